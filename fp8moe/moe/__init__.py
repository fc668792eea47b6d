"""Mixture-of-Experts on the FP8 grouped GEMMs: routing and its plan, the fused expert block, the layer.

- :mod:`fp8moe.moe.routing`: :func:`route` (softmax or DeepSeek-V3 sigmoid top-k), :func:`plan_routing`
  (the padded layout of the T*k assignments, once per layer call);
- :mod:`fp8moe.moe.fused`: :func:`fused_experts`, dispatch -> GEMM -> SwiGLU -> GEMM -> combine as one
  autograd function on the padded layout;
- :mod:`fp8moe.moe.pieces`: its memory passes in plain torch (the ground truth of their kernels);
- :mod:`fp8moe.moe.layer`: :class:`MoE`, the layer (the fused block by default, or op by op with ``fused=False``);
- :mod:`fp8moe.moe.parallel`: expert parallelism over a ``torch.distributed`` group (``MoE(ep_group=...)``:
  each token sent once per rank, FP8 dispatch, the fused block per rank; EP x DP groups, state-dict resharding).
"""

from fp8moe.moe.fused import PRECISIONS, fused_experts
from fp8moe.moe.layer import MoE
from fp8moe.moe.routing import SCORES, Routing, RoutingPlan, plan_routing, route

__all__ = ["PRECISIONS", "SCORES", "MoE", "Routing", "RoutingPlan", "fused_experts", "plan_routing", "route"]
