"""jax_bridge.parallel: the MoE layer under expert parallelism (a 4-device "ep" mesh of CPU devices, in a
child process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``) against the unsharded
``jax_bridge.moe_layer`` on the same parameters and tokens, reference backend.

Each child compiles the EP step and the unsharded step once (jit of grad) and runs them on three routings of
the same shapes (balanced, skewed, one device taking every assignment while the three others get none)."""

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
reference = step(lambda p, x: jax_bridge.moe_layer(p, x, fused=False, **OPTIONS))  # EP runs the op-by-op block
ep = step(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, **OPTIONS))
ep_forward = jax.jit(lambda p, x: parallel.ep_moe_layer(p, x, mesh=mesh, **OPTIONS))


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
    assert run_on_four_cpu_devices(SCRIPT, precision, str(top_k)) == "ok"


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
# Inside the user's own shard_map: the local weights must be this device's E/ep experts.
body = lambda p, x: parallel.moe_layer_ep(p, x, top_k=2)
replicated = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("ep")), out_specs=(P("ep"), P())))
xs = jax.device_put(x, NamedSharding(mesh, P("ep")))
raises(lambda: replicated(eight, xs), "params['w_gate_up']: expected this device's 2 = 8/4 experts on axis 0")
y, aux = parallel.ep_moe_layer(eight, x, mesh=mesh, top_k=2, precision="bf16")  # eager, unsharded inputs
assert y.shape == x.shape and y.sharding.spec[0] == "ep" and aux.shape == ()
# The seam: another expert block with local_expert_block's signature runs in its place.
calls = []


def block(*args, **kwargs):
    calls.append(args[0].shape)  # the (ep * T, D) receive buffer
    return parallel.local_expert_block(*args, **kwargs)


y2, _ = parallel.ep_moe_layer(eight, x, mesh=mesh, top_k=2, precision="bf16", expert_block=block)
assert calls == [(8, 256)] and bool((y2 == y).all())
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
    with the padded all_to_all and with the unsharded layer to rounding. Not bit for bit, as on the CPU: XLA
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

    results = {
        impl: step(
            lambda p, x, impl=impl: parallel.ep_moe_layer(
                p, x, mesh=mesh, top_k=k, precision=precision, all_to_all=impl
            )
        )(jax.device_put(params, parallel.param_shardings(mesh)), jax.device_put(x, NamedSharding(mesh, P("ep"))))
        for impl in parallel.ALL_TO_ALL_IMPLS
    }
    unsharded = step(lambda p, x: jax_bridge.moe_layer(p, x, top_k=k, precision=precision, fused=False))(params, x)
    floor = {"bf16": 40.0, "fp8": 25.0}[precision]
    ragged = jax.tree_util.tree_leaves(results["ragged_all_to_all"])
    for other in (jax.tree_util.tree_leaves(results["all_to_all"]), jax.tree_util.tree_leaves(unsharded)):
        for a, b in zip(ragged, other):
            a, b = torch.from_numpy(np.array(a, np.float32)), torch.from_numpy(np.array(b, np.float32))
            assert a.shape == b.shape
            if b.numel() == 1:  # the aux loss
                np.testing.assert_allclose(a.item(), b.item(), rtol=1e-5)
            else:
                assert sqnr_db(b, a) > floor, (tuple(a.shape), sqnr_db(b, a))


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
