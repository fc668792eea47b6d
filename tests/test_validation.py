"""Bad input to fp8moe.grouped_mm raises TypeError/ValueError naming the argument and the expectation."""

import pytest
import torch

import fp8moe


def good():
    gen = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(300, 256, generator=gen),
        w=torch.randn(3, 128, 256, generator=gen),
        offsets=torch.tensor([100, 100, 300], dtype=torch.int32),
    )


def call(validate=True, out_dtype=torch.bfloat16, **overrides):
    args = good() | overrides
    return fp8moe.grouped_mm(args["x"], args["w"], args["offsets"], out_dtype=out_dtype, validate=validate)


BAD = {
    "x_not_tensor": (TypeError, "x: expected a torch.Tensor", dict(x=[[1.0]])),
    "x_rank": (ValueError, "x: expected a 2-D tensor", dict(x=torch.randn(2, 150, 256))),
    "x_dtype": (TypeError, "x: expected dtype in", dict(x=torch.randn(300, 256).half())),
    "x_int": (TypeError, "x: expected dtype in", dict(x=torch.ones(300, 256, dtype=torch.int32))),
    "x_non_contiguous": (ValueError, "x: expected a contiguous row-major tensor", dict(x=torch.randn(256, 300).T)),
    "x_k_not_multiple": (
        ValueError,
        "x: K = x.shape.1. must be a multiple of 128",
        dict(x=torch.randn(300, 200), w=torch.randn(3, 128, 200)),
    ),
    "w_rank": (ValueError, "w: expected a 3-D tensor", dict(w=torch.randn(128, 256))),
    "w_dtype": (TypeError, "w: expected dtype in", dict(w=torch.randn(3, 128, 256, dtype=torch.float64))),
    "w_strided": (
        ValueError,
        "w: expected a contiguous row-major tensor",
        dict(w=torch.randn(3, 256, 128).transpose(1, 2)),
    ),
    "w_n_not_multiple": (ValueError, "w: N = w.shape.1. must be a multiple of 128", dict(w=torch.randn(3, 100, 256))),
    "k_mismatch": (
        ValueError,
        r"w: expected w.shape\[2\] == K == x.shape\[1\] == 256, got 384",
        dict(w=torch.randn(3, 128, 384)),
    ),
    "no_experts": (
        ValueError,
        "w: expected at least one expert",
        dict(w=torch.randn(0, 128, 256), offsets=torch.zeros(0, dtype=torch.int32)),
    ),
    "offsets_dtype": (TypeError, "offsets: expected dtype in .*int32", dict(offsets=torch.tensor([100, 100, 300]))),
    "offsets_rank": (
        ValueError,
        "offsets: expected a 1-D tensor",
        dict(offsets=torch.tensor([[100, 100, 300]], dtype=torch.int32)),
    ),
    "offsets_strided": (
        ValueError,
        "offsets: expected a contiguous",
        dict(offsets=torch.tensor([100, 0, 100, 0, 300, 0], dtype=torch.int32)[::2]),
    ),
    "expert_count_mismatch": (
        ValueError,
        r"offsets: expected shape \(3,\)",
        dict(offsets=torch.tensor([100, 300], dtype=torch.int32)),
    ),
    "offsets_decreasing": (
        ValueError,
        r"offsets: expected non-decreasing values, got offsets\[2\] = 50 < offsets\[1\] = 100",
        dict(offsets=torch.tensor([100, 100, 50], dtype=torch.int32)),
    ),
    "offsets_past_m": (
        ValueError,
        r"offsets: expected offsets\[-1\] <= M = 300, got 301",
        dict(offsets=torch.tensor([100, 100, 301], dtype=torch.int32)),
    ),
    "offsets_negative": (
        ValueError,
        "offsets: expected non-negative values",
        dict(offsets=torch.tensor([-1, 100, 300], dtype=torch.int32)),
    ),
}


@pytest.mark.parametrize("error, message, overrides", BAD.values(), ids=BAD.keys())
def test_bad_input_is_rejected_with_a_named_argument(error, message, overrides):
    with pytest.raises(error, match=message):
        call(**overrides)


def test_out_dtype_is_checked():
    with pytest.raises(TypeError, match="out_dtype: expected one of"):
        call(out_dtype=torch.int8)
    with pytest.raises(TypeError, match="out_dtype: expected one of"):
        call(out_dtype="bfloat16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to build a cross-device call")
def test_device_mismatch_is_rejected():
    args = good()
    with pytest.raises(ValueError, match="w: expected device"):
        fp8moe.grouped_mm(args["x"].cuda(), args["w"], args["offsets"].cuda())
    with pytest.raises(ValueError, match="offsets: expected device"):
        fp8moe.grouped_mm(args["x"].cuda(), args["w"].cuda(), args["offsets"])


def test_device_mismatch_is_rejected_on_meta():
    """The device rule without a GPU: a meta-device weight beside a CPU x."""
    args = good()
    with pytest.raises(ValueError, match=r"w: expected device cpu \(that of x\), got meta"):
        fp8moe.grouped_mm(args["x"], args["w"].to("meta"), args["offsets"])
    with pytest.raises(ValueError, match=r"offsets: expected device cpu \(that of x\), got meta"):
        fp8moe.grouped_mm(args["x"], args["w"], args["offsets"].to("meta"))


def test_value_rules_need_validate_but_shape_rules_do_not():
    # offsets past M is a value rule: only checked with validate=True (no host read in the hot path)
    past_m = torch.tensor([100, 100, 301], dtype=torch.int32)
    call(validate=False, offsets=past_m)
    with pytest.raises(ValueError, match=r"offsets: expected offsets\[-1\] <= M = 300, got 301"):
        call(validate=True, offsets=past_m)
    with pytest.raises(ValueError, match="offsets: expected shape"):
        call(validate=False, offsets=torch.tensor([300], dtype=torch.int32))


def test_unknown_backend_is_rejected():
    args = good()
    with pytest.raises(ValueError, match="unknown backend 'cutlass'"):
        fp8moe.grouped_mm(args["x"], args["w"], args["offsets"], backend="cutlass")
    with pytest.raises(TypeError, match="backend: expected a str"):
        fp8moe.grouped_mm(args["x"], args["w"], args["offsets"], backend=3)
