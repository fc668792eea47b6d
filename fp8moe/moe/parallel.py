"""Expert parallelism over a ``torch.distributed`` process group (first slice: torch, one row per assignment).

``MoE(..., ep_group=group)`` spreads the E experts over the ``ep_size`` ranks of ``group``: rank r holds
experts ``[r * El, (r + 1) * El)`` with ``El = E / ep_size`` (its ``w_gate_up``/``w_down`` are (El, ...)); the
router weight is replicated (same values on every rank; its gradient is a sum over ranks, reduce it over the
group like a data-parallel gradient). Each rank routes *its own* tokens (the tokens are sharded over the
group, as in data parallelism) over the global E experts, then :func:`expert_parallel_experts`:

1. sorts the T*k (token, expert) assignments by expert (the layer's stable sort, so by destination rank
   and, within a rank, by local expert);
2. exchanges the per-expert counts with one ``all_to_all_single`` of (ep_size, El) int64 counts and reads
   the split sizes on the host once (the only host synchronisation of the call, as in torchtitan);
3. sends the assignment rows (bf16) to the ranks owning their experts with :func:`all_to_all` (an autograd
   Function over ``dist.all_to_all_single``; its backward is the reverse all-to-all). gloo supports
   ``all_to_all_single`` on CPU (bf16, fp32, int64 and empty splits), so the same code runs on gloo and NCCL;
4. groups the received rows by local expert with a stable sort (rows from source rank 0 first, then rank 1,
   ...: exactly the order the single-process layer gives the expert's rows when the group's token shards
   are concatenated in rank order), runs the local experts through the layer's op-by-op path
   (:meth:`MoE._experts`: grouped GEMMs on the local weights, fp8 through :func:`fp8moe.grouped_mm` or
   bf16), ungroups them and sends the results back with the reverse all-to-all;
5. combines them with the combine weights exactly as the single-process layer does.

Hence y, dx and the local experts' weight gradients are bit-identical to those of the single-process layer
holding all experts, run on the concatenation of the ranks' token shards (tested on the reference backend).

This slice sends **one row per (token, expert) assignment**; sending each token once per destination rank
(and expanding it there), FP8 dispatch and ``fused=True`` under EP come next.

Aux loss (``aux_loss`` of the layer under EP): ``E * sum_e f_e * P_e`` with ``f_e = C_e / sum(C)``, ``C`` the
expert counts all-reduced over the group (global counts) and ``P_e`` the mean normalized score of expert e
over *this rank's* tokens. Its mean over the ranks equals the single-process aux loss of the concatenated
batch when the shards are equally large (mean of the shard means), and so does the gradient of that mean
(what averaging the ranks' losses or gradients computes). With ``score="sigmoid"``, ``last_expert_counts``
holds the global counts, so ``update_expert_bias`` keeps the replicated bias identical on every rank.

Every rank of the group must call the layer (forward and backward) the same number of times in the same
order, even with zero tokens: the all-to-alls are collective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from fp8moe.moe.routing import Routing

if TYPE_CHECKING:
    from fp8moe.moe.layer import MoE


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


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 with split sizes; the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        dx = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(dx, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return dx, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Rows ``x[sum(in_splits[:r]) : ...]`` go to rank r; the result holds ``out_splits[r]`` rows from rank r,
    in rank order. Differentiable (the gradient travels back by the reverse all-to-all)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


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


def expert_parallel_experts(layer: MoE, tokens: Tensor, routing: Routing) -> Tensor:
    """The expert part of the layer under EP: tokens (T, D), their routing over the global E experts ->
    (T, D) bf16 ``sum_j combine[t, j] * expert_{e_j}(tokens[t])`` (see the module docstring)."""
    group, ep, num_local = layer.ep_group, layer.ep_size, layer.num_local_experts
    num_tokens, k, d_model = tokens.shape[0], layer.top_k, layer.d_model
    counts = torch.diff(routing.offsets.long(), prepend=routing.offsets.new_zeros(1, dtype=torch.int64))
    send_counts = counts.view(ep, num_local).contiguous()  # [destination rank, its local expert]
    recv_counts = torch.empty_like(send_counts)  # [source rank, local expert]
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    in_splits, out_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # the host read
    num_received = sum(out_splits)

    # Same assignment rows and expert-sorted order as the single-process layer.
    assignments = tokens.to(torch.bfloat16).unsqueeze(1).expand(-1, k, -1).reshape(num_tokens * k, d_model)
    sorted_x = assignments.index_select(0, routing.order)
    received = all_to_all(sorted_x, out_splits, in_splits, group)

    # Each source's rows arrive sorted by local expert: their ids follow from the received counts.
    local_ids = torch.arange(num_local, device=tokens.device).repeat(ep)
    local_ids = torch.repeat_interleave(local_ids, recv_counts.reshape(-1), output_size=num_received)
    local_order = torch.argsort(local_ids, stable=True)
    local_offsets = torch.cumsum(recv_counts.sum(0), 0).to(torch.int32)
    out = layer._experts(received.index_select(0, local_order), local_offsets)
    ungroup = torch.empty_like(local_order).scatter_(0, local_order, torch.arange(num_received, device=tokens.device))
    returned = all_to_all(out.index_select(0, ungroup), in_splits, out_splits, group)
    return layer._combine(returned, routing, num_tokens)


__all__ = ["GlobalCounts", "all_to_all", "expert_parallel_experts", "group_size_and_rank"]
