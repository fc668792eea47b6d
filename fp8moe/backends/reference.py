"""Reference backend: the recipe in plain torch, dequantize then multiply in fp32 (CPU or GPU).

It is the ground truth the fast backends are tested against, not a fast path: it reads the group
boundaries on the host once per call and loops over experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fp8moe.backends.base import Backend, into
from fp8moe.quant.reference import (
    BLOCK,
    dequantize_blockwise,
    dequantize_colwise,
    dequantize_rowwise,
    quantize_blockwise,
    quantize_colwise,
    quantize_rowwise,
)


def _group_bounds(offsets: Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def _dequantized_token_tiles(t: Tensor) -> Tensor:
    """One group's rows t (m, C) through 128x1 token tiles (zero-padded to 128 rows), in fp32."""
    pad = -t.shape[0] % BLOCK
    padded = torch.nn.functional.pad(t.float(), (0, 0, 0, pad))
    return dequantize_colwise(*quantize_colwise(padded))[: t.shape[0]]


class ReferenceBackend(Backend):
    name = "reference"

    def quantize_weight(
        self, w: Tensor, transposed: bool, *, out_t: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        wq, sw = quantize_blockwise(w)
        if not transposed:
            return wq, sw, wq.new_empty(0), sw.new_empty(0)
        wq_t, sw_t = out_t if out_t is not None else (None, None)
        contiguous = torch.contiguous_format  # clone: a custom op's outputs must not alias its inputs or each other
        wq_t = into("out_t[0]", wq_t, wq.transpose(1, 2).clone(memory_format=contiguous))
        sw_t = into("out_t[1]", sw_t, sw.transpose(1, 2).clone(memory_format=contiguous))
        return wq, sw, wq_t, sw_t

    def forward(
        self, x: Tensor, wq: Tensor, sw: Tensor, offsets: Tensor, out_dtype: torch.dtype, *, out: Tensor | None = None
    ) -> Tensor:
        xd = dequantize_rowwise(*quantize_rowwise(x))
        wd = dequantize_blockwise(wq, sw)
        y = torch.zeros(x.shape[0], wq.shape[1], dtype=torch.float32, device=x.device)
        for e, (lo, hi) in enumerate(_group_bounds(offsets)):
            if hi > lo:
                y[lo:hi] = xd[lo:hi] @ wd[e].T
        return into("out", out, y.to(out_dtype))

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
        bounds = _group_bounds(offsets)
        dx = dw = None
        if need_dx:
            dyd = dequantize_rowwise(*quantize_rowwise(dy))
            wd_t = dequantize_blockwise(wq_t, sw_t)  # (E, K, N)
            dx = torch.zeros(dy.shape[0], wd_t.shape[1], dtype=torch.float32, device=dy.device)
            for e, (lo, hi) in enumerate(bounds):
                if hi > lo:
                    dx[lo:hi] = dyd[lo:hi] @ wd_t[e].T
            dx = into("dx_out", dx_out, dx.to(dx_dtype))
        if need_dw:
            dw = torch.zeros(len(bounds), dy.shape[1], x.shape[1], dtype=torch.float32, device=dy.device)
            for e, (lo, hi) in enumerate(bounds):
                if hi > lo:
                    dw[e] = _dequantized_token_tiles(dy[lo:hi]).T @ _dequantized_token_tiles(x[lo:hi])
            dw = into("dw_out", dw_out, dw.to(dw_dtype))
        return dx, dw
