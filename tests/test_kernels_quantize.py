"""Quantization kernels of fp8moe.kernels.quantize against the reference recipe, in their GEMM layouts.

Every check is bit-exact against fp8moe.quant.reference evaluated on the CPU and placed in the documented
layouts (the helpers of triton_checks): padding rows and the tail zero with zero scales, NaN/Inf
tiles, all-zero tiles, tiny values, and tiles whose amax sits at either side of the two thresholds that
matter (448 * 2^-126: a zero tile below it; 448 * 2^-90: the kernels' fast division path from there up).

CPU (skipped where CUDA is available): the kernels under the Triton interpreter (``TRITON_INTERPRET=1``,
in a child process per test, small sizes), with triton_checks' substitution: the reference's final fp32 ->
e4m3 cast goes through the interpreter's own (inexact) conversion, and values of NaN tiles are not compared
(their scales are). The interpreter runs the portable forms of the two inline-PTX steps (see the module's
``PTX`` flag).
GPU (skipped without CUDA): the same checks at larger sizes, with the conversion and NaN codes compared
too, and every output poisoned before the call; the inline-PTX steps run there.
"""

from __future__ import annotations

import os

import pytest
import torch
from triton_checks import (
    ROUTINGS,
    _quantize_tiles_converting_like_the_interpreter,
    assert_fp8_equal,
    assert_scales_equal,
    codes,
    expected_rows_padded,
    expected_token_tiles,
    layout_for,
    poison_allocator,
    run_configs_once,
    run_in_the_interpreter,
    special_weight,
    tokens_with_special_tiles,
)

from fp8moe.plan import GroupLayout, plan_groups
from fp8moe.quant import reference
from fp8moe.recipe import BLOCK, FP8_DTYPE, FP8_MAX, MIN_NORMAL

kq = pytest.importorskip("fp8moe.kernels.quantize", reason="triton is not importable")

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the CPU path runs under the Triton interpreter)")

# ---- inputs: tiles of chosen magnitude classes ------------------------------------------------------------

F32_MAX = torch.finfo(torch.float32).max
FAST_EDGE = FP8_MAX * 2.0**-90  # the smallest amax the fast division path takes
ZERO_EDGE = FP8_MAX * MIN_NORMAL  # the smallest amax whose scale is not below 2^-126


def _below(v: float) -> float:
    """The fp32 number just below v > 0."""
    return torch.nextafter(torch.tensor(v), torch.tensor(0.0)).item()


# Classes of tiles the fast path takes (amax 0 after the flush, or >= FAST_EDGE and finite) ...
FAST_CLASSES = ("zero", "signed_zero", "subnormal", "fast_edge", "normal", "tiny_mixed", "huge", "f32_max")
# ... and those that send their CTA to the div_rn path.
SLOW_CLASSES = ("below_fast_edge", "zero_edge", "below_zero_edge", "tiny_normal", "nan", "inf", "neg_inf")


def class_values(name: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """n fp32 values of one tile class, random signs; where the class fixes an amax, one value is +-amax."""
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    u = torch.rand(n, generator=gen) * 0.9 + 0.1  # magnitudes within a binade or so of the amax

    def with_amax(amax: float) -> torch.Tensor:
        v = sign * u * amax
        v[torch.randint(n, (1,), generator=gen)] = amax * sign[0]
        return v

    if name == "zero":
        return torch.zeros(n)
    if name == "signed_zero":  # -0.0 reads as +0: codes 0x00, not 0x80
        return torch.where(sign < 0, -0.0, 0.0)
    if name == "subnormal":  # every value flushed: a zero tile
        return sign * torch.randint(1, 1 << 23, (n,), generator=gen).float() * 2.0**-149
    if name == "fast_edge":
        return with_amax(FAST_EDGE)
    if name == "normal":
        return torch.randn(n, generator=gen) * 2.0 ** torch.randint(-8, 8, (1,), generator=gen).item()
    if name == "tiny_mixed":  # normal values with subnormals, -0 and values whose quotient underflows
        v = torch.randn(n, generator=gen)
        v[: n // 4] = sign[: n // 4] * 2.0**-140
        v[n // 4 : n // 4 + 4] = -0.0
        v[n // 4 + 4 : n // 2] = sign[n // 4 + 4 : n // 2] * 1e-30
        return v
    if name == "huge":
        return with_amax(3e38)
    if name == "f32_max":
        return with_amax(F32_MAX)
    if name == "below_fast_edge":
        return with_amax(_below(FAST_EDGE))
    if name == "zero_edge":  # scale 2^-126 exactly: not a zero tile
        return with_amax(ZERO_EDGE)
    if name == "below_zero_edge":  # normal values, yet a zero tile (scale below 2^-126)
        return with_amax(_below(ZERO_EDGE))
    if name == "tiny_normal":
        return with_amax(1e-30)
    if name in ("nan", "inf", "neg_inf"):
        v = torch.randn(n, generator=gen)
        v[torch.randint(n, (1,), generator=gen)] = {"nan": float("nan"), "inf": float("inf")}.get(name, -float("inf"))
        return v
    raise ValueError(name)


def special_tokens(gen: torch.Generator, dtype: torch.dtype, device) -> tuple[torch.Tensor, GroupLayout]:
    """x (256, 256) in two groups of 128 tokens: rows 0-127 are 1x128 tiles of the fast classes (row r of
    class r), rows 128-255 mix slow and fast classes; columns 0-127 hold 128x1 tiles of the fast classes
    for tokens 0-127 and columns 128-255 slow ones, so each CTA (64 or 128 rows, 64 or 128 columns) is
    wholly fast or has a slow tile."""
    x = torch.empty(256, 256)
    classes = FAST_CLASSES + SLOW_CLASSES
    for r in range(128):
        x[r, :128] = class_values(FAST_CLASSES[r % len(FAST_CLASSES)], 128, gen)
        x[r + 128, :128] = class_values(classes[r % len(classes)], 128, gen)
    for c in range(128, 256):
        x[:128, c] = class_values(SLOW_CLASSES[c % len(SLOW_CLASSES)], 128, gen)
        x[128:, c] = class_values(classes[c % len(classes)], 128, gen)
    offsets = torch.tensor([128, 256], dtype=torch.int32, device=device)
    return x.to(device, dtype), plan_groups(offsets, 256)


def special_weights(gen: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    """w (E, 128, 128 * len(classes)): block k of every expert of one class, fast and slow."""
    classes = FAST_CLASSES + SLOW_CLASSES
    blocks = [class_values(name, BLOCK * BLOCK, gen).view(BLOCK, BLOCK) for name in classes]
    w = torch.cat(blocks, dim=1)
    return torch.stack([w, w.flip(1)]).to(device, dtype)


# ---- checks (CPU under the interpreter, and GPU) ----------------------------------------------------------


def check_tokens(x: torch.Tensor, layout: GroupLayout, interpreter: bool = False) -> None:
    """quantize_tokens in its three modes against the reference recipe evaluated on the CPU."""
    both = kq.quantize_tokens(x, layout)
    rows = kq.quantize_tokens(x, layout, token_tiles=False)
    tiles = kq.quantize_tokens(x, layout, rowwise=False)
    mp, cols = layout.num_padded_rows, x.shape[1]
    assert [tuple(t.shape) for t in both] == [(mp, cols), (cols // BLOCK, mp), (cols * mp,), (mp // BLOCK, cols)]
    assert all(t.is_contiguous() for t in both)
    x, layout = x.cpu(), plan_groups(layout.offsets.cpu(), layout.num_rows)
    rq, rs = expected_rows_padded(x, layout)
    rqt, rst = expected_token_tiles(x, layout)
    for (q, s), (ref_q, ref_s) in (
        (both[:2], (rq, rs)),
        (rows, (rq, rs)),
        (both[2:], (rqt, rst)),
        (tiles, (rqt, rst)),
    ):
        assert_scales_equal(s.cpu(), ref_s)
        assert_fp8_equal(q.cpu(), ref_q, interpreter)


def check_weight(w: torch.Tensor, interpreter: bool = False) -> None:
    """quantize_weight with and without the transposed outputs (and into out_t buffers) against the
    reference recipe evaluated on the CPU."""
    e, n, k = w.shape
    wq, sw, wq_t, sw_t = kq.quantize_weight(w, True)
    wq2, sw2, empty_q, empty_s = kq.quantize_weight(w, False)
    assert empty_q.numel() == 0 and empty_s.numel() == 0
    assert torch.equal(codes(wq2), codes(wq)) and torch.equal(sw2.nan_to_num(), sw.nan_to_num())
    out_t = (
        torch.empty(e, k, n, dtype=FP8_DTYPE, device=w.device),
        torch.empty(e, k // BLOCK, n // BLOCK, device=w.device),
    )
    _, _, wq_t3, sw_t3 = kq.quantize_weight(w, True, out_t=out_t)
    assert wq_t3 is out_t[0] and sw_t3 is out_t[1]
    assert torch.equal(codes(wq_t3), codes(wq_t)) and torch.equal(sw_t3.nan_to_num(), sw_t.nan_to_num())
    assert all(t.is_contiguous() for t in (wq, sw, wq_t, sw_t)) and wq_t.shape == (e, k, n)
    rq, rs = reference.quantize_blockwise(w.cpu())
    assert_scales_equal(sw.cpu(), rs)
    assert_scales_equal(sw_t.cpu(), rs.transpose(1, 2).contiguous())
    assert_fp8_equal(wq.cpu(), rq, interpreter)
    assert_fp8_equal(wq_t.cpu(), rq.transpose(1, 2).contiguous(), interpreter)


def check_weight_both_fp32_paths(w: torch.Tensor, interpreter: bool = False) -> None:
    """fp32 w through the transposed copy and through the single-read kernel (FP32_WEIGHT_SINGLE_READ)."""
    saved = kq.FP32_WEIGHT_SINGLE_READ
    try:
        for single_read in (False, True):
            kq.FP32_WEIGHT_SINGLE_READ = single_read
            check_weight(w, interpreter)
    finally:
        kq.FP32_WEIGHT_SINGLE_READ = saved


# ---- CPU: the kernels under the Triton interpreter, in a child process per check ----------------------------


def _interpreter_setup() -> None:
    """In the child: the reference's cast done the interpreter's way, and one tile shape per mode (each
    config runs the kernel once under the interpreter)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    reference.quantize_tiles = _quantize_tiles_converting_like_the_interpreter
    one_per_mode = [(64, 128, 4), (128, 64, 4), (128, 128, 8)]
    tok = kq._quantize_tokens_kernel
    run_configs_once(tok, [c for c in tok.configs if (*c.kwargs.values(), c.num_warps) in one_per_mode])
    run_configs_once(kq._quantize_weight_kernel, kq._quantize_weight_kernel.configs[:1])


def interpreted_tokens_routings() -> None:
    """Ragged routing (an empty group, a one-row group, unrouted rows, a tail block) and a skewed one."""
    gen = torch.Generator().manual_seed(0)
    x = tokens_with_special_tiles(200, 128, gen, torch.bfloat16, "cpu")
    check_tokens(x, plan_groups(torch.tensor([0, 70, 71, 190], dtype=torch.int32), 200), interpreter=True)
    check_tokens(x[:130], plan_groups(torch.tensor([0, 129, 130], dtype=torch.int32), 130), interpreter=True)


def interpreted_tokens_dtypes_and_strides() -> None:
    """fp32 input, fp16 input with a row stride other than C (a column slice), and no rows at all."""
    gen = torch.Generator().manual_seed(1)
    layout = plan_groups(torch.tensor([40, 100, 100], dtype=torch.int32), 110)
    check_tokens(tokens_with_special_tiles(110, 128, gen, torch.float32, "cpu"), layout, interpreter=True)
    wide = tokens_with_special_tiles(110, 384, gen, torch.float16, "cpu")
    check_tokens(wide[:, 128:256], layout, interpreter=True)
    empty = plan_groups(torch.zeros(2, dtype=torch.int32), 0)
    q, s, qt, st = kq.quantize_tokens(torch.empty(0, 128), empty)
    assert q.shape == (empty.num_padded_rows, 128) and not codes(q).any() and not s.any()
    assert not codes(qt).any() and not st.any()


def interpreted_tokens_special_values() -> None:
    """Tiles of every magnitude class, fast and slow, rowwise and token tiles (fp32 keeps the edges)."""
    x, layout = special_tokens(torch.Generator().manual_seed(2), torch.float32, "cpu")
    check_tokens(x, layout, interpreter=True)


def interpreted_weights() -> None:
    """bf16 random blocks, and every magnitude class in fp32 through both fp32 paths."""
    gen = torch.Generator().manual_seed(3)
    check_weight(special_weight(gen, 2, 128, 256, torch.bfloat16, "cpu"), interpreter=True)
    check_weight_both_fp32_paths(special_weights(gen, torch.float32, "cpu")[:1], interpreter=True)


@pytest.mark.parametrize(
    "check",
    [
        "interpreted_tokens_routings",
        "interpreted_tokens_dtypes_and_strides",
        "interpreted_tokens_special_values",
        "interpreted_weights",
    ],
)
def test_kernels_under_the_triton_interpreter(check):
    run_in_the_interpreter(__name__, "_interpreter_setup", check)


# ---- the fast division, in NumPy with an exact fp32 FMA (CPU) -------------------------------------------------


def test_fast_division_is_the_ieee_quotient():
    """kq._divide's arithmetic (y_hi = RN(1/d), y_lo = RN(fma(-d, y_hi, 1) y_hi), q0 = fma(x, y_hi, RN(x
    y_lo)), r = fma(-d, q0, x), q = fma(r, y_hi, q0)) gives the IEEE fp32 quotient for divisors in [2^-90,
    2^120] wherever its e4m3 code can differ: random significands, quotients near e4m3 rounding midpoints
    and just below powers of two, perturbed by a few ulps; and RN(amax / 448) for every significand of
    amax in a few binades (the kernels' scale)."""
    np = pytest.importorskip("numpy")
    fma32 = getattr(pytest.importorskip("triton._C.libtriton").interpreter, "fma_fp32", None)
    if fma32 is None:  # the interpreter's exact fp32 FMA (Triton >= 3.7; the GPU machine's 3.6 lacks it)
        pytest.skip("this Triton's interpreter has no exact fp32 FMA to model the kernels' division with")
    rng = np.random.default_rng(0)
    f32 = np.float32

    def fma(a, b, c):
        return fma32(*np.broadcast_arrays(*(np.asarray(v, dtype=f32) for v in (a, b, c))))

    def divide(x, d):
        y_hi = f32(1) / d
        y_lo = fma(-d, y_hi, f32(1)) * y_hi
        q = fma(x, y_hi, x * y_lo)
        return fma(fma(-d, q, x), y_hi, q)

    def e4m3(v):
        return torch.from_numpy(np.ascontiguousarray(v)).to(FP8_DTYPE).view(torch.uint8)

    n = 1 << 19
    d = (f32(1) + rng.integers(0, 1 << 23, n).astype(f32) * f32(2.0**-23)) * np.exp2(rng.integers(-90, 120, n)).astype(
        f32
    )
    mid = (rng.integers(8, 16, n) + 0.5) * np.exp2(rng.integers(-10, 6, n).astype(np.float64))  # e4m3 midpoints
    top = (1 - rng.integers(1, 64, n) * 2.0**-24) * np.exp2(rng.integers(-10, 9, n).astype(np.float64))
    any_ = (1 + rng.random(n)) * np.exp2(rng.integers(-30, 9, n).astype(np.float64))
    quotient = np.where(rng.random(n) < 0.4, mid, np.where(rng.random(n) < 0.5, top, any_)).clip(max=448)
    x = quotient * d.astype(np.float64)
    keep = x < 2.0**127  # finite after the perturbation below
    x, d = x[keep].astype(f32), d[keep]
    x = (x.view(np.int32) + rng.integers(-3, 4, x.size).astype(np.int32)).view(f32)
    x = np.where(rng.random(x.size) < 0.5, -x, x).astype(f32)
    want, got = x / d, divide(x, d)
    relevant = np.abs(want) >= f32(2.0**-13)  # below, an ulp may differ; the code is a signed zero either way
    assert np.array_equal(want[relevant].view(np.int32), got[relevant].view(np.int32))
    assert torch.equal(e4m3(want), e4m3(got))

    y_hi = f32(1) / f32(448)
    assert kq._reciprocal_parts(FP8_MAX) == (y_hi, fma(f32(-448), y_hi, f32(1)) * y_hi)  # the kernels' constants
    significands = np.arange(1 << 23, dtype=np.uint32)
    for exponent in (-82, 127):  # amax / 448 for every significand of amax, at both ends of the fast range
        amax = ((np.uint32(exponent + 127) << 23) | significands).view(f32)
        assert np.array_equal((amax / f32(448)).view(np.int32), divide(amax, f32(448)).view(np.int32))


# ---- argument checks (no kernel launch; CPU) ---------------------------------------------------------------


def test_bad_arguments_name_the_argument():
    layout = plan_groups(torch.tensor([100, 256], dtype=torch.int32), 256)
    with pytest.raises(ValueError, match="x: columns must be a multiple of 128"):
        kq.quantize_tokens(torch.randn(256, 100), layout)
    with pytest.raises(TypeError, match="dy: expected dtype"):
        kq.quantize_tokens(torch.ones(256, 128, dtype=torch.int32), layout, name="dy")
    with pytest.raises(ValueError, match=r"dy: expected 256 rows \(layout.num_rows\)"):
        kq.quantize_tokens(torch.randn(255, 128), layout, name="dy")
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        kq.quantize_tokens(torch.randn(256), layout)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        kq.quantize_tokens([[1.0]], layout)
    with pytest.raises(ValueError, match="x: expected unit stride along columns"):
        kq.quantize_tokens(torch.randn(128, 256).T, layout)
    with pytest.raises(TypeError, match="layout: expected a GroupLayout"):
        kq.quantize_tokens(torch.randn(256, 128), None)
    with pytest.raises(TypeError, match="rowwise: expected a bool"):
        kq.quantize_tokens(torch.randn(256, 128), layout, rowwise=1)
    with pytest.raises(ValueError, match="rowwise, token_tiles: expected at least one"):
        kq.quantize_tokens(torch.randn(256, 128), layout, rowwise=False, token_tiles=False)
    with pytest.raises(TypeError, match="w: expected a torch.Tensor"):
        kq.quantize_weight(None, True)
    with pytest.raises(ValueError, match=r"w: expected an \(E, N, K\) tensor"):
        kq.quantize_weight(torch.randn(128, 128), True)
    with pytest.raises(TypeError, match="w: expected dtype"):
        kq.quantize_weight(torch.ones(1, 128, 128, dtype=torch.int8), True)
    with pytest.raises(TypeError, match="transposed: expected a bool"):
        kq.quantize_weight(torch.randn(1, 128, 128), 1)
    w = torch.randn(2, 128, 256)
    good = (torch.empty(2, 256, 128, dtype=FP8_DTYPE), torch.empty(2, 2, 1))
    with pytest.raises(ValueError, match="out_t: buffers for the transposed outputs given, but transposed is False"):
        kq.quantize_weight(w, False, out_t=good)
    with pytest.raises(TypeError, match="out_t: expected a pair"):
        kq.quantize_weight(w, True, out_t=good[0])
    with pytest.raises(TypeError, match=r"out_t\[0\]: expected dtype"):
        kq.quantize_weight(w, True, out_t=(good[0].float(), good[1]))
    with pytest.raises(ValueError, match=r"out_t\[0\]: expected a contiguous tensor of shape \(2, 256, 128\)"):
        kq.quantize_weight(w, True, out_t=(torch.empty(2, 128, 256, dtype=FP8_DTYPE).transpose(1, 2), good[1]))
    with pytest.raises(ValueError, match=r"out_t\[1\]: expected a contiguous tensor of shape \(2, 2, 1\)"):
        kq.quantize_weight(w, True, out_t=(good[0], torch.empty(2, 1, 2)))


def test_package_reexports():
    import fp8moe.kernels

    assert fp8moe.kernels.quantize_tokens is kq.quantize_tokens
    assert fp8moe.kernels.quantize_weight is kq.quantize_weight


# ---- GPU: bit-exact on the device, outputs poisoned first ---------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
@pytest.mark.parametrize("e", [1, 8, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tokens_bit_exact(routing, e, dtype):
    if routing is not None and routing.get("empty_groups", 0) >= e:
        pytest.skip("more empty groups than experts")
    gen = torch.Generator().manual_seed(e)
    layout = layout_for(routing, 1000, e, gen)
    x = tokens_with_special_tiles(1000, 384, gen, dtype, "cuda")
    poison_allocator()
    check_tokens(x, layout)


@gpu
@pytest.mark.gpu
def test_tokens_strided_rows_and_no_rows():
    gen = torch.Generator().manual_seed(7)
    base = tokens_with_special_tiles(600, 512, gen, torch.bfloat16, "cuda")
    layout = plan_groups(torch.tensor([100, 100, 550], dtype=torch.int32, device="cuda"), 600)
    poison_allocator()
    check_tokens(base[:, 128:384], layout)  # a column slice: row stride 512
    empty = plan_groups(torch.zeros(4, dtype=torch.int32, device="cuda"), 0)
    poison_allocator()
    q, s, qt, st = kq.quantize_tokens(torch.empty(0, 256, device="cuda"), empty, name="dy")
    assert q.shape == (empty.num_padded_rows, 256) and not codes(q).any() and not s.any()
    assert not codes(qt).any() and not st.any()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_special_values(dtype):
    x, layout = special_tokens(torch.Generator().manual_seed(2), dtype, "cuda")
    poison_allocator()
    check_tokens(x, layout)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 128, 128), (8, 256, 384), (3, 512, 128)])
def test_weight_bit_exact(dtype, shape):
    gen = torch.Generator().manual_seed(shape[0])
    w = special_weight(gen, *shape, dtype, "cuda")
    poison_allocator()
    check_weight_both_fp32_paths(w) if dtype == torch.float32 else check_weight(w)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_special_values(dtype):
    w = special_weights(torch.Generator().manual_seed(4), dtype, "cuda")
    poison_allocator()
    check_weight_both_fp32_paths(w) if dtype == torch.float32 else check_weight(w)


@gpu
@pytest.mark.gpu
def test_weight_fp32_single_read_is_stable():
    """The fp32 single-read kernel (miscompiled in its previous form on Triton 3.6: codes varied run to
    run) gives identical bits on repeated runs at a benchmark-like size."""
    saved = kq.FP32_WEIGHT_SINGLE_READ
    kq.FP32_WEIGHT_SINGLE_READ = True
    try:
        w = torch.randn(4, 1024, 2048, device="cuda")
        first = kq.quantize_weight(w, True)
        for _ in range(3):
            poison_allocator()
            again = kq.quantize_weight(w, True)
            for a, b in zip(first, again):
                assert torch.equal(
                    a.view(torch.uint8) if a.dtype == FP8_DTYPE else a,
                    b.view(torch.uint8) if b.dtype == FP8_DTYPE else b,
                )
    finally:
        kq.FP32_WEIGHT_SINGLE_READ = saved
