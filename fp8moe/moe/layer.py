"""A Mixture-of-Experts feed-forward layer (top-k softmax or sigmoid router, SwiGLU experts) on grouped GEMMs.

``MoE(d_model, d_ff, num_experts, top_k, precision="fp8" | "bf16")`` runs its experts as one fused block
(:func:`fp8moe.moe.fused_experts`: dispatch straight into the padded GEMM layout, the activations kept
padded between the GEMMs, combine read from the padded rows), its two expert GEMMs (the fused gate/up
projection and the down projection) in blockwise FP8 or in bf16 (``torch._grouped_mm``) with the same
routing, dispatch, SwiGLU and combine code, so the same model trains both ways and only the GEMMs differ.
The JAX twin is ``jax_bridge.moe.moe_layer`` (also fused by default).

``fused=False`` runs the experts op by op instead: two :func:`fp8moe.grouped_mm` (or ``torch._grouped_mm``)
calls on the expert-sorted rows with bf16 activations between them and a bf16 combine (the layer before
the fused block; slower and with a higher peak, see experiments/results/README.md). It is the layer that
gives second-order gradients in bf16: the fused block is differentiable once (``create_graph=True`` raises
a RuntimeError naming ``fused=False``).

``ep_group=group`` (a ``torch.distributed`` process group) spreads the experts over the group's ranks
(expert parallelism, :mod:`fp8moe.moe.parallel`): each rank holds E / ep_size of them and routes its own
tokens; each token travels once to every rank holding one of its experts, where they run as the fused block.

Routing, for T tokens and E experts:
- ``logits = x @ router.T`` in fp32, ``probs = softmax(logits)``; each token picks its ``top_k`` experts
  and weighs them by ``topk_probs / sum(topk_probs)``;
- the T * top_k (token, expert) assignments are sorted by expert with a stable sort, and the group
  ``offsets`` (cumulative ends, int32) come from a scatter-add count; all on the device, no host sync;
- ``aux_loss = E * sum_e f_e * P_e`` (Switch Transformer load balancing), ``f_e`` the fraction of the
  assignments routed to expert e and ``P_e`` the mean router probability of e.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fp8moe.autograd import grouped_mm
from fp8moe.backends import BACKEND_NAMES
from fp8moe.moe.fused import PRECISIONS, fused_experts
from fp8moe.moe.parallel import EP_PARTIALS, GlobalCounts, expert_parallel_experts, group_size_and_rank
from fp8moe.moe.routing import SCORES, Routing, plan_routing, route
from fp8moe.recipe import BLOCK


def _as_int(name: str, value: object) -> int:
    """``value`` as an int; anything but an integer (bool included, floats such as 128.0 too) is a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    return int(value)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts: ``y[t] = sum_j combine[t, j] * expert_{e_j}(x[t])``.

    ``expert_e(v) = w_down[e] @ (silu(g) * u)`` with ``[g; u] = w_gate_up[e] @ v``.

    Args:
        d_model: D, model width (an int, multiple of 128).
        d_ff: F, expert hidden width (an int, multiple of 128).
        num_experts: E (an int).
        top_k: experts per token, an int with ``1 <= top_k <= E``.
        precision: "fp8" (:func:`fp8moe.grouped_mm`, blockwise FP8 with fp32 master weights) or "bf16"
            (``torch._grouped_mm`` on the weights cast to bf16).
        backend: fp8moe backend for ``precision="fp8"`` ("auto", "reference", "triton", "deepgemm").
        fused: run the experts as one fused block (:func:`fp8moe.moe.fused_experts`; y accumulated in fp32
            and returned in x's dtype); None (default) means True. False: two ``grouped_mm`` calls with
            bf16 activations between them and a bf16 combine (op by op; supports ``create_graph=True`` in
            bf16; a ValueError with ``ep_group``, whose local path is the fused block).
        score: the router, "softmax" (top-k of the softmax) or "sigmoid" (DeepSeek-V3: top-k of sigmoid
            scores plus the ``expert_bias`` buffer, which only selects; see :meth:`update_expert_bias`).
        ep_group: a ``torch.distributed`` process group for expert parallelism (None: all experts here).
            This rank (``ep_rank`` of ``ep_size``) then holds experts ``[ep_rank * El, (ep_rank + 1) * El)``,
            ``El = num_local_experts = E / ep_size`` (E not divisible: ValueError), in ``w_gate_up``/``w_down``
            of El rows; the router stays (E, D), replicated. See :mod:`fp8moe.moe.parallel`.
        fp8_dispatch: under ``ep_group`` with ``precision="fp8"``, send the tokens to the experts' ranks
            quantized 1x128 (e4m3 codes + fp32 scales, ~half of bf16's bytes) instead of bf16; the forward
            is bit-identical, ``w_gate_up``'s gradient is built from the dequantized rows (see
            :mod:`fp8moe.moe.parallel`). None (default): on with ``precision="fp8"`` under ``ep_group``.
        ep_partials: under ``ep_group``, the dtype in which each rank's partial outputs (forward) and the
            partial gradients of the rows it received (backward) travel back to the tokens' ranks: "fp32"
            (default: y and dx bit-identical to the single-process layer for top_k <= 2, see
            :mod:`fp8moe.moe.parallel`) or "bf16" (half of those bytes, 2D instead of 4D per pair and
            direction; the partials rounded to bf16 before the sum). "bf16" without ``ep_group``: ValueError.

    Parameters: ``router.weight`` (E, D), ``w_gate_up`` (E, 2F, D) (rows [:F] gate, [F:] up), ``w_down``
    (E, D, F) (El under EP), fp32, initialised N(0, 1/fan_in) (router N(0, 0.02^2)).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        *,
        precision: str = "fp8",
        backend: str = "auto",
        fused: bool | None = None,
        score: str = "softmax",
        ep_group: object | None = None,
        fp8_dispatch: bool | None = None,
        ep_partials: str = "fp32",
    ) -> None:
        super().__init__()
        d_model, d_ff, num_experts, top_k = (
            _as_int(name, value)
            for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts), ("top_k", top_k))
        )
        for name, value in (("precision", precision), ("backend", backend)):
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a str, got {type(value).__name__} {value!r}")
        for name, value in (("d_model", d_model), ("d_ff", d_ff)):
            if value <= 0 or value % BLOCK:
                raise ValueError(f"{name}: expected a positive multiple of {BLOCK}, got {value}")
        if num_experts < 1:
            raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= num_experts = {num_experts}, got {top_k}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
        for name, value in (("fused", fused), ("fp8_dispatch", fp8_dispatch)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool or None, got {type(value).__name__}")
        if score not in SCORES:
            raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
        if ep_group is None:
            ep_size, ep_rank = 1, 0
        else:
            ep_size, ep_rank = group_size_and_rank(ep_group, num_experts)
            if fused is False:
                raise ValueError(
                    "fused: under ep_group the local experts run the fused block; leave fused None or True"
                )
        if not isinstance(ep_partials, str):
            raise TypeError(f"ep_partials: expected a str, got {type(ep_partials).__name__} {ep_partials!r}")
        if ep_partials not in EP_PARTIALS:
            raise ValueError(f"ep_partials: expected one of {EP_PARTIALS}, got {ep_partials!r}")
        if ep_partials != "fp32" and ep_group is None:
            raise ValueError("ep_partials: needs ep_group (it is the dtype of the partials sent back)")
        if fp8_dispatch and (ep_group is None or precision != "fp8"):
            raise ValueError("fp8_dispatch: needs ep_group and precision='fp8'")
        fused = True if fused is None else fused
        fp8_dispatch = ep_group is not None and precision == "fp8" if fp8_dispatch is None else fp8_dispatch
        self.fp8_dispatch, self.ep_partials = fp8_dispatch, ep_partials
        self.ep_group, self.ep_size, self.ep_rank = ep_group, ep_size, ep_rank
        self.num_local_experts = num_experts // ep_size
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.precision, self.backend, self.fused, self.score = precision, backend, fused, score
        self.router = nn.Linear(d_model, num_experts, bias=False)
        # DeepSeek-V3's auxiliary-loss-free balancing: a selection bias per expert, outside the gradient
        self.register_buffer("expert_bias", torch.zeros(num_experts) if score == "sigmoid" else None)
        self.last_expert_counts: Tensor | None = None
        self.w_gate_up = nn.Parameter(torch.empty(self.num_local_experts, 2 * d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(self.num_local_experts, d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.normal_(self.w_gate_up, std=1 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_down, std=1 / math.sqrt(self.d_ff))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"precision={self.precision!r}, backend={self.backend!r}, fused={self.fused}, score={self.score!r}"
            + (
                f", ep_size={self.ep_size}, ep_rank={self.ep_rank}, fp8_dispatch={self.fp8_dispatch}, "
                f"ep_partials={self.ep_partials!r}"
                if self.ep_group is not None
                else ""
            )
        )

    @torch.no_grad()
    def update_expert_bias(self, rate: float = 1e-3) -> None:
        """Auxiliary-loss-free balancing step (``score="sigmoid"``): ``bias_e += rate * sign(mean - count_e)``
        from the expert counts of the last training forward (call it once per optimizer step)."""
        if self.expert_bias is None:
            raise ValueError("score: update_expert_bias needs score='sigmoid'")
        if self.last_expert_counts is not None:
            counts = self.last_expert_counts.float()
            self.expert_bias += rate * torch.sign(counts.mean() - counts)

    def _expert_mm(self, x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        """Grouped GEMM ``x[rows of e] @ w[e].T`` in this layer's precision: x (M, K) bf16 -> (M, N) bf16."""
        if self.precision == "bf16":
            return torch._grouped_mm(x, w.to(torch.bfloat16).transpose(1, 2), offs=offsets)
        return grouped_mm(x, w, offsets, backend=self.backend, out_dtype=torch.bfloat16)

    def _experts(self, sorted_x: Tensor, offsets: Tensor) -> Tensor:
        """This rank's experts on expert-sorted bf16 rows (M, D) with group ends ``offsets`` -> (M, D) bf16."""
        h = self._expert_mm(sorted_x, self.w_gate_up, offsets)  # (M, 2F)
        a = F.silu(h[:, : self.d_ff]) * h[:, self.d_ff :]
        return self._expert_mm(a, self.w_down, offsets)  # (M, D)

    def _combine(self, out: Tensor, routing: Routing, num_tokens: int) -> Tensor:
        """Expert outputs (T*k, D) in routing.order -> (T, D) ``sum_j combine[t, j] * out[t, j]`` in out's dtype."""
        inverse = torch.empty_like(routing.order).scatter_(
            0, routing.order, torch.arange(routing.order.numel(), device=out.device)
        )
        per_token = out.index_select(0, inverse).view(num_tokens, self.top_k, self.d_model)
        return torch.bmm(routing.combine.to(out.dtype).unsqueeze(1), per_token).squeeze(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., D) -> (y (..., D) in x's dtype, aux_loss () fp32). Expert activations are bf16 (op by op)
        or as the fused block keeps them (h bf16, a fp32 until quantized).

        x must be a floating-point tensor; ``...`` may hold zero tokens (then y is empty and aux_loss is 0).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor (e.g. bf16 or fp32), got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dimension d_model = {self.d_model}, got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.d_model)
        num_tokens, k = tokens.shape[0], self.top_k
        global_counts = None if self.ep_group is None else GlobalCounts(self.ep_group)
        routing = route(
            tokens, self.router.weight, k, score=self.score, bias=self.expert_bias, reduce_counts=global_counts
        )
        if self.training and self.expert_bias is not None:
            self.last_expert_counts = (
                torch.diff(routing.offsets, prepend=routing.offsets.new_zeros(1)).detach()
                if global_counts is None
                else global_counts.counts
            )
        if global_counts is not None:
            y = expert_parallel_experts(self, tokens, routing)
            return y.to(x.dtype).reshape(x.shape), routing.aux_loss
        if self.fused:
            plan = plan_routing(routing.experts, self.num_experts, order=routing.order, offsets=routing.offsets)
            # the block takes bf16 or fp32 tensors; others (fp16, fp64) enter it as fp32, as any float enters
            # the op-by-op layer
            block_in, w_gate_up, w_down = (
                t if t.dtype in (torch.bfloat16, torch.float32) else t.float()
                for t in (tokens, self.w_gate_up, self.w_down)
            )
            y = fused_experts(
                block_in,
                w_gate_up,
                w_down,
                routing.experts,
                routing.combine,
                backend=self.backend,
                precision=self.precision,
                plan=plan,
            )
            return y.to(x.dtype).reshape(x.shape), routing.aux_loss
        # Gather from the flat (T*k, D) assignment list: unique indices, so the backward is deterministic.
        assignments = tokens.to(torch.bfloat16).unsqueeze(1).expand(-1, k, -1).reshape(num_tokens * k, self.d_model)
        out = self._experts(assignments.index_select(0, routing.order), routing.offsets)  # expert-sorted
        y = self._combine(out, routing, num_tokens)
        return y.to(x.dtype).reshape(x.shape), routing.aux_loss
