"""jax_bridge.parallel: the MoE layer under expert parallelism (a 4-device "ep" mesh of CPU devices, in a
child process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``) against the unsharded
``jax_bridge.moe_layer`` on the same parameters and tokens, reference backend.

Each child compiles the EP step and the unsharded step once (jit of grad) and runs them on three routings of
the same shapes (balanced, skewed, one device taking every assignment while the three others get none): the
op-by-op block (``fused=False``) against ``moe_layer(fused=False)``, and the fused block (the default) against
``moe_layer(fused=True)`` on x in bf16, with FP8 dispatch (fp8's default) against bf16 dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jax_bridge
from jax_bridge import parallel

PRECISION, TOP_K = sys.argv[1], int(sys.argv[2])
D, F, E, T, EP = 128, 128, 8, 64, 4  # 16 tokens and 2 experts per device
mesh = jax.make_mesh((EP,), ("ep",))
assert parallel.all_to_all_impl(mesh) == "all_to_all"  # XLA:CPU has no ragged all-to-all: the padded fallback


def problem(routing):
    keys = jax.random.split(jax.random.key(7), 3)
    params = jax_bridge.init_moe_params(keys[0], D, F, E)
    x = jax.random.normal(keys[1], (T, D), jnp.float32)
    dy = jax.random.normal(keys[2], (T, D), jnp.float32)
    if routing != "balanced":  # feature 0 large on every token; the router's column 0 picks the experts
        x = x.at[:, 0].set(4.0 + jnp.abs(x[:, 0]))
        column = {"skewed": [0.5, 0.4, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4], "one_device": [-3, -3, -3, -3, 3, 3, -3, -3]}
        params["router"] = params["router"].at[:, 0].set(jnp.asarray(column[routing], jnp.float32))
    return params, x, dy


def step(layer):
    def loss(params, x, dy):
        y, aux = layer(params, x)
        return jnp.vdot(y, dy) + 0.1 * aux, (y, aux)

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


OPTIONS = dict(top_k=TOP_K, precision=PRECISION, backend="reference")
reference = step(lambda p, x: jax_bridge.moe_layer(p, x, fused=False, **OPTIONS))
ep = step(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, fused=False, **OPTIONS))  # the op-by-op block
ep_forward = jax.jit(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, fused=False, **OPTIONS))


def check(name, got, want, exact, atol=0.0):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if exact:
        assert np.array_equal(got, want), (name, int((got != want).sum()), float(np.abs(got - want).max()))
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


for routing in ("balanced", "skewed", "one_device"):
    params, x, dy = problem(routing)
    counts = np.asarray(jax_bridge.route(x, params["router"], TOP_K).counts).reshape(EP, E // EP).sum(1)
    if routing == "one_device":  # experts 4 and 5 (device 2) on every token; with top_k = 3, one more elsewhere
        assert counts[2] == 2 * T and (TOP_K == 3 or counts.tolist() == [0, 0, 2 * T, 0]), counts
    if routing == "skewed":
        assert counts[0] > T * TOP_K / 2 and counts.min() < T * TOP_K / 8, counts
    (g_ref, gx_ref), (y_ref, aux_ref) = reference(params, x, dy)
    sharded = jax.device_put(params, parallel.param_shardings(mesh))
    xs = jax.device_put(x, NamedSharding(mesh, P("ep")))
    (g, gx), (y, aux) = ep(sharded, xs, dy)
    assert y.sharding.spec[0] == "ep" and g["w_gate_up"].sharding.spec[0] == "ep"
    tag = f"{routing}"
    # top_k <= 2: every sum over a token's slots has at most two terms, so the same bits (module docstring);
    # top_k = 3: a sum split across devices is associated differently: 1 bf16 ulp of y and dx at most.
    exact = TOP_K <= 2
    y_scale = float(np.abs(np.asarray(y_ref)).max())
    check(f"{tag} y", y, y_ref, exact, atol=2**-7 * y_scale)
    check(f"{tag} y forward only", ep_forward(sharded, xs)[0], y_ref, exact, atol=2**-7 * y_scale)
    check(f"{tag} dx", gx, gx_ref, exact, atol=2**-7 * float(np.abs(np.asarray(gx_ref)).max()))
    # The experts see the same rows in the same order: their weight gradients are the same bits.
    for key in ("w_gate_up", "w_down"):
        check(f"{tag} d{key}", g[key], g_ref[key], exact=True)
    # The router's gradient is a sum over the devices (shard_map psums it): fp32 rounding.
    scale = float(np.abs(np.asarray(g_ref["router"])).max())
    check(f"{tag} drouter", g["router"], g_ref["router"], exact=False, atol=1e-5 * scale)
    # Global counts and probabilities (psum): the unsharded aux loss, to fp32 rounding of the sums.
    np.testing.assert_allclose(float(aux), float(aux_ref), rtol=1e-6, err_msg=tag)
    assert float(aux) > (2.5 if routing == "one_device" else 1.0), (routing, float(aux))
assert ep._cache_size() == 1  # new routings, the same executable
print("ok")
"""


def run_on_four_cpu_devices(script: str, *args: str) -> str:
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.parametrize("precision, top_k", [("bf16", 2), ("fp8", 2), ("bf16", 3)])
def test_ep_layer_matches_unsharded_layer(precision, top_k):
    """``fused=False``: the op-by-op ``local_expert_block`` against ``moe_layer(fused=False)``."""
    assert run_on_four_cpu_devices(SCRIPT, precision, str(top_k)) == "ok"


FUSED_SCRIPT = """
import re, sys
import jax, jax.numpy as jnp, numpy as np, torch
from jax.sharding import NamedSharding, PartitionSpec as P
import jax_bridge
from fp8moe.testing import sqnr_db
from jax_bridge import parallel

PRECISION, TOP_K = sys.argv[1], int(sys.argv[2])
D, F, E, T, EP = 128, 128, 8, 64, 4  # 16 tokens and 2 experts per device
mesh = jax.make_mesh((EP,), ("ep",))
BF16, F32 = jnp.bfloat16, jnp.float32


def problem(routing):  # x and dy in bf16, the dispatch dtype (an fp32 x would be quantized from fp32 unsharded)
    keys = jax.random.split(jax.random.key(7), 3)
    params = jax_bridge.init_moe_params(keys[0], D, F, E)
    x = jax.random.normal(keys[1], (T, D), F32)
    dy = jax.random.normal(keys[2], (T, D), F32)
    if routing != "balanced":  # feature 0 large on every token; the router's column 0 picks the experts
        x = x.at[:, 0].set(4.0 + jnp.abs(x[:, 0]))
        column = {"skewed": [0.5, 0.4, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4], "one_device": [-3, -3, -3, -3, 3, 3, -3, -3]}
        params["router"] = params["router"].at[:, 0].set(jnp.asarray(column[routing], F32))
    return params, x.astype(BF16), dy.astype(BF16)


def step(layer):
    def loss(params, x, dy):
        y, aux = layer(params, x)
        return jnp.vdot(y.astype(F32), dy.astype(F32)) + 0.1 * aux, (y, aux)

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


OPTIONS = dict(top_k=TOP_K, precision=PRECISION, backend="reference")
reference = step(lambda p, x: jax_bridge.moe_layer(p, x, **OPTIONS))  # fused=True, the default
ep = step(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, fp8_dispatch=False, **OPTIONS))
ep_forward = jax.jit(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, fp8_dispatch=False, **OPTIONS))
if PRECISION == "fp8":
    ep8 = step(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, **OPTIONS))  # FP8 dispatch: the default
    ep8_forward = jax.jit(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, **OPTIONS))
    bf16_gemms = step(lambda p, x: jax_bridge.moe_layer(p, x, top_k=TOP_K, precision="bf16"))


def check(name, got, want, exact, atol=0.0):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if exact:
        assert np.array_equal(got, want), (name, int((got != want).sum()), float(np.abs(got - want).max()))
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


def as_torch(a):
    return torch.from_numpy(np.asarray(a, np.float64))


for routing in ("balanced", "skewed", "one_device"):
    params, x, dy = problem(routing)
    (g_ref, gx_ref), (y_ref, aux_ref) = reference(params, x, dy)
    sharded = jax.device_put(params, parallel.param_shardings(mesh))
    xs = jax.device_put(x, NamedSharding(mesh, P("ep")))
    (g, gx), (y, aux) = ep(sharded, xs, dy)
    assert y.dtype == BF16 and gx.dtype == BF16 and y.sharding.spec[0] == "ep"
    # top_k <= 2: a token's fp32 sums (y over its slots, dx over its slots) have at most two non-zero terms,
    # one rounding in both layers, so the same bits; top_k = 3: a sum split over devices is associated
    # differently in fp32 before the rounding to bf16: within 1 bf16 ulp of the largest value.
    exact = TOP_K <= 2
    y_tol, dx_tol = (2**-7 * float(np.abs(np.asarray(a, np.float32)).max()) for a in (y_ref, gx_ref))
    check(f"{routing} y", y, y_ref, exact, y_tol)
    check(f"{routing} y forward only", ep_forward(sharded, xs)[0], y_ref, exact, y_tol)
    check(f"{routing} dx", gx, gx_ref, exact, dx_tol)
    for key in ("w_gate_up", "w_down"):  # each expert: the same rows in the same order, the same padded tiles
        check(f"{routing} d{key}", g[key], g_ref[key], exact=True)
    scale = float(np.abs(np.asarray(g_ref["router"])).max())  # a sum over the devices: fp32 rounding
    check(f"{routing} drouter", g["router"], g_ref["router"], exact=False, atol=1e-5 * scale)
    np.testing.assert_allclose(float(aux), float(aux_ref), rtol=1e-6, err_msg=routing)
    if PRECISION != "fp8":
        continue
    # FP8 dispatch against bf16 dispatch: the forward bit for bit (the 1x128 tiles are per token), every
    # gradient too except w_gate_up's, whose 128x1 token tiles are quantized from the received rows
    # dequantized (one more e4m3 rounding of x: ~28 dB between the two, as in torch's test).
    (g8, gx8), (y8, aux8) = ep8(sharded, xs, dy)
    check(f"{routing} FP8 dispatch y", y8, y, exact=True)
    check(f"{routing} FP8 dispatch y forward only", ep8_forward(sharded, xs)[0], y, exact=True)
    check(f"{routing} FP8 dispatch dx", gx8, gx, exact=True)
    for key in ("w_down", "router"):
        check(f"{routing} FP8 dispatch d{key}", g8[key], g[key], exact=True)
    assert float(aux8) == float(aux)
    extra = sqnr_db(as_torch(g["w_gate_up"]), as_torch(g8["w_gate_up"]))
    (g16, _), _ = bf16_gemms(params, x, dy)  # the same layer with bf16 GEMMs: the fidelity reference
    exact16 = as_torch(g16["w_gate_up"])
    fidelity = (sqnr_db(exact16, as_torch(g["w_gate_up"])), sqnr_db(exact16, as_torch(g8["w_gate_up"])))
    assert 24 <= extra < float("inf"), (routing, extra)
    assert fidelity[1] >= fidelity[0] - 1.5, (routing, fidelity)
    print(f"{routing} dw_gate_up: {extra:.1f} dB vs bf16 dispatch, fidelity {fidelity[0]:.1f} -> {fidelity[1]:.1f} dB")

assert ep._cache_size() == 1  # new routings, the same executable
if PRECISION == "fp8":  # what travels: FP8 dispatch sends uint8 codes + fp32 scales, no bf16 rows
    def exchanged(layer):
        text = jax.jit(layer).lower(sharded, xs).as_text()
        return re.findall(r"all_to_all.*-> tensor<4x16x(\\d+x\\w+)>", text)

    wire = exchanged(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, **OPTIONS))
    assert "128xui8" in wire and "1xf32" in wire and "128xbf16" not in wire, wire
    assert "128xbf16" in exchanged(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, fp8_dispatch=False, **OPTIONS))
    # The ragged all-to-all (GPUs) does not compile on XLA:CPU, but the step traces and lowers with it: the
    # codes travel as uint8 there too, and the wire's backward (the reverse ragged exchange) is in the program.
    ragged = lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, all_to_all="ragged_all_to_all", **OPTIONS)
    loss = lambda p, x: jnp.sum(ragged(p, x)[0].astype(F32) ** 2)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(sharded, xs).as_text()
    assert re.search(r"ragged_all_to_all.*-> tensor<64x128xui8>", text), "no uint8 ragged all-to-all"
    assert len(re.findall(r"ragged_all_to_all.*-> tensor<64x128xf32>", text)) == 2  # partials, dx
    assert re.search(r"ragged_all_to_all.*-> tensor<64x128xbf16>", text)  # dy: bf16 values (x is bf16)
print("ok")
"""


@pytest.mark.parametrize("precision, top_k", [("bf16", 2), ("fp8", 2), ("bf16", 3)])
def test_fused_ep_layer_matches_the_unsharded_fused_layer_and_fp8_dispatch(precision, top_k):
    """``ep_moe_layer(fused=True)`` (the default) against ``moe_layer(fused=True)`` on x in bf16; with fp8,
    FP8 dispatch (the default) against bf16 dispatch."""
    out = run_on_four_cpu_devices(FUSED_SCRIPT, precision, str(top_k))
    assert out.splitlines()[-1] == "ok", out
    print(out)


ERRORS_SCRIPT = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import jax_bridge
from jax_bridge import parallel

mesh = jax.make_mesh((4,), ("ep",))
x = jnp.zeros((8, 256))


def raises(fn, message):
    try:
        fn()
    except ValueError as error:
        assert message in str(error), (message, str(error))
    else:
        raise AssertionError(f"no ValueError: {message}")


six = jax_bridge.init_moe_params(jax.random.key(0), 256, 128, 6)
raises(lambda: parallel.ep_moe_layer(six, x, mesh=mesh, top_k=2),
       "num_experts: expected a multiple of the size 4 of mesh axis 'ep', got 6")
eight = jax_bridge.init_moe_params(jax.random.key(0), 256, 128, 8)
raises(lambda: parallel.ep_moe_layer(eight, x, mesh=mesh, top_k=2, axis="expert"),
       "axis: 'expert' is not an axis of the mesh (axes ('ep',))")
raises(lambda: parallel.ep_moe_layer(eight, x[:6], mesh=mesh, top_k=2),
       "x: expected (N, ..., D) with N a multiple of the size 4 of mesh axis 'ep', got shape (6, 256)")
raises(lambda: parallel.ep_moe_layer(eight, x, mesh=mesh, top_k=2, all_to_all="nccl"), "all_to_all: expected")
raises(lambda: parallel.ep_moe_layer(eight, x, mesh=mesh, top_k=2, precision="bf16", fp8_dispatch=True),
       "fp8_dispatch: FP8 dispatch needs precision='fp8', got 'bf16'")
raises(lambda: parallel.ep_moe_layer(eight, x, mesh=mesh, top_k=2, fused=False, fp8_dispatch=True),
       "fp8_dispatch: FP8 dispatch needs the fused expert block (fused=True)")
# Inside the user's own shard_map: the local weights must be this device's E/ep experts.
body = lambda p, x: parallel.moe_layer_ep(p, x, top_k=2)
replicated = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("ep")), out_specs=(P("ep"), P())))
xs = jax.device_put(x, NamedSharding(mesh, P("ep")))
raises(lambda: replicated(eight, xs), "params['w_gate_up']: expected this device's 2 = 8/4 experts on axis 0")
y, aux = parallel.ep_moe_layer(eight, x, mesh=mesh, top_k=2, precision="bf16", fused=False)  # eager, unsharded
assert y.shape == x.shape and y.sharding.spec[0] == "ep" and aux.shape == ()
# The seam: another expert block with local_expert_block's signature runs in its place.
calls = []


def block(*args, **kwargs):
    calls.append(args[0].shape)  # the (ep * T, D) receive buffer
    return parallel.local_expert_block(*args, **kwargs)


xr = jax.random.normal(jax.random.key(1), (8, 256))
y, _ = parallel.ep_moe_layer(eight, xr, mesh=mesh, top_k=2, precision="bf16", fused=False)
y2, _ = parallel.ep_moe_layer(eight, xr, mesh=mesh, top_k=2, precision="bf16", expert_block=block)
# another block gets the fused block's treatment: rows in fp32, the fp32 sum of its partials rounded once to
# x's dtype (fp32 here), where the op-by-op layer rounds y to bf16
assert calls == [(8, 256)] and bool((y2.astype(jnp.bfloat16).astype(y.dtype) == y).all()) and bool((y2 != y).any())
# fused=True (the default) runs the fused block there: the bf16 rows reach it in fp32, its fp32 partials return
calls.clear()
fused_block = lambda *args, **kwargs: calls.append(args[0].dtype) or parallel.fused_expert_block(*args, **kwargs)
y3, _ = parallel.ep_moe_layer(eight, x, mesh=mesh, top_k=2, precision="bf16", expert_block=fused_block)
y4, _ = parallel.ep_moe_layer(eight, x, mesh=mesh, top_k=2, precision="bf16")
assert calls == [jnp.float32] and bool((y3 == y4).all()) and y4.dtype == x.dtype
print("ok")
"""


def test_bad_configurations_raise_value_errors_naming_them_and_the_expert_block_seam():
    assert run_on_four_cpu_devices(ERRORS_SCRIPT) == "ok"


# --- GPU: the ragged all-to-all -----------------------------------------------------------------------------


def _gpus() -> list:
    try:
        import jax

        return jax.devices("gpu")
    except Exception:  # noqa: BLE001 - no jax, or no GPU backend
        return []


@pytest.mark.gpu
@pytest.mark.skipif(not _gpus(), reason="needs a GPU visible to JAX and torch")
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_gpu_ragged_all_to_all_matches_the_padded_one_and_the_unsharded_layer(precision):
    """On the machine's GPUs (one is enough to compile and run it): "auto" picks ragged_all_to_all, and it agrees
    with the padded all_to_all and with the unsharded layer to rounding, op by op and fused (with FP8 dispatch
    in fp8; not yet run on a GPU). Not bit for bit, as on the CPU: XLA
    autotunes each program's GEMMs (the fp32 router's among them) on a GPU, so separately compiled programs
    may differ in the last bits of the combine weights, which moves bf16 roundings and, in fp8, FP8 roundings
    downstream (seen on an H200, one GPU, jax 0.11.2: 46-56 dB in bf16, 29-30 dB in fp8, or the same bits,
    from one process to the next; each program is deterministic)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_bridge
    from fp8moe.testing import sqnr_db
    from jax_bridge import parallel

    devices = _gpus()
    n = len(devices)
    mesh = jax.make_mesh((n,), ("ep",), devices=devices)
    assert parallel.all_to_all_impl(mesh) == "ragged_all_to_all"
    d, f, e, t, k = 256, 256, 4 * n, 128 * n, 2
    keys = jax.random.split(jax.random.key(3), 3)
    params = jax_bridge.init_moe_params(keys[0], d, f, e)
    x = jax.random.normal(keys[1], (t, d), jnp.float32)
    dy = jax.random.normal(keys[2], (t, d), jnp.float32)

    def step(layer):
        def loss(p, x):
            y, aux = layer(p, x)
            return jnp.vdot(y, dy) + 0.1 * aux, (y, aux)

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

    for fused in (False, True):  # the op-by-op block and the fused one (FP8 dispatch with fp8)
        # fused fp8: FP8 dispatch's second quantization of x for dw_gate_up is ~28 dB by itself (CPU test)
        floor = {"bf16": 40.0, "fp8": 22.0 if fused else 25.0}[precision]
        results = {
            impl: step(
                lambda p, x, impl=impl: parallel.ep_moe_layer(
                    p, x, mesh=mesh, top_k=k, precision=precision, all_to_all=impl, fused=fused
                )
            )(jax.device_put(params, parallel.param_shardings(mesh)), jax.device_put(x, NamedSharding(mesh, P("ep"))))
            for impl in parallel.ALL_TO_ALL_IMPLS
        }
        unsharded = step(lambda p, x: jax_bridge.moe_layer(p, x, top_k=k, precision=precision, fused=fused))(params, x)
        ragged = jax.tree_util.tree_leaves(results["ragged_all_to_all"])
        for other in (jax.tree_util.tree_leaves(results["all_to_all"]), jax.tree_util.tree_leaves(unsharded)):
            for a, b in zip(ragged, other):
                a, b = torch.from_numpy(np.array(a, np.float32)), torch.from_numpy(np.array(b, np.float32))
                assert a.shape == b.shape
                if b.numel() == 1:  # the aux loss
                    np.testing.assert_allclose(a.item(), b.item(), rtol=1e-5)
                else:
                    assert sqnr_db(b, a) > floor, (fused, tuple(a.shape), sqnr_db(b, a))


def test_each_token_travels_once_per_destination_device():
    import numpy as np

    from jax_bridge import parallel

    # 4 devices of 2 experts; token 0 -> device 2 (twice), token 1 -> devices 0 and 2, token 2 -> device 0
    # (twice), token 3 -> devices 1 and 3: 6 rows for 8 assignments.
    experts = np.array([[4, 5], [0, 5], [1, 0], [3, 7]], np.int32)
    plan = parallel.dispatch_plan(experts, 4, 2)
    np.testing.assert_array_equal(np.asarray(plan.send_sizes), [2, 1, 2, 1])
    sends = np.asarray(plan.sends)
    np.testing.assert_array_equal(sends, [[0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]])
    perm = np.asarray(plan.perm)  # each device's tokens first, in token order
    assert [perm[d, : sends[d].sum()].tolist() for d in range(4)] == [[1, 2], [3], [0, 1], [3]]
    assert sorted(perm[0].tolist()) == [0, 1, 2, 3]
