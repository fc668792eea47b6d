"""Triton quantization kernels (fp8moe.quant.triton) against the reference recipe, in their GEMM layouts.

GPU (skipped without CUDA): every kernel bit-exact against fp8moe.quant.reference placed in the documented
layout (padding rows and the tail zero with zero scales, NaN/Inf tiles, all-zero tiles), every output
element written (the caching allocator is poisoned first). The reference is evaluated on the CPU, so
these tests do not lean on the CUDA build of torch's division (reference.py divides tensor by tensor,
which is the IEEE quotient on both devices, as the kernels' ``div_rn``).

CPU: the same kernels under the Triton interpreter (``TRITON_INTERPRET=1``, in a child process so the
setting never reaches other tests), at small sizes, also bit-exact, with one substitution. The
interpreter's own fp32 -> e4m3 conversion (triton 3.9) is wrong in known ways (exact ties round away
from zero instead of to even, subnormals land a code or two off, a value that rounds up across a power
of two comes out one binade low: 127.1 -> 64 instead of 128, NaN becomes a finite code), so in the child
the reference recipe's final fp32 -> e4m3 cast goes through that same interpreter conversion, and the
values of NaN/Inf tiles (NaN after division) are not compared there (their scales are). Scales,
divisions, clamping, tile membership and placement are thus checked exactly; the conversion itself and
NaN values are checked on the GPU, where the conversion is exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp8moe.backends.reference import ReferenceQuantizer
from fp8moe.plan import GroupLayout, plan_groups
from fp8moe.quant import reference
from fp8moe.quant.reference import quantize_blockwise
from fp8moe.recipe import BLOCK, FP8_DTYPE, FP8_MAX, MIN_NORMAL
from fp8moe.testing import random_offsets

tq = pytest.importorskip("fp8moe.quant.triton", reason="triton is not importable")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the CPU path runs under the Triton interpreter)")

ROUTINGS = {
    "ragged": {},
    "empty_experts": {"empty_groups": 3},
    "unrouted_tail": {"empty_groups": 1, "tail_rows": 200},
    "skewed": {"empty_groups": 2, "skew": 0.4},
    "one_row_groups": None,
}


# ---- the reference recipe placed in the kernels' layouts (also used by test_backend_triton) ----------


def expected_rows_padded(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (Mp, C), s (C/128, Mp)) of quantize_rows_padded, from the reference recipe."""
    return ReferenceQuantizer().tokens(x, layout, True, False)


def expected_token_tiles(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat (C * Mp,), s (Mp/128, C)) of quantize_token_tiles, from the reference recipe (host loop)."""
    return ReferenceQuantizer().tokens(x, layout, False, True)


def codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).int()


def assert_fp8_equal(got: torch.Tensor, ref: torch.Tensor, interpreter: bool = False) -> None:
    """Bit-exact e4m3, except that any NaN code matches any NaN code (any code at all under the
    interpreter, whose NaN conversion is arbitrary)."""
    assert got.dtype == FP8_DTYPE and got.shape == ref.shape
    g, r = codes(got), codes(ref)
    nan_g, nan_r = got.float().isnan(), ref.float().isnan()
    if not interpreter:
        assert torch.equal(nan_g, nan_r)
    bad = ((g != r) & ~nan_r).nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} values differ, first at {bad[0].tolist()}: {g[tuple(bad[0])]} vs {r[tuple(bad[0])]}"
    )


def assert_scales_equal(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def tokens_with_special_tiles(m: int, c: int, gen: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    """Random rows spanning several binades, with a NaN, an Inf and an all-zero 128-column span."""
    x = torch.randn(m, c, generator=gen) * torch.exp2(torch.randint(-6, 6, (m, 1), generator=gen).float())
    x[m // 2, 3] = float("nan")
    x[m // 3, c - 5] = float("-inf")
    x[m // 4, :BLOCK] = 0
    return x.to(device, dtype)


def check_token_kernels(x: torch.Tensor, layout: GroupLayout, interpreter: bool = False) -> None:
    """All three token kernels on x against the reference recipe evaluated on the CPU (see
    cpu_reference), and the one-read kernel against the other two."""
    q, s = tq.quantize_rows_padded(x, layout)
    qt, st = tq.quantize_token_tiles(x, layout)
    both = tq.quantize_tokens(x, layout)
    assert q.shape == (layout.num_padded_rows, x.shape[1]) and q.is_contiguous()
    for a, b in zip(both, (q, s, qt, st)):
        assert torch.equal(codes(a), codes(b)) if a.dtype == FP8_DTYPE else torch.equal(a.nan_to_num(), b.nan_to_num())
    x, layout = x.cpu(), plan_groups(layout.offsets.cpu(), layout.num_rows)
    rq, rs = expected_rows_padded(x, layout)
    rqt, rst = expected_token_tiles(x, layout)
    assert_scales_equal(s.cpu(), rs)
    assert_scales_equal(st.cpu(), rst)
    assert_fp8_equal(q.cpu(), rq, interpreter)
    assert_fp8_equal(qt.cpu(), rqt, interpreter)


def check_weight_kernel(w: torch.Tensor, interpreter: bool = False) -> None:
    """The weight kernel against the reference recipe evaluated on the CPU, both layouts."""
    wq, sw, wq_t, sw_t = tq.quantize_weight(w, True)
    wq2, sw2, empty_q, empty_s = tq.quantize_weight(w, False)
    assert empty_q.numel() == 0 and empty_s.numel() == 0
    assert torch.equal(codes(wq2), codes(wq)) and torch.equal(sw2.nan_to_num(), sw.nan_to_num())
    assert wq.is_contiguous() and wq_t.is_contiguous() and wq_t.shape == (w.shape[0], w.shape[2], w.shape[1])
    rq, rs = quantize_blockwise(w.cpu())
    assert_scales_equal(sw.cpu(), rs)
    assert_scales_equal(sw_t.cpu(), rs.transpose(1, 2).contiguous())
    assert_fp8_equal(wq.cpu(), rq, interpreter)
    assert_fp8_equal(wq_t.cpu(), rq.transpose(1, 2).contiguous(), interpreter)


def special_weight(gen: torch.Generator, e: int, n: int, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Random blocks of very different magnitudes, with a NaN, an Inf and an all-zero block."""
    blocks = torch.exp2(torch.randint(-8, 4, (e, n // BLOCK, k // BLOCK), generator=gen).float())
    w = torch.randn(e, n, k, generator=gen) * blocks.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    w[0, 1, 2] = float("nan")
    w[-1, -1, -1] = float("inf")
    w[0, -BLOCK:, :BLOCK] = 0
    return w.to(device, dtype)


# ---- CPU: the kernels under the Triton interpreter, in a child process ---------------------------------


@triton.jit
def _to_e4m3_kernel(x_ptr, y_ptr, n, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.float8e4nv), mask=offs < n)


def _quantize_tiles_converting_like_the_interpreter(tiles: torch.Tensor, amax: torch.Tensor):
    """The recipe of fp8moe.quant.reference.quantize_tiles (zero tiles included) with its final fp32 ->
    e4m3 cast done by the interpreter (NaN values keep the true NaN code: the interpreter's NaN codes are
    arbitrary)."""
    scale = amax / torch.full_like(amax, FP8_MAX)
    zero_tile = scale < MIN_NORMAL
    scale = torch.where(zero_tile, torch.zeros_like(scale), scale)
    fp32 = (tiles / torch.where(zero_tile, torch.ones_like(scale), scale)).clamp(-FP8_MAX, FP8_MAX)
    fp32 = torch.where(zero_tile, torch.zeros_like(fp32), fp32).contiguous()
    values = torch.empty(fp32.shape, dtype=FP8_DTYPE)
    _to_e4m3_kernel[(triton.cdiv(fp32.numel(), 1024),)](fp32, values, fp32.numel(), BLOCK_SIZE=1024)
    return torch.where(fp32.isnan(), torch.full_like(values, float("nan")), values), scale


def run_configs_once(tuner, configs: list) -> None:
    """Interpreter child only: let an autotuner choose among ``configs`` by running each once (the
    interpreter has no timer; Triton 3.6 "times" even a single config)."""
    tuner.configs = configs
    tuner._do_bench = lambda kernel_call, quantiles: (kernel_call(), [0.0] * len(quantiles))[1]


def interpreter_checks() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (see test_kernels_under_the_triton_interpreter)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    reference.quantize_tiles = _quantize_tiles_converting_like_the_interpreter
    one_shape_per_mode = [c for c in tq._quantize_tokens_kernel.configs if c.num_warps == 4 and 32 in c.kwargs.values()]
    one_shape_per_mode.append(tq._quantize_tokens_kernel.configs[-1])  # 128x128
    run_configs_once(tq._quantize_tokens_kernel, one_shape_per_mode)
    run_configs_once(tq._quantize_weight_kernel, tq._quantize_weight_kernel.configs[:1])
    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 70, 71, 190], dtype=torch.int32)  # empty, 70 rows, 1 row, 119 rows; 10 unrouted
    layout = plan_groups(offsets, 200)
    check_token_kernels(tokens_with_special_tiles(200, 256, gen, torch.bfloat16, "cpu"), layout, interpreter=True)
    check_weight_kernel(special_weight(gen, 2, 128, 256, torch.bfloat16, "cpu"), interpreter=True)


def run_in_the_interpreter(module: str) -> None:
    """Run ``<module>.interpreter_checks()`` (a test module beside this one) in a child process with
    TRITON_INTERPRET=1; skip if the interpreter lacks something the kernels use."""
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import {module}; {module}.interpreter_checks()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True)
    known = ("NotImplementedError", "only 0-dimensional arrays can be converted")  # the latter: triton 3.6 + NumPy 2
    if proc.returncode and any(k in proc.stderr for k in known):
        pytest.skip(f"the Triton interpreter cannot run these kernels here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kernels_under_the_triton_interpreter():
    run_in_the_interpreter("test_quant_triton")


# ---- argument checks (no kernel launch; CPU) -----------------------------------------------------------


def test_bad_arguments_name_the_argument():
    layout = plan_groups(torch.tensor([100, 256], dtype=torch.int32), 256)
    with pytest.raises(ValueError, match="x: columns must be a multiple of 128"):
        tq.quantize_rows_padded(torch.randn(256, 100), layout)
    with pytest.raises(TypeError, match="x: expected dtype"):
        tq.quantize_token_tiles(torch.ones(256, 128, dtype=torch.int32), layout)
    with pytest.raises(ValueError, match=r"x: expected 256 rows \(layout.num_rows\)"):
        tq.quantize_tokens(torch.randn(255, 128), layout)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        tq.quantize_rows_padded(torch.randn(256), layout)
    with pytest.raises(TypeError, match="layout: expected a GroupLayout"):
        tq.quantize_rows_padded(torch.randn(256, 128), None)
    with pytest.raises(ValueError, match="w: expected an \\(E, N, K\\) tensor"):
        tq.quantize_weight(torch.randn(128, 128), True)
    with pytest.raises(TypeError, match="transposed: expected a bool"):
        tq.quantize_weight(torch.randn(1, 128, 128), 1)


# ---- GPU: bit-exact on the device ----------------------------------------------------------------------


def poison_allocator() -> None:
    """Fill freed blocks of the caching allocator with 0xFF bytes (NaN in e4m3 and fp32), so an output
    element a kernel forgets to write shows up as a mismatch."""
    held = [torch.full((numel,), 0xFF, dtype=torch.uint8, device="cuda") for numel in (64 << 20, *[256 << 10] * 32)]
    del held


def layout_for(routing, m: int, e: int, gen: torch.Generator) -> GroupLayout:
    if routing is None:
        offsets = torch.arange(1, e + 1, dtype=torch.int32, device="cuda")
    else:
        offsets = random_offsets(m, e, generator=gen, device="cuda", **routing)
    return plan_groups(offsets, m)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
@pytest.mark.parametrize("e", [1, 8, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_token_kernels_bit_exact(routing, e, dtype):
    if routing is not None and routing.get("empty_groups", 0) >= e:
        pytest.skip("more empty groups than experts")
    gen = torch.Generator().manual_seed(e)
    layout = layout_for(routing, 1000, e, gen)
    x = tokens_with_special_tiles(1000, 384, gen, dtype, "cuda")
    poison_allocator()
    check_token_kernels(x, layout)


@gpu
@pytest.mark.gpu
def test_token_kernels_strided_rows_and_no_rows():
    gen = torch.Generator().manual_seed(7)
    base = tokens_with_special_tiles(600, 512, gen, torch.bfloat16, "cuda")
    layout = plan_groups(torch.tensor([100, 100, 550], dtype=torch.int32, device="cuda"), 600)
    check_token_kernels(base[:, 128:384], layout)  # a column slice: row stride 512
    empty = plan_groups(torch.zeros(4, dtype=torch.int32, device="cuda"), 0)
    poison_allocator()
    q, s, qt, st = tq.quantize_tokens(torch.empty(0, 256, device="cuda"), empty)
    assert q.shape == (empty.num_padded_rows, 256) and not codes(q).any() and not s.any()
    assert not codes(qt).any() and not st.any()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 128, 128), (8, 256, 384), (3, 512, 128)])
def test_weight_kernel_bit_exact(dtype, shape):
    gen = torch.Generator().manual_seed(shape[0])
    w = special_weight(gen, *shape, dtype, "cuda")
    poison_allocator()
    check_weight_kernel(w)
