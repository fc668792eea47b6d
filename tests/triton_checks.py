"""Shared helpers of the Triton tests (not a test module): the reference recipe placed in the kernels'
layouts, bit-exact comparisons, inputs with special tiles, a poisoned allocator, and running checks under
the Triton interpreter in a child process.

Under the interpreter (``TRITON_INTERPRET=1``, in a child process so the setting never reaches other
tests) the interpreter's own fp32 -> e4m3 conversion (triton 3.9) is wrong in known ways (exact ties round
away from zero instead of to even, subnormals land a code or two off, a value that rounds up across a
power of two comes out one binade low: 127.1 -> 64 instead of 128, NaN becomes a finite code), so in the
child the reference recipe's final fp32 -> e4m3 cast goes through that same interpreter conversion
(:func:`_quantize_tiles_converting_like_the_interpreter`), and the values of NaN/Inf tiles (NaN after
division) are not compared there (their scales are). Scales, divisions, clamping, tile membership and
placement are thus checked exactly; the conversion itself and NaN values are checked on the GPU, where
the conversion is exact.
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
from fp8moe.recipe import BLOCK, FP8_DTYPE, FP8_MAX, MIN_NORMAL
from fp8moe.testing import random_offsets

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

ROUTINGS = {
    "ragged": {},
    "empty_experts": {"empty_groups": 3},
    "unrouted_tail": {"empty_groups": 1, "tail_rows": 200},
    "skewed": {"empty_groups": 2, "skew": 0.4},
    "one_row_groups": None,
}


# ---- the reference recipe placed in the kernels' layouts -------------------------------------------------


def expected_rows_padded(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (Mp, C), s (C/128, Mp)): the rowwise outputs of fp8moe.kernels.quantize.quantize_tokens, from the
    reference recipe."""
    return ReferenceQuantizer().tokens(x, layout, True, False)


def expected_token_tiles(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat (C * Mp,), s (Mp/128, C)): the token-tile outputs of fp8moe.kernels.quantize.quantize_tokens,
    from the reference recipe (host loop)."""
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


# ---- inputs ------------------------------------------------------------------------------------------------


def tokens_with_special_tiles(m: int, c: int, gen: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    """Random rows spanning several binades, with a NaN, an Inf and an all-zero 128-column span."""
    x = torch.randn(m, c, generator=gen) * torch.exp2(torch.randint(-6, 6, (m, 1), generator=gen).float())
    x[m // 2, 3] = float("nan")
    x[m // 3, c - 5] = float("-inf")
    x[m // 4, :BLOCK] = 0
    return x.to(device, dtype)


def special_weight(gen: torch.Generator, e: int, n: int, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Random blocks of very different magnitudes, with a NaN, an Inf and an all-zero block."""
    blocks = torch.exp2(torch.randint(-8, 4, (e, n // BLOCK, k // BLOCK), generator=gen).float())
    w = torch.randn(e, n, k, generator=gen) * blocks.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    w[0, 1, 2] = float("nan")
    w[-1, -1, -1] = float("inf")
    w[0, -BLOCK:, :BLOCK] = 0
    return w.to(device, dtype)


def layout_for(routing, m: int, e: int, gen: torch.Generator) -> GroupLayout:
    """A plan on the GPU for one of ROUTINGS (None: E one-row groups)."""
    if routing is None:
        offsets = torch.arange(1, e + 1, dtype=torch.int32, device="cuda")
    else:
        offsets = random_offsets(m, e, generator=gen, device="cuda", **routing)
    return plan_groups(offsets, m)


def poison_allocator() -> None:
    """Fill freed blocks of the caching allocator with 0xFF bytes (NaN in e4m3 and fp32), so an output
    element a kernel forgets to write shows up as a mismatch."""
    held = [torch.full((numel,), 0xFF, dtype=torch.uint8, device="cuda") for numel in (64 << 20, *[256 << 10] * 32)]
    del held


# ---- CPU: kernels under the Triton interpreter, in a child process ------------------------------------------


@triton.jit
def _to_e4m3_kernel(x_ptr, y_ptr, n, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.float8e4nv), mask=offs < n)


def _quantize_tiles_converting_like_the_interpreter(tiles: torch.Tensor, amax: torch.Tensor):
    """The recipe of fp8moe.quant.reference.quantize_tiles (zero tiles included) with its final fp32 ->
    e4m3 cast done by the interpreter (NaN values keep the true NaN code: the interpreter's NaN codes are
    arbitrary). Install it in the child as ``reference.quantize_tiles``."""
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


def run_in_the_interpreter(module: str, *calls: str) -> None:
    """Call ``<module>.<call>()`` for each of ``calls`` (default: ``interpreter_checks``; ``module`` is a
    test module beside this one) in a child process with TRITON_INTERPRET=1.

    Skips where CUDA is available: these checks are meant for CPU machines (there the GPU tests run the
    kernels natively), and on the GPU machine (Triton 3.6 + NumPy 2.5) the interpreter's NumPy division
    differs from the IEEE quotient in the last bit. Also skips if the interpreter lacks something the
    kernels use."""
    if torch.cuda.is_available():
        pytest.skip("interpreter checks are for CPU machines; the GPU tests run the kernels natively here")
    here = str(Path(__file__).parent)
    body = "; ".join(f"m.{call}()" for call in calls or ("interpreter_checks",))
    code = f"import sys; sys.path.insert(0, {here!r}); import {module} as m; {body}"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True)
    known = ("NotImplementedError", "only 0-dimensional arrays can be converted")  # the latter: triton 3.6 + NumPy 2
    if proc.returncode and any(k in proc.stderr for k in known):
        pytest.skip(f"the Triton interpreter cannot run these kernels here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
