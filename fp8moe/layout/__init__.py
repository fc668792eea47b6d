"""Group layout planning: where each expert's rows live in the 128-row-padded grouped layout.

Tokens arrive sorted by expert; ``offsets`` (E,) int32 holds the cumulative end row of each expert's
group. The FP8 GEMMs want every group to start on a 128-row boundary (a 1x128 tile row or a 128x1 token
tile never spans two experts), so each group is padded with zero rows to a multiple of 128. Everything
here is computed on the device from ``offsets`` with no host synchronisation; the padded row count is
the static upper bound ``padded_rows_bound(M, E)``, and rows past the last group are tail padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fp8moe.recipe import BLOCK


def padded_rows_bound(num_rows: int, num_groups: int) -> int:
    """Static number of rows of the padded layout for ``num_rows`` tokens in ``num_groups`` groups.

    Each group of size s takes ceil(s/128)*128 <= s + 127 rows, so the total is at most
    ``128 * floor((num_rows + 127 * num_groups) / 128)``; the bound never depends on the routing.
    """
    return BLOCK * ((num_rows + (BLOCK - 1) * num_groups) // BLOCK)


@dataclass(frozen=True)
class GroupLayout:
    """Device-side plan of a ragged grouping of ``num_rows`` rows into ``E`` groups.

    All tensors live on ``offsets.device`` and are int32.

    Attributes:
        offsets: (E,) cumulative end row of each group (as given).
        sizes: (E,) rows in each group.
        starts: (E,) first row of each group in unpadded order.
        padded_sizes: (E,) ``sizes`` rounded up to a multiple of 128.
        padded_starts: (E,) first row of each group in the padded layout (a multiple of 128).
        padded_ends: (E,) cumulative end of each padded group (``padded_starts + padded_sizes``).
        row_expert: (num_padded_rows,) group id of each padded row, -1 on padding rows (the
            ``grouped_layout`` DeepGEMM's contiguous M-grouped kernels take).
        padded_to_row: (num_padded_rows,) unpadded source row of each padded row, -1 on padding rows.
        row_to_padded: (num_rows,) padded destination of each row, -1 for rows at or past ``offsets[-1]``.
        num_rows: M, rows of the unpadded input.
        num_padded_rows: static row count of the padded layout, ``padded_rows_bound(M, E)``.
    """

    offsets: Tensor
    sizes: Tensor
    starts: Tensor
    padded_sizes: Tensor
    padded_starts: Tensor
    padded_ends: Tensor
    row_expert: Tensor
    padded_to_row: Tensor
    row_to_padded: Tensor
    num_rows: int
    num_padded_rows: int

    @property
    def num_groups(self) -> int:
        return self.offsets.numel()


def plan_groups(offsets: Tensor, num_rows: int) -> GroupLayout:
    """Plan the 128-row-padded layout of ``num_rows`` rows grouped by ``offsets`` (E,) int32.

    ``offsets`` must be non-decreasing with ``0 <= offsets[-1] <= num_rows`` (checked by
    :func:`fp8moe.grouped_mm` under ``validate=True``; values are not read on the host here).
    """
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(f"offsets: expected a non-empty 1-D tensor, got shape {tuple(offsets.shape)}")
    if offsets.dtype != torch.int32:
        raise TypeError(f"offsets: expected dtype torch.int32, got {offsets.dtype}")
    device = offsets.device
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    sizes = ends - starts
    padded_sizes = (sizes + BLOCK - 1) // BLOCK * BLOCK
    padded_ends = torch.cumsum(padded_sizes, 0)
    padded_starts = padded_ends - padded_sizes
    num_groups = offsets.numel()
    num_padded = padded_rows_bound(num_rows, num_groups)

    # Group of each unpadded row (num_groups for rows past the last group).
    rows = torch.arange(num_rows, device=device)
    row_group = torch.searchsorted(ends, rows, right=True)
    in_group = row_group < num_groups
    g = row_group.clamp(max=num_groups - 1)
    row_to_padded = torch.where(in_group, rows - starts[g] + padded_starts[g], -1)

    # Group and source row of each padded row.
    prow = torch.arange(num_padded, device=device)
    prow_group = torch.searchsorted(padded_ends, prow, right=True)
    pg = prow_group.clamp(max=num_groups - 1)
    local = prow - padded_starts[pg]
    valid = (prow_group < num_groups) & (local < sizes[pg])
    row_expert = torch.where(valid, pg, -1)
    padded_to_row = torch.where(valid, starts[pg] + local, -1)

    i32 = torch.int32
    return GroupLayout(
        offsets=offsets,
        sizes=sizes.to(i32),
        starts=starts.to(i32),
        padded_sizes=padded_sizes.to(i32),
        padded_starts=padded_starts.to(i32),
        padded_ends=padded_ends.to(i32),
        row_expert=row_expert.to(i32),
        padded_to_row=padded_to_row.to(i32),
        row_to_padded=row_to_padded.to(i32),
        num_rows=num_rows,
        num_padded_rows=num_padded,
    )


def pad_rows(x: Tensor, layout: GroupLayout) -> Tensor:
    """Gather x (M, C) into the padded layout (num_padded_rows, C); padding rows are zero."""
    src = layout.padded_to_row
    if x.shape[0] == 0:
        return x.new_zeros(src.numel(), x.shape[1])
    valid = (src >= 0).unsqueeze(1)
    gathered = x.index_select(0, src.clamp(min=0))
    return torch.where(valid, gathered, torch.zeros((), dtype=x.dtype, device=x.device))


def unpad_rows(y: Tensor, layout: GroupLayout) -> Tensor:
    """Gather y (num_padded_rows, C) back to unpadded order (M, C); rows past the last group are zero."""
    dst = layout.row_to_padded
    valid = (dst >= 0).unsqueeze(1)
    gathered = y.index_select(0, dst.clamp(min=0))
    return torch.where(valid, gathered, torch.zeros((), dtype=y.dtype, device=y.device))


def padded_output(layout: GroupLayout, cols: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised (num_padded_rows + 1, C) buffer whose extra last row is zero.

    A GEMM writes the padded layout into ``buffer[:num_padded_rows]``; :func:`gather_padded_output` then
    unpads it in one gather (rows past ``offsets[-1]`` read the zero row).
    """
    buffer = torch.empty(layout.num_padded_rows + 1, cols, dtype=dtype, device=layout.offsets.device)
    buffer[-1].zero_()
    return buffer


def gather_padded_output(buffer: Tensor, layout: GroupLayout, out: Tensor | None = None) -> Tensor:
    """buffer (num_padded_rows + 1, C) from :func:`padded_output` -> (M, C) in unpadded row order,
    written into ``out`` ((M, C) of buffer's dtype) when given."""
    dst = layout.row_to_padded
    index = torch.where(dst >= 0, dst, layout.num_padded_rows)
    if out is None:
        return buffer.index_select(0, index)
    return torch.index_select(buffer, 0, index, out=out)
