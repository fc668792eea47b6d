"""Expert parallelism for the JAX MoE layer: :func:`jax_bridge.moe_layer` under a mesh axis with ``jax.shard_map``,
the local experts as the fused block (:func:`jax_bridge.fused_experts`, ``fused=True``, the default, as in
``moe_layer``) or op by op (``fused=False``), or any ``expert_block=``.

Layout over the ``ep`` devices of the mesh axis (default ``"ep"``): the tokens are sharded over the axis (each
device routes its own shard, as in data parallelism), the router weight is replicated, and device r holds
experts ``[r * El, (r + 1) * El)``, ``El = E / ep`` (``w_gate_up``/``w_down`` sharded on the expert axis).

Per device (:func:`moe_layer_ep`, the body of the ``shard_map``):

1. route its T tokens over the global E experts with the operations of :func:`jax_bridge.route` (fp32 router,
   top-k; mirrored in ``_route_global_aux``, which also computes the global aux loss);
2. **dispatch, each token once per destination device**: the send buffer is (ep, T) rows, block d holding, in
   token order, the tokens with at least one expert on device d, followed by empty rows; beside each row
   travel its k local expert ids (-1 = "not here") and its k combine weights (0 where not here); with
   **FP8 dispatch** (the fused block's default in fp8) the rows travel as 1x128 e4m3 codes (uint8) + fp32
   scales (:func:`jax_bridge.quantize_rows`, once per token), else as bf16;
3. the all-to-all: ``jax.lax.ragged_all_to_all`` (only the filled rows travel) where it compiles (GPU),
   else ``jax.lax.all_to_all`` of the whole (ep, T) buffer, which is the worst case (one device taking all
   tokens), so nothing is ever dropped. Both deliver the same receive buffer: block s holds source s's rows
   in its token order, so :func:`all_to_all_impl` only decides which collective moves the bytes;
4. the received rows run through the local expert block, which returns each received row's combined partial
   output ``sum_{j local} c_j * expert(x)`` in fp32: :func:`fused_expert_block` (``fused=True``) is
   :func:`jax_bridge.fused_experts` on the rows fed as fp32 (the bf16 values, exact; with FP8 dispatch the
   codes decoded, and the codes themselves as ``x_fp8``: GEMM1's rows, not re-quantized), the local ids and
   combine weights, so its y in x's dtype is the fp32 partial, unrounded; :func:`local_expert_block`
   (``fused=False``) expands the rows into their (row, slot) assignments and runs the local part of
   ``moe_layer(fused=False)`` (same grouped GEMMs, SwiGLU and combine code). Any function with their
   signature can replace them (``expert_block=``);
5. the fp32 partial outputs travel back by the reverse all-to-all (one row per token and destination
   device), and each token's output is the fp32 sum of its partials (device order), rounded once: to x's
   dtype with the fused block (as the fused block rounds its y), to bf16 op by op (as that layer rounds it).

Gradients flow through both all-to-alls (their transposes are the reverse all-to-alls) and through the
dispatch of the combine weights (the router's gradient). With the fused block the rows' gradient travels back
in fp32, straight through the wire's rounding (bf16 or FP8, as torch's FP8 dispatch), and a token's gradients
from its devices are summed in fp32, rounded once to x's dtype.

Bytes per received row (D columns, k slots), fused block: forward 2D (bf16 rows) or D + 4D/128 (FP8
dispatch), 8k (ids, combine weights), 4D back (the fp32 partial); backward 2D (dy in bf16: y is rounded to
bf16, so its cotangent holds bf16 values; 4D for an fp32 x) out and 4D (dx) + 4k (dc) back. The op-by-op
block: the same, with bf16 rows and bf16 dx.

Numerics against the unsharded :func:`jax_bridge.moe_layer` with the same ``fused`` on the concatenated token
shards (tested on the reference backend; with ``fused=True`` on x in bf16, the dispatch dtype: for an fp32 x
the unsharded fused block quantizes the fp32 values): every expert sees the same rows in the same order
(source device, then token) in the same padded tiles, so the expert GEMMs give the same bits, forward and
backward (fp8 and bf16 on torch). What differs is only the grouping of the top_k sums (the combine in fp32,
the token gradient over the slots: fp32 with the fused block, bf16 op by op): with ``top_k <= 2`` each such
sum has at most two non-zero terms, a single correctly rounded addition in both, so y, dx and the expert
weight gradients are **bit-identical**; with ``top_k > 2`` a sum split across devices is associated
differently, so y and dx may differ in the last bit where a token's experts span devices (tested with
top_k = 3: within 2^-7 of the largest value; the fused block sums in fp32 and rounds once to bf16, so a
last-bit fp32 difference shows only where it crosses a bf16 rounding boundary). The router weight's gradient
is a sum over devices (fp32 rounding). **FP8 dispatch** against bf16 dispatch: y, dx, the router's and
``w_down``'s gradients bit-identical (a 1x128 tile lies in one token's row: the codes are those the block
would make after a bf16 dispatch); ``w_gate_up``'s gradient needs 128x1 token tiles across tokens, which
cannot be cut from 1x128 codes: the block quantizes them from the received values decoded (a second
quantization, DeepSeek-V3's recipe), so it differs from bf16 dispatch by one more e4m3 rounding of x (~28 dB
SQNR between the two; its SQNR against the bf16-GEMM layer drops by < 1 dB: tested < 1.5 dB), as in torch
(:mod:`fp8moe.moe.parallel`). ``bf16_ragged_dot`` (always op by op) runs XLA's GEMM on other row counts (the
same bits on CPU in a check, not a test). On a GPU, separately compiled programs are not bit-comparable: XLA
autotunes each program's GEMMs (the fp32 router's too), and a last-bit change of a combine weight moves bf16
and FP8 roundings downstream; seen on an H200 (one GPU, jax 0.11.2, op-by-op block): the EP layer (ragged or
padded) against the unsharded layer at 46-56 dB in bf16 and ~29 dB in fp8, or the same bits, from one process
to the next. The fused block under EP has not run on a GPU yet.

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
from jax_bridge._fused import dequantize_rows, fused_experts, quantize_rows
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
        expert_ids: (R, k) int32 local expert of each (row, slot); ids outside [0, El) (-1) route nowhere.
        combine: (R, k) fp32 combine weights (0 where the slot routes nowhere).

    Returns:
        (R, D) fp32 ``sum_j combine[r, j] * expert_{ids[r, j]}(x[r])`` (products of bf16 values, summed in
        fp32, as the layer's combine; not rounded).

    The (row, slot) assignments are sorted by local expert with a stable sort (rows in order, so each
    expert sees its rows in the order of the received buffer), then the layer's own code runs: grouped GEMM
    (``_expert_mm``), SwiGLU, grouped GEMM, un-permutation and combine. The rows enter as bf16.
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


def fused_expert_block(
    x: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    expert_ids: jax.Array,
    combine: jax.Array,
    *,
    precision: str = "fp8",
    backend: str = "auto",
    x_fp8: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """The local experts as the fused block, :func:`jax_bridge.fused_experts` (one forward and one backward
    callback): :func:`local_expert_block`'s arguments and result, plus ``x_fp8``.

    The rows enter the block as fp32 (the received bf16 values, exact), so the block's result, in x's dtype,
    is the fp32 partial output ``sum_{j local} combine[r, j] * expert(x[r])`` (slot order, not rounded) and its
    gradient for the rows comes back in fp32 too. The block quantizes (fp8) or casts (bf16) fp32 rows that
    hold bf16 values to the bits it would make from the bf16 rows, so nothing changes in the expert math.
    ``x_fp8``: the rows' 1x128 codes and scales (FP8 dispatch; x then holds the values they decode to),
    GEMM1's rows without re-quantizing (fp8 only). Weights other than bf16/fp32 are cast to fp32.
    """
    if precision not in ("fp8", "bf16"):
        raise ValueError(f"precision: the fused block runs 'fp8' or 'bf16', got {precision!r}")
    w_gate_up, w_down = (
        w if w.dtype in (jnp.bfloat16, jnp.float32) else w.astype(jnp.float32) for w in (w_gate_up, w_down)
    )
    return fused_experts(
        x.astype(jnp.float32),
        w_gate_up,
        w_down,
        expert_ids,
        combine.astype(jnp.float32),
        backend=backend,
        precision=precision,
        x_fp8=x_fp8,
    )


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _through_wire(rows: jax.Array, received: jax.Array, sizes: Any, axis: str, impl: str) -> jax.Array:
    """``received`` (what the dispatch delivered from the send buffer ``rows``: bf16 values, or FP8 codes
    decoded), differentiable in ``rows`` as the identity through the wire: the fp32 cotangent travels back
    by the reverse exchange, not rounded to the wire's dtype (straight through, as torch's FP8 dispatch)."""
    del rows, sizes, axis, impl
    return received


def _through_wire_fwd(rows, received, sizes, axis, impl):
    del rows
    return received, sizes


def _through_wire_bwd(axis, impl, sizes, ct):
    back = _exchange(ct, axis, impl, None if sizes is None else sizes[::-1], 0)
    return back, None, None


_through_wire.defvjp(_through_wire_fwd, _through_wire_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _send_back(partial: jax.Array, sizes: Any, axis: str, impl: str, dy_wire: Any) -> jax.Array:
    """The fp32 partial outputs back to their sources (the reverse exchange); the cotangent travels the other
    way as ``dy_wire`` (bf16 where it holds bf16 values: half the bytes, the same bits), then fp32."""
    del dy_wire
    return _exchange(partial, axis, impl, None if sizes is None else sizes[::-1], 0)


def _send_back_fwd(partial, sizes, axis, impl, dy_wire):
    return _send_back(partial, sizes, axis, impl, dy_wire), sizes


def _send_back_bwd(axis, impl, dy_wire, sizes, ct):
    return _exchange(ct.astype(dy_wire), axis, impl, sizes, 0).astype(jnp.float32), None


_send_back.defvjp(_send_back_fwd, _send_back_bwd)


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
    fused: bool = True,
    fp8_dispatch: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The per-device body of :func:`ep_moe_layer`, to call inside your own ``jax.shard_map`` over a mesh
    with the axis ``axis`` (e.g. combined with data-parallel axes).

    Args:
        params: this device's parameters: ``router`` (E, D) replicated, ``w_gate_up`` (E/ep, 2F, D) and
            ``w_down`` (E/ep, D, F) its experts (device r: experts [r * E/ep, (r+1) * E/ep)).
        x: (..., D) this device's tokens.
        all_to_all: "ragged_all_to_all", "all_to_all" or "auto" (inside a trace there is no mesh to probe:
            "ragged_all_to_all" on a GPU platform, else "all_to_all"; :func:`ep_moe_layer` probes instead).
        fused: the local experts as the fused block, :func:`fused_expert_block` (default, for "fp8" and
            "bf16", as :func:`jax_bridge.moe_layer`'s default), or op by op, :func:`local_expert_block`
            (``fused=False``, and always for "bf16_ragged_dot").
        fp8_dispatch: send the rows quantized 1x128 (e4m3 codes as uint8 + fp32 scales) instead of bf16 and
            hand the codes to the fused block as GEMM1's rows (its ``x_fp8``). None (default): on with
            ``precision="fp8"`` and the fused block (or an ``expert_block``, which must then take ``x_fp8=``).
        expert_block: the local experts instead of the above; any function with :func:`local_expert_block`'s
            signature and result (with FP8 dispatch, also an ``x_fp8=`` keyword) drops in here. It is treated
            as the fused block: rows fed as fp32, rows' gradients in fp32, y the fp32 sum of its partials
            rounded once to x's dtype.

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
    block, fp8_dispatch = _resolve_block(precision, backend, fused, fp8_dispatch, expert_block)
    impl = _resolve_impl(all_to_all, x)
    wide = block is not local_expert_block  # rows in fp32 (bf16 values) and partials straight from the block

    tokens = x.reshape(-1, d_model)
    num_tokens = tokens.shape[0]
    routing = _route_global_aux(tokens, router, top_k, axis, n)

    here, sends, send_sizes, perm = dispatch_plan(routing.experts, n, num_local)  # once per destination device
    filled = jnp.arange(num_tokens)[None] < send_sizes[:, None]  # (n, T) filled rows of the send buffer

    def send_buffer(a: jax.Array, fill: Any, per_token: bool = False) -> jax.Array:
        """(n, T, ...) per destination device, or (T, ...) the same for all (``per_token``) -> the send
        buffer: block d's first ``send_sizes[d]`` rows are its tokens in token order, then ``fill``."""
        if per_token:
            a = jnp.broadcast_to(a[None], (n, *a.shape))
        index = perm.reshape(n, num_tokens, *(1,) * (a.ndim - 2))
        mask = filled.reshape(n, num_tokens, *(1,) * (a.ndim - 2))
        return jnp.where(mask, jnp.take_along_axis(a, index, axis=1), fill)

    send_ids = send_buffer(jnp.where(here, routing.experts[None] % num_local, -1), -1)
    send_c = send_buffer(jnp.where(here, routing.combine[None], 0.0), 0.0)

    sizes = None
    if impl == "ragged_all_to_all":
        recv_sizes = jax.lax.all_to_all(send_sizes, axis, 0, 0, tiled=True)
        sizes = (send_sizes, recv_sizes)
    recv_ids = _exchange(send_ids, axis, impl, sizes, -1)
    recv_c = _exchange(send_c, axis, impl, sizes, 0)
    rows = n * num_tokens
    extra = {}
    if not wide:  # the op-by-op block: bf16 rows, differentiated through the exchange (bf16 cotangents)
        recv_x = _exchange(send_buffer(tokens.astype(jnp.bfloat16), 0, True), axis, impl, sizes, 0)
    else:
        # the rows the block sees: x's values in fp32 (gradient summed over the destinations in fp32), on the
        # wire as bf16 or as FP8 codes + scales; through the wire straight (fp32 cotangents travel back)
        send_x = send_buffer(tokens.astype(jnp.float32), 0.0, True)
        if fp8_dispatch:
            codes, scales = quantize_rows(tokens.astype(jnp.bfloat16))  # per token: the same tiles as per pair
            recv_codes = _exchange(send_buffer(codes, 0, True), axis, impl, sizes, 0)
            recv_scales = _exchange(send_buffer(scales, 0.0, True), axis, impl, sizes, 0)
            recv_codes, recv_scales = recv_codes.reshape(rows, d_model), recv_scales.reshape(rows, -1)
            received = dequantize_rows(recv_codes, recv_scales).reshape(n, num_tokens, d_model)
            extra = {"x_fp8": (recv_codes, recv_scales)}
        else:
            wire = jax.lax.stop_gradient(send_x).astype(jnp.bfloat16)
            received = _exchange(wire, axis, impl, sizes, 0).astype(jnp.float32)
        recv_x = _through_wire(send_x, received, sizes, axis, impl)

    partial = (
        block(
            recv_x.reshape(rows, d_model),
            params["w_gate_up"],
            params["w_down"],
            recv_ids.reshape(rows, top_k),
            recv_c.reshape(rows, top_k),
            precision=precision,
            backend=backend,
            **extra,
        )
        .astype(jnp.float32)
        .reshape(n, num_tokens, d_model)
    )

    # y's cotangent holds bf16 values when y is rounded to bf16 (the op-by-op block, or x in bf16): dy then
    # travels to the experts as bf16, losslessly; else as fp32
    dy_wire = jnp.dtype(jnp.bfloat16 if not wide or x.dtype == jnp.bfloat16 else jnp.float32)
    back = _send_back(partial, sizes, axis, impl, dy_wire)  # block d: from device d
    inverse = jnp.argsort(perm, axis=1)  # token t's row in block d
    parts = jnp.where(sends[..., None], jnp.take_along_axis(back, inverse[..., None], axis=1), 0.0)
    if wide:  # the fused block's y: the fp32 sum of the slots, rounded once to x's dtype
        return parts.sum(axis=0).astype(x.dtype).reshape(x.shape), routing.aux_loss
    # Rounded to bf16 explicitly: XLA (excess precision allowed) would drop a bare f32 -> bf16 -> f32 round
    # trip fused with the sum, while the unsharded layer's y is rounded after its combine GEMM.
    y = jax.lax.reduce_precision(parts.sum(axis=0), exponent_bits=8, mantissa_bits=7).astype(jnp.bfloat16)
    return y.astype(x.dtype).reshape(x.shape), routing.aux_loss


def _resolve_block(
    precision: str, backend: str, fused: bool, fp8_dispatch: bool | None, expert_block: Callable | None
) -> tuple[Callable[..., jax.Array], bool]:
    """(the local expert block, whether the rows travel as FP8), checked."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    if not isinstance(fused, bool):
        raise TypeError(f"fused: expected a bool, got {type(fused).__name__}")
    if fp8_dispatch is not None and not isinstance(fp8_dispatch, bool):
        raise TypeError(f"fp8_dispatch: expected a bool or None, got {type(fp8_dispatch).__name__}")
    if expert_block is not None:
        block = expert_block
    else:
        block = fused_expert_block if fused and precision != "bf16_ragged_dot" else local_expert_block
    if fp8_dispatch is None:
        fp8_dispatch = precision == "fp8" and block is not local_expert_block
    if fp8_dispatch and precision != "fp8":
        raise ValueError(f"fp8_dispatch: FP8 dispatch needs precision='fp8', got {precision!r}")
    if fp8_dispatch and block is local_expert_block:
        raise ValueError("fp8_dispatch: FP8 dispatch needs the fused expert block (fused=True), which takes the codes")
    return block, fp8_dispatch


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
    fused: bool = True,
    fp8_dispatch: bool | None = None,
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
        fused: the local experts as the fused block (default; :func:`fused_expert_block`) or op by op
            (``False``: :func:`local_expert_block`), as :func:`jax_bridge.moe_layer`'s ``fused``.
        fp8_dispatch: rows sent as 1x128 FP8 codes + scales (None: on with ``precision="fp8"`` and the fused
            block); see :func:`moe_layer_ep`.
        expert_block: the local experts instead (:func:`moe_layer_ep`).

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
    _resolve_block(precision, backend, fused, fp8_dispatch, expert_block)  # bad options raise here, not traced
    impl = all_to_all_impl(mesh, axis) if all_to_all == "auto" else _resolve_impl(all_to_all, x)
    fn = _sharded_layer(mesh, axis, top_k, precision, backend, impl, expert_block, fused, fp8_dispatch)
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
    mesh: Mesh,
    axis: str,
    top_k: int,
    precision: str,
    backend: str,
    impl: str,
    expert_block: Callable | None,
    fused: bool,
    fp8_dispatch: bool | None,
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
        fused=fused,
        fp8_dispatch=fp8_dispatch,
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
    "fused_expert_block",
    "local_expert_block",
    "moe_layer_ep",
    "param_shardings",
    "param_specs",
]
