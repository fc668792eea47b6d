"""jax_bridge.fused_experts: the fused expert block as one custom_vjp, against torch's fp8moe.moe.fused_experts
on the same inputs and routing (same bits: y and every gradient, both precisions), the saved-dict layout hook,
only the needed gradients, jit/grad/scan/checkpoint, no recompilation when the routing changes, tokens routed
nowhere, one callback per direction, and bad arguments.

JAX runs on the CPU here (torch reference backend for precision="fp8")."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_bridge
from fp8moe.moe import fused as torch_fused
from fp8moe.moe import fused_experts as torch_fused_experts
from fp8moe.moe import plan_routing

T, D, F, E, K = 40, 256, 128, 4, 2
BF16, F32 = jnp.bfloat16, jnp.float32
TORCH = {jnp.dtype(BF16): torch.bfloat16, jnp.dtype(F32): torch.float32}


def _gpu_device() -> jax.Device | None:
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    return devices[0] if devices and torch.cuda.is_available() else None


GPU = _gpu_device()


@pytest.fixture(autouse=True)
def on_cpu_unless_gpu(request):
    """Every test runs with JAX's default device on the CPU, except those marked gpu."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def problem(seed: int, dtypes=(F32, F32, F32, F32), routing: str = "random"):
    """x (T, D), w_gate_up (E, 2F, D), w_down (E, D, F), expert_ids (T, K) int32, combine (T, K), dy (T, D).

    routing "random": uniform ids with two assignments routed nowhere (-1, E); "skewed": expert 0 empty, most
    assignments on expert 1; "nowhere": every assignment of the first 8 tokens routed nowhere."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D))
    w1 = rng.standard_normal((E, 2 * F, D)) / np.sqrt(D)
    w2 = rng.standard_normal((E, D, F)) / np.sqrt(F)
    ids = rng.integers(0, E, (T, K))
    if routing == "random":
        ids[3, 1], ids[7, 0] = -1, E
    elif routing == "skewed":
        ids = np.where(rng.random((T, K)) < 0.8, 1, rng.integers(2, E, (T, K)))
    elif routing == "nowhere":
        ids[:8] = -1
    c = rng.random((T, K)) + 0.1
    dy = rng.standard_normal((T, D))
    arrays = [jnp.asarray(a, dt) for a, dt in zip((x, w1, w2, c), dtypes)]
    x, w1, w2, c = arrays
    return x, w1, w2, jnp.asarray(ids, jnp.int32), c, jnp.asarray(dy, x.dtype)


def tt(a: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(a).clone()


def torch_block(x, w1, w2, ids, c, dy, precision, needs=(True,) * 4, backend="reference"):
    """torch's fused_experts on the same values: y and the gradients of the inputs in ``needs``."""
    leaves = [tt(a).requires_grad_(need) for a, need in zip((x, w1, w2, c), needs)]
    y = torch_fused_experts(
        leaves[0],
        leaves[1],
        leaves[2],
        tt(ids),
        leaves[3],
        backend=backend,
        precision=precision,
        cache_weight=False,
    )
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, tt(dy)) if wanted else ())
    return y.detach(), [next(grads) if need else None for need in needs]


def bridge(precision):
    def block(x, w1, w2, ids, c):
        return jax_bridge.fused_experts(x, w1, w2, ids, c, backend="reference", precision=precision)

    return block


def same(a: jax.Array, b: torch.Tensor) -> bool:
    got = torch.from_dlpack(a)
    return got.dtype == b.dtype and torch.equal(got, b)


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
@pytest.mark.parametrize(
    "dtypes, routing",
    [((F32, F32, F32, F32), "random"), ((BF16, BF16, BF16, BF16), "skewed"), ((BF16, F32, F32, F32), "nowhere")],
    ids=["fp32-random", "bf16-skewed", "bf16_x_fp32_weights-nowhere"],
)
def test_bit_identical_to_torch_fused_experts(precision, dtypes, routing):
    x, w1, w2, ids, c, dy = problem(0, dtypes, routing)
    block = bridge(precision)

    @jax.jit
    def fwd_bwd(x, w1, w2, ids, c, dy):
        y, pullback = jax.vjp(lambda *a: block(*a[:3], ids, a[3]), x, w1, w2, c)
        return y, pullback(dy)

    y, grads = fwd_bwd(x, w1, w2, ids, c, dy)
    y_inference = jax.jit(block)(x, w1, w2, ids, c)  # no gradient: the inference path
    y_t, grads_t = torch_block(x, w1, w2, ids, c, dy, precision)
    assert same(y, y_t) and same(y_inference, y_t)
    for name, g, g_t in zip(("dx", "dw_gate_up", "dw_down", "dcombine"), grads, grads_t):
        assert same(g, g_t), name
    if routing == "nowhere":  # tokens routed nowhere: zero output and zero gradients
        assert not jnp.any(y[:8]) and not jnp.any(grads[0][:8]) and not jnp.any(grads[3][:8])
    if routing == "skewed":  # an expert no token reaches: zero weight gradients
        assert not jnp.any(grads[1][0]) and not jnp.any(grads[2][0])


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_only_the_needed_gradients_run_and_match(precision):
    x, w1, w2, ids, c, dy = problem(1)
    block = bridge(precision)
    for needs in [(True, False, False, False), (False, True, False, False), (False, False, True, True)]:
        argnums = tuple(i for i, need in enumerate(needs) if need)

        def loss(x, w1, w2, c):
            return jnp.vdot(block(x, w1, w2, ids, c), dy)

        grads = jax.jit(jax.grad(loss, argnums=argnums))(x, w1, w2, c)
        _, grads_t = torch_block(x, w1, w2, ids, c, dy, precision, needs)
        for g, g_t in zip(grads, [g for g in grads_t if g is not None], strict=True):
            assert same(g, g_t), needs


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_saved_spec_describes_the_saved_dict(precision):
    """fp8moe.moe.fused.saved_spec (the hook the bridge allocates residuals from) agrees with _block_forward."""
    x, w1, w2, ids, c, _ = (tt(a) for a in problem(2))
    plan = plan_routing(ids, E)
    gemms = torch_fused._Fp8Gemms("reference", False) if precision == "fp8" else torch_fused._Bf16Gemms()
    for needs in itertools.product((False, True), repeat=4):
        _, saved = torch_fused._block_forward(gemms, x, w1, w2, c, plan, needs)
        spec = torch_fused.saved_spec(precision, T, K, E, D, F, needs, c.dtype)
        assert list(saved) == list(spec), needs
        for key, value in saved.items():
            entry = spec[key]
            values, entries = (value, entry) if isinstance(value, tuple) else ((value,), (entry,))
            if value is None:
                assert entry is None, (needs, key)
                continue
            assert [(tuple(v.shape), v.dtype) for v in values] == [(e.shape, e.dtype) for e in entries], (needs, key)


def test_scan_and_checkpoint_over_layers_match_the_unrolled_loop_and_compile_once():
    layers = [problem(seed)[:5] for seed in (3, 4)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[(w1, w2, c) for _, w1, w2, _, c in layers])
    ids = jnp.stack([layer[3] for layer in layers])
    x, dy = layers[0][0], problem(5)[5]
    block = bridge("fp8")

    def layer(h, p):
        (w1, w2, c), ids = p
        return h + block(h, w1, w2, ids, c), None

    def scan_loss(stacked, x, ids):
        h, _ = jax.lax.scan(jax.checkpoint(layer), x, (stacked, ids))
        return jnp.vdot(h, dy)

    def loop_loss(stacked, x, ids):
        for i in range(2):
            x, _ = layer(x, jax.tree_util.tree_map(lambda a: a[i], (stacked, ids)))
        return jnp.vdot(x, dy)

    scan_step = jax.jit(jax.value_and_grad(scan_loss, argnums=(0, 1)))
    value, grads = scan_step(stacked, x, ids)
    value_ref, grads_ref = jax.jit(jax.value_and_grad(loop_loss, argnums=(0, 1)))(stacked, x, ids)
    # The same callbacks on the same values: the same bits, whatever XLA fuses around them.
    np.testing.assert_array_equal(np.asarray(value), np.asarray(value_ref))
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    # new routings (other ids, other combine weights): the same executable
    scan_step((stacked[0], stacked[1], stacked[2][:, :, ::-1]), x, (ids + 1) % E)
    assert scan_step._cache_size() == 1


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_routing_from_a_jax_router_changes_without_recompilation(precision):
    """ids and combine weights from lax.top_k inside the jitted step: traced once, compiled once."""
    x, w1, w2, _, _, dy = problem(6)
    traces = []

    def loss(router, x, w1, w2):
        traces.append(None)
        probs = jax.nn.softmax(x @ router.T, axis=-1)
        combine, ids = jax.lax.top_k(probs, K)
        return jnp.vdot(jax_bridge.fused_experts(x, w1, w2, ids, combine, backend="reference", precision=precision), dy)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    seen = set()
    for seed in range(3):
        router = jax.random.normal(jax.random.key(seed), (E, D), F32)
        _, grads = step(router, x, w1, w2)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
        seen.add(tuple(np.asarray(jax.lax.top_k(jax.nn.softmax(x @ router.T), K)[1]).reshape(-1)[:16]))
    assert len(seen) == 3 and len(traces) == 1 and step._cache_size() == 1


def test_one_callback_forward_one_backward():
    x, w1, w2, ids, c, dy = problem(7)

    def fwd_bwd(x, w1, w2, c):
        y, pullback = jax.vjp(lambda *a: bridge("fp8")(*a[:3], ids, a[3]), x, w1, w2, c)
        return y, pullback(dy)

    jaxpr = str(jax.make_jaxpr(fwd_bwd)(x, w1, w2, c))
    assert jaxpr.count("buffer_callback") == 2


def test_moe_layer_block_matches_the_torch_block_on_the_same_routing():
    """moe_layer(precision="fp8") hands the block JAX's top-k ids and combine weights: given those, y and the
    expert weights' gradients are the torch block's bits."""
    keys = jax.random.split(jax.random.key(8), 3)
    params = jax_bridge.init_moe_params(keys[0], D, F, E)
    x = jax.random.normal(keys[1], (T, D), F32)
    dy = jax.random.normal(keys[2], (T, D), F32)

    def loss(p, x):
        y, aux = jax_bridge.moe_layer(p, x, top_k=K, backend="reference")
        routing = jax_bridge.route(x, p["router"], K)  # the same values as the layer's own (one XLA program)
        return jnp.vdot(y, dy) + aux, (
            y,
            jax.lax.stop_gradient(routing.experts),
            jax.lax.stop_gradient(routing.combine),
        )

    (_, (y, experts, combine)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
    y_t, grads_t = torch_block(
        x, params["w_gate_up"], params["w_down"], experts, combine, dy, "fp8", (False, True, True, False)
    )
    assert same(y, y_t)
    assert same(grads["w_gate_up"], grads_t[1]) and same(grads["w_down"], grads_t[2])
    assert float(jnp.abs(grads["router"]).max()) > 0  # the combine weights' gradient reaches the router


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x=np.zeros((T, D), np.float32).tolist()), TypeError, "x: expected a jax.Array"),
        (dict(x=jnp.zeros((T, D), jnp.float16)), TypeError, "x: expected dtype in"),
        (dict(x=jnp.zeros((T, 200), F32)), ValueError, "x: expected a last dimension that is a positive multiple"),
        (dict(w1=jnp.zeros((E, 2 * F, D, 1), F32)), ValueError, "w_gate_up: expected a 3-D array"),
        (dict(w1=jnp.zeros((E, 3 * F, D), F32)), ValueError, r"w_gate_up: expected shape \(E, 2F, 256\)"),
        (dict(w2=jnp.zeros((E, D, 2 * F), F32)), ValueError, r"w_down: expected shape \(4, 256, 128\)"),
        (dict(ids=jnp.zeros((T, K), F32)), TypeError, "expert_ids: expected dtype in"),
        (dict(ids=jnp.zeros((T + 1, K), jnp.int32)), ValueError, r"expert_ids: expected shape \(40, k\)"),
        (dict(c=jnp.zeros((T, K + 1), F32)), ValueError, r"combine: expected shape \(40, 2\)"),
        (dict(c=jnp.zeros((T, K), jnp.int32)), TypeError, "combine: expected dtype in"),
        (dict(precision="fp16"), ValueError, "precision: expected one of"),
        (dict(precision=8), TypeError, "precision: expected a str"),
        (dict(backend="cutlass"), ValueError, "backend: expected one of"),
        (dict(backend=None), TypeError, "backend: expected a str"),
    ],
)
def test_bad_arguments_raise_at_trace_time_naming_the_argument(change, error, message):
    x, w1, w2, ids, c, _ = problem(9)
    args = dict(x=x, w1=w1, w2=w2, ids=ids, c=c, precision="fp8", backend="reference") | change
    with pytest.raises(error, match=message):
        jax.eval_shape(  # traced only, nothing runs
            lambda: jax_bridge.fused_experts(
                args["x"],
                args["w1"],
                args["w2"],
                args["ids"],
                args["c"],
                backend=args["backend"],
                precision=args["precision"],
            )
        )


def test_gemm_results_and_quantized_weights_are_written_into_xla_buffers(monkeypatch):
    """fp8: the transposed quantized weights, h, the expert outputs and the weight gradients are written in
    place (by the quantizer and the GEMMs); only the other residuals and y, dx, dc are copied."""
    import jax_bridge._fused as bridge_fused

    copied = []
    store = bridge_fused._store

    def recording_store(name, dest, value):
        if value.data_ptr() != dest.data_ptr():
            copied.append(name.split("[")[0])
        store(name, dest, value)

    monkeypatch.setattr(bridge_fused, "_store", recording_store)
    x, w1, w2, ids, c, dy = problem(10)
    jax.vjp(lambda *a: bridge("fp8")(*a[:3], ids, a[3]), x, w1, w2, c)[1](dy)
    assert sorted(set(copied)) == ["a_tiles", "dcombine", "dx", "valid", "x_tiles", "y"]


def test_weights_quantized_once_for_several_micro_batches():
    """quantize_weight once per step, fed to every micro-batch's block in a lax.scan: each micro-batch gives the
    torch block's bits (with its weight cache), the weight gradients are summed over the micro-batches, and the
    weights are quantized twice per step (once each), not once per micro-batch."""
    x1, w1, w2, ids1, c1, dy1 = problem(11)
    x2, _, _, ids2, c2, dy2 = problem(12)
    xs, ids, cs, dys = (jnp.stack(pair) for pair in ((x1, x2), (ids1, ids2), (c1, c2), (dy1, dy2)))

    def step(w1, w2, xs, cs):
        q = (jax_bridge.quantize_weight(w1, backend="reference"), jax_bridge.quantize_weight(w2, backend="reference"))

        def micro_batch(total, batch):
            x, ids, c, dy = batch
            y = jax_bridge.fused_experts(x, w1, w2, ids, c, backend="reference", quantized_weights=q)
            return total + jnp.vdot(y, dy), y

        return jax.lax.scan(micro_batch, jnp.zeros((), F32), (xs, ids, cs, dys))

    (_, ys), grads = jax.jit(jax.value_and_grad(step, argnums=(0, 1, 2, 3), has_aux=True))(w1, w2, xs, cs)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: step(*a)[0], argnums=(0, 1)))(w1, w2, xs, cs))
    assert jaxpr.count("buffer_callback") == 4  # two quantizations, the block's forward and backward (in the scan)
    dw1_t, dw2_t = 0, 0
    for i, (x, ids_i, c, dy) in enumerate(((x1, ids1, c1, dy1), (x2, ids2, c2, dy2))):
        y_t, (dx_t, g1, g2, dc_t) = torch_block(x, w1, w2, ids_i, c, dy, "fp8")
        assert same(ys[i], y_t) and same(grads[2][i], dx_t) and same(grads[3][i], dc_t)
        dw1_t, dw2_t = dw1_t + g1, dw2_t + g2
    assert same(grads[0], dw1_t) and same(grads[1], dw2_t)


def test_bad_quantized_weights():
    x, w1, w2, ids, c, _ = problem(13)
    q1, q2 = (jax.eval_shape(lambda w: jax_bridge.quantize_weight(w, backend="reference"), w) for w in (w1, w2))
    q1, q2 = (jax_bridge.QuantizedWeight(*(jnp.zeros(a.shape, a.dtype) for a in q)) for q in (q1, q2))
    call = functools.partial(jax_bridge.fused_experts, x, w1, w2, ids, c, backend="reference")
    with pytest.raises(ValueError, match=r"quantized_weights\[1\].wq: expected uint8 \(4, 256, 128\)"):
        jax.eval_shape(lambda: call(quantized_weights=(q1, q1)))
    with pytest.raises(TypeError, match="quantized_weights: expected a pair"):
        jax.eval_shape(lambda: call(quantized_weights=q1))
    with pytest.raises(ValueError, match="quantized_weights: only with precision='fp8'"):
        jax.eval_shape(lambda: call(precision="bf16", quantized_weights=(q1, q2)))
    with pytest.raises(ValueError, match="w: expected shape"):
        jax_bridge.quantize_weight(w1[:, :100])


def test_prequantized_rows_x_fp8_match_the_torch_block_and_quantizing_in_the_block():
    """``quantize_rows`` gives torch's ``quantize_rowwise`` bits (``dequantize_rows`` its dequantization), and
    ``fused_experts(x_fp8=quantize_rows(x))`` gives, under jit and grad, the bits of quantizing x in the block
    (the rows' 1x128 tiles are the same) and of the torch block with ``x_fp8=``; the inference path too."""
    from fp8moe.quant.reference import dequantize_rowwise, quantize_rowwise

    x, w1, w2, ids, c, dy = problem(21)
    to_torch = torch.from_dlpack
    x = x.astype(BF16)
    codes, scales = jax_bridge.quantize_rows(x)
    assert codes.dtype == jnp.uint8 and scales.shape == (T, D // 128)
    codes_t, scales_t = quantize_rowwise(to_torch(x))
    assert torch.equal(to_torch(codes), codes_t.view(torch.uint8)) and torch.equal(to_torch(scales), scales_t)
    assert torch.equal(to_torch(jax_bridge.dequantize_rows(codes, scales)), dequantize_rowwise(codes_t, scales_t))

    def loss(x, w1, w2, c, x_fp8):
        y = jax_bridge.fused_experts(x, w1, w2, ids, c, backend="reference", x_fp8=x_fp8)
        return jnp.vdot(y.astype(F32), dy.astype(F32)), y

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    own, given = step(x, w1, w2, c, None), step(x, w1, w2, c, (codes, scales))
    for a, b in zip(jax.tree_util.tree_leaves(own), jax.tree_util.tree_leaves(given)):
        assert same(a, to_torch(b))
    as_fp8 = (jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn), scales)  # e4m3 arrays are taken too
    forward = jax.jit(lambda x, q: jax_bridge.fused_experts(x, w1, w2, ids, c, backend="reference", x_fp8=q))
    assert same(forward(x, as_fp8), to_torch(own[1]))
    y_t = torch_fused_experts(
        to_torch(x),
        to_torch(w1),
        to_torch(w2),
        to_torch(ids),
        to_torch(c),
        backend="reference",
        x_fp8=(codes_t, scales_t),
    )
    assert same(own[1], y_t)  # x bf16: y bf16 in both
    call = functools.partial(jax_bridge.fused_experts, x, w1, w2, ids, c, backend="reference")
    with pytest.raises(ValueError, match="x_fp8: pre-quantized rows need precision='fp8'"):
        call(precision="bf16", x_fp8=(codes, scales))
    with pytest.raises(ValueError, match=r"x_fp8\[1\]: expected shape \(40, 2\)"):
        call(x_fp8=(codes, scales[:, :1]))
    with pytest.raises(TypeError, match="x_fp8: expected a pair"):
        call(x_fp8=codes)


def _gpu_cases() -> list[tuple[str, str]]:
    if GPU is None:
        return [("fp8", "none")]
    import fp8moe

    backends = [b for b, why in fp8moe.backend_info("cuda")["backends"].items() if why is None and b != "reference"]
    return [("fp8", b) for b in backends] + [("bf16", "auto")]


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="needs a CUDA device visible to both JAX and torch")
@pytest.mark.parametrize("precision, backend", _gpu_cases())
@pytest.mark.parametrize("routing", ["random", "skewed"])
def test_gpu_bit_identical_to_torch_fused_experts(precision, backend, routing):
    """Each GPU backend (and bf16) through the bridge on XLA's stream: the torch block's bits, jitted fwd+bwd and
    the inference path, also with weights quantized once."""
    with jax.default_device(GPU):
        x, w1, w2, ids, c, dy = problem(20, (BF16, F32, F32, F32), routing)

        def fwd_bwd(x, w1, w2, ids, c, dy, quantize):
            q = None
            if quantize:
                q = tuple(jax_bridge.quantize_weight(w, backend=backend) for w in (w1, w2))
            y, pullback = jax.vjp(
                lambda x, w1, w2, c: jax_bridge.fused_experts(
                    x, w1, w2, ids, c, backend=backend, precision=precision, quantized_weights=q
                ),
                x,
                w1,
                w2,
                c,
            )
            return y, pullback(dy)

        fwd_bwd = jax.jit(fwd_bwd, static_argnums=6)
        y, grads = fwd_bwd(x, w1, w2, ids, c, dy, False)
        y_inference = jax.jit(lambda *a: jax_bridge.fused_experts(*a, backend=backend, precision=precision))(
            x, w1, w2, ids, c
        )
        results = [(y, grads)] + ([fwd_bwd(x, w1, w2, ids, c, dy, True)] if precision == "fp8" else [])
    assert next(iter(y.devices())).platform == GPU.platform
    y_t, grads_t = torch_block(x, w1, w2, ids, c, dy, precision, backend=backend)
    assert y_t.device.type == ("cuda" if GPU.platform == "gpu" else "cpu") and same(y_inference, y_t)
    for y, grads in results:
        assert same(y, y_t)
        for name, g, g_t in zip(("dx", "dw_gate_up", "dw_down", "dcombine"), grads, grads_t):
            assert same(g, g_t), name


SHARD_MAP_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, torch
from jax.sharding import NamedSharding, PartitionSpec as P
import jax_bridge
from fp8moe.moe import fused_experts

mesh = jax.make_mesh((2,), ("d",))
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 48, 256), np.float32)
w1 = rng.standard_normal((3, 256, 256), np.float32) / 16
w2 = rng.standard_normal((3, 256, 128), np.float32) / 11
ids = rng.integers(-1, 3, (2, 48, 2)).astype(np.int32)
c = rng.random((2, 48, 2)).astype(np.float32)


def per_device(x, w1, w2, ids, c):  # x, ids, c: this device's shard; the weights replicated
    def loss(x, w1, w2, c):
        return jax_bridge.fused_experts(x[0], w1, w2, ids[0], c[0], backend="reference").sum()

    y = jax_bridge.fused_experts(x[0], w1, w2, ids[0], c[0], backend="reference")
    return (y[None], *jax.grad(loss, argnums=(0, 1, 2, 3))(x, w1, w2, c))


spec = dict(in_specs=(P("d"), P(), P(), P("d"), P("d")), out_specs=(P("d"), P("d"), P(), P(), P("d")))
sharded = [jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, ids, c)]
y, dx, dw1, dw2, dc = jax.jit(jax.shard_map(per_device, mesh=mesh, **spec))(sharded[0], w1, w2, *sharded[1:])
sums = [0, 0]
for i in range(2):
    leaves = [torch.from_numpy(a).requires_grad_() for a in (x[i], w1, w2, c[i])]
    yt = fused_experts(leaves[0], leaves[1], leaves[2], torch.from_numpy(ids[i]), leaves[3], backend="reference")
    grads = torch.autograd.grad(yt.sum(), leaves)
    assert torch.equal(torch.from_numpy(np.asarray(y)[i]), yt.detach()), i
    assert torch.equal(torch.from_numpy(np.asarray(dx)[i]), grads[0]), i
    assert torch.equal(torch.from_numpy(np.asarray(dc)[i]), grads[3]), i
    sums = [sums[0] + grads[1], sums[1] + grads[2]]
for got, want in zip((dw1, dw2), sums):  # the replicated weights' gradients are summed over the devices
    assert torch.equal(torch.from_numpy(np.asarray(got)), want)
print("ok")
"""


def test_shard_map_one_block_per_device_and_replicated_weight_gradients_summed():
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
