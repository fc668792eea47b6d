"""Routing and its plan: which experts each token goes to, and where each assignment lives in the padded layout.

:func:`route` scores T tokens against E experts (fp32 logits ``x @ router.T``) and picks ``top_k`` each:

- ``score="softmax"`` (Mixtral/Switch): ``probs = softmax(logits)``; the top-k by probability, combine
  weights ``topk_probs / sum(topk_probs)``;
- ``score="sigmoid"`` (DeepSeek-V3): ``s = sigmoid(logits)``; the top-k by ``s + bias`` (``bias`` (E,), the
  per-expert bias of auxiliary-loss-free balancing, used for the *selection only*: it is outside the
  gradient and does not enter the combine weights), combine weights ``s_topk / sum(s_topk)``.

``aux_loss = E * sum_e f_e * P_e`` in both (``f_e``: share of the T*k assignments sent to expert e, ``P_e``:
mean over tokens of e's normalized score: the softmax probability, or ``s / sum(s)``: DeepSeek-V3's
sequence-wise balance loss when applied per sequence).

:func:`plan_routing` turns the (T, k) expert ids into one :class:`~fp8moe.plan.GroupLayout` over the T*k
assignments (sorted by expert with a stable sort, so ties keep token order and the plan is deterministic)
plus the two maps the fused block needs: ``pos`` (T, k), the padded row of each assignment, and
``row_assignment`` (Mp,), the assignment at each padded row. All on the device, no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from fp8moe import ops
from fp8moe.plan import GroupLayout, plan_groups

SCORES = ("softmax", "sigmoid")


class Routing(NamedTuple):
    """Where each token goes, for T tokens, E experts and k = top_k (all on the tokens' device).

    Attributes:
        order: (T*k,) int64, the flat assignment (``token * k + slot``) at each expert-sorted position.
        offsets: (E,) int32 cumulative end of each expert's group in the sorted order.
        combine: (T, k) fp32 combine weights (each row sums to 1); differentiable in the router weight.
        experts: (T, k) int64 chosen experts, in decreasing (biased) score.
        aux_loss: () fp32 load-balancing loss ``E * sum_e f_e * P_e``.
    """

    order: Tensor
    offsets: Tensor
    combine: Tensor
    experts: Tensor
    aux_loss: Tensor


def route(
    x: Tensor,
    router_weight: Tensor,
    top_k: int,
    *,
    score: str = "softmax",
    bias: Tensor | None = None,
    reduce_counts: Callable[[Tensor], Tensor] | None = None,
) -> Routing:
    """Top-k routing of x (T, D) by router_weight (E, D); logits in fp32 (see the module docstring).

    ``bias``: (E,) per-expert selection bias (``score="sigmoid"`` only; detached, never differentiated).
    ``reduce_counts``: maps this call's (E,) int64 expert counts to the counts ``f_e`` is taken from (expert
    parallelism: the all-reduce over the EP group, see :mod:`fp8moe.moe.parallel`); then
    ``f_e = reduced_e / sum(reduced)``. ``order`` and ``offsets`` always describe this call's tokens.
    """
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    num_experts = router_weight.shape[0]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an int with 1 <= top_k <= num_experts = {num_experts}, got {top_k!r}")
    if bias is not None:
        if score != "sigmoid":
            raise ValueError("bias: a selection bias needs score='sigmoid'")
        if not isinstance(bias, Tensor) or bias.shape != (num_experts,):
            raise ValueError(f"bias: expected a tensor of shape ({num_experts},)")
    with torch.autocast(x.device.type, enabled=False):
        logits = x.float() @ router_weight.float().T
    if score == "softmax":
        probs = logits.softmax(dim=-1)  # (T, E)
        topk_probs, experts = probs.topk(top_k, dim=-1)
        balance = probs
    else:
        scores = torch.sigmoid(logits)
        selection = scores.detach() if bias is None else scores.detach() + bias.detach().float()
        experts = selection.topk(top_k, dim=-1).indices
        topk_probs = scores.gather(1, experts)
        balance = scores / scores.sum(dim=-1, keepdim=True)
    combine = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    # Zero tokens (a static shape, no sync) give aux_loss 0, not the 0/0 of an empty mean.
    if reduce_counts is None:
        fraction = counts.float() / max(flat.numel(), 1)
    else:
        reduced = reduce_counts(counts)
        fraction = reduced.float() / reduced.sum().clamp(min=1).float()
    mean_balance = balance.mean(dim=0) if x.shape[0] else balance.sum(dim=0)
    aux_loss = num_experts * (fraction * mean_balance).sum()
    return Routing(order, offsets, combine, experts, aux_loss)


class RoutingPlan(NamedTuple):
    """The routing of T tokens (k assignments each) planned once, for both GEMMs, forward and backward.

    Attributes:
        layout: the :class:`~fp8moe.plan.GroupLayout` of the T*k assignments sorted by expert (Mp =
            ``layout.num_padded_rows`` padded rows).
        pos: (T, k) int64, the padded row of each assignment; ``Mp`` (past the layout) for an assignment
            routed nowhere (expert id outside ``[0, E)``: a capacity drop).
        row_assignment: (Mp,) int64, the flat assignment ``t * k + j`` at each padded row, -1 on padding.
    """

    layout: GroupLayout
    pos: Tensor
    row_assignment: Tensor

    @property
    def top_k(self) -> int:
        return self.pos.shape[1]


def plan_routing(
    expert_ids: Tensor, num_experts: int, *, order: Tensor | None = None, offsets: Tensor | None = None
) -> RoutingPlan:
    """Plan the routing ``expert_ids`` (T, k) int32/int64 over ``num_experts`` experts.

    Assignments with an id outside ``[0, E)`` (e.g. -1) are routed nowhere: they sit past the last group
    and get zero output. ``order``/``offsets``: the stable expert sort and group ends if already computed
    (:class:`Routing` has them; they must be what this function would compute). No host synchronisation.
    """
    if not isinstance(expert_ids, Tensor) or expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("expert_ids: expected an int32 or int64 tensor")
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids: expected a 2-D (T, k) tensor, got shape {tuple(expert_ids.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    num_tokens, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    if order is None or offsets is None:
        key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # dropped: a group past the end
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        offsets = torch.cumsum(counts[:num_experts], 0).to(torch.int32)
    if torch.compiler.is_compiling():
        # Under torch.compile: the plan as its custom op (a GPU's plan kernel is opaque to the compiler) and the
        # views read through the properties' functions (the compiler cannot enter a cached_property's lock).
        layout = GroupLayout.from_data(offsets, ops.plan_op(offsets, flat.numel()), flat.numel())
        row_to_padded = GroupLayout.row_to_padded.func(layout)
        padded_to_row = GroupLayout.padded_to_row.func(layout)
    else:
        layout = plan_groups(offsets, flat.numel())
        row_to_padded, padded_to_row = layout.row_to_padded, layout.padded_to_row
    pos = torch.empty_like(flat).scatter_(0, order, row_to_padded.long())
    source = padded_to_row.long()
    row_assignment = torch.where(source >= 0, order[source.clamp(min=0)] if flat.numel() else source, -1)
    return RoutingPlan(layout, pos.view(num_tokens, k), row_assignment)


__all__ = ["SCORES", "Routing", "RoutingPlan", "plan_routing", "route"]
