"""jax_bridge.moe: the MoE layer against a dense per-expert loop reference, gradients, empty experts, scan
over layers, the torch twin (fp8moe.moe.MoE) on the same weights, parameter init and bad arguments.

JAX runs on the CPU here (torch reference backend for precision="fp8")."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_bridge
from fp8moe.testing import sqnr_db

D, F, E, TOP_K, T = 256, 128, 5, 2, 96
BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.fixture(autouse=True)
def on_cpu():
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def problem(seed: int, empty: tuple[int, ...] = ()):
    """Parameters (fp32), tokens x (T, D) fp32 and an output cotangent. Experts in ``empty`` get a router
    row pointing against a feature that every token has large, so no token picks them."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = jax_bridge.init_moe_params(keys[0], D, F, E)
    x = jax.random.normal(keys[1], (T, D), F32)
    if empty:
        x = x.at[:, 0].set(4.0 + jnp.abs(x[:, 0]))
        params["router"] = params["router"].at[jnp.asarray(empty), 0].set(-3.0)
    dy = jax.random.normal(keys[2], (T, D), F32)
    return params, x, dy


def dense_reference(params, x, top_k, precision):
    """Every expert applied to every token, weighted by a (T, E) gate matrix that is zero off the top-k."""
    probs = jax.nn.softmax(jnp.dot(x, params["router"].T, precision=jax.lax.Precision.HIGHEST), axis=-1)
    chosen = jnp.argsort(-probs, axis=-1)[:, :top_k]
    picked = jnp.take_along_axis(probs, chosen, axis=-1)
    gates = (
        jnp.zeros_like(probs).at[jnp.arange(x.shape[0])[:, None], chosen].set(picked / picked.sum(-1, keepdims=True))
    )
    tokens, num_tokens = x.astype(BF16), x.shape[0]

    def matmul(v, w):  # v (T, K) bf16, w (N, K) -> (T, N) bf16, one expert on all tokens
        if precision == "fp8":
            return jax_bridge.grouped_mm(v, w[None], jnp.asarray([num_tokens], jnp.int32), backend="reference")
        return jnp.dot(v, w.astype(BF16).T, preferred_element_type=F32).astype(BF16)

    y = jnp.zeros(x.shape, F32)
    for e in range(params["router"].shape[0]):
        h = matmul(tokens, params["w_gate_up"][e]).astype(F32)
        gate = jax.nn.silu(h[:, :F]).astype(BF16).astype(F32)
        a = (gate * h[:, F:]).astype(BF16)
        y = y + gates[:, e : e + 1] * matmul(a, params["w_down"][e]).astype(F32)
    fraction = jnp.zeros(probs.shape[1]).at[chosen.reshape(-1)].add(1.0) / chosen.size
    aux = probs.shape[1] * jnp.sum(fraction * probs.mean(axis=0))
    return y.astype(BF16).astype(x.dtype), aux


def loss_fn(layer):
    def loss(params, x, dy):
        y, aux = layer(params, x)
        return jnp.vdot(y.astype(F32), dy) + 0.1 * aux

    return loss


def db(ref, got) -> float:
    return sqnr_db(torch.from_dlpack(ref.astype(F32)), torch.from_dlpack(got.astype(F32)))


@pytest.mark.parametrize(
    "precision, fused, y_floor_db, grad_floor_db, empty",
    [
        ("fp8", False, 45.0, 25.0, ()),
        ("fp8", False, 45.0, 25.0, (1, 3)),
        ("fp8", True, 20.0, 15.0, (1, 3)),
        ("bf16", True, 45.0, 40.0, (1, 3)),
        ("bf16", False, 45.0, 40.0, (1, 3)),
        ("bf16_ragged_dot", False, 45.0, 40.0, (1, 3)),
    ],
    ids=[
        "fp8-op_by_op-all_experts",
        "fp8-op_by_op-empty_experts",
        "fp8-fused-empty_experts",
        "bf16-fused-empty_experts",
        "bf16-op_by_op-empty_experts",
        "bf16_ragged_dot-empty_experts",
    ],
)
def test_layer_matches_dense_loop_reference_with_gradients(precision, fused, y_floor_db, grad_floor_db, empty):
    """The reference quantizes bf16 tokens and bf16 SwiGLU outputs per expert, which is what the op-by-op fp8
    layer does (same bits per token, hence 45 dB); the fused fp8 block quantizes them from fp32, so it differs
    from the reference by FP8 noise (as the torch fused block differs from the torch op-by-op layer)."""
    params, x, dy = problem(0, empty)
    routing = jax.jit(jax_bridge.route, static_argnums=2)(x, params["router"], TOP_K)
    counts = np.asarray(routing.counts)
    assert counts.sum() == T * TOP_K and all(counts[e] == 0 for e in empty) and (counts > 0).sum() == E - len(empty)

    def layer(p, x):
        return jax_bridge.moe_layer(p, x, top_k=TOP_K, precision=precision, backend="reference", fused=fused)

    (y, aux), grads = jax.jit(lambda p, x: (layer(p, x), jax.grad(loss_fn(layer), argnums=(0, 1))(p, x, dy)))(params, x)
    (y_ref, aux_ref), grads_ref = jax.jit(
        lambda p, x: (
            dense_reference(p, x, TOP_K, precision),
            jax.grad(loss_fn(lambda p, x: dense_reference(p, x, TOP_K, precision)), argnums=(0, 1))(p, x, dy),
        )
    )(params, x)
    chex.assert_shape(y, (T, D))
    chex.assert_type([y, aux], [F32, F32])
    # Same experts, same per-token GEMMs: the outputs agree to bf16 rounding (FP8 noise for the fused fp8 block).
    assert db(y_ref, y) > y_floor_db, f"y: {db(y_ref, y):.1f} dB"
    np.testing.assert_allclose(float(aux), float(aux_ref), rtol=1e-6)
    flat, flat_ref = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_ref)
    for (path, g), r in zip(flat, flat_ref):
        name = jax.tree_util.keystr(path)
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, name
        assert db(r, g) > grad_floor_db, f"{name}: {db(r, g):.1f} dB"
    for e in empty:  # no token reaches these experts: exactly zero weight gradients
        assert not jnp.any(grads[0]["w_gate_up"][e]) and not jnp.any(grads[0]["w_down"][e])


def test_scan_over_layers_matches_loop_and_compiles_once():
    layers = [problem(seed)[0] for seed in (1, 2)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
    _, x, dy = problem(3)

    def block(h, p):
        y, aux = jax_bridge.moe_layer(p, h, top_k=TOP_K, backend="reference")
        return h + y, aux

    def scan_loss(stacked, x):
        h, aux = jax.lax.scan(jax.checkpoint(block), x, stacked)
        return jnp.vdot(h, dy) + aux.sum()

    def loop_loss(layers, x):
        aux = 0.0
        for p in layers:
            x, a = block(x, p)
            aux = aux + a
        return jnp.vdot(x, dy) + aux

    step = jax.jit(jax.value_and_grad(scan_loss, argnums=(0, 1)))
    value, (g_stacked, gx) = step(stacked, x)
    value_ref, (g_layers, gx_ref) = jax.jit(jax.value_and_grad(loop_loss, argnums=(0, 1)))(layers, x)
    # XLA may skip the final bf16 rounding of y when it fuses the last layer into the loss (excess
    # precision), so the values agree to bf16 rounding; the gradients agree to fp32 noise.
    np.testing.assert_allclose(float(value), float(value_ref), rtol=2**-9)
    chex.assert_trees_all_close(
        g_stacked, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *g_layers), rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    step(stacked, x * 1.5)  # new values, new routings: the same executable
    assert step._cache_size() == 1


@pytest.mark.parametrize(
    "precision, fused",
    [("fp8", True), ("bf16", True), ("fp8", False), ("bf16", False), ("bf16_ragged_dot", False)],
    ids=["fp8-fused", "bf16-fused", "fp8-op_by_op", "bf16-op_by_op", "bf16_ragged_dot"],
)
def test_same_outputs_as_the_torch_twin(precision, fused):
    moe = pytest.importorskip("fp8moe.moe")
    params, x, _ = problem(4)
    y, aux = jax.jit(
        lambda p, x: jax_bridge.moe_layer(p, x, top_k=TOP_K, precision=precision, backend="reference", fused=fused)
    )(params, x)
    twin = moe.MoE(D, F, E, TOP_K, precision=precision.removesuffix("_ragged_dot"), backend="reference", fused=fused)
    with torch.no_grad():
        for param, key in ((twin.router.weight, "router"), (twin.w_gate_up, "w_gate_up"), (twin.w_down, "w_down")):
            param.copy_(torch.from_dlpack(params[key]))
        y_t, aux_t = twin(torch.from_dlpack(x).clone())
    y_j = torch.from_dlpack(y)
    if precision == "bf16_ragged_dot":  # XLA's GEMM: within bf16 rounding of the largest output
        assert (y_j - y_t).abs().max().item() <= 2**-8 * y_t.abs().max().item()
    elif fused:  # the fp32 combine weights of XLA's and torch's softmax differ in the last bit: so does y
        # (given the same routing the blocks give the same bits: tests/test_jax_fused.py)
        assert (y_j - y_t).abs().max().item() <= 2**-20 * y_t.abs().max().item()
    else:  # the same torch GEMMs (fp8 on the reference backend, torch._grouped_mm in bf16): the same bits
        assert torch.equal(y_j, y_t)
    np.testing.assert_allclose(float(aux), aux_t.item(), rtol=1e-6)


def test_init_moe_params_shapes_dtypes_and_scales():
    params = jax_bridge.init_moe_params(jax.random.key(5), 256, 384, 6, dtype=BF16)
    chex.assert_shape(
        [params["router"], params["w_gate_up"], params["w_down"]], [(6, 256), (6, 768, 256), (6, 256, 384)]
    )
    chex.assert_type(list(params.values()), BF16)
    for key, std in (("router", 0.02), ("w_gate_up", 1 / math.sqrt(256)), ("w_down", 1 / math.sqrt(384))):
        np.testing.assert_allclose(float(jnp.std(params[key].astype(F32))), std, rtol=0.05, err_msg=key)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), "top_k: expected 1 <= top_k <= num_experts = 5, got 0"),
        (dict(top_k=6), "top_k: expected 1 <= top_k"),
        (dict(top_k=2, precision="fp16"), "precision: expected one of"),
        (dict(top_k=2, backend="cutlass"), "backend: expected one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    params, x, _ = problem(6)
    with pytest.raises(ValueError, match=message):
        jax_bridge.moe_layer(params, x, **kwargs)


def test_bad_shapes():
    params, x, _ = problem(7)
    with pytest.raises(ValueError, match="x: expected last dimension d_model = 256"):
        jax_bridge.moe_layer(params, x[:, :128], top_k=2)
    with pytest.raises(ValueError, match=r"params\['w_down'\]: expected shape \(5, 256, 128\)"):
        jax_bridge.moe_layer(params | {"w_down": params["w_down"][:, :128]}, x, top_k=2)
    with pytest.raises(TypeError, match="fused: expected a bool"):
        jax_bridge.moe_layer(params, x, top_k=2, fused="yes")
    with pytest.raises(ValueError, match="d_ff: expected a positive multiple of 128"):
        jax_bridge.init_moe_params(jax.random.key(0), 256, 100, 4)
