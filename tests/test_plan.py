"""Group planning against a plain Python model of the 128-row-padded layout: the torch implementation,
and the one-launch Triton kernel (under the Triton interpreter on CPU, natively on a GPU) bit for bit."""

import os

import pytest
import torch

from fp8moe.backends.reference import pad_rows
from fp8moe.plan import GroupLayout, padded_rows_bound, plan_groups, plan_groups_torch
from fp8moe.testing import random_offsets


def python_layout(ends: list[int], num_rows: int) -> dict:
    """The padded layout computed row by row in Python."""
    starts = [0] + ends[:-1]
    sizes = [e - s for s, e in zip(starts, ends)]
    padded_sizes = [-(-s // 128) * 128 for s in sizes]
    padded_starts, acc = [], 0
    for p in padded_sizes:
        padded_starts.append(acc)
        acc += p
    num_padded = 128 * ((num_rows + 127 * len(ends)) // 128)
    row_expert, padded_to_row = [-1] * num_padded, [-1] * num_padded
    row_to_padded = [num_padded] * num_rows
    for g, (s, size, ps) in enumerate(zip(starts, sizes, padded_starts)):
        for i in range(size):
            row_expert[ps + i] = g
            padded_to_row[ps + i] = s + i
            row_to_padded[s + i] = ps + i
    return dict(
        padded_sizes=padded_sizes,
        padded_starts=padded_starts,
        row_expert=row_expert,
        padded_to_row=padded_to_row,
        row_to_padded=row_to_padded,
        num_padded_rows=num_padded,
    )


CASES = {
    "ragged": ([37, 300, 301, 700], 700),
    "empty_groups": ([0, 0, 250, 250, 600, 600], 600),
    "one_row_groups": ([1, 2, 3, 4], 4),
    "multiples_of_128": ([128, 384, 384, 512], 512),
    "tail_rows_unrouted": ([100, 200, 260], 400),
    "all_rows_unrouted": ([0, 0], 50),
    "single_group": ([129], 129),
    "no_rows": ([0, 0, 0], 0),
}


@pytest.mark.parametrize("ends, num_rows", CASES.values(), ids=CASES.keys())
def test_plan_matches_python_model(ends, num_rows):
    layout = plan_groups(torch.tensor(ends, dtype=torch.int32), num_rows)
    model = python_layout(ends, num_rows)
    assert layout.num_padded_rows == model.pop("num_padded_rows")
    assert layout.num_rows == num_rows and layout.num_groups == len(ends)
    for field, expected in model.items():
        got = getattr(layout, field)
        assert got.dtype == torch.int32, field
        assert got.tolist() == expected, field
    # every group starts on a 128-row boundary and the bound is never exceeded
    assert all(p % 128 == 0 for p in model["padded_starts"])
    assert model["padded_starts"][-1] + model["padded_sizes"][-1] <= layout.num_padded_rows
    rebuilt = GroupLayout.from_data(layout.offsets, layout.data, num_rows)
    assert rebuilt.num_padded_rows == layout.num_padded_rows and torch.equal(
        rebuilt.row_to_padded, layout.row_to_padded
    )


def test_bound_holds_for_worst_case_routing():
    # each group one row past a multiple of 128 maximises padding
    ends = torch.cumsum(torch.full((8,), 129), 0).to(torch.int32)
    layout = plan_groups(ends, 8 * 129)
    assert layout.padded_starts[-1].item() + layout.padded_sizes[-1].item() == 8 * 256 <= padded_rows_bound(8 * 129, 8)


def test_pad_and_unpad_rows_round_trip():
    gen = torch.Generator().manual_seed(0)
    ends, num_rows = [37, 37, 300, 420], 450
    layout = plan_groups(torch.tensor(ends, dtype=torch.int32), num_rows)
    x = torch.randn(num_rows, 16, generator=gen)
    padded = pad_rows(x, layout)
    assert padded.shape == (layout.num_padded_rows, 16)
    assert torch.equal(padded[layout.row_expert < 0], torch.zeros_like(padded[layout.row_expert < 0]))
    back = torch.cat([padded, padded.new_zeros(1, 16)])[layout.row_to_padded.long()]
    assert torch.equal(back[:420], x[:420])
    assert torch.equal(back[420:], torch.zeros(30, 16))  # rows past offsets[-1] come back as zero


def test_plan_rejects_bad_offsets():
    with pytest.raises(TypeError, match="offsets: expected dtype torch.int32"):
        plan_groups(torch.tensor([3, 5]), 5)
    with pytest.raises(ValueError, match="offsets: expected a non-empty 1-D tensor"):
        plan_groups(torch.zeros(0, dtype=torch.int32), 5)
    with pytest.raises(TypeError, match="offsets: expected a torch.Tensor"):
        plan_groups([3, 5], 5)
    with pytest.raises(TypeError, match="num_rows: expected a non-negative int"):
        plan_groups(torch.tensor([3, 5], dtype=torch.int32), 5.0)


def kernel_cases() -> list[tuple[torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.tensor(ends, dtype=torch.int32), rows) for ends, rows in CASES.values()]
    for e in (1, 3, 8, 37, 256):
        cases.append((random_offsets(3000, e, generator=gen, empty_groups=e // 3, tail_rows=17), 3000))
    # invalid offsets (negative, decreasing, past M): clamped the same way, never out of bounds
    cases.append((torch.tensor([-5, 100, 50, 400], dtype=torch.int32), 300))
    return cases


def test_invalid_offsets_are_clamped_in_bounds():
    for offsets, rows in [(torch.tensor([-5, 100, 50, 400], dtype=torch.int32), 300), (torch.tensor([301]), 300)]:
        layout = plan_groups_torch(offsets.int(), rows)
        assert 0 <= int(layout.padded_to_row.max()) < rows and int(layout.padded_to_row.min()) >= -1
        assert int(layout.row_to_padded.max()) <= layout.num_padded_rows and int(layout.row_to_padded.min()) >= 0


def interpreter_checks() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (see test_plan_kernel_under_the_triton_interpreter)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from fp8moe.kernels.plan import plan_groups_kernel

    for offsets, rows in kernel_cases():
        expected = plan_groups_torch(offsets, rows)
        got = plan_groups_kernel(offsets, rows)
        assert got.num_padded_rows == expected.num_padded_rows
        assert torch.equal(got.data, expected.data), (offsets.tolist()[:8], rows)


def test_plan_kernel_under_the_triton_interpreter():
    pytest.importorskip("triton")
    from triton_checks import run_in_the_interpreter

    run_in_the_interpreter("test_plan")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the CPU path runs under the interpreter)"
)
def test_plan_kernel_on_the_gpu_is_one_launch_and_matches_torch():
    for offsets, rows in kernel_cases():
        expected = plan_groups_torch(offsets, rows)
        got = plan_groups(offsets.cuda(), rows)
        assert torch.equal(got.data.cpu(), expected.data)


@pytest.mark.parametrize(
    "num_groups, options",
    [
        (1, {"skew": 0.4}),
        (3, {"skew": 0.4, "empty_groups": 2, "tail_rows": 10}),
        (8, {"skew": 0.4, "empty_groups": 2}),
        (5, {"empty_groups": 4}),
        (6, {"tail_rows": 1000}),
    ],
)
def test_random_offsets_route_every_row_but_the_tail(num_groups, options):
    """The test helper's contract: offsets[-1] == num_rows - tail_rows, the requested empty groups, and
    the skewed group's share."""
    offsets = random_offsets(1000, num_groups, generator=torch.Generator().manual_seed(num_groups), **options)
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
    assert offsets.dtype == torch.int32 and (sizes >= 0).all()
    assert int(offsets[-1]) == 1000 - options.get("tail_rows", 0)
    assert int((sizes == 0).sum()) >= options.get("empty_groups", 0)
    if "skew" in options and num_groups - options.get("empty_groups", 0) > 1:
        assert int(sizes.max()) >= round(options["skew"] * int(offsets[-1]))
