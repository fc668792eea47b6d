"""Expert parallelism over a ``torch.distributed`` process group: ``MoE(..., ep_group=group)``.

The E experts are spread over the ``ep_size`` ranks of ``group``: rank r holds experts
``[r * El, (r + 1) * El)`` with ``El = E / ep_size`` (its ``w_gate_up``/``w_down`` are (El, ...)); the router
weight is replicated (same values on every rank; its gradient is a sum over ranks, reduce it like a
data-parallel gradient). Each rank routes *its own* tokens (the tokens are sharded over the group, as in data
parallelism) over the global E experts, then :func:`expert_parallel_experts`:

1. **each token travels once per destination rank**: the (token, rank) *pairs* (rank r owns at least one of
   the token's k experts) are sorted by rank, then token; each pair carries the token's row, its k expert
   ids made local to that rank (ids of experts elsewhere replaced by -1) and its k combine weights;
2. the pair counts go through one ``all_to_all_single`` (with a fingerprint of the layer's configuration, so
   ranks whose layers differ fail with a ValueError instead of hanging) and are read on the host once (the
   only host synchronisation of the call, as in every torch EP implementation);
3. the rows travel in bf16 (``fp8_dispatch=False``), or as 1x128-quantized e4m3 codes (as uint8: gloo has no
   fp8) plus fp32 scales (**FP8 dispatch**, about half the bytes); ids and combine weights travel with them;
4. the receiver runs its El experts as the **fused block** (:func:`fp8moe.moe.fused_experts` on the received
   rows fed as fp32 (their bf16 values, or the FP8 codes decoded: exact), ids outside ``[0, El)`` routed
   nowhere): expanded to the pair's local assignments, grouped by local expert (stable: rows from source
   rank 0 first, then rank 1, ..., i.e. the order of the concatenated token shards), combined on the expert
   side into **one partial sum per pair** (slot order, fp32 from +0: the block's y in its x's dtype, fp32,
   unrounded);
5. the partials travel back in **fp32** (``MoE(ep_partials="fp32")``, the default; ``"bf16"``: rounded to bf16,
   half those bytes) and the source sums each token's partials in fp32 in rank order (fixed: deterministic),
   rounded once to x's dtype.

All the all-to-alls are differentiable (autograd Functions over ``dist.all_to_all_single``: gloo on CPUs,
NCCL on GPUs). In the backward, dy travels to the experts in bf16 when x is bf16 (dy of a bf16 y holds bf16
values: exact; else in fp32, or bf16 with ``ep_partials="bf16"``) and enters the block in fp32; the gradient
of each received row (the pair's **partial dx**, the block's fp32 sum over the pair's local slots, in slot
order) travels back in the ``ep_partials`` dtype, straight through the wire's rounding (bf16 or FP8) of the
forward; the source sums a token's partial dx in fp32 in rank order and casts the sum once to x's dtype. The
combine weights' gradients travel back in fp32 and are summed the same way (one non-zero term per slot).

**Bytes per pair row** sent to another rank (D columns, k slots; the counts exchange aside): forward 2D
(bf16 rows) or D + 4D/128 (FP8 dispatch), 12k (int64 ids, fp32 combine weights), 4D back (fp32 partials; 2D
with ``ep_partials="bf16"``); backward 2D out (dy of a bf16 x; 4D for an fp32 x with fp32 partials) and 4D
(partial dx; 2D with bf16 partials) + 4k (combine-weight gradients) back. fp32 partials cost 2D more bytes
per returned row in each direction than bf16 partials: at D = 2048, top_k = 8, 24.7 KB instead of 16.5 KB
per row over a forward and backward with bf16 dispatch (+50%), 22.7 KB instead of 14.5 KB with FP8 dispatch.
:func:`record_all_to_all` counts them (``experiments/bench_ep.py`` reports them per direction).

**Local path.** Under EP the local experts always run the fused block (``MoE(fused=None)``, the default,
resolves to True, as everywhere; ``fused=False`` is a ValueError under ``ep_group``): the partial sums are
its combine.

**Same results as the single-process layer** (``MoE(fused=True)`` holding all E experts, on the concatenation
of the ranks' shards, x in bf16 — the dispatch dtype; tested on the reference backend, bf16 and fp8, with
bf16 and FP8 dispatch):

- the expert weight gradients: bit-identical (every expert sees the same rows in the same order, every
  assignment the same dy); the global expert counts too;
- y and dx: the single-process block sums a token's k terms (``c_j * out_j`` for y, the GEMM1 dgrad rows for
  dx) in fp32 from +0 in slot order j = 0..k-1 and rounds once to x's dtype; the EP layer sums the terms of
  each rank in slot order (the others are +0, which change no sum), then the ranks' fp32 partials in rank
  order, and rounds once. The terms are the same bits, and fp32 addition is commutative but not
  associative, so y and dx are **bit-identical wherever the two addition trees agree up to the order of each
  addition's operands**: always for ``top_k <= 2`` (at most two non-zero terms: one correctly rounded
  addition either way), and for any top_k for a token whose experts all live on one rank. At ``top_k = 3`` a
  split token is bit-identical when its slots 0 and 1 live on one rank or slot 2 on a later rank than both;
  otherwise (e.g. slot 0 on rank 0, slots 1 and 2 on rank 1: ``p0 + (p1 + p2)`` against ``(p0 + p1) + p2``)
  the fp32 sums may differ in their last bits and the result by one ulp of x's dtype where they straddle a
  rounding boundary (tested: within 2^-7 relative plus 2^-16 of the largest value, and bit-identical on the
  tokens whose trees agree);
- with ``ep_partials="bf16"``: y of a split token differs by the bf16 rounding of its partials (~2^-8
  relative); dx is still bit-identical where no rank holds some but not all of the token's slots (a one-slot
  partial dx is a bf16 GEMM row, exact in bf16: every token at top_k <= 2), else it differs by that rounding;
- the router gradient: a sum over ranks in another order: fp32 rounding.

**FP8 dispatch** (``MoE(fp8_dispatch=...)``, default on with ``precision="fp8"``): the source quantizes each
pair's bf16 row 1x128 (:func:`fp8moe.quant.reference.quantize_rowwise`, the recipe's bits) and sends the
codes and scales; the receiver gives them to the fused block as GEMM1's rows (``fused_experts(x_fp8=...)``)
without re-quantizing, so the forward (y, and everything computed from it) is bit-identical to bf16
dispatch: a 1x128 tile lies in one token's row, the same tile the fused block would quantize after a bf16
dispatch. GEMM1's weight gradient needs 128x1 tiles *across* tokens, which cannot be cut from 1x128 codes:
they are quantized from the received values dequantized to fp32 (a second quantization, DeepSeek-V3's
recipe), so ``w_gate_up``'s gradient differs from bf16 dispatch by the noise of one more e4m3 rounding of x
(~28 dB SQNR between the two; against the same layer with bf16 GEMMs its SQNR drops by ~0.7 dB, tested
< 1.5 dB); every other output and gradient is bit-identical. The backward's all-to-alls are the same either
way (the rows' gradient goes straight through the FP8 rounding).

**Aux loss** (``aux_loss`` of the layer under EP): ``E * sum_e f_e * P_e`` with ``f_e = C_e / sum(C)``, ``C`` the
expert counts all-reduced over the group (global counts) and ``P_e`` the mean normalized score of expert e
over *this rank's* tokens. Its mean over the ranks equals the single-process aux loss of the concatenated
batch when the shards are equally large (mean of the shard means), and so does the gradient of that mean.
With ``score="sigmoid"``, ``last_expert_counts`` holds the global counts, so ``update_expert_bias`` keeps the
replicated bias identical on every rank.

Every rank of the group must call the layer (forward and backward) the same number of times in the same
order, even with zero tokens: the all-to-alls are collective. Any routing works, including a rank that
receives no tokens or all of them.

EP x DP, gradients and checkpoints: :func:`expert_data_parallel_groups`, :func:`gather_expert_state_dict`,
:func:`shard_expert_state_dict` (and the README's "Expert parallelism" section).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from fp8moe.moe.fused import fused_experts
from fp8moe.moe.routing import Routing, RoutingPlan
from fp8moe.quant.reference import dequantize_rowwise, quantize_rowwise
from fp8moe.recipe import FP8_DTYPE

if TYPE_CHECKING:
    from fp8moe.moe.layer import MoE

EP_PARTIALS = ("fp32", "bf16")  # MoE(ep_partials=...): the dtype of the partial outputs and partial dx sent back
EXPERT_KEYS = ("w_gate_up", "w_down")  # the state-dict entries sharded over the EP group (dim 0: experts)


def group_size_and_rank(group: object, num_experts: int) -> tuple[int, int]:
    """(ep_size, ep_rank) of this process in ``group``; ValueError if E is not divisible by the group size."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("ep_group: torch.distributed is not initialized (call dist.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"ep_group: expected a torch.distributed.ProcessGroup, got {type(group).__name__}")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("ep_group: this process is not a member of the group")
    if num_experts % size:
        raise ValueError(f"num_experts: expected a multiple of the EP group size {size}, got {num_experts}")
    return size, rank


# ---------------------------------------------------------------------------------------------- all-to-all


@dataclass
class AllToAllRecord:
    """What :func:`record_all_to_all` saw: one entry per ``all_to_all_single`` (forward and backward)."""

    bytes_sent: list[int] = field(default_factory=list)  # bytes this rank sent to *other* ranks
    bytes_moved: list[int] = field(default_factory=list)  # its whole send buffer (its own rows included)
    seconds: list[float] = field(default_factory=list)  # wall time of the call, synchronised (see below)
    dtypes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent)

    @property
    def total_bytes_moved(self) -> int:
        return sum(self.bytes_moved)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds)


_RECORD: AllToAllRecord | None = None


@contextlib.contextmanager
def record_all_to_all() -> Iterator[AllToAllRecord]:
    """Record every all-to-all of the EP layer (bytes sent to other ranks, dtype, and its time with the
    device synchronised before and after: the benchmark's measurement; it serialises the call)."""
    global _RECORD
    previous, _RECORD = _RECORD, AllToAllRecord()
    try:
        yield _RECORD
    finally:
        _RECORD = previous


def _all_to_all_single(out: Tensor, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> None:
    record = _RECORD
    if record is None:
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    sync()
    record.seconds.append(time.perf_counter() - start)
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
    own = in_splits[dist.get_rank(group)]
    record.bytes_sent.append((sum(in_splits) - own) * row_bytes)
    record.bytes_moved.append(sum(in_splits) * row_bytes)
    record.dtypes.append(str(x.dtype).removeprefix("torch."))


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    _all_to_all_single(out, x.contiguous(), out_splits, in_splits, group)
    return out


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 with split sizes; the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Rows ``x[sum(in_splits[:r]) : ...]`` go to rank r; the result holds ``out_splits[r]`` rows from rank r,
    in rank order. Differentiable (the gradient travels back by the reverse all-to-all)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def pad_fp8_rows(codes: Tensor, scales: Tensor, plan: RoutingPlan) -> tuple[Tensor, Tensor]:
    """Pre-quantized rows (T, D) e4m3 + (T, D/128) fp32 -> GEMM1's rows operand on ``plan``'s padded layout:
    ``(Mp, D)`` e4m3 and ``(D/128, Mp)`` fp32, zero on padding: the bits the fused block writes when it
    quantizes the dispatched rows itself (:func:`fp8moe.moe.pieces.quantize_padded`)."""
    source = plan.row_assignment // plan.top_k
    valid = (source >= 0)[:, None]
    index = source.clamp(min=0)
    if codes.shape[0]:
        q = torch.where(valid, codes.view(torch.uint8)[index], torch.zeros((), dtype=torch.uint8, device=codes.device))
        s = torch.where(valid, scales[index], torch.zeros((), dtype=scales.dtype, device=scales.device))
    else:
        q = codes.new_zeros(index.numel(), codes.shape[1], dtype=torch.uint8)
        s = scales.new_zeros(index.numel(), scales.shape[1])
    return q.view(FP8_DTYPE), s.T.contiguous()


# ------------------------------------------------------------------------------------------- token pairs


def _sum_pairs(rows: Tensor, pos: Tensor) -> Tensor:
    """rows (P, C) -> (T, C) fp32: ``out[t] = sum_r rows[pos[r, t]]`` over the ranks r in order, from +0 (pos
    == P: no such pair, +0 added, which changes no sum)."""
    out = rows.new_zeros(pos.shape[1], rows.shape[1], dtype=torch.float32)
    if rows.shape[0] == 0:
        return out
    for pos_r in pos:
        valid = (pos_r < rows.shape[0])[:, None]
        out = out + torch.where(
            valid, rows[pos_r.clamp(max=rows.shape[0] - 1)].float(), torch.zeros((), device=rows.device)
        )
    return out


class _GatherPairs(torch.autograd.Function):
    """x (T, C) -> (P, C): the row of each pair's token. Backward: the pairs' gradients summed per token in
    rank order (fp32; deterministic, no atomics)."""

    @staticmethod
    def forward(ctx, x: Tensor, pair_token: Tensor, pos: Tensor) -> Tensor:
        ctx.save_for_backward(pos)
        ctx.dtype = x.dtype
        return x.index_select(0, pair_token)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (pos,) = ctx.saved_tensors
        return _sum_pairs(grad, pos).to(ctx.dtype), None, None


@dataclass(frozen=True)
class _Pairs:
    """This call's pairs and exchange sizes: ``pair_token`` (P,) the token of each pair in the send buffer,
    ``pos`` (ep, T) each (rank, token) pair's row in it (P: none), the split sizes of the dispatch
    (``in_splits`` sent to each rank, ``out_splits`` received from each), the group."""

    pair_token: Tensor
    pos: Tensor
    in_splits: list[int]
    out_splits: list[int]
    group: dist.ProcessGroup


class _Dispatch(torch.autograd.Function):
    """tokens (T, D) -> the received rows (m, D) **fp32** (their bf16 values, or with FP8 dispatch the
    codes decoded) and, with FP8 dispatch, the codes (m, D) e4m3 and scales (m, D/128) fp32 (else None).

    Forward: each pair's token row rounded to bf16 and sent as bf16, or quantized 1x128
    (:func:`quantize_rowwise`) and sent as codes (uint8 on the wire) + scales. Backward: the rows' gradient
    (the partial dx of each pair, fp32 from the fused block) travels back in ``grad_wire`` (fp32: exact; bf16:
    half the bytes), straight through the wire's rounding; the source sums each token's pair gradients in
    fp32 in rank order (:func:`_sum_pairs`) and casts the sum once to the tokens' dtype."""

    @staticmethod
    def forward(ctx, tokens: Tensor, pairs: _Pairs, fp8: bool, grad_wire: torch.dtype):
        ctx.pairs, ctx.grad_wire, ctx.dtype = pairs, grad_wire, tokens.dtype
        rows = tokens.index_select(0, pairs.pair_token).to(torch.bfloat16)
        args = (pairs.out_splits, pairs.in_splits, pairs.group)
        if not fp8:
            return _exchange(rows, *args).float(), None, None
        codes, scales = quantize_rowwise(rows)
        codes = _exchange(codes.view(torch.uint8), *args).view(FP8_DTYPE)
        scales = _exchange(scales, *args)
        ctx.mark_non_differentiable(codes, scales)
        return dequantize_rowwise(codes, scales), codes, scales

    @staticmethod
    def backward(ctx, grad: Tensor, _codes, _scales) -> tuple[Tensor, None, None, None]:
        pairs = ctx.pairs
        back = _exchange(grad.to(ctx.grad_wire), pairs.in_splits, pairs.out_splits, pairs.group)
        return _sum_pairs(back, pairs.pos).to(ctx.dtype), None, None, None


class _Return(torch.autograd.Function):
    """The fused block's partial outputs (m, D) fp32, one per received pair -> (T, D) in ``out_dtype``.

    Forward: the partials travel back in ``wire`` (fp32: exact; bf16: rounded, half the bytes); the source
    sums each token's partials in fp32 in rank order and casts the sum once to ``out_dtype``. Backward: dy of
    each pair's token travels to the experts in ``grad_wire`` (bf16 when dy is bf16: exact) and enters the
    block in fp32."""

    @staticmethod
    def forward(ctx, partials: Tensor, pairs: _Pairs, wire: torch.dtype, grad_wire: torch.dtype, out_dtype):
        ctx.pairs, ctx.grad_wire, ctx.dtype = pairs, grad_wire, partials.dtype
        back = _exchange(partials.to(wire), pairs.in_splits, pairs.out_splits, pairs.group)
        return _sum_pairs(back, pairs.pos).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None, None, None]:
        pairs = ctx.pairs
        rows = dy.index_select(0, pairs.pair_token).to(ctx.grad_wire)
        return _exchange(rows, pairs.out_splits, pairs.in_splits, pairs.group).to(ctx.dtype), None, None, None, None


class GlobalCounts:
    """``route(..., reduce_counts=...)`` for EP: all-reduces the (E,) expert counts over the group and keeps
    the result (the layer's ``last_expert_counts``)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.counts = group, None

    def __call__(self, counts: Tensor) -> Tensor:
        total = counts.detach().clone()
        dist.all_reduce(total, group=self.group)
        self.counts = total
        return total


def _fingerprint(layer: MoE) -> list[int]:
    """What every rank's layer must agree on (checked in the counts exchange)."""
    return [layer.num_experts, layer.top_k, layer.d_model, layer.d_ff, ("bf16", "fp8").index(layer.precision),
            int(layer.fp8_dispatch), layer.ep_size, EP_PARTIALS.index(layer.ep_partials)]  # fmt: skip


def expert_parallel_experts(layer: MoE, tokens: Tensor, routing: Routing) -> Tensor:
    """The expert part of the layer under EP: tokens (T, D), their routing over the global E experts ->
    (T, D) in tokens' dtype, ``sum_j combine[t, j] * expert_{e_j}(tokens[t])`` (see the module docstring)."""
    group, ep, num_local = layer.ep_group, layer.ep_size, layer.num_local_experts
    num_tokens, device = tokens.shape[0], tokens.device
    experts = routing.experts
    dest = experts // num_local  # (T, k) destination rank of each assignment
    ranks = torch.arange(ep, device=device)
    hit = (dest.unsqueeze(0) == ranks[:, None, None]).any(-1)  # (ep, T): pair (r, t) exists
    send_counts = hit.sum(1)  # pairs to each rank

    # The counts exchange with the layers' fingerprint, and the one host read.
    fingerprint = torch.tensor(_fingerprint(layer), dtype=torch.int64, device=device)
    message = torch.cat([send_counts[:, None], fingerprint.expand(ep, -1)], 1).contiguous()
    received = torch.empty_like(message)
    dist.all_to_all_single(received, message, group=group)
    both = torch.stack([message, received]).tolist()
    in_splits, out_splits = [row[0] for row in both[0]], [row[0] for row in both[1]]
    for rank, row in enumerate(both[1]):
        if row[1:] != both[0][0][1:]:
            raise ValueError(
                f"ep_group: the layer of EP rank {rank} differs from this rank's ({layer.ep_rank}): (num_experts, "
                f"top_k, d_model, d_ff, precision, fp8_dispatch, ep_size, ep_partials) = {tuple(row[1:])} vs "
                f"{tuple(both[0][0][1:])}"
            )
    num_pairs = sum(in_splits)

    # Pairs in (rank, token) order: pos[r, t] is the pair's row in the send buffer (num_pairs if none).
    flat_hit = hit.reshape(-1)
    pos_flat = torch.where(flat_hit, torch.cumsum(flat_hit, 0) - 1, num_pairs)
    pair_flat = torch.empty(num_pairs + 1, dtype=torch.int64, device=device)
    pair_flat.scatter_(0, pos_flat, torch.arange(flat_hit.numel(), device=device))
    pair_flat = pair_flat[:num_pairs]
    pair_token, pair_rank = pair_flat % max(num_tokens, 1), pair_flat // max(num_tokens, 1)
    pos = pos_flat.view(ep, num_tokens)

    pairs = _Pairs(pair_token, pos, in_splits, out_splits, group)

    pair_experts = experts.index_select(0, pair_token)
    local_ids = torch.where(pair_experts // num_local == pair_rank[:, None], pair_experts % num_local, -1)
    pair_combine = _GatherPairs.apply(routing.combine, pair_token, pos)
    recv_ids = _exchange(local_ids, out_splits, in_splits, group)
    recv_combine = all_to_all(pair_combine, out_splits, in_splits, group)

    # The rows enter the fused block in fp32 (their bf16 values, or the FP8 codes decoded: exact), so that its
    # partial outputs and its dx come out in fp32, unrounded; they travel back in the ep_partials dtype.
    wire = torch.float32 if layer.ep_partials == "fp32" else torch.bfloat16
    out_dtype = tokens.dtype
    dy_wire = torch.bfloat16 if out_dtype == torch.bfloat16 else wire  # dy of a bf16 y holds bf16 values
    recv_x, codes, scales = _Dispatch.apply(tokens, pairs, layer.fp8_dispatch, wire)
    partials = fused_experts(
        recv_x,
        layer.w_gate_up,
        layer.w_down,
        recv_ids,
        recv_combine,
        backend=layer.backend,
        precision=layer.precision,
        x_fp8=(codes, scales) if layer.fp8_dispatch else None,
    )
    return _Return.apply(partials, pairs, wire, dy_wire, out_dtype)


# ------------------------------------------------------------------------------------ EP x DP, checkpoints


def expert_data_parallel_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(ep_group, expert_dp_group) of this process for EP x DP on the default (world) group.

    The world's ``W = ep_size * dp_size`` ranks form ``dp_size`` EP groups of consecutive ranks
    (``[d * ep_size, (d + 1) * ep_size)``: put them on one node, the all-to-alls are the heavy traffic) and
    ``ep_size`` expert-DP groups of the ranks holding the same experts (``{e, e + ep_size, ...}``). Every rank
    calls this (``new_group`` is collective). Gradients: the expert weights (``w_gate_up``, ``w_down``)
    are averaged over ``expert_dp_group``; every replicated parameter (router, attention, embeddings, norms)
    over the whole world (each rank saw its own tokens). See the README for the scaling of the losses.
    """
    world = dist.get_world_size()
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size: expected a positive divisor of the world size {world}, got {ep_size!r}")
    rank = dist.get_rank()
    ep_group = dp_group = None
    for d in range(world // ep_size):
        g = dist.new_group(list(range(d * ep_size, (d + 1) * ep_size)))
        if rank // ep_size == d:
            ep_group = g
    for e in range(ep_size):
        g = dist.new_group(list(range(e, world, ep_size)))
        if rank % ep_size == e:
            dp_group = g
    return ep_group, dp_group


def _is_expert_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in EXPERT_KEYS


def shard_expert_state_dict(state_dict: dict[str, Tensor], ep_size: int, ep_rank: int) -> dict[str, Tensor]:
    """A single-process state dict (of a MoE layer or a whole model) -> the state dict of EP rank ``ep_rank``
    of ``ep_size``: every ``*w_gate_up``/``*w_down`` (E, ...) sliced to its experts ``[r * El, (r + 1) * El)``,
    everything else as is. No communication."""
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank: expected 0 <= ep_rank < ep_size = {ep_size}, got {ep_rank}")
    out = {}
    for key, value in state_dict.items():
        if _is_expert_key(key):
            if value.shape[0] % ep_size:
                raise ValueError(f"{key}: {value.shape[0]} experts are not divisible by ep_size {ep_size}")
            num_local = value.shape[0] // ep_size
            value = value[ep_rank * num_local : (ep_rank + 1) * num_local].clone()
        out[key] = value
    return out


def gather_expert_state_dict(state_dict: dict[str, Tensor], group: dist.ProcessGroup) -> dict[str, Tensor]:
    """An EP rank's state dict -> the single-process one (experts concatenated in rank order), on every rank
    of ``group`` (collective: every rank calls it). Replicated entries are taken from this rank."""
    size = dist.get_world_size(group)
    out = {}
    for key, value in state_dict.items():
        if _is_expert_key(key):
            parts = [torch.empty_like(value) for _ in range(size)]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = torch.cat(parts)
        out[key] = value
    return out


__all__ = [
    "AllToAllRecord",
    "EP_PARTIALS",
    "EXPERT_KEYS",
    "GlobalCounts",
    "all_to_all",
    "expert_data_parallel_groups",
    "expert_parallel_experts",
    "gather_expert_state_dict",
    "group_size_and_rank",
    "pad_fp8_rows",
    "record_all_to_all",
    "shard_expert_state_dict",
]
