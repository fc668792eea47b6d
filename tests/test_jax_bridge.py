"""jax_bridge.grouped_mm: same bits as fp8moe.grouped_mm, the recipe in float64 JAX, accuracy against bf16
ragged_dot, JAX transformations (jit, grad, scan, checkpoint), traced offsets, bad input, zero copy.

CPU tests pin JAX to the CPU (the torch reference backend); GPU tests skip without a CUDA device seen by
both JAX and torch."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.experimental.buffer_callback import buffer_callback

import fp8moe
import jax_bridge
from fp8moe.testing import random_offsets, sqnr_db
from jax_bridge._callbacks import as_torch, on_xla_stream

CPU = jax.devices("cpu")[0]
ROUTINGS = {
    "ragged": dict(),
    "empty_experts_and_tail": dict(empty_groups=2, tail_rows=37),
}


def _gpu_device() -> jax.Device | None:
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    return devices[0] if devices and torch.cuda.is_available() else None


GPU = _gpu_device()
needs_gpu = pytest.mark.skipif(GPU is None, reason="needs a CUDA device visible to both JAX and torch")


@pytest.fixture(autouse=True)
def on_cpu_unless_gpu(request):
    """Every test runs with JAX's default device on the CPU, except those marked gpu."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(CPU):
        yield


def make_problem(
    seed, m=300, n=256, k=256, e=5, x_dtype=jnp.bfloat16, w_dtype=jnp.float32, dy_dtype=jnp.bfloat16, **routing
):
    """Random x (M, K), w (E, N, K), dy (M, N) and int32 offsets, as JAX arrays on the default device."""
    gen = torch.Generator().manual_seed(seed)
    offsets = random_offsets(m, e, generator=gen, **routing)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(e, n, k, generator=gen) / math.sqrt(k)
    dy = torch.randn(m, n, generator=gen)
    return (
        jnp.asarray(x.numpy(), x_dtype),
        jnp.asarray(w.numpy(), w_dtype),
        jnp.asarray(offsets.numpy()),
        jnp.asarray(dy.numpy(), dy_dtype),
    )


def to_torch(a: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(a).clone()


def bridge_vjp(x, w, offsets, dy, **kwargs):
    """(y, dx, dw) through the bridge, jitted."""

    @jax.jit
    def run(x, w, offsets, dy):
        y, pullback = jax.vjp(lambda x, w: jax_bridge.grouped_mm(x, w, offsets, **kwargs), x, w)
        return (y, *pullback(dy))

    return run(x, w, offsets, dy)


def torch_vjp(x, w, offsets, dy, backend="reference", out_dtype=torch.bfloat16):
    """(y, dx, dw) through fp8moe.grouped_mm on the same values (torch tensors on the arrays' device)."""
    xt, wt = to_torch(x).requires_grad_(), to_torch(w).requires_grad_()
    y = fp8moe.grouped_mm(xt, wt, to_torch(offsets), backend=backend, out_dtype=out_dtype)
    y.backward(to_torch(dy))
    return y.detach(), xt.grad, wt.grad


def assert_bits_equal(got: jax.Array, want: torch.Tensor) -> None:
    """Same dtype, shape and bit patterns (NaN included)."""
    got_t = torch.from_dlpack(got)
    assert got_t.dtype == want.dtype and got_t.shape == want.shape
    bits = {2: torch.int16, 4: torch.int32}[want.element_size()]
    differ = (got_t.view(bits) != want.view(bits)).sum().item()
    assert differ == 0, f"{differ} of {want.numel()} elements differ"


DTYPES = {
    "x_bf16_w_fp32_out_bf16": (jnp.bfloat16, jnp.float32, jnp.bfloat16, torch.bfloat16),
    "x_fp32_w_bf16_out_fp32": (jnp.float32, jnp.bfloat16, jnp.float32, torch.float32),
}


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_bit_identical_to_torch_op(dtypes, routing):
    x_dtype, w_dtype, out_dtype, torch_out = dtypes
    x, w, offsets, dy = make_problem(0, x_dtype=x_dtype, w_dtype=w_dtype, dy_dtype=out_dtype, **routing)
    y, dx, dw = bridge_vjp(x, w, offsets, dy, backend="reference", out_dtype=out_dtype)
    chex.assert_shape([y, dx, dw], [(300, 256), (300, 256), (5, 256, 256)])
    chex.assert_type([y, dx, dw], [out_dtype, x_dtype, w_dtype])
    y_t, dx_t, dw_t = torch_vjp(x, w, offsets, dy, out_dtype=torch_out)
    assert_bits_equal(y, y_t)
    assert_bits_equal(dx, dx_t)
    assert_bits_equal(dw, dw_t)
    # Eagerly (no jit), and with the backend left to "auto" (the reference backend on a CPU): same bits.
    assert_bits_equal(jax_bridge.grouped_mm(x, w, offsets, out_dtype=out_dtype), y_t)


def test_only_the_needed_gradients_run_and_match():
    """Differentiating in w alone, or x alone, runs only wgrad or dgrad; the results are the torch op's."""
    x, w, offsets, dy = make_problem(1, **ROUTINGS["empty_experts_and_tail"])
    _, dx_t, dw_t = torch_vjp(x, w, offsets, dy)

    def loss(x, w):
        return jnp.vdot(
            jax_bridge.grouped_mm(x, w, offsets, backend="reference").astype(jnp.float32), dy.astype(jnp.float32)
        )

    assert_bits_equal(jax.jit(jax.grad(loss, argnums=1))(x, w), dw_t)
    assert_bits_equal(jax.jit(jax.grad(loss, argnums=0))(x, w), dx_t)
    # The backward is built from symbolic zeros: no dx for an undifferentiated x, and no residual weight.
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=1))(x, w))
    assert "need_dx=False, need_dw=True" in jaxpr and "with_dx=False, with_dw=True" in jaxpr
    # y unused by the loss: its cotangent is a symbolic zero and the bridge contributes nothing.
    g = jax.grad(lambda x, w: jax_bridge.grouped_mm(x, w, offsets)[:0].sum() + x.astype(jnp.float32).sum())(x, w)
    np.testing.assert_array_equal(np.asarray(g, np.float32), 1.0)


# --- an independent float64 implementation of the recipe, in JAX -----------------------------------------


def _round_e4m3(v: jax.Array) -> jax.Array:
    """float64 -> nearest e4m3fn value (ties to even, subnormal step 2**-9), saturated at +-448."""
    mag = jnp.abs(v)
    exponent = jnp.floor(jnp.log2(jnp.where(mag > 0, mag, 1.0)))
    quantum = jnp.exp2(jnp.maximum(exponent, -6.0) - 3.0)
    return jnp.clip(jnp.round(v / quantum) * quantum, -448.0, 448.0)


def _fake_quant(tiles: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Quantize-dequantize float32 ``tiles`` (one tile spans ``axes``), scale amax/448 in fp32; float64 out."""
    t32 = tiles.astype(jnp.float32)
    t32 = jnp.where(jnp.abs(t32) < 2.0**-126, jnp.float32(0), t32)  # the recipe's rule for tiny values
    amax = jnp.max(jnp.abs(t32), axis=axes, keepdims=True)
    scale = amax / jnp.float32(448.0)
    zero_tile = scale < 2.0**-126
    scale = jnp.where(zero_tile, jnp.float32(0), scale)
    q = _round_e4m3((t32 / jnp.where(zero_tile, jnp.float32(1.0), scale)).astype(jnp.float64))
    return jnp.where(zero_tile, 0.0, q) * scale.astype(jnp.float64)


def _rows(a):  # 1x128 tiles along the last axis
    return _fake_quant(a.reshape(*a.shape[:-1], -1, 128), (-1,)).reshape(a.shape)


def _blocks(w):  # 128x128 tiles over the last two axes of (E, N, K)
    e, n, k = w.shape
    return _fake_quant(w.reshape(e, n // 128, 128, k // 128, 128), (2, 4)).reshape(w.shape)


def _token_tiles(a):  # 128x1 tiles along the rows of one group, zero-padded to 128 rows
    pad = -a.shape[0] % 128
    padded = jnp.pad(a.astype(jnp.float32), ((0, pad), (0, 0)))
    return _fake_quant(padded.reshape(-1, 128, a.shape[1]), (1,)).reshape(padded.shape)[: a.shape[0]]


@functools.partial(jax.jit, static_argnums=2)
def recipe_float64(x, w, offsets, dy):
    """y, dx, dw of the recipe in float64 (call under x64); x, w, dy float32, offsets a tuple of ints."""
    xd, wd, dyd = _rows(x), _blocks(w), _rows(dy)
    y, dx = jnp.zeros((x.shape[0], w.shape[1])), jnp.zeros(x.shape)
    dw = jnp.zeros(w.shape)
    bounds = zip([0, *offsets[:-1]], offsets)
    for g, (lo, hi) in enumerate(bounds):
        if hi > lo:
            y = y.at[lo:hi].set(xd[lo:hi] @ wd[g].T)
            dx = dx.at[lo:hi].set(dyd[lo:hi] @ wd[g])
            dw = dw.at[g].set(_token_tiles(dy[lo:hi]).T @ _token_tiles(x[lo:hi]))
    return y, dx, dw


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_matches_float64_recipe_in_jax(routing):
    x, w, offsets, dy = make_problem(2, x_dtype=jnp.float32, dy_dtype=jnp.float32, **routing)
    got = bridge_vjp(x, w, offsets, dy, backend="reference", out_dtype=jnp.float32)
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
    with enable_x64(True):
        want = [np.asarray(a) for a in recipe_float64(x, w, tuple(int(v) for v in offsets), dy)]
        assert all(a.dtype == np.float64 for a in want)
    assert jnp.zeros(()).dtype != jnp.float64, "x64 leaked out of the test"
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert np.abs(r).max() > 0
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=1e-5, atol=1e-5 * np.abs(r).max(), err_msg=name)


def test_accuracy_against_bf16_ragged_dot():
    x, w, offsets, dy = make_problem(3, m=640, k=512, w_dtype=jnp.bfloat16, **ROUTINGS["empty_experts_and_tail"])
    sizes = jnp.diff(offsets, prepend=0)

    def unquantized(x, w):
        return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), sizes, preferred_element_type=jnp.float32)

    y_ref, pullback = jax.vjp(unquantized, x, w)
    refs = (y_ref, *pullback(dy.astype(jnp.float32)))
    got = bridge_vjp(x, w, offsets, dy, backend="reference")
    for name, g, r, floor in zip(("y", "dx", "dw"), got, refs, (28, 26, 26)):
        db = sqnr_db(to_torch(r.astype(jnp.float32)), to_torch(g.astype(jnp.float32)))
        assert floor <= db < 60, f"{name}: SQNR {db:.1f} dB"  # < 60: it is quantized, not a copy


# --- transformations ----------------------------------------------------------------------------------


def test_jit_grad_value_and_grad_and_eager_agree():
    x, w, offsets, dy = make_problem(4)

    def loss(x, w):
        y = jax_bridge.grouped_mm(x, w, offsets)
        return jnp.vdot(y.astype(jnp.float32), dy.astype(jnp.float32))

    value, (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    eager_gx, eager_gw = jax.grad(loss, argnums=(0, 1))(x, w)
    _, dx, dw = bridge_vjp(x, w, offsets, dy)
    chex.assert_trees_all_equal((gx, gw), (eager_gx, eager_gw), (dx, dw))
    chex.assert_shape(value, ())
    assert math.isfinite(float(value)) and float(value) != 0


def _stack(seed, layers, m, d, e):
    gen = torch.Generator().manual_seed(seed)
    w = jnp.asarray((torch.randn(layers, e, d, d, generator=gen) / math.sqrt(d)).numpy())
    x = jnp.asarray(torch.randn(m, d, generator=gen).numpy(), jnp.bfloat16)
    offsets = jnp.asarray(random_offsets(m, e, generator=gen, empty_groups=1).numpy())
    return x, w, offsets


def test_scan_over_layers_and_checkpoint_match_unrolled_loop():
    x, ws, offsets = _stack(5, layers=2, m=200, d=256, e=3)

    def layer(h, w):
        return jax_bridge.grouped_mm(h, w, offsets), None

    def loop_loss(x, ws):
        for i in range(ws.shape[0]):
            x, _ = layer(x, ws[i])
        return jnp.sum(x.astype(jnp.float32) ** 2)

    def scan_loss(x, ws, body=layer):
        return jnp.sum(jax.lax.scan(body, x, ws)[0].astype(jnp.float32) ** 2)

    want = jax.jit(jax.value_and_grad(loop_loss, argnums=(0, 1)))(x, ws)
    for name, fn in {
        "scan": scan_loss,
        "scan of checkpointed layers": lambda x, ws: scan_loss(x, ws, jax.checkpoint(layer)),
        "checkpointed loop": jax.checkpoint(loop_loss),
    }.items():
        got = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(x, ws)
        # The callbacks give the same bits; only XLA's own f32 sum in the loss may be fused differently.
        np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6, err_msg=name)
        chex.assert_trees_all_equal(got[1], want[1], custom_message=name)
    assert float(jnp.abs(want[1][1]).max()) > 0


def test_offsets_from_a_router_inside_jit_without_recompilation():
    """offsets computed on device inside the jitted step; new routings reuse the one compilation."""
    m, d, e = 256, 256, 4
    x, w, _, dy = make_problem(6, m=m, n=d, k=d, e=e)
    traces = []

    @jax.jit
    def step(x, w, router):
        traces.append(None)
        expert = jnp.argmax(x.astype(jnp.float32) @ router.T, axis=-1)
        order = jnp.argsort(expert, stable=True)
        offsets = jnp.cumsum(jnp.zeros(e, jnp.int32).at[expert].add(1)).astype(jnp.int32)
        y, pullback = jax.vjp(lambda xs, w: jax_bridge.grouped_mm(xs, w, offsets), x[order], w)
        return offsets, order, (y, *pullback(dy))

    seen = set()
    for seed in range(3):
        router = jax.random.normal(jax.random.key(seed), (e, d))
        offsets, order, got = step(x, w, router)
        seen.add(tuple(np.asarray(offsets)))
        want = torch_vjp(x[order], w, offsets, dy)
        for g, r in zip(got, want):
            assert_bits_equal(g, r)
    assert len(seen) == 3, "the routings should differ"
    assert len(traces) == 1 and step._cache_size() == 1


# --- bad input, backend choice ------------------------------------------------------------------------

GOOD = dict(x=((300, 256), jnp.float32), w=((3, 128, 256), jnp.float32), offsets=((3,), jnp.int32))
BAD = {
    # name: (error, message regex, overrides as (shape, dtype), same message as the torch op for the shape rules)
    "x_rank": (ValueError, "x: expected a 2-D array", dict(x=((2, 150, 256), jnp.float32)), False),
    "x_dtype": (
        TypeError,
        r"x: expected dtype in \('bfloat16', 'float32'\), got float16",
        dict(x=((300, 256), jnp.float16)),
        False,
    ),
    "x_int": (TypeError, "x: expected dtype in", dict(x=((300, 256), jnp.int32)), False),
    "x_k_not_multiple": (
        ValueError,
        r"x: K = x.shape\[1\] must be a multiple of 128",
        dict(x=((300, 200), jnp.float32), w=((3, 128, 200), jnp.float32)),
        True,
    ),
    "w_rank": (ValueError, "w: expected a 3-D array", dict(w=((128, 256), jnp.float32)), False),
    "w_dtype": (TypeError, "w: expected dtype in", dict(w=((3, 128, 256), jnp.int8)), False),
    "w_n_not_multiple": (
        ValueError,
        r"w: N = w.shape\[1\] must be a multiple of 128",
        dict(w=((3, 100, 256), jnp.float32)),
        True,
    ),
    "k_mismatch": (
        ValueError,
        r"w: expected w.shape\[2\] == K == x.shape\[1\] == 256, got 384",
        dict(w=((3, 128, 384), jnp.float32)),
        True,
    ),
    "no_experts": (
        ValueError,
        "w: expected at least one expert",
        dict(w=((0, 128, 256), jnp.float32), offsets=((0,), jnp.int32)),
        True,
    ),
    "offsets_dtype": (
        TypeError,
        r"offsets: expected dtype in \('int32',\), got uint32",
        dict(offsets=((3,), jnp.uint32)),
        False,
    ),
    "offsets_rank": (ValueError, "offsets: expected a 1-D array", dict(offsets=((1, 3), jnp.int32)), False),
    "expert_count_mismatch": (ValueError, r"offsets: expected shape \(3,\)", dict(offsets=((2,), jnp.int32)), True),
}


def _abstract(spec):
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in spec.items()}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_at_trace_time_like_the_torch_op(case):
    error, message, overrides, shared_rule = case
    args = _abstract(GOOD | overrides)
    with pytest.raises(error, match=message) as caught:  # eval_shape: traced only, nothing runs
        jax.eval_shape(lambda a: jax_bridge.grouped_mm(a["x"], a["w"], a["offsets"]), args)
    if shared_rule:
        to_t = {jnp.float32: torch.float32, jnp.int32: torch.int32}
        t = {name: torch.ones(shape, dtype=to_t[dtype]) for name, (shape, dtype) in (GOOD | overrides).items()}
        with pytest.raises(error) as torch_caught:
            fp8moe.grouped_mm(t["x"], t["w"], t["offsets"])
        assert str(caught.value) == str(torch_caught.value)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(out_dtype=jnp.int8), TypeError, "out_dtype: expected one of"),
        (dict(out_dtype="float64"), TypeError, "out_dtype: expected one of"),
        (dict(backend="cublas"), ValueError, "unknown backend 'cublas'"),
        (dict(backend=3), TypeError, "backend: expected a str"),
        (dict(backend=["reference"]), TypeError, "backend: expected a str, got list"),
        (dict(wgrad=["triton"]), TypeError, "wgrad: expected None or a str, got list"),
        (dict(wgrad="cutlass"), ValueError, "wgrad: unknown wgrad provider 'cutlass'"),
        (dict(backend="deepgemm"), RuntimeError, "backend 'deepgemm' cannot run"),
    ],
)
def test_bad_options_raise_at_trace_time(kwargs, error, message):
    args = _abstract(GOOD)
    with pytest.raises(error, match=message):
        jax.eval_shape(lambda a: jax_bridge.grouped_mm(a["x"], a["w"], a["offsets"], **kwargs), args)


def test_tiny_values_give_the_torch_ops_bits():
    """XLA's CPU threads flush subnormals; inside the callback torch runs with IEEE subnormals, and the recipe
    reads |v| < 2^-126 as 0, so tiny and subnormal inputs give the torch op's bits (and never NaN)."""
    x = jnp.zeros((128, 256), jnp.float32).at[0, 0].set(1e-37).at[1, 1].set(1e-44).at[2, 2].set(2.0**-126)
    x = x.at[3, 128:].set(3e-38)  # tiles below the threshold: zero tiles
    # tiles just above it, against a small weight: subnormal products, which a flushing thread would zero
    x = x.at[4:64].set(jax.random.normal(jax.random.key(1), (60, 256)) * jnp.float32(1e-35))
    w = jax.random.normal(jax.random.key(0), (2, 128, 256)) * jnp.float32(1e-4)
    w = w.at[1].set(1e-41)  # an all-subnormal expert weight
    offsets = jnp.array([64, 128], jnp.int32)
    dy = jax.random.normal(jax.random.key(2), (128, 128)) * jnp.float32(1e-35)
    y, dx, dw = bridge_vjp(x, w, offsets, dy, out_dtype=jnp.float32)
    y_t, dx_t, dw_t = torch_vjp(x, w, offsets, dy, out_dtype=torch.float32)
    for got, want in ((y, y_t), (dx, dx_t), (dw, dw_t)):
        assert np.isfinite(np.asarray(got)).all()
        assert_bits_equal(got, want)


@pytest.mark.parametrize("fn", [jax_bridge.grouped_mm, jax_bridge.grouped_mm_bf16], ids=["fp8", "bf16"])
def test_non_array_input_raises(fn):
    x, w, offsets, _ = make_problem(7)
    with pytest.raises(TypeError, match="x: expected a jax.Array, got list"):
        fn(np.asarray(x, np.float32).tolist(), w, offsets)
    with pytest.raises(TypeError, match="w: expected a jax.Array, got Tensor"):
        fn(x, to_torch(w), offsets)


def shard_map_script(fn: str, forward: str, check: str) -> str:
    """A script for a child process with two CPU devices: ``fn`` (a jax_bridge function) called per device
    inside ``jax.shard_map`` on its shard of x and offsets with a replicated w; y (fp32, ``forward`` the
    expression of it), dx and the replicated weight's dw come back and ``check`` compares them with torch."""
    return f"""
import jax, jax.numpy as jnp, numpy as np, torch
from jax.sharding import NamedSharding, PartitionSpec as P
import fp8moe, jax_bridge

mesh = jax.make_mesh((2,), ("d",))
x = np.random.default_rng(0).standard_normal((2, 256, 256), np.float32)
w = np.random.default_rng(1).standard_normal((3, 256, 256), np.float32) / 16
offsets = np.array([[100, 100, 256], [50, 200, 230]], np.int32)


def per_device(x, w, offsets):  # x, offsets: this device's shard; w: replicated
    loss = lambda x, w: jax_bridge.{fn}(x[0], w, offsets[0]).astype(jnp.float32).sum()
    y = {forward}
    return (y[None], *jax.grad(loss, argnums=(0, 1))(x, w))


spec = dict(in_specs=(P("d"), P(), P("d")), out_specs=(P("d"), P("d"), P()))
sharded = [jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, offsets)]
y, dx, dw = jax.jit(jax.shard_map(per_device, mesh=mesh, **spec))(sharded[0], w, sharded[1])
dw_sum = 0
{check}
assert torch.equal(torch.from_numpy(np.asarray(dw)), dw_sum)  # the replicated weight's gradient is summed
print("ok")
"""


def run_on_two_cpu_devices(script: str) -> None:
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


SHARD_MAP_SCRIPT = shard_map_script(
    "grouped_mm",
    "jax_bridge.grouped_mm(x[0], w, offsets[0], out_dtype=jnp.float32)",
    """
for i in range(2):
    xt, wt = torch.from_numpy(x[i]).requires_grad_(), torch.from_numpy(w).requires_grad_()
    yt = fp8moe.grouped_mm(xt, wt, torch.from_numpy(offsets[i]), out_dtype=torch.float32)
    fp8moe.grouped_mm(xt, wt, torch.from_numpy(offsets[i])).float().sum().backward()
    assert torch.equal(torch.from_numpy(np.asarray(y)[i]), yt.detach()), i
    assert torch.equal(torch.from_numpy(np.asarray(dx)[i]), xt.grad), i
    dw_sum = dw_sum + wt.grad
""",
)


def test_shard_map_one_call_per_device_and_replicated_weight_gradient_summed():
    run_on_two_cpu_devices(SHARD_MAP_SCRIPT)


# --- the callback plumbing ----------------------------------------------------------------------------


def _buffer_address(buf) -> int:
    if hasattr(buf, "__array__") and buf.__dlpack_device__()[0] == 1:  # host buffer
        return np.asarray(buf).__array_interface__["data"][0]
    return buf.__cuda_array_interface__["data"][0]


def _assert_zero_copy_views(device):
    seen = {}

    def callback(ctx, out, x, w):
        with on_xla_stream(ctx, x):
            views = {"x": as_torch(x), "w": as_torch(w), "out": as_torch(out[0]), "out_fp8": as_torch(out[1])}
            seen.update({name: (t.data_ptr(), t.dtype, tuple(t.shape), t.device.type) for name, t in views.items()})
            seen["addresses"] = [_buffer_address(b) for b in (x, w, out[0], out[1])]
            views["out"].copy_(views["x"].float() @ views["w"].float())
            views["out_fp8"].view(torch.float8_e4m3fn).copy_(views["x"].float().to(torch.float8_e4m3fn))

    x = jax.device_put(jax.random.normal(jax.random.key(0), (64, 128), jnp.bfloat16), device)
    w = jax.device_put(jax.random.normal(jax.random.key(1), (128, 32), jnp.bfloat16), device)
    shapes = (jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((64, 128), jnp.uint8))
    y, x8 = jax.jit(buffer_callback(callback, shapes))(x, w)
    assert [seen[name][0] for name in ("x", "w", "out", "out_fp8")] == seen["addresses"]
    assert seen["x"][1:] == (torch.bfloat16, (64, 128), "cpu" if device.platform == "cpu" else "cuda")
    assert seen["out_fp8"][1] == torch.uint8
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(
        np.asarray(x8), torch.from_dlpack(x).cpu().float().to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    )


def test_buffers_are_wrapped_zero_copy_on_cpu():
    _assert_zero_copy_views(CPU)


# --- GPU ----------------------------------------------------------------------------------------------


def _gpu_backends() -> list[str]:
    if GPU is None:
        return ["none"]
    return [name for name, reason in fp8moe.backend_info("cuda")["backends"].items() if reason is None]


@pytest.mark.gpu
@needs_gpu
def test_buffers_are_wrapped_zero_copy_on_gpu():
    _assert_zero_copy_views(GPU)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_gpu_bit_identical_to_torch_op(backend, routing):
    with jax.default_device(GPU):
        x, w, offsets, dy = make_problem(8, m=1000, n=512, k=768, e=6, **routing)
        got = bridge_vjp(x, w, offsets, dy, backend=backend)
        eager = jax_bridge.grouped_mm(x, w, offsets, backend=backend)
    assert next(iter(got[0].devices())).platform == "gpu"
    want = torch_vjp(x, w, offsets, dy, backend=backend)
    assert want[0].is_cuda
    for g, r in zip(got, want):
        assert_bits_equal(g, r)
    assert_bits_equal(eager, want[0])
    if backend != "reference":  # the GPU kernels against the reference backend, through the bridge
        with jax.default_device(GPU):
            ref = bridge_vjp(x, w, offsets, dy, backend="reference")
        for name, g, r in zip(("y", "dx", "dw"), got, ref):
            db = sqnr_db(to_torch(r.astype(jnp.float32)), to_torch(g.astype(jnp.float32)))
            assert db > 40, f"{name}: {backend} vs reference backend: SQNR {db:.1f} dB"


# --- grouped_mm_bf16: torch._grouped_mm through the bridge ---------------------------------------------


def torch_grouped_mm_vjp(x, w, offsets, dy):
    """(y, dx, dw) of torch._grouped_mm called directly in torch (its autograd) on the bf16-cast values, the
    unrouted rows of y and dx zeroed (torch leaves them undefined); dx, dw cast to x's and w's dtypes."""
    xt, wt = to_torch(x), to_torch(w)
    xg, wg = xt.bfloat16().requires_grad_(), wt.bfloat16().requires_grad_()
    offs = to_torch(offsets)
    y = torch._grouped_mm(xg, wg.transpose(1, 2), offs=offs)
    y.backward(to_torch(dy))
    routed = (torch.arange(x.shape[0]) < offs[-1]).unsqueeze(1)
    zero = torch.zeros((), dtype=torch.bfloat16)
    dx = torch.where(routed, xg.grad, zero).to(xt.dtype)
    return torch.where(routed, y.detach(), zero), dx, wg.grad.to(wt.dtype)


def bf16_vjp(x, w, offsets, dy):
    @jax.jit
    def run(x, w, offsets, dy):
        y, pullback = jax.vjp(lambda x, w: jax_bridge.grouped_mm_bf16(x, w, offsets), x, w)
        return (y, *pullback(dy))

    return run(x, w, offsets, dy)


BF16_DTYPES = {"x_bf16_w_fp32": (jnp.bfloat16, jnp.float32), "x_fp32_w_bf16": (jnp.float32, jnp.bfloat16)}


@pytest.mark.parametrize("dtypes", BF16_DTYPES.values(), ids=BF16_DTYPES.keys())
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_bf16_bit_identical_to_torch_grouped_mm(dtypes, routing):
    x_dtype, w_dtype = dtypes
    x, w, offsets, dy = make_problem(20, x_dtype=x_dtype, w_dtype=w_dtype, **routing)
    if routing:  # NaN in the unrouted tail of x: its rows get zeros, nothing leaks into dw
        x = x.at[-1].set(jnp.nan)
    y, dx, dw = bf16_vjp(x, w, offsets, dy)
    chex.assert_shape([y, dx, dw], [(300, 256), (300, 256), (5, 256, 256)])
    chex.assert_type([y, dx, dw], [jnp.bfloat16, x_dtype, w_dtype])
    want = torch_grouped_mm_vjp(x, w, offsets, dy)
    for got, ref in zip((y, dx, dw), want):
        assert_bits_equal(got, ref)
    assert_bits_equal(jax_bridge.grouped_mm_bf16(x, w, offsets), want[0])  # eagerly too
    if routing:
        end = int(offsets[-1])
        assert end < 300 and not jnp.any(y[end:]) and not jnp.any(dx[end:])
        sizes = np.diff(np.asarray(offsets), prepend=0)
        assert (sizes == 0).any()
        for e in range(5):  # an empty expert's weight gets exactly zero gradient, the others not
            assert bool(jnp.any(dw[e])) == (sizes[e] > 0), e


def test_bf16_only_the_needed_gradients_run():
    x, w, offsets, dy = make_problem(21, **ROUTINGS["empty_experts_and_tail"])
    _, dx_t, dw_t = torch_grouped_mm_vjp(x, w, offsets, dy)

    def loss(x, w):
        return jnp.vdot(jax_bridge.grouped_mm_bf16(x, w, offsets).astype(jnp.float32), dy.astype(jnp.float32))

    assert_bits_equal(jax.jit(jax.grad(loss, argnums=1))(x, w), dw_t)
    assert_bits_equal(jax.jit(jax.grad(loss, argnums=0))(x, w), dx_t)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=1))(x, w))
    assert "need_dx=False, need_dw=True" in jaxpr
    g = jax.grad(lambda x, w: jax_bridge.grouped_mm_bf16(x, w, offsets)[:0].sum() + x.astype(jnp.float32).sum())(x, w)
    np.testing.assert_array_equal(np.asarray(g, np.float32), 1.0)


def test_bf16_scan_checkpoint_and_traced_offsets_without_recompilation():
    x, ws, offsets = _stack(22, layers=2, m=200, d=256, e=3)

    def layer(h, w):
        return jax_bridge.grouped_mm_bf16(h, w, offsets), None

    def loop_loss(x, ws):
        for i in range(ws.shape[0]):
            x, _ = layer(x, ws[i])
        return jnp.sum(x.astype(jnp.float32) ** 2)

    def scan_loss(x, ws):
        return jnp.sum(jax.lax.scan(jax.checkpoint(layer), x, ws)[0].astype(jnp.float32) ** 2)

    want = jax.jit(jax.value_and_grad(loop_loss, argnums=(0, 1)))(x, ws)
    got = jax.jit(jax.value_and_grad(scan_loss, argnums=(0, 1)))(x, ws)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    chex.assert_trees_all_equal(got[1], want[1])
    assert float(jnp.abs(want[1][1]).max()) > 0

    m, d, e = 256, 256, 4
    x, w, _, dy = make_problem(23, m=m, n=d, k=d, e=e)
    traces = []

    @jax.jit
    def step(x, w, router):
        traces.append(None)
        expert = jnp.argmax(x.astype(jnp.float32) @ router.T, axis=-1)
        order = jnp.argsort(expert, stable=True)
        offsets = jnp.cumsum(jnp.zeros(e, jnp.int32).at[expert].add(1)).astype(jnp.int32)
        y, pullback = jax.vjp(lambda xs, w: jax_bridge.grouped_mm_bf16(xs, w, offsets), x[order], w)
        return offsets, order, (y, *pullback(dy))

    seen = set()
    for seed in range(3):
        offsets, order, got = step(x, w, jax.random.normal(jax.random.key(seed), (e, d)))
        seen.add(tuple(np.asarray(offsets)))
        for g, r in zip(got, torch_grouped_mm_vjp(x[order], w, offsets, dy)):
            assert_bits_equal(g, r)
    assert len(seen) == 3 and len(traces) == 1 and step._cache_size() == 1


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bf16_bad_input_raises_like_grouped_mm(case):
    error, message, overrides, _ = case
    args = _abstract(GOOD | overrides)
    with pytest.raises(error, match=message) as caught:
        jax.eval_shape(lambda a: jax_bridge.grouped_mm_bf16(a["x"], a["w"], a["offsets"]), args)
    with pytest.raises(error) as fp8_caught:
        jax.eval_shape(lambda a: jax_bridge.grouped_mm(a["x"], a["w"], a["offsets"]), args)
    assert str(caught.value) == str(fp8_caught.value)


BF16_SHARD_MAP_SCRIPT = shard_map_script(
    "grouped_mm_bf16",
    "jax_bridge.grouped_mm_bf16(x[0], w, offsets[0]).astype(jnp.float32)",
    """
for i in range(2):
    xt, wt = torch.from_numpy(x[i]).requires_grad_(), torch.from_numpy(w).requires_grad_()
    offs = torch.from_numpy(offsets[i])
    yt = torch._grouped_mm(xt.bfloat16(), wt.bfloat16().transpose(1, 2), offs=offs)
    routed = (torch.arange(256) < offs[-1]).unsqueeze(1)  # torch leaves these rows of y and dx undefined
    yt = torch.where(routed, yt, 0)
    yt.float().sum().backward()
    assert torch.equal(torch.from_numpy(np.asarray(y)[i]), yt.detach().float()), i
    assert torch.equal(torch.from_numpy(np.asarray(dx)[i]), torch.where(routed, xt.grad, 0)), i
    dw_sum = dw_sum + wt.grad
""",
)


def test_bf16_shard_map_replicated_weight_gradient_summed():
    run_on_two_cpu_devices(BF16_SHARD_MAP_SCRIPT)
