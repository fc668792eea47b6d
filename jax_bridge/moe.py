"""A Mixture-of-Experts feed-forward layer in JAX (top-k softmax router, SwiGLU experts) on grouped GEMMs.

The JAX twin of :class:`fp8moe.moe.MoE`, with the same definition, so both give the same outputs for the
same weights. ``precision="fp8"`` and ``precision="bf16"`` run the experts as one fused block,
:func:`jax_bridge.fused_experts` (dispatch, GEMM1, SwiGLU, GEMM2, combine and their backward in one
forward and one backward callback: blockwise FP8, or ``torch._grouped_mm`` on the weights cast to bf16),
the bits of the torch twin's ``MoE(..., fused=True)`` for the same routing; the router, softmax, top-k and
aux loss stay in JAX (differentiable there) and hand the block the top-k ids and combine weights.
``fused=False`` runs the op-by-op layer instead (two :func:`jax_bridge.grouped_mm` /
:func:`jax_bridge.grouped_mm_bf16` calls with a JAX SwiGLU and combine between them: the torch twin's
``fused=False``). ``precision="bf16_ragged_dot"`` is always op by op, through ``jax.lax.ragged_dot`` on the
weights cast to bf16 (pure XLA, no torch at run time; it runs densely over all experts, slower and larger on
a GPU).

Routing, for T tokens and E experts, all on the device (no host read, so it runs inside ``jax.jit``):
- ``logits = x @ router.T`` in fp32 (full fp32 precision), ``probs = softmax(logits)``; each token picks its
  ``top_k`` experts and weighs them by ``topk_probs / sum(topk_probs)``;
- the T * top_k (token, expert) assignments are sorted by expert with a stable argsort, and the group
  ``offsets`` (cumulative ends, int32) are the cumulative per-expert counts;
- ``aux_loss = E * sum_e f_e * P_e`` (Switch Transformer load balancing), ``f_e`` the fraction of the
  assignments routed to expert e and ``P_e`` the mean router probability of e.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fp8moe.backends import BACKEND_NAMES
from fp8moe.recipe import BLOCK
from jax_bridge._fused import fused_experts
from jax_bridge._grouped_mm import grouped_mm, grouped_mm_bf16

PRECISIONS = ("bf16", "bf16_ragged_dot", "fp8")


class Routing(NamedTuple):
    """Where each token goes, for T tokens, E experts and k = top_k.

    Attributes:
        order: (T*k,) int32, the flat assignment (``token * k + slot``) at each expert-sorted position.
        counts: (E,) int32 assignments per expert.
        offsets: (E,) int32 cumulative end of each expert's group in the sorted order.
        combine: (T, k) fp32 combine weights (each row sums to 1).
        experts: (T, k) int32 chosen experts, in decreasing probability.
        aux_loss: () fp32 load-balancing loss ``E * sum_e f_e * P_e``.
    """

    order: jax.Array
    counts: jax.Array
    offsets: jax.Array
    combine: jax.Array
    experts: jax.Array
    aux_loss: jax.Array


def route(x: jax.Array, router: jax.Array, top_k: int) -> Routing:
    """Top-k softmax routing of x (T, D) by router (E, D); the logits are computed in fp32."""
    num_experts = router.shape[0]
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)  # (T, E)
    topk_probs, experts = jax.lax.top_k(probs, top_k)
    combine = topk_probs / topk_probs.sum(axis=-1, keepdims=True)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    counts = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)
    offsets = jnp.cumsum(counts).astype(jnp.int32)
    # Zero tokens (a static shape) give aux_loss 0, not the NaN of an empty mean, as in the torch twin.
    fraction = counts.astype(jnp.float32) / max(flat.size, 1)
    mean_probs = probs.mean(axis=0) if x.shape[0] else probs.sum(axis=0)
    aux_loss = num_experts * jnp.sum(fraction * mean_probs)
    return Routing(order, counts, offsets, combine, experts, aux_loss)


def init_moe_params(
    key: jax.Array, d_model: int, d_ff: int, num_experts: int, dtype: jnp.dtype = jnp.float32
) -> dict[str, jax.Array]:
    """Parameters of one MoE layer, in ``dtype``.

    Returns ``{"router": (E, D), "w_gate_up": (E, 2F, D) (rows [:F] gate, [F:] up), "w_down": (E, D, F)}``,
    drawn from N(0, 1/fan_in) (fan_in = D for w_gate_up, F for w_down; the router from N(0, 0.02^2), as
    in the torch twin). D = ``d_model`` and F = ``d_ff`` must be positive multiples of 128.
    """
    _check_sizes(d_model, d_ff, num_experts)
    k_router, k_gate_up, k_down = jax.random.split(key, 3)
    normal = jax.random.normal
    return {
        "router": (0.02 * normal(k_router, (num_experts, d_model))).astype(dtype),
        "w_gate_up": (normal(k_gate_up, (num_experts, 2 * d_ff, d_model)) / math.sqrt(d_model)).astype(dtype),
        "w_down": (normal(k_down, (num_experts, d_model, d_ff)) / math.sqrt(d_ff)).astype(dtype),
    }


def _check_sizes(d_model: int, d_ff: int, num_experts: int) -> None:
    for name, value in (("d_model", d_model), ("d_ff", d_ff)):
        if value <= 0 or value % BLOCK:
            raise ValueError(f"{name}: expected a positive multiple of {BLOCK}, got {value}")
    if num_experts < 1:
        raise ValueError(f"num_experts: expected >= 1, got {num_experts}")


def _check_params(params: dict[str, jax.Array], x: jax.Array) -> tuple[int, int, int]:
    """(E, D, F) from the parameter shapes, checked against each other and against x (..., D)."""
    missing = {"router", "w_gate_up", "w_down"} - set(params)
    if missing:
        raise ValueError(f"params: missing keys {sorted(missing)} (see init_moe_params)")
    num_experts, d_model = params["router"].shape
    d_ff = params["w_down"].shape[2]
    _check_sizes(d_model, d_ff, num_experts)
    for name, expected in (("w_gate_up", (num_experts, 2 * d_ff, d_model)), ("w_down", (num_experts, d_model, d_ff))):
        if tuple(params[name].shape) != expected:
            raise ValueError(f"params[{name!r}]: expected shape {expected}, got {tuple(params[name].shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(f"x: expected last dimension d_model = {d_model}, got shape {tuple(x.shape)}")
    return num_experts, d_model, d_ff


def _expert_mm(x: jax.Array, w: jax.Array, routing: Routing, precision: str, backend: str) -> jax.Array:
    """Grouped GEMM ``x[rows of e] @ w[e].T``: x (T*k, K) bf16 expert-sorted, w (E, N, K) -> (T*k, N) bf16."""
    if precision == "bf16":
        return grouped_mm_bf16(x, w, routing.offsets)
    if precision == "bf16_ragged_dot":
        return jax.lax.ragged_dot(x, jnp.swapaxes(w.astype(jnp.bfloat16), 1, 2), routing.counts)
    return grouped_mm(x, w, routing.offsets, backend=backend, out_dtype=jnp.bfloat16)


def _swiglu(h: jax.Array, d_ff: int) -> jax.Array:
    """h (M, 2F) bf16 -> silu(h[:, :F]) * h[:, F:] (M, F) bf16, rounded as torch rounds it: silu computed in
    fp32 and rounded to bf16, then the product computed in fp32 and rounded (jax.nn.silu on bf16 rounds
    every step and would differ from the torch twin in a third of the elements)."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    gate = jax.nn.silu(h[:, :d_ff].astype(f32)).astype(bf16)
    return (gate.astype(f32) * h[:, d_ff:].astype(f32)).astype(bf16)


def moe_layer(
    params: dict[str, jax.Array],
    x: jax.Array,
    *,
    top_k: int,
    precision: str = "fp8",
    backend: str = "auto",
    fused: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Top-k routed SwiGLU experts: ``y[t] = sum_j combine[t, j] * expert_{e_j}(x[t])``.

    ``expert_e(v) = w_down[e] @ (silu(g) * u)`` with ``[g; u] = w_gate_up[e] @ v``; expert activations are
    bf16, the router runs in fp32.

    Args:
        params: from :func:`init_moe_params` (any float dtype; fp32 master weights in the fp8 recipe).
        x: (T, D) or (..., D), any float dtype.
        top_k: experts per token, ``1 <= top_k <= E``.
        precision: "fp8" (blockwise FP8), "bf16" (``torch._grouped_mm``) or "bf16_ragged_dot"
            (``jax.lax.ragged_dot``, op by op).
        backend: fp8moe backend for ``precision="fp8"`` ("auto", "reference", "triton", "deepgemm").
        fused: "fp8" and "bf16" through :func:`jax_bridge.fused_experts` (default; y accumulated in fp32) or,
            when False, op by op through :func:`jax_bridge.grouped_mm` / :func:`jax_bridge.grouped_mm_bf16`
            (bf16 activations between the GEMMs, bf16 combine).

    Returns:
        (y (like x, in x's dtype), aux_loss () fp32).
    """
    num_experts, d_model, d_ff = _check_params(params, x)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= num_experts = {num_experts}, got {top_k}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    if not isinstance(fused, bool):
        raise TypeError(f"fused: expected a bool, got {type(fused).__name__}")
    tokens = x.reshape(-1, d_model)
    num_tokens = tokens.shape[0]
    routing = route(tokens, params["router"], top_k)
    if fused and precision != "bf16_ragged_dot":
        as_float = [
            a if a.dtype in (jnp.bfloat16, jnp.float32) else a.astype(jnp.float32)
            for a in (tokens, params["w_gate_up"], params["w_down"])
        ]
        y = fused_experts(*as_float, routing.experts, routing.combine, backend=backend, precision=precision)
        return y.astype(x.dtype).reshape(x.shape), routing.aux_loss
    # Gather from the flat (T*k, D) assignment list with a permutation (unique indices): the transpose
    # is a scatter without collisions, hence deterministic on a GPU.
    assignments = jnp.repeat(tokens.astype(jnp.bfloat16), top_k, axis=0)
    h = _expert_mm(assignments[routing.order], params["w_gate_up"], routing, precision, backend)  # (T*k, 2F)
    a = _swiglu(h, d_ff)
    out = _expert_mm(a, params["w_down"], routing, precision, backend)  # (T*k, D), expert-sorted
    positions = jnp.arange(num_tokens * top_k, dtype=jnp.int32)
    inverse = jnp.zeros_like(routing.order).at[routing.order].set(positions)
    per_token = out[inverse].reshape(num_tokens, top_k, d_model)
    y = jnp.einsum(
        "tk,tkd->td", routing.combine.astype(out.dtype), per_token, preferred_element_type=jnp.float32
    ).astype(out.dtype)
    return y.astype(x.dtype).reshape(x.shape), routing.aux_loss
