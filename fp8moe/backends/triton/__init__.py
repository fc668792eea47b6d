"""Triton backend: the Triton quantization kernels of :mod:`fp8moe.quant.triton` feeding the Triton
grouped GEMMs of :mod:`.kernels`; needs nothing but Triton and a Hopper-class GPU.

- forward: x quantized 1x128 into the 128-row-padded grouped layout, M-grouped NT GEMM against the
  128x128-quantized weight, output written straight to the unpadded rows;
- dgrad: dy quantized 1x128 the same way, the
  same M-grouped GEMM against the transposed weight operand (E, K, N);
- wgrad: dy and x quantized into 128x1 per-group token tiles, K-grouped GEMM per expert writing dw once
  in its final dtype.
Nothing reads device memory on the host, so the whole forward and backward are CUDA-graph capturable
(once the kernels are compiled and autotuned by an eager call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fp8moe.backends.base import Backend, check_grad_buffers, cuda_capability_reason
from fp8moe.backends.triton.kernels import k_grouped_gemm, m_grouped_gemm
from fp8moe.layout import GroupLayout, plan_groups
from fp8moe.quant import triton as tq

# wgrad(dyt, sdyt, xt, sxt, dw_dtype, dw_out) -> dw, for the group plan it was prepared for
WgradGemm = Callable[[Tensor, Tensor, Tensor, Tensor, torch.dtype, "Tensor | None"], Tensor]


class TritonBackend(Backend):
    """The Triton quantizers and GEMMs. Subclasses keep the quantizers and this orchestration and swap
    GEMMs: :attr:`m_grouped_gemm` (forward and dgrad) and :meth:`prepare_wgrad` (wgrad)."""

    name = "triton"
    m_grouped_gemm = staticmethod(m_grouped_gemm)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        needs = "a GPU with TMA and FP8 tensor cores (compute capability 9.0 or newer)"
        return cuda_capability_reason(device, lambda major: major >= 9, needs)

    def prepare_wgrad(self, layout: GroupLayout) -> WgradGemm:
        """The wgrad GEMM for ``layout``, prepared at the top of the backward and called at its end."""
        return lambda dyt, sdyt, xt, sxt, dtype, out: k_grouped_gemm(dyt, sdyt, xt, sxt, layout, dtype, out)

    def quantize_weight(
        self, w: Tensor, transposed: bool, *, out_t: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tq.quantize_weight(w, transposed, out_t=out_t)

    def forward(
        self, x: Tensor, wq: Tensor, sw: Tensor, offsets: Tensor, out_dtype: torch.dtype, *, out: Tensor | None = None
    ) -> Tensor:
        layout = plan_groups(offsets, x.shape[0])
        xq, sx = tq.quantize_rows_padded(x, layout)
        return self.m_grouped_gemm(xq, sx, wq, sw, layout, out_dtype, out)

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        wq_t: Tensor,
        sw_t: Tensor,
        offsets: Tensor,
        need_dx: bool,
        need_dw: bool,
        dx_dtype: torch.dtype,
        dw_dtype: torch.dtype,
        *,
        dx_out: Tensor | None = None,
        dw_out: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        check_grad_buffers(dy, x, offsets.shape[0], dx_dtype, dw_dtype, dx_out, dw_out)
        layout = plan_groups(offsets, x.shape[0])
        wgrad = self.prepare_wgrad(layout) if need_dw else None
        # Two kernels, not the one-read quantize_grad_output: on an H100 they take 0.20 ms together against
        # its 0.36 ms (experiments/results/bench_kernels.md); its 128x128 tiles suit neither layout.
        if need_dx:
            dyq, sdy = tq.quantize_rows_padded(dy, layout)
        if need_dw:
            dyt, sdyt = tq.quantize_token_tiles(dy, layout)
        dx = dw = None
        if need_dx:
            dx = self.m_grouped_gemm(dyq, sdy, wq_t, sw_t, layout, dx_dtype, dx_out)
            del dyq, sdy  # free the dgrad operand before the wgrad operands are allocated
        if need_dw:
            xt, sxt = tq.quantize_token_tiles(x, layout)
            dw = wgrad(dyt, sdyt, xt, sxt, dw_dtype, dw_out)
        return dx, dw
