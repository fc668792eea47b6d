"""Group planning: where each expert's rows live in the 128-row-padded grouped layout.

Tokens arrive sorted by expert; ``offsets`` (E,) int32 holds the cumulative end row of each expert's
group. The FP8 GEMMs want every group to start on a 128-row boundary (a 1x128 tile row or a 128x1 token
tile never spans two experts), so each group is padded with zero rows to a multiple of 128. The plan is
computed once per routing, on the device (one Triton kernel on a GPU, a few torch ops elsewhere), with no
host synchronisation; the padded row count is the static bound ``padded_rows_bound(M, E)``, and rows past
the last group are tail padding.

A plan crosses custom-op and JAX-callback boundaries as two tensors and an int: ``offsets``, the packed
int32 ``data`` buffer, and ``num_rows`` (see :meth:`GroupLayout.from_data`).
"""

from __future__ import annotations

import functools
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


def plan_data_size(num_rows: int, num_groups: int) -> int:
    """Length of the packed int32 plan buffer: ``2 E + 2 Mp + M``."""
    return 2 * num_groups + 2 * padded_rows_bound(num_rows, num_groups) + num_rows


@dataclass(frozen=True, eq=False)
class GroupLayout:
    """Device-side plan of a ragged grouping of ``num_rows`` rows into ``E`` groups.

    All tensors are int32 on ``offsets.device``; everything but ``offsets`` is a view of the one packed
    buffer ``data`` = ``[padded_starts (E) | padded_sizes (E) | row_expert (Mp) | padded_to_row (Mp) |
    row_to_padded (M)]``.

    Attributes:
        offsets: (E,) cumulative end row of each group (as given).
        data: (2E + 2Mp + M,) the packed plan.
        num_rows: M, rows of the unpadded input.
        num_padded_rows: Mp = ``padded_rows_bound(M, E)``, the static row count of the padded layout.
        padded_starts: (E,) first row of each group in the padded layout (a multiple of 128).
        padded_sizes: (E,) rows of each group rounded up to a multiple of 128.
        row_expert: (Mp,) group of each padded row, -1 on padding rows (the ``grouped_layout`` DeepGEMM's
            contiguous M-grouped kernels take). Valid rows come first in every 128-row block.
        padded_to_row: (Mp,) unpadded source row of each padded row, -1 on padding rows.
        row_to_padded: (M,) padded row of each row; ``Mp`` (one past the layout) for rows at or past
            ``offsets[-1]``, so a gather from a buffer with one extra zero row unpads in one pass.
    """

    offsets: Tensor
    data: Tensor
    num_rows: int
    num_padded_rows: int

    @property
    def num_groups(self) -> int:
        return self.offsets.shape[0]

    @classmethod
    def from_data(cls, offsets: Tensor, data: Tensor, num_rows: int) -> GroupLayout:
        """Rebuild the plan from its flat form (what custom ops and callbacks carry)."""
        return cls(offsets, data, num_rows, padded_rows_bound(num_rows, offsets.shape[0]))

    def _part(self, start: int, length: int) -> Tensor:
        return self.data[start : start + length]

    def padded_sizes_on_host(self) -> tuple[Tensor, torch.cuda.Event | None]:
        """``padded_sizes`` on the host: (tensor, event to wait on before reading it, or None).

        On a GPU the copy is started once per plan, asynchronously into pinned memory, the first time this
        is called (the forward calls it when a weight gradient will need it, so the backward rarely waits).
        """
        cached = self.__dict__.get("_padded_sizes_on_host")
        if cached is None:
            if self.data.is_cuda:
                host = torch.empty(self.num_groups, dtype=torch.int32, pin_memory=True)
                host.copy_(self.padded_sizes, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                cached = (host, event)
            else:
                cached = (self.padded_sizes, None)
            self.__dict__["_padded_sizes_on_host"] = cached  # frozen dataclass: a cache, not a field
        return cached

    @functools.cached_property
    def padded_starts(self) -> Tensor:
        return self._part(0, self.num_groups)

    @functools.cached_property
    def padded_sizes(self) -> Tensor:
        return self._part(self.num_groups, self.num_groups)

    @functools.cached_property
    def row_expert(self) -> Tensor:
        return self._part(2 * self.num_groups, self.num_padded_rows)

    @functools.cached_property
    def padded_to_row(self) -> Tensor:
        return self._part(2 * self.num_groups + self.num_padded_rows, self.num_padded_rows)

    @functools.cached_property
    def row_to_padded(self) -> Tensor:
        return self._part(2 * self.num_groups + 2 * self.num_padded_rows, self.num_rows)


def check_offsets(offsets: object, name: str = "offsets") -> Tensor:
    """Raise unless ``offsets`` is a non-empty 1-D contiguous int32 tensor; return it."""
    if not isinstance(offsets, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D tensor, got shape {tuple(offsets.shape)}")
    if not offsets.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {offsets.stride()}")
    return offsets


def plan_groups(offsets: Tensor, num_rows: int) -> GroupLayout:
    """Plan the 128-row-padded layout of ``num_rows`` rows grouped by ``offsets`` (E,) int32.

    ``offsets`` must be non-decreasing with ``0 <= offsets[-1] <= num_rows`` (checked by
    :func:`fp8moe.grouped_mm` under ``validate=True``; values are never read on the host here). Values that
    break these rules are clamped (each end into ``[0, num_rows]``, a group ending before its start is
    empty), so no kernel reads or writes out of bounds; the results are then unspecified. On a CUDA
    device with Triton this is one kernel launch; elsewhere a few torch ops (:func:`plan_groups_torch`,
    which gives the same buffer).
    """
    check_offsets(offsets)
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise TypeError(f"num_rows: expected a non-negative int, got {num_rows!r}")
    if offsets.is_cuda:
        from fp8moe.kernels.plan import plan_groups_kernel

        return plan_groups_kernel(offsets, num_rows)
    return plan_groups_torch(offsets, num_rows)


def plan_groups_torch(offsets: Tensor, num_rows: int) -> GroupLayout:
    """:func:`plan_groups` in plain torch ops (any device): the model the Triton plan kernel is tested against."""
    device = offsets.device
    num_groups = offsets.numel()
    num_padded = padded_rows_bound(num_rows, num_groups)
    ends = offsets.long().clamp(0, num_rows)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    sizes = (ends - starts).clamp(min=0)
    padded_sizes = (sizes + BLOCK - 1) // BLOCK * BLOCK
    padded_ends = torch.cumsum(padded_sizes, 0)
    padded_starts = padded_ends - padded_sizes

    # padded row of each unpadded row (num_padded for rows past the last group); cummax keeps the search
    # sorted for invalid (decreasing) offsets
    rows = torch.arange(num_rows, device=device)
    g = torch.searchsorted(ends.cummax(0).values, rows, right=True)
    gc = g.clamp(max=num_groups - 1)
    row_to_padded = torch.where(g < num_groups, rows - starts[gc] + padded_starts[gc], num_padded)

    # group and source row of each padded row
    prow = torch.arange(num_padded, device=device)
    pg = torch.searchsorted(padded_ends, prow, right=True).clamp(max=num_groups - 1)
    local = prow - padded_starts[pg]
    valid = (prow < padded_ends[-1]) & (local < sizes[pg])
    row_expert = torch.where(valid, pg, -1)
    padded_to_row = torch.where(valid, starts[pg] + local, -1)

    data = torch.cat([padded_starts, padded_sizes, row_expert, padded_to_row, row_to_padded]).to(torch.int32)
    return GroupLayout(offsets, data, num_rows, num_padded)


__all__ = ["GroupLayout", "check_offsets", "padded_rows_bound", "plan_data_size", "plan_groups", "plan_groups_torch"]
