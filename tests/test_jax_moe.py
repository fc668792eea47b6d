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
    "precision, grad_floor_db, empty",
    [("fp8", 25.0, ()), ("fp8", 25.0, (1, 3)), ("bf16", 40.0, (1, 3)), ("bf16_ragged_dot", 40.0, (1, 3))],
    ids=["fp8-all_experts", "fp8-empty_experts", "bf16-empty_experts", "bf16_ragged_dot-empty_experts"],
)
def test_layer_matches_dense_loop_reference_with_gradients(precision, grad_floor_db, empty):
    params, x, dy = problem(0, empty)
    routing = jax.jit(jax_bridge.route, static_argnums=2)(x, params["router"], TOP_K)
    counts = np.asarray(routing.counts)
    assert counts.sum() == T * TOP_K and all(counts[e] == 0 for e in empty) and (counts > 0).sum() == E - len(empty)

    def layer(p, x):
        return jax_bridge.moe_layer(p, x, top_k=TOP_K, precision=precision, backend="reference")

    (y, aux), grads = jax.jit(lambda p, x: (layer(p, x), jax.grad(loss_fn(layer), argnums=(0, 1))(p, x, dy)))(params, x)
    (y_ref, aux_ref), grads_ref = jax.jit(
        lambda p, x: (
            dense_reference(p, x, TOP_K, precision),
            jax.grad(loss_fn(lambda p, x: dense_reference(p, x, TOP_K, precision)), argnums=(0, 1))(p, x, dy),
        )
    )(params, x)
    chex.assert_shape(y, (T, D))
    chex.assert_type([y, aux], [F32, F32])
    # Same experts, same per-token GEMMs: the outputs agree to bf16 rounding.
    assert db(y_ref, y) > 45
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


@pytest.mark.parametrize("precision", ["fp8", "bf16", "bf16_ragged_dot"])
def test_same_outputs_as_the_torch_twin(precision):
    moe = pytest.importorskip("fp8moe.moe")
    params, x, _ = problem(4)
    y, aux = jax.jit(lambda p, x: jax_bridge.moe_layer(p, x, top_k=TOP_K, precision=precision, backend="reference"))(
        params, x
    )
    twin = moe.MoE(D, F, E, TOP_K, precision=precision.removesuffix("_ragged_dot"), backend="reference")
    with torch.no_grad():
        for param, key in ((twin.router.weight, "router"), (twin.w_gate_up, "w_gate_up"), (twin.w_down, "w_down")):
            param.copy_(torch.from_dlpack(params[key]))
        y_t, aux_t = twin(torch.from_dlpack(x).clone())
    y_j = torch.from_dlpack(y)
    if precision == "bf16_ragged_dot":  # XLA's GEMM: within bf16 rounding of the largest output
        assert (y_j - y_t).abs().max().item() <= 2**-8 * y_t.abs().max().item()
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
    with pytest.raises(ValueError, match="d_ff: expected a positive multiple of 128"):
        jax_bridge.init_moe_params(jax.random.key(0), 256, 100, 4)
