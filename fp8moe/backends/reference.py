"""Reference providers: the recipe in plain torch, dequantize then multiply in fp32 (CPU or GPU).

They are the ground truth the fast backends are tested against, not a fast path: the quantizer builds
the GEMM layouts with torch ops and a host loop over the groups, the GEMMs read the group bounds on the
host and loop over experts. Every product runs with ``torch.autocast`` disabled, so the recipe is computed
whatever autocast context the caller is in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fp8moe.backends.base import into
from fp8moe.plan import GroupLayout
from fp8moe.quant.reference import (
    dequantize_blockwise,
    dequantize_colwise,
    dequantize_rowwise,
    quantize_blockwise,
    quantize_colwise,
    quantize_rowwise,
)
from fp8moe.recipe import BLOCK, FP8_DTYPE


def pad_rows(x: Tensor, plan: GroupLayout) -> Tensor:
    """Gather x (M, C) into the padded layout (Mp, C); padding rows are zero."""
    src = plan.padded_to_row.long()
    gathered = x[src.clamp(min=0)] if x.shape[0] else x.new_zeros(src.numel(), x.shape[1])
    return torch.where((src >= 0).unsqueeze(1), gathered, torch.zeros((), dtype=x.dtype, device=x.device))


def _groups(plan: GroupLayout) -> list[tuple[int, int]]:
    """(padded start, padded length) of each group, read on the host."""
    return list(zip(plan.padded_starts.tolist(), plan.padded_sizes.tolist()))


class ReferenceQuantizer:
    """:mod:`fp8moe.quant.reference` placed in the GEMM layouts of :mod:`fp8moe.backends.base`."""

    def tokens(
        self, x: Tensor, plan: GroupLayout, rows: bool, token_tiles: bool, tiles_out: tuple | None = None
    ) -> tuple[Tensor, ...]:
        padded = pad_rows(x, plan)
        result: tuple[Tensor, ...] = ()
        if rows:
            q, s = quantize_rowwise(padded)
            result += (q, s.T.contiguous())
        if token_tiles:
            q, s = quantize_colwise(padded)
            cols, mp = x.shape[1], plan.num_padded_rows
            flat = torch.zeros(cols * mp, dtype=FP8_DTYPE, device=x.device)
            groups = _groups(plan)
            end = sum(length for _, length in groups)
            for start, length in [*groups, (end, mp - end)]:  # the tail block of zero tokens last
                flat[cols * start : cols * (start + length)] = q[start : start + length].T.reshape(-1)
            if tiles_out is not None:
                flat = into("tiles_out[0]", tiles_out[0], flat)
                s = into("tiles_out[1]", tiles_out[1], s)
            result += (flat, s)
        return result

    def weight(self, w: Tensor, transposed: bool, out_t: tuple[Tensor, Tensor] | None) -> tuple[Tensor, ...]:
        wq, sw = quantize_blockwise(w)
        if not transposed:
            return wq, sw, wq.new_empty(0), sw.new_empty(0)
        wq_t, sw_t = out_t if out_t is not None else (None, None)
        contiguous = torch.contiguous_format  # clone: a custom op's outputs must not alias each other
        wq_t = into("out_t[0]", wq_t, wq.transpose(1, 2).clone(memory_format=contiguous))
        sw_t = into("out_t[1]", sw_t, sw.transpose(1, 2).clone(memory_format=contiguous))
        return wq, sw, wq_t, sw_t


def reference_m_grouped(
    a: Tensor,
    sa: Tensor,
    b: Tensor,
    sb: Tensor,
    plan: GroupLayout,
    out_dtype: torch.dtype,
    out: Tensor | None,
    padded: bool = False,
    low_memory: bool = False,
) -> Tensor:
    """The M-grouped GEMM of :class:`~fp8moe.backends.base.MGroupedGemm`, dequantized, fp32 per group
    (``padded=True``: (Mp, N) in the padded layout, every row outside the groups zero; ``low_memory`` is
    ignored)."""
    with torch.autocast(a.device.type, enabled=False):
        result = torch.zeros(plan.num_padded_rows + 1, b.shape[1], dtype=torch.float32, device=a.device)
        for g, (start, length) in enumerate(_groups(plan)):
            if length:  # only the groups' rows and weights are dequantized (Mp is a loose static bound)
                rows = slice(start, start + length)
                result[rows] = dequantize_rowwise(a[rows], sa[:, rows].T) @ dequantize_blockwise(b[g], sb[g]).T
        if padded:
            return into("out", out, result[:-1].to(out_dtype))
        y = result[plan.row_to_padded.long()]  # unrouted rows read the zero row past the layout
    return into("out", out, y.to(out_dtype))


class ReferenceKGrouped:
    """The K-grouped GEMM (wgrad) dequantized, fp32 per group."""

    def prepare(self, plan: GroupLayout):
        def wgrad(
            a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, out_dtype: torch.dtype, out: Tensor | None, accumulate: bool
        ) -> Tensor:
            n, k = sa.shape[1], sb.shape[1]
            d = torch.zeros(plan.num_groups, n, k, dtype=torch.float32, device=a.device)
            with torch.autocast(a.device.type, enabled=False):
                for g, (start, length) in enumerate(_groups(plan)):
                    if length:
                        blocks = slice(start // BLOCK, (start + length) // BLOCK)
                        ag = dequantize_colwise(a[n * start : n * (start + length)].view(n, length).T, sa[blocks])
                        bg = dequantize_colwise(b[k * start : k * (start + length)].view(k, length).T, sb[blocks])
                        d[g] = ag.T @ bg
            if accumulate:
                if out is None:
                    raise ValueError("out: accumulate=True needs the buffer to add into")
                return out.add_(d)
            return into("dw_out", out, d.to(out_dtype))

        return wgrad
