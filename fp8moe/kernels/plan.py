"""The group plan of :mod:`fp8moe.plan` in one Triton launch.

Every program recomputes the (E,)-sized prefix sums in registers (E is small) and fills one block of
rows of the packed plan; program 0 also writes ``padded_starts`` and ``padded_sizes``. A row's group is
found by counting the group ends at or below it (a search over E), so no launch depends on another.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fp8moe.kernels.launch import direct
from fp8moe.plan import GroupLayout, padded_rows_bound, plan_data_size

_ROWS_PER_PROGRAM = 1024


@triton.jit
def _pick(values, onehot):
    """values (E,) at the group marked in each row of onehot (R, E) -> (R,)."""
    return tl.sum(tl.where(onehot, values[None, :], 0), axis=1)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _plan_kernel(offsets_ptr, data_ptr, num_groups, num_rows, num_padded, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    in_range = e < num_groups
    # clamped as in fp8moe.plan.plan_groups_torch: invalid offsets never index out of bounds
    ends = tl.minimum(tl.maximum(tl.load(offsets_ptr + e, mask=in_range, other=0), 0), num_rows)
    starts = tl.minimum(tl.maximum(tl.load(offsets_ptr + e - 1, mask=in_range & (e > 0), other=0), 0), num_rows)
    sizes = tl.maximum(ends - starts, 0)
    padded_sizes = (sizes + 127) // 128 * 128
    padded_ends = tl.cumsum(padded_sizes, axis=0)
    padded_starts = padded_ends - padded_sizes
    if tl.program_id(0) == 0:
        tl.store(data_ptr + e, padded_starts, mask=in_range)
        tl.store(data_ptr + num_groups + e, padded_sizes, mask=in_range)

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    last = num_groups - 1
    # padded rows: group = number of groups whose padded end is at or below the row
    below = (padded_ends[None, :] <= rows[:, None]) & in_range[None, :]
    group = tl.sum(below.to(tl.int32), axis=1)
    onehot = e[None, :] == tl.minimum(group, last)[:, None]
    local = rows - _pick(padded_starts, onehot)
    valid = (group < num_groups) & (local < _pick(sizes, onehot))
    base = data_ptr + 2 * num_groups
    in_padded = rows < num_padded
    tl.store(base + rows, tl.where(valid, group, -1), mask=in_padded)
    tl.store(base + num_padded + rows, tl.where(valid, _pick(starts, onehot) + local, -1), mask=in_padded)
    # unpadded rows: group = number of groups whose end is at or below the row (running max of the ends,
    # as the torch model's cummax, for invalid decreasing offsets)
    ends = tl.associative_scan(ends, 0, _maximum)
    below = (ends[None, :] <= rows[:, None]) & in_range[None, :]
    group = tl.sum(below.to(tl.int32), axis=1)
    onehot = e[None, :] == tl.minimum(group, last)[:, None]
    dest = rows - _pick(starts, onehot) + _pick(padded_starts, onehot)
    tl.store(base + 2 * num_padded + rows, tl.where(group < num_groups, dest, num_padded), mask=rows < num_rows)


def plan_groups_kernel(offsets: Tensor, num_rows: int) -> GroupLayout:
    """:func:`fp8moe.plan.plan_groups` as one kernel launch (offsets already checked)."""
    num_groups = offsets.shape[0]
    num_padded = padded_rows_bound(num_rows, num_groups)
    data = torch.empty(plan_data_size(num_rows, num_groups), dtype=torch.int32, device=offsets.device)
    block_e = triton.next_power_of_2(num_groups)
    block_r = max(16, min(_ROWS_PER_PROGRAM, 2**17 // block_e))
    grid = (max(1, triton.cdiv(num_padded, block_r)),)
    direct(_plan_kernel)[grid](offsets, data, num_groups, num_rows, num_padded, BLOCK_E=block_e, BLOCK_R=block_r)
    return GroupLayout(offsets, data, num_rows, num_padded)
