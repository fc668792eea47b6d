"""Group layout planning against a plain Python model of the 128-row-padded layout."""

import pytest
import torch

from fp8moe.layout import pad_rows, padded_rows_bound, plan_groups, unpad_rows
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
    row_to_padded = [-1] * num_rows
    for g, (s, size, ps) in enumerate(zip(starts, sizes, padded_starts)):
        for i in range(size):
            row_expert[ps + i] = g
            padded_to_row[ps + i] = s + i
            row_to_padded[s + i] = ps + i
    return dict(
        sizes=sizes,
        starts=starts,
        padded_sizes=padded_sizes,
        padded_starts=padded_starts,
        padded_ends=[p + q for p, q in zip(padded_starts, padded_sizes)],
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
    assert model["padded_ends"][-1] <= layout.num_padded_rows


def test_bound_holds_for_worst_case_routing():
    # each group one row past a multiple of 128 maximises padding
    ends = torch.cumsum(torch.full((8,), 129), 0).to(torch.int32)
    layout = plan_groups(ends, 8 * 129)
    assert layout.padded_ends[-1].item() == 8 * 256 <= padded_rows_bound(8 * 129, 8)


def test_pad_and_unpad_rows_round_trip():
    gen = torch.Generator().manual_seed(0)
    ends, num_rows = [37, 37, 300, 420], 450
    layout = plan_groups(torch.tensor(ends, dtype=torch.int32), num_rows)
    x = torch.randn(num_rows, 16, generator=gen)
    padded = pad_rows(x, layout)
    assert padded.shape == (layout.num_padded_rows, 16)
    assert torch.equal(padded[layout.row_expert < 0], torch.zeros_like(padded[layout.row_expert < 0]))
    back = unpad_rows(padded, layout)
    assert torch.equal(back[:420], x[:420])
    assert torch.equal(back[420:], torch.zeros(30, 16))  # rows past offsets[-1] come back as zero


def test_plan_rejects_bad_offsets():
    with pytest.raises(TypeError, match="offsets: expected dtype torch.int32"):
        plan_groups(torch.tensor([3, 5]), 5)
    with pytest.raises(ValueError, match="offsets: expected a non-empty 1-D tensor"):
        plan_groups(torch.zeros(0, dtype=torch.int32), 5)


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
