"""The quantization recipe (fp8moe.quant.reference): tile scales, bounds, zero tiles, NaN, round trips."""

import math

import numpy as np
import pytest
import torch

from fp8moe.quant import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_blockwise,
    dequantize_colwise,
    dequantize_rowwise,
    quantize_blockwise,
    quantize_colwise,
    quantize_rowwise,
)
from fp8moe.testing import fq_blocks, fq_rows, fq_token_tiles


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def heavy_tailed(gen, *shape):
    """Random values spanning many binades, so tiles have very different amax."""
    scale = torch.exp2(torch.randint(-12, 12, shape[:-1] + (1,), generator=gen).float())
    return torch.randn(*shape, generator=gen) * scale


def test_rowwise_scales_are_tile_amax_over_448(gen):
    x = heavy_tailed(gen, 7, 384)
    q, s = quantize_rowwise(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (7, 3)
    expected = x.abs().unflatten(-1, (3, 128)).amax(-1) / FP8_MAX
    torch.testing.assert_close(s, expected, rtol=0, atol=0)
    assert q.float().abs().max() <= FP8_MAX
    # every tile uses the full e4m3 range: its largest element lands on +-448
    torch.testing.assert_close(q.float().abs().unflatten(-1, (3, 128)).amax(-1), torch.full((7, 3), FP8_MAX))


def test_colwise_and_blockwise_tile_shapes(gen):
    x = heavy_tailed(gen, 256, 256)
    q, s = quantize_colwise(x)
    assert s.shape == (2, 256)
    torch.testing.assert_close(s, x.abs().unflatten(0, (2, 128)).amax(1) / FP8_MAX, rtol=0, atol=0)
    w = heavy_tailed(gen, 3, 256, 384)
    qw, sw = quantize_blockwise(w)
    assert qw.shape == w.shape and sw.shape == (3, 2, 3)
    blocks = w.abs().reshape(3, 2, 128, 3, 128).amax(dim=(2, 4))
    torch.testing.assert_close(sw, blocks / FP8_MAX, rtol=0, atol=0)


@pytest.mark.parametrize(
    "quantize, dequantize, model, shape",
    [
        (quantize_rowwise, dequantize_rowwise, fq_rows, (5, 256)),
        (quantize_colwise, dequantize_colwise, fq_token_tiles, (256, 128)),
        (quantize_blockwise, dequantize_blockwise, fq_blocks, (2, 256, 384)),
    ],
)
def test_round_trip_matches_independent_float64_recipe(gen, quantize, dequantize, model, shape):
    x = heavy_tailed(gen, *shape)
    got = dequantize(*quantize(x)).numpy()
    # dequantization multiplies in fp32, so the float64 model is rounded to fp32 for an exact comparison
    np.testing.assert_array_equal(got, model(x.numpy().astype(np.float64)).astype(np.float32))


def test_round_trip_error_is_within_half_an_e4m3_step(gen):
    x = heavy_tailed(gen, 64, 512)
    q, s = quantize_rowwise(x)
    err = (dequantize_rowwise(q, s) - x).abs().unflatten(-1, (4, 128))
    # normal e4m3 numbers have 3 mantissa bits (half step 2**-4 relative); subnormals a step of 2**-9 * scale
    bound = x.abs().unflatten(-1, (4, 128)) * 2**-4 + s.unsqueeze(-1) * 2**-10
    assert torch.all(err <= bound)


def test_zero_tile_gives_zero_scale_and_values_not_nan(gen):
    x = torch.randn(4, 256, generator=gen)
    x[1, 128:] = 0
    q, s = quantize_rowwise(x)
    assert s[1, 1] == 0
    assert torch.all(q[1, 128:].float() == 0)
    assert torch.isfinite(dequantize_rowwise(q, s)).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_poisons_only_its_own_tile(gen, bad):
    x = torch.randn(4, 256, generator=gen)
    x[2, 5] = bad
    d = dequantize_rowwise(*quantize_rowwise(x))
    assert torch.isnan(d[2, :128]).any()
    assert torch.isfinite(d[2, 128:]).all() and torch.isfinite(d[[0, 1, 3]]).all()


def test_bf16_input_quantizes_like_its_fp32_value(gen):
    x = torch.randn(3, 256, generator=gen).bfloat16()
    q16, s16 = quantize_rowwise(x)
    q32, s32 = quantize_rowwise(x.float())
    assert torch.equal(q16.view(torch.uint8), q32.view(torch.uint8)) and torch.equal(s16, s32)


def test_shape_not_multiple_of_128_is_rejected():
    with pytest.raises(ValueError, match="x: dimension -1 must be a multiple of 128"):
        quantize_rowwise(torch.randn(2, 100))
    with pytest.raises(ValueError, match="w: dimension -2 must be a multiple of 128"):
        quantize_blockwise(torch.randn(1, 100, 128))


TINY_CASES = {
    "subnormal_beside_zero": [1e-44] + [0.0] * 127,  # amax/448 rounds to 0 in fp32: was 0/0 = NaN
    "subnormals_only": [2.0**-130, -(2.0**-140)] + [0.0] * 126,
    "amax_just_below_448_min_normal": [448 * 2.0**-126 * (1 - 2**-20), 1e-40] + [0.0] * 126,
    "smallest_normal_values": [2.0**-126, -(2.0**-125)] + [0.0] * 126,
}


@pytest.mark.parametrize("values", TINY_CASES.values(), ids=TINY_CASES.keys())
@pytest.mark.parametrize(
    "quantize, dequantize, shape",
    [
        (quantize_rowwise, dequantize_rowwise, (1, 128)),
        (quantize_colwise, dequantize_colwise, (128, 1)),
    ],
)
def test_tiny_tiles_are_zero_tiles_never_nan(values, quantize, dequantize, shape):
    """The recipe's rule: |v| < 2^-126 reads as 0, and a tile whose scale is below 2^-126 is a zero tile."""
    x = torch.tensor(values, dtype=torch.float32).reshape(shape)
    q, s = quantize(x)
    assert torch.equal(s, torch.zeros_like(s)) and not q.float().any()
    assert not dequantize(q, s).isnan().any()


def test_first_tile_above_the_tiny_threshold_is_quantized():
    """A tile whose amax is 448 * 2^-126 has scale 2^-126 exactly: quantized, and subnormals in it read as 0."""
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1], x[0, 2] = 448 * 2.0**-126, 2.0**-127, 2.0**-120
    q, s = quantize_rowwise(x)
    assert s.item() == 2.0**-126
    assert q[0, 0].float().item() == 448 and q[0, 1].float().item() == 0 and q[0, 2].float().item() == 64
    y64 = fq_rows(x.double().numpy())
    np.testing.assert_array_equal(dequantize_rowwise(q, s).double().numpy(), y64)


def test_tiny_values_in_a_block_and_a_nan_still_propagates():
    w = torch.zeros(1, 128, 128)
    w[0, 0, 0] = 1e-44
    q, s = quantize_blockwise(w)
    assert s.item() == 0 and not q.float().any()
    w[0, 5, 5] = math.nan
    assert quantize_blockwise(w)[1].isnan().all()
