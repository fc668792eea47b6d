"""Triton providers: the quantization kernels and the grouped GEMMs of :mod:`fp8moe.kernels`; they need
nothing but Triton and a Hopper-class GPU.

- quantizer: one read of x (dy) writes its 1x128 rows in the padded layout and its 128x1 token tiles;
  one read of w writes both weight operands;
- M-grouped GEMM (forward, dgrad): results written straight to the unpadded rows (or, ``padded=True``,
  kept in the padded layout);
- K-grouped GEMM (wgrad): dw written once in its final dtype, or added into an fp32 buffer.
Nothing reads device memory on the host, so the whole forward and backward are CUDA-graph capturable
(once the kernels are compiled and autotuned by an eager call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fp8moe.backends.base import WgradGemm, cuda_capability_reason
from fp8moe.kernels import quantize as kq
from fp8moe.kernels.gemm import k_grouped_gemm, m_grouped_gemm
from fp8moe.plan import GroupLayout


def unavailable_reason(device: torch.device) -> str | None:
    needs = "a GPU with TMA and FP8 tensor cores (compute capability 9.0 or newer)"
    return cuda_capability_reason(device, lambda major: major >= 9, needs)


class TritonQuantizer:
    def tokens(
        self, x: Tensor, plan: GroupLayout, rows: bool, token_tiles: bool, tiles_out: tuple | None = None
    ) -> tuple[Tensor, ...]:
        return kq.quantize_tokens(x, plan, rowwise=rows, token_tiles=token_tiles, token_tiles_out=tiles_out)

    def weight(self, w: Tensor, transposed: bool, out_t: tuple[Tensor, Tensor] | None) -> tuple[Tensor, ...]:
        return kq.quantize_weight(w, transposed, out_t=out_t)


# The M-grouped provider is the kernel's own entry point (same signature, ``padded`` by keyword).
triton_m_grouped = m_grouped_gemm


class TritonKGrouped:
    def prepare(self, plan: GroupLayout) -> WgradGemm:
        def wgrad(
            a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, out_dtype: torch.dtype, out: Tensor | None, accumulate: bool
        ) -> Tensor:
            return k_grouped_gemm(a, sa, b, sb, plan, out_dtype, out, accumulate=accumulate)

        return wgrad
