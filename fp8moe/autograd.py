"""``grouped_mm``: the differentiable FP8 blockwise grouped GEMM (a ``torch.autograd.Function``)."""

from __future__ import annotations

import torch
from torch import Tensor

from fp8moe import ops
from fp8moe.backends import resolve_backend_name
from fp8moe.validation import check_grouped_mm_args


class _GroupedMM(torch.autograd.Function):
    """y = x @ w[e].T per group; saves x, offsets and the transposed quantized weight for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offsets: Tensor, backend: str, out_dtype: torch.dtype) -> Tensor:
        need_dx = ctx.needs_input_grad[0]
        wq, sw, wq_t, sw_t = ops.quantize_weight(w, backend, need_dx)
        y = ops.grouped_mm_forward(x, wq, sw, offsets, backend, out_dtype)
        ctx.save_for_backward(x, offsets, wq_t, sw_t)
        ctx.backend = backend
        ctx.dtypes = (x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, offsets, wq_t, sw_t = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        if not (need_dx or need_dw):
            return None, None, None, None, None
        dx, dw = ops.grouped_mm_backward(
            dy.contiguous(), x, wq_t, sw_t, offsets, ctx.backend, need_dx, need_dw, *ctx.dtypes
        )
        return (dx if need_dx else None), (dw if need_dw else None), None, None, None


def grouped_mm(
    x: Tensor,
    w: Tensor,
    offsets: Tensor,
    *,
    backend: str = "auto",
    out_dtype: torch.dtype = torch.bfloat16,
    validate: bool = False,
) -> Tensor:
    """Blockwise-FP8 grouped GEMM: ``y[rows of e] = x[rows of e] @ w[e].T``.

    Args:
        x: (M, K) bf16 or fp32, row-major; tokens sorted by expert.
        w: (E, N, K) bf16 or fp32, row-major; a stack of per-expert ``nn.Linear`` weights (out x in).
        offsets: (E,) int32 on ``x.device``: cumulative end row of each expert's group, non-decreasing,
            ``offsets[-1] <= M``. Empty groups are allowed; rows at or past ``offsets[-1]`` get zero
            output and zero gradient.
        backend: "auto" | "reference" | "triton" | "deepgemm". ``FP8MOE_BACKEND`` overrides "auto".
        out_dtype: dtype of ``y`` (bf16, fp16 or fp32; the DeepGEMM backend computes y and dx in bf16
            and converts).
        validate: also check the *values* of ``offsets`` (one host read; for tests and debugging).

    Returns:
        y: (M, N) ``out_dtype``. Differentiable in ``x`` and ``w`` (gradients in their dtypes).

    K and N must be multiples of 128. The recipe is in :mod:`fp8moe.quant.reference`.
    """
    check_grouped_mm_args(x, w, offsets, out_dtype, validate)
    name = resolve_backend_name(backend, x.device)
    return _GroupedMM.apply(x, w, offsets, name, out_dtype)
