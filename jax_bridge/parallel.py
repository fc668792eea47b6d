"""Expert parallelism for the JAX MoE layer: :func:`jax_bridge.moe_layer` under a mesh axis with ``jax.shard_map``
(its op-by-op expert block, ``moe_layer(fused=False)``, unless ``expert_block=`` is given).

Layout over the ``ep`` devices of the mesh axis (default ``"ep"``): the tokens are sharded over the axis (each
device routes its own shard, as in data parallelism), the router weight is replicated, and device r holds
experts ``[r * El, (r + 1) * El)``, ``El = E / ep`` (``w_gate_up``/``w_down`` sharded on the expert axis).

Per device (:func:`moe_layer_ep`, the body of the ``shard_map``):

1. route its T tokens over the global E experts with the operations of :func:`jax_bridge.route` (fp32 router,
   top-k; mirrored in ``_route_global_aux``, which also computes the global aux loss);
2. **dispatch, each token once per destination device**: the send buffer is (ep, T) rows, block d holding, in
   token order, the tokens with at least one expert on device d, followed by empty rows; beside each row
   travel its k local expert ids (``El`` = "not here") and its k combine weights (0 where not here);
3. the all-to-all: ``jax.lax.ragged_all_to_all`` (only the filled rows travel) where it compiles (GPU),
   else ``jax.lax.all_to_all`` of the whole (ep, T) buffer, which is the worst case (one device taking all
   tokens), so nothing is ever dropped. Both deliver the same receive buffer: block s holds source s's rows
   in its token order, so :func:`all_to_all_impl` only decides which collective moves the bytes;
4. the received rows are expanded there into their (row, slot) assignments and run through
   :func:`local_expert_block`, the local part of :func:`jax_bridge.moe_layer` (same grouped GEMMs, SwiGLU and
   combine code): it returns each received row's combined partial output ``sum_{j local} c_j * expert(x)``
   in fp32. **This is the seam for the fused expert block**: any function with its signature can replace it;
5. the fp32 partial outputs travel back by the reverse all-to-all (one row per token and destination
   device), and each token's output is the sum of its partials, rounded to bf16 as the layer rounds it.

Gradients flow through both all-to-alls (their transposes are the reverse all-to-alls) and through the
dispatch of the combine weights (the router's gradient).

Numerics against the unsharded :func:`jax_bridge.moe_layer` on the concatenated token shards (tested on the
reference backend): every expert sees the same rows in the same order (source device, then token), so the
expert GEMMs give the same bits, forward and backward (fp8 and bf16 on torch). What differs is only the
grouping of the top_k sums (the combine in fp32, the token gradient over the slots in bf16): with
``top_k <= 2`` each such sum has at most two non-zero terms, a single correctly rounded addition in both, so
y, dx and the expert weight gradients are **bit-identical**; with ``top_k > 2`` a sum split across devices is
associated differently, so y and dx may differ in the last bit where a token's experts span devices (tested
with top_k = 3: within 2^-7 of the largest value). The router weight's gradient is a sum over devices (fp32
rounding). ``bf16_ragged_dot`` runs XLA's GEMM on other row counts (the same bits on CPU in a check, not a
test). On a GPU, separately compiled programs are not bit-comparable: XLA autotunes each program's GEMMs
(the fp32 router's too), and a last-bit change of a combine weight moves bf16 and FP8 roundings downstream;
seen on an H200 (one GPU, jax 0.11.2): the EP layer (ragged or padded) against the unsharded layer at 46-56
dB in bf16 and ~29 dB in fp8, or the same bits, from one process to the next.

The aux loss is the unsharded layer's, from global quantities: ``E * sum_e f_e * P_e`` with ``f_e`` the
share of expert e in all ``ep * T * k`` assignments (the counts ``psum``-ed over the axis) and ``P_e`` the
mean router probability over all ``ep * T`` tokens (the probability sums ``psum``-ed). It is the same value
on every device (equal to the unsharded aux loss to fp32 rounding) and differentiable.

Buffers (static shapes, sized for the worst case of one device receiving every token): the send and
receive buffers are (ep, T) rows, and ``ep * T * k`` assignment rows enter the local expert block, of which
only the received assignments are real (the grouped GEMMs stop at the last group's end; the element-wise
passes of the op-by-op path, gathers and SwiGLU, run over the whole buffer). The ragged all-to-all moves only
the filled rows; the padded fallback moves the whole buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fp8moe.backends import BACKEND_NAMES
from jax_bridge._grouped_mm import _platform_of, _vary, _varying_axes
from jax_bridge.moe import PRECISIONS, Routing, _check_params, _expert_mm, _swiglu

ALL_TO_ALL_IMPLS = ("ragged_all_to_all", "all_to_all")


# --- which all-to-all -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _ragged_compiles(mesh: Mesh, axis: str) -> bool:
    """Whether a small ``ragged_all_to_all`` over ``axis`` compiles for ``mesh`` (tried once per mesh)."""
    n = mesh.shape[axis]

    def probe(a: jax.Array) -> jax.Array:
        sizes = jnp.ones(n, jnp.int32)
        offsets = jnp.arange(n, dtype=jnp.int32)
        return jax.lax.ragged_all_to_all(a, jnp.zeros_like(a), offsets, sizes, offsets * 0, sizes, axis_name=axis)

    spec = P(axis)
    fn = jax.jit(jax.shard_map(probe, mesh=mesh, in_specs=spec, out_specs=spec))
    arg = jax.ShapeDtypeStruct((n * n, 1), jnp.float32, sharding=NamedSharding(mesh, spec))
    try:
        fn.lower(arg).compile()
    except Exception:  # noqa: BLE001 - e.g. XLA:CPU's UNIMPLEMENTED ragged-all-to-all (whatever the type)
        return False
    return True


def all_to_all_impl(mesh: Mesh, axis: str = "ep") -> str:
    """The collective :func:`ep_moe_layer` uses with ``all_to_all="auto"`` on ``mesh``: "ragged_all_to_all"
    if a ``jax.lax.ragged_all_to_all`` over ``axis`` compiles for the mesh's devices (tried once per mesh,
    cached; it does on GPUs), else "all_to_all" (the padded fallback; XLA:CPU has no ragged all-to-all)."""
    _check_axis(mesh, axis)
    return "ragged_all_to_all" if _ragged_compiles(mesh, axis) else "all_to_all"


def _check_axis(mesh: Mesh, axis: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis: {axis!r} is not an axis of the mesh (axes {tuple(mesh.axis_names)})")


# --- the local experts: the seam for the fused expert block ------------------------------------------------


def local_expert_block(
    x: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    expert_ids: jax.Array,
    combine: jax.Array,
    *,
    precision: str = "fp8",
    backend: str = "auto",
) -> jax.Array:
    """The expert part of :func:`jax_bridge.moe_layer` on one device's experts (the seam where the fused
    ``custom_vjp`` expert block drops in: same arguments, same result).

    Args:
        x: (R, D) bf16 rows (the received tokens).
        w_gate_up: (El, 2F, D), w_down: (El, D, F): the local experts.
        expert_ids: (R, k) int32 local expert of each (row, slot); ids outside [0, El) route nowhere.
        combine: (R, k) fp32 combine weights (0 where the slot routes nowhere).

    Returns:
        (R, D) fp32 ``sum_j combine[r, j] * expert_{ids[r, j]}(x[r])`` (products of bf16 values, summed in
        fp32, as the layer's combine; not rounded).

    The (row, slot) assignments are sorted by local expert with a stable sort (rows in order, so each
    expert sees its rows in the order of the received buffer), then the layer's own code runs: grouped GEMM
    (``_expert_mm``), SwiGLU, grouped GEMM, un-permutation and combine.
    """
    num_rows, top_k = expert_ids.shape
    num_local, d_ff = w_gate_up.shape[0], w_down.shape[2]
    flat = expert_ids.reshape(-1)
    flat = jnp.where((flat >= 0) & (flat < num_local), flat, num_local)  # "nowhere" sorts last
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    counts = jnp.zeros(num_local + 1, jnp.int32).at[flat].add(1)[:num_local]
    offsets = jnp.cumsum(counts).astype(jnp.int32)
    routing = Routing(order, counts, offsets, combine, expert_ids, None)
    assignments = jnp.repeat(x.astype(jnp.bfloat16), top_k, axis=0)
    h = _expert_mm(assignments[order], w_gate_up, routing, precision, backend)
    a = _swiglu(h, d_ff)
    out = _expert_mm(a, w_down, routing, precision, backend)
    positions = jnp.arange(num_rows * top_k, dtype=jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(positions)
    per_slot = out[inverse].reshape(num_rows, top_k, -1)
    return jnp.einsum("tk,tkd->td", combine.astype(out.dtype), per_slot, preferred_element_type=jnp.float32)


class DispatchPlan(NamedTuple):
    """Which tokens travel where, for T tokens with top_k experts each over ``ep`` devices of El experts.

    Attributes:
        here: (ep, T, k) bool, whether slot j of token t routes to an expert on device d.
        sends: (ep, T) bool, whether token t travels to device d (once, whatever its number of experts there).
        send_sizes: (ep,) int32 rows sent to each device (``sends.sum(1)``).
        perm: (ep, T) the send buffer's rows: block d lists the tokens with ``sends[d]`` in token order, then
            the others (a permutation of the tokens per device).
    """

    here: jax.Array
    sends: jax.Array
    send_sizes: jax.Array
    perm: jax.Array


def dispatch_plan(experts: jax.Array, ep_size: int, num_local: int) -> DispatchPlan:
    """The dispatch of :func:`moe_layer_ep` for ``experts`` (T, k) global expert ids (device d owns experts
    ``[d * num_local, (d+1) * num_local)``): each token travels **once per destination device**."""
    dest = experts // num_local  # (T, k)
    here = dest[None] == jnp.arange(ep_size, dtype=dest.dtype)[:, None, None]
    sends = here.any(axis=-1)
    send_sizes = sends.sum(axis=1).astype(jnp.int32)
    perm = jnp.argsort(~sends, axis=1, stable=True).astype(jnp.int32)
    return DispatchPlan(here, sends, send_sizes, perm)


# --- the layer, per device -------------------------------------------------------------------------------


def _exchange(a: jax.Array, axis: str, impl: str, sizes: tuple[jax.Array, jax.Array] | None, fill: Any) -> jax.Array:
    """(n, T, ...) blocks, block d for device d, the first ``send_sizes[d]`` rows filled -> (n, T, ...) with
    block s from device s (its first ``recv_sizes[s]`` rows filled; with the ragged collective the others
    hold ``fill``)."""
    if impl == "all_to_all":
        return jax.lax.all_to_all(a, axis, 0, 0)
    n, rows = a.shape[:2]
    send_sizes, recv_sizes = sizes
    flat = a.reshape(n * rows, *a.shape[2:])
    start = jnp.arange(n, dtype=jnp.int32) * rows
    mine = jnp.full((n,), jax.lax.axis_index(axis) * rows, jnp.int32)
    output = _vary(jnp.full_like(flat, fill), _varying_axes(flat))
    out = jax.lax.ragged_all_to_all(flat, output, start, send_sizes, mine, recv_sizes, axis_name=axis)
    return out.reshape(a.shape)


def moe_layer_ep(
    params: dict[str, jax.Array],
    x: jax.Array,
    *,
    top_k: int,
    axis: str = "ep",
    precision: str = "fp8",
    backend: str = "auto",
    all_to_all: str = "auto",
    expert_block: Callable[..., jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The per-device body of :func:`ep_moe_layer`, to call inside your own ``jax.shard_map`` over a mesh
    with the axis ``axis`` (e.g. combined with data-parallel axes).

    Args:
        params: this device's parameters: ``router`` (E, D) replicated, ``w_gate_up`` (E/ep, 2F, D) and
            ``w_down`` (E/ep, D, F) its experts (device r: experts [r * E/ep, (r+1) * E/ep)).
        x: (..., D) this device's tokens.
        all_to_all: "ragged_all_to_all", "all_to_all" or "auto" (inside a trace there is no mesh to probe:
            "ragged_all_to_all" on a GPU platform, else "all_to_all"; :func:`ep_moe_layer` probes instead).
        expert_block: the local experts, :func:`local_expert_block` by default; any function with its
            signature and result (e.g. the fused ``custom_vjp`` expert block) drops in here.

    Returns:
        (y like x, aux_loss () fp32 over all devices' tokens, the same on every device).
    """
    n = jax.lax.axis_size(axis)
    router = params["router"]
    num_experts, d_model = router.shape
    if num_experts % n:
        raise ValueError(f"num_experts: expected a multiple of the size {n} of mesh axis {axis!r}, got {num_experts}")
    num_local = num_experts // n
    local_params = {"router": router, "w_gate_up": params["w_gate_up"], "w_down": params["w_down"]}
    if local_params["w_gate_up"].shape[0] != num_local:
        raise ValueError(
            f"params['w_gate_up']: expected this device's {num_local} = {num_experts}/{n} experts on axis 0, "
            f"got shape {tuple(local_params['w_gate_up'].shape)}"
        )
    _check_params({**local_params, "router": router[:num_local]}, x)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= num_experts = {num_experts}, got {top_k}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    impl = _resolve_impl(all_to_all, x)

    tokens = x.reshape(-1, d_model)
    num_tokens = tokens.shape[0]
    routing = _route_global_aux(tokens, router, top_k, axis, n)

    here, sends, send_sizes, perm = dispatch_plan(routing.experts, n, num_local)  # once per destination device
    filled = jnp.arange(num_tokens)[None] < send_sizes[:, None]  # (n, T) filled rows of the send buffer
    bf16_tokens = jnp.broadcast_to(tokens.astype(jnp.bfloat16)[None], (n, num_tokens, d_model))
    send_x = jnp.where(filled[..., None], jnp.take_along_axis(bf16_tokens, perm[..., None], axis=1), 0)
    ids = jnp.where(here, routing.experts[None] % num_local, num_local)
    send_ids = jnp.where(filled[..., None], jnp.take_along_axis(ids, perm[..., None], axis=1), num_local)
    weights = jnp.where(here, routing.combine[None], 0.0)
    send_c = jnp.where(filled[..., None], jnp.take_along_axis(weights, perm[..., None], axis=1), 0.0)

    sizes = None
    if impl == "ragged_all_to_all":
        recv_sizes = jax.lax.all_to_all(send_sizes, axis, 0, 0, tiled=True)
        sizes = (send_sizes, recv_sizes)
    recv_x = _exchange(send_x, axis, impl, sizes, 0)
    recv_ids = _exchange(send_ids, axis, impl, sizes, num_local)
    recv_c = _exchange(send_c, axis, impl, sizes, 0)

    rows = n * num_tokens
    block = local_expert_block if expert_block is None else expert_block  # the seam for the fused block
    partial = (
        block(
            recv_x.reshape(rows, d_model),
            params["w_gate_up"],
            params["w_down"],
            recv_ids.reshape(rows, top_k),
            recv_c.reshape(rows, top_k),
            precision=precision,
            backend=backend,
        )
        .astype(jnp.float32)
        .reshape(n, num_tokens, d_model)
    )

    back = _exchange(partial, axis, impl, None if sizes is None else sizes[::-1], 0)  # block d: from device d
    inverse = jnp.argsort(perm, axis=1)  # token t's row in block d
    parts = jnp.where(sends[..., None], jnp.take_along_axis(back, inverse[..., None], axis=1), 0.0)
    # Rounded to bf16 explicitly: XLA (excess precision allowed) would drop a bare f32 -> bf16 -> f32 round
    # trip fused with the sum, while the unsharded layer's y is rounded after its combine GEMM.
    y = jax.lax.reduce_precision(parts.sum(axis=0), exponent_bits=8, mantissa_bits=7).astype(jnp.bfloat16)
    return y.astype(x.dtype).reshape(x.shape), routing.aux_loss


def _resolve_impl(all_to_all: str, x: jax.Array) -> str:
    if all_to_all == "auto":
        return "ragged_all_to_all" if _platform_of(x) in ("gpu", "cuda", "rocm") else "all_to_all"
    if all_to_all not in ALL_TO_ALL_IMPLS:
        raise ValueError(f"all_to_all: expected 'auto' or one of {ALL_TO_ALL_IMPLS}, got {all_to_all!r}")
    return all_to_all


def _route_global_aux(tokens: jax.Array, router: jax.Array, top_k: int, axis: str, n: int) -> Routing:
    """:func:`jax_bridge.route` (the same operations in the same order, so the same bits, forward and
    backward) with the aux loss of the unsharded layer over all devices' tokens: ``E * sum_e f_e * P_e`` from
    the expert counts and router probability sums ``psum``-ed over ``axis``. ``order``/``offsets`` unused."""
    num_experts = router.shape[0]
    logits = jnp.dot(tokens.astype(jnp.float32), router.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)  # (T, E)
    topk_probs, experts = jax.lax.top_k(probs, top_k)
    combine = topk_probs / topk_probs.sum(axis=-1, keepdims=True)
    flat = experts.reshape(-1)
    counts = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)
    total = n * tokens.shape[0]
    fraction = jax.lax.psum(counts, axis).astype(jnp.float32) / max(total * top_k, 1)
    mean_probs = jax.lax.psum(probs.sum(axis=0), axis) / max(total, 1)
    aux_loss = num_experts * jnp.sum(fraction * mean_probs)
    return Routing(None, counts, None, combine, experts, aux_loss)


# --- the layer on a mesh ---------------------------------------------------------------------------------


def ep_moe_layer(
    params: dict[str, jax.Array],
    x: jax.Array,
    *,
    mesh: Mesh,
    top_k: int,
    axis: str = "ep",
    precision: str = "fp8",
    backend: str = "auto",
    all_to_all: str = "auto",
    expert_block: Callable[..., jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`jax_bridge.moe_layer` with its experts spread over the mesh axis ``axis`` (expert parallelism).

    Args:
        params: the layer's global parameters (:func:`jax_bridge.init_moe_params`); ``w_gate_up`` and
            ``w_down`` are sharded over ``axis`` on the expert dimension (device r holds experts
            [r * E/ep, (r+1) * E/ep)), the router replicated. Place them with :func:`param_shardings` to
            avoid a reshard.
        x: (N, ..., D) tokens, sharded over ``axis`` on the first dimension (N divisible by the axis size).
        mesh: a mesh with the axis ``axis``.
        all_to_all: "auto" (:func:`all_to_all_impl`: ragged where it compiles), "ragged_all_to_all" or
            "all_to_all" (padded to the worst case, nothing dropped).
        expert_block: the local experts (:func:`moe_layer_ep`); :func:`local_expert_block` by default.

    Returns:
        (y like x, sharded like x; aux_loss () fp32, the unsharded layer's over all tokens). Differentiable
        (jit, grad); see the module docstring for the numerics against :func:`jax_bridge.moe_layer`.
    """
    _check_axis(mesh, axis)
    n = mesh.shape[axis]
    num_experts = params["router"].shape[0] if "router" in params else None
    if num_experts is not None and num_experts % n:
        raise ValueError(f"num_experts: expected a multiple of the size {n} of mesh axis {axis!r}, got {num_experts}")
    _check_params(params, x)
    if x.ndim < 2 or x.shape[0] % n:
        raise ValueError(
            f"x: expected (N, ..., D) with N a multiple of the size {n} of mesh axis {axis!r}, "
            f"got shape {tuple(x.shape)}"
        )
    impl = all_to_all_impl(mesh, axis) if all_to_all == "auto" else _resolve_impl(all_to_all, x)
    fn = _sharded_layer(mesh, axis, top_k, precision, backend, impl, expert_block)
    params = _place({key: params[key] for key in param_specs(axis)}, param_shardings(mesh, axis), mesh, axis)
    return fn(params, _place(x, NamedSharding(mesh, P(axis)), mesh, axis))


def _place(tree: Any, shardings: Any, mesh: Mesh, axis: str) -> Any:
    """``tree`` placed as the shard_map expects (a no-op where it already is): ``jax.reshard`` on an axis of
    type Explicit (which requires it), a sharding constraint on an Auto axis."""
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ()))
    explicit = getattr(jax.sharding, "AxisType", None)
    if explicit is not None and types.get(axis) == explicit.Explicit:
        return jax.reshard(tree, shardings)
    return jax.lax.with_sharding_constraint(tree, shardings)


@functools.lru_cache(maxsize=64)
def _sharded_layer(
    mesh: Mesh, axis: str, top_k: int, precision: str, backend: str, impl: str, expert_block: Callable | None
):
    """The jitted ``shard_map`` of :func:`moe_layer_ep` (compiled once per configuration for eager calls;
    inlined inside an outer jit)."""
    body = functools.partial(
        moe_layer_ep,
        top_k=top_k,
        axis=axis,
        precision=precision,
        backend=backend,
        all_to_all=impl,
        expert_block=expert_block,
    )
    specs = param_specs(axis)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, P(axis)), out_specs=(P(axis), P())))


def param_specs(axis: str = "ep") -> dict[str, P]:
    """The ``PartitionSpec`` of each parameter under expert parallelism over ``axis``."""
    return {"router": P(), "w_gate_up": P(axis), "w_down": P(axis)}


def param_shardings(mesh: Mesh, axis: str = "ep") -> dict[str, NamedSharding]:
    """``NamedSharding`` of each parameter (for ``jax.device_put(params, param_shardings(mesh))``)."""
    return {key: NamedSharding(mesh, spec) for key, spec in param_specs(axis).items()}


__all__ = [
    "ALL_TO_ALL_IMPLS",
    "DispatchPlan",
    "all_to_all_impl",
    "dispatch_plan",
    "ep_moe_layer",
    "local_expert_block",
    "moe_layer_ep",
    "param_shardings",
    "param_specs",
]
