"""Triton quantization kernels, one read of the input each, writing the layouts the grouped GEMMs read.

The recipe is :mod:`fp8moe.recipe`'s, bit for bit (ground truth: :mod:`fp8moe.quant.reference`): per tile
``scale = amax(|t|) / 448`` (IEEE division); a tile whose scale is below 2^-126 (all values tiny or zero)
has scale 0 and codes 0; otherwise ``code = e4m3(v / scale)`` (IEEE division, round to nearest even),
where a value with ``|v| < 2^-126`` (any subnormal) gives code +0; NaN/Inf in a tile make its scale
non-finite. Destination rows come from the on-device :class:`~fp8moe.plan.GroupLayout` (attributes
``num_rows``, ``num_padded_rows``, ``num_groups``, ``offsets``, ``padded_to_row``, ``row_expert``,
``padded_starts``, ``padded_sizes`` only), so nothing synchronises with the host and the kernels write the
padding themselves.

Layouts (Mp = ``layout.num_padded_rows``, C = columns of the token input, E = groups):

- *rowwise* (1x128 tiles along C) in the 128-row-padded grouped layout: codes ``(Mp, C)`` e4m3 row-major,
  scales ``(C/128, Mp)`` fp32 contiguous (its ``.T`` is the MN-major ``(Mp, C/128)`` scale operand of
  DeepGEMM's M-grouped kernels). Padding rows (between groups and past the last group) hold code 0 and
  scale 0.
- *token tiles* (128x1 tiles along tokens within each group; groups zero-padded to 128 tokens): codes flat
  ``(C * Mp,)`` e4m3, group g stored K-major as a row-major ``(C, k_g)`` block (``k_g = padded_sizes[g]``)
  starting at element ``C * padded_starts[g]``: token t of group g, column c is at ``C * padded_starts[g]
  + c * k_g + t``. The tail past the last group is one more such block of ``Mp - padded_ends[-1]`` zero
  tokens. Scales ``(Mp/128, C)`` fp32 contiguous: token block b (padded rows ``[128 b, 128 b + 128)``),
  column c at ``[b, c]``.
- *weights* (128x128 blocks): codes ``(E, N, K)`` with scales ``(E, N/128, K/128)``, and optionally the
  same blocks transposed, codes ``(E, K, N)`` with scales ``(E, K/128, N/128)``.

Design (the kernels are memory-bound at the target, >= 85% of copy bandwidth on an H200; at ~4 bytes
moved an element, one-read quantization into both layouts leaves ~35 instructions an element at full
issue rate, which a plain ``div_rn`` per element and byte-wise transposes exceed):

- *Sub-tiles and packed transposes.* A CTA loads its tile (R rows, 128 or 64 columns; rows are padded
  rows gathered through ``padded_to_row`` for tokens) as four sub-tiles ``a = 0..3`` of R/4 rows,
  sub-tile ``a`` holding rows ``4 b + a`` (``b = 0..R/4-1``), with 16-byte vector loads along the
  contiguous columns. The transposed outputs (token tiles; the transposed weight) run along the *row*
  axis: 128 consecutive tokens / weight rows of one column are 128 contiguous bytes. The four codes of
  rows ``4b .. 4b+3`` of a column sit at the same position of the four sub-tiles, in one thread, so they
  are packed into one little-endian int32 word without moving data, and only the ``(R/4, C')`` word tile
  is transposed (``tl.trans``: one shared-memory round trip of 4-byte elements; no fp32 tile is ever
  transposed). It is stored through an int32 view of the output, 32 consecutive words (128 bytes) a
  column, as 16-byte vector stores of whole lines. Row-major outputs are stored from the load layout.
- *Division.* ``v / scale`` is the IEEE quotient computed in four floating-point operations from
  per-tile reciprocal parts (:func:`_divide`: Markstein's correction, exact for divisors in [2^-90,
  2^120]); the scale itself (amax / 448) the same way from constants. Each CTA checks that all its tiles
  have amax 0 or in [448 * 2^-90, FLT_MAX] (:func:`_is_fast`) and otherwise takes a branch with
  ``div_rn`` and the zero-tile rule as written (NaN/Inf tiles, tiles of tiny values); the branch is
  CTA-uniform. No clamp is needed before the e4m3 conversion: ``|v / scale| <= 448 (1 + 2^-24)`` rounds
  to 448, and NaN stays NaN.
- *Reductions.* amax is NaN-propagating (``max.NaN`` while the pairs are in registers, then an integer max
  of the non-negative bit patterns, in which NaN sorts above +Inf).
- *PTX.* On a GPU two steps are inline PTX (``PTX``: not under the Triton interpreter, which runs their
  portable forms): the flush of tiny values as ``add.ftz`` of +0 (fused with the widening of bf16), and the
  conversion of four sub-tiles' quotients straight into packed words with ``cvt.rn.satfinite.e4m3x2.f32``
  (the instruction Triton emits for ``.to(tl.float8e4nv)``; the portable form assembles bytes one by one).
- *Occupancy.* The configs (see :func:`_token_configs`, :func:`_weight_configs`) keep two or more CTAs
  an SM, so that one CTA's loads are in flight while another computes; the one-read 128x128 token tile
  also runs at 4 warps, where each thread's per-tile work (scales and reciprocals of its rows and
  columns) is shared by the most elements.
- *Sources.* The token kernel reads the value it quantizes through a constexpr source mode (see
  :func:`_source_rows`): GATHER, rows of x through a row map and a divisor (``padded_to_row`` for
  :func:`quantize_tokens`; the fused MoE block's dispatch uses its plan's ``row_assignment`` and k), and
  the fused MoE block's passes computed in fp32 on the fly (``c * dy``, SwiGLU and its backward; see
  :mod:`fp8moe.kernels.moe`). The same kernel can instead write its value unquantized as one plain
  (bf16) tensor (PLAIN).

Measured on the CPU only (sm_90 code from Triton 3.6 read with ptxas/cuobjdump): ~23 instructions an
element for both token layouts at 4 warps, ~13 for rowwise only, ~17 for token tiles only, ~13 for a
weight block with both layouts (the previous kernels: ~50-60, with the token tiles stored through 1-byte
shared-memory writes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fp8moe.kernels.launch import direct
from fp8moe.plan import GroupLayout
from fp8moe.recipe import BLOCK, FP8_DTYPE, FP8_MAX, MIN_NORMAL
from fp8moe.validation import check_out

#: When True, fp32 weights take the same single-read kernel as bf16/fp16 for the transposed output.
#: When False, fp32 weights get ``wq_t``/``sw_t`` as a transposed copy of ``wq``/``sw`` (one more read of
#: the codes). Triton 3.6 miscompiled the previous two-layout kernel for fp32 input (it transposed an fp32
#: tile); this kernel transposes packed int32 codes instead, for every input dtype. Measured bit-exact
#: against the previous kernels and the reference recipe on an H200 (2026-12-03, Triton 3.6), at 0.170 ms
#: for w (8, 2048, 7168) fp32 with both layouts (101% of copy bandwidth) vs 0.86 ms for the copy path.
FP32_WEIGHT_SINGLE_READ = True

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _reciprocal_parts(d: float) -> tuple[float, float]:
    """``(y_hi, y_lo)`` (see :func:`_divide`) of a constant divisor, in fp32, on the host."""
    one, div = torch.ones((), dtype=torch.float32), torch.tensor(d, dtype=torch.float32)
    hi = one / div  # IEEE fp32 division
    residual = 1.0 - d * hi.item()  # exact in float64, and exactly representable in fp32
    return hi.item(), (torch.tensor(residual, dtype=torch.float32) * hi).item()


# jit code reads only constexpr globals
_MAX = tl.constexpr(FP8_MAX)
_MIN_NORMAL = tl.constexpr(MIN_NORMAL)
_MAX_RECIPROCAL_HI, _MAX_RECIPROCAL_LO = (tl.constexpr(v) for v in _reciprocal_parts(FP8_MAX))
# Tiles with amax 0 or in [448 * 2^-90, FLT_MAX] take the fast path (module docstring).
_FAST_MIN_AMAX = tl.constexpr(FP8_MAX * 2.0**-90)
_INF = tl.constexpr(float("inf"))

# ---- the recipe on register tiles ------------------------------------------------------------------------
#
# A CTA's tile is four sub-tiles x0..x3 of R/4 rows each, sub-tile a holding rows 4 b + a (module
# docstring); the per-element arithmetic runs on them joined into one (R/4, C', 2, 2) tensor X, element
# [b, c, i, j] of sub-tile 2 j + i (``tl.join`` adds register dimensions: no data moves), and per-tile values
# broadcast against it. Few, larger helpers: the interpreter re-patches triton.language on every call of a
# jit function.


@triton.jit
def _flush(x, PTX: tl.constexpr):
    """fp32 x with ``|v| < 2^-126`` (subnormals, -0) replaced by +0, the recipe's first step; NaN stays NaN.
    PTX: ``add.ftz`` of +0 (flush-to-zero keeps the sign of a subnormal, and -0 + +0 is +0)."""
    if PTX:
        return tl.inline_asm_elementwise(
            "add.ftz.f32 $0, $1, 0f00000000;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.where(tl.abs(x) < _MIN_NORMAL, 0.0, x)


@triton.jit
def _load_flushed(ptrs, mask, PTX: tl.constexpr):
    """``tl.load(ptrs, mask, other=0)`` (mask None: unmasked) in fp32, :func:`_flush`-ed. PTX and bf16
    input: the flush fused with the widening of each register's pair of bf16 values (a shift and a mask)."""
    if mask is None:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    if PTX:
        if x.dtype == tl.bfloat16:
            x = tl.inline_asm_elementwise(
                "{ .reg .b32 lo, hi; shl.b32 lo, $2, 16; and.b32 hi, $2, 0xffff0000; "
                "add.ftz.f32 $0, lo, 0f00000000; add.ftz.f32 $1, hi, 0f00000000; }",
                "=r,=r,r",
                [x],
                dtype=tl.float32,
                is_pure=True,
                pack=2,
            )
        else:
            x = _flush(x.to(tl.float32), PTX)
    else:
        x = _flush(x.to(tl.float32), PTX)
    return x


@triton.jit
def _cast(x, dtype: tl.constexpr, PTX: tl.constexpr):
    """x (fp32, or already of ``dtype``: returned as is) rounded to ``dtype`` to nearest even (torch's
    ``.to``). Portable form for bf16: the rounding done on the fp32 bit pattern (NaN: 0x7FC0), as the Triton
    interpreter's own conversion to bf16 truncates; on a GPU Triton's conversion (``cvt.rn``)."""
    if x.dtype == dtype:
        y = x
    elif PTX:
        y = x.to(dtype)
    elif dtype == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _mul_rn(a, b, PTX: tl.constexpr):
    """fp32 ``a * b`` rounded once, never contracted with a following add into an FMA (PTX: ``mul.rn.f32``:
    an explicit rounding mode is never contracted; no ``.ftz``: subnormals kept, as torch). Broadcasts."""
    if PTX:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a * b


@triton.jit
def _add_rn(a, b, PTX: tl.constexpr):
    """fp32 ``a + b`` rounded once, never contracted with a preceding multiply (PTX: ``add.rn.f32``)."""
    if PTX:
        return tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a + b


@triton.jit
def _join4(x0, x1, x2, x3):
    """(..) x 4 -> (.., 2, 2), element [.., i, j] from x_{2j+i}."""
    return tl.join(tl.join(x0, x1), tl.join(x2, x3))


@triton.jit
def _split4(x):
    """Inverse of :func:`_join4`."""
    x01, x23 = tl.split(x)
    x0, x1 = tl.split(x01)
    x2, x3 = tl.split(x23)
    return x0, x1, x2, x3


@triton.jit
def _row_amax(x):
    """max of ``|x|`` along the 128 columns of x (R, 128), NaN when an element is NaN: halving steps of
    NaN-propagating maxima while the pairs are in one thread's registers, then an integer max of the bit
    patterns of the (non-negative) partial maxima, whose order is that of the floats with every NaN above
    +Inf. (A ``tl.reduce`` with a NaN-propagating combine function runs element by element in the
    interpreter; ``tl.max`` of floats drops NaN.)"""
    R: tl.constexpr = x.shape[0]
    lo, hi = tl.split(tl.reshape(tl.abs(x), (R, 64, 2)))
    a = tl.maximum(lo, hi, propagate_nan=tl.PropagateNan.ALL)
    lo, hi = tl.split(tl.reshape(a, (R, 32, 2)))
    a = tl.maximum(lo, hi, propagate_nan=tl.PropagateNan.ALL)
    lo, hi = tl.split(tl.reshape(a, (R, 16, 2)))
    a = tl.maximum(lo, hi, propagate_nan=tl.PropagateNan.ALL)
    return tl.max(a.to(tl.int32, bitcast=True), 1).to(tl.float32, bitcast=True)


@triton.jit
def _col_amax(x0, x1, x2, x3):
    """max of ``|x|`` over the rows of the four sub-tiles (R/4, C'), per column, NaN-propagating (as
    :func:`_row_amax`)."""
    a = tl.maximum(tl.abs(x0), tl.abs(x1), propagate_nan=tl.PropagateNan.ALL)
    a = tl.maximum(a, tl.abs(x2), propagate_nan=tl.PropagateNan.ALL)
    a = tl.maximum(a, tl.abs(x3), propagate_nan=tl.PropagateNan.ALL)
    return tl.max(a.to(tl.int32, bitcast=True), 0).to(tl.float32, bitcast=True)


@triton.jit
def _divide(x, divisor, y_hi, y_lo):
    """``RN(x / divisor)`` in four floating-point operations, given ``y_hi = RN(1 / divisor)`` and ``y_hi +
    y_lo = 1 / divisor`` within ~2^-47 (the residual ``1 - divisor y_hi`` of a correctly rounded reciprocal
    is exact).

    ``q0 = RN(x (y_hi + y_lo))`` is within one ulp of the quotient (its error before rounding is ~2^-46
    relative), and with ``y_hi = RN(1 / divisor)`` Markstein's theorem makes one correction ``q0 + (x -
    divisor q0) y_hi`` (two FMAs) the correctly rounded quotient, provided the residual does not
    underflow: for a divisor in [2^-90, 2^120] that holds for every quotient of magnitude >= 2^-13.
    Smaller quotients may come out an ulp off, but with the sign of x and below 2^-10, where e4m3 rounds
    every value to a signed zero, so the codes are those of the IEEE quotient. (The hardware's
    ``div.rn.f32`` is the same correction after a reciprocal per element, plus a range check and a branch:
    ten instructions.) An x of +0 gives +0.
    """
    q = tl.fma(x, y_hi, x * y_lo)
    r = tl.fma(-divisor, q, x)
    return tl.fma(r, y_hi, q)


@triton.jit
def _is_fast(amax):
    """Tiles the fast path quantizes bit-exactly: amax 0 (every value zero after the flush) or in [448 *
    2^-90, FLT_MAX]. False for NaN/Inf tiles and tiles of tiny values only, which take ``div_rn``."""
    return (amax == 0.0) | ((amax >= _FAST_MIN_AMAX) & (amax < _INF))


@triton.jit
def _all_fast(amax):
    """Whether every tile of the CTA (amax: a tensor of tiles) :func:`_is_fast`: a CTA-uniform scalar."""
    return tl.min(_is_fast(amax).to(tl.int32)) == 1


@triton.jit
def _tile_scales(amax, FAST: tl.constexpr):
    """Per tile: (scale, divisor, y_hi, y_lo, zero_tile).

    FAST (every tile of the CTA :func:`_is_fast`): ``scale = RN(amax / 448)`` by :func:`_divide`
    (exact there: checked for every fp32 significand), a zero tile only for amax 0 (divisor 1: its values
    are all +0 and divide to +0), ``y_hi``/``y_lo`` the reciprocal parts of the divisor for
    :func:`_divide`. Otherwise the recipe as written: scale = amax / 448 (``div_rn``), 0 for a zero tile
    (scale below 2^-126; False for NaN, so a NaN scale stays NaN), divisor = scale or 1 (no y_hi/y_lo).
    """
    if FAST:
        scale = _divide(amax, _MAX, _MAX_RECIPROCAL_HI, _MAX_RECIPROCAL_LO)
        zero_tile = amax == 0.0
        divisor = tl.where(zero_tile, 1.0, scale)
        y_hi = tl.div_rn(1.0, divisor)
        y_lo = tl.fma(-divisor, y_hi, 1.0) * y_hi
    else:
        scale = tl.div_rn(amax, _MAX)
        zero_tile = scale < _MIN_NORMAL
        scale = tl.where(zero_tile, 0.0, scale)
        divisor = tl.where(zero_tile, 1.0, scale)
        y_hi = divisor
        y_lo = divisor
    return scale, divisor, y_hi, y_lo, zero_tile


@triton.jit
def _quotients(x, divisor, y_hi, y_lo, zero_tile, FAST: tl.constexpr):
    """``x / divisor`` for flushed x (per-tile operands broadcast to x): by :func:`_divide` (inlined: one
    jit call less under the interpreter) when FAST, otherwise by ``div_rn`` with +0 in zero tiles.

    The e4m3 conversion needs no clamp before it: ``|x| <= amax`` and ``divisor = RN(amax / 448)`` give
    ``|x / divisor| <= 448 (1 + 2^-24)``, which rounds to 448 (e4m3 has no value between 448 and the next
    midpoint 464), and NaN stays NaN.
    """
    if FAST:
        q = tl.fma(x, y_hi, x * y_lo)
        r = tl.fma(-divisor, q, x)
        return tl.fma(r, y_hi, q)
    else:
        return tl.where(zero_tile, 0.0, tl.div_rn(x, divisor))


@triton.jit
def _e4m3_words(q, PTX: tl.constexpr):
    """Joined fp32 quotients q (.., 2, 2) -> int32 words (..) holding the e4m3 codes of the four sub-tiles
    as bytes 0..3 (little-endian, sub-tile 0 first). PTX: two ``cvt.rn.satfinite.e4m3x2.f32`` (the
    conversion Triton emits for ``.to(tl.float8e4nv)``) and a register pair move; otherwise Triton's
    conversion and shifts (which the compiler assembles byte by byte, about three instructions a code)."""
    q0, q1, q2, q3 = _split4(q)
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
            "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }",
            "=r,r,r,r,r",
            [q0, q1, q2, q3],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        b0 = q0.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        b1 = q1.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        b2 = q2.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        b3 = q3.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)


# ---- tokens ------------------------------------------------------------------------------------------------


@triton.jit
def _rowwise(x, amax, q_ptrs, stride, s_ptrs, FAST: tl.constexpr):
    """1x128 quantization of the joined sub-tiles x (R/4, 128, 2, 2) with row amax (R/4, 2, 2): codes of
    sub-tile a at ``q_ptrs + a * stride`` (q_ptrs (R/4, 128): the rows of sub-tile 0), scales at s_ptrs
    (R/4, 2, 2). The quotients are split back into the four sub-tiles before the conversion, so that the
    conversion packs codes of neighbouring columns and the stores are those of a row-major tile."""
    scale, divisor, y_hi, y_lo, zero_tile = _tile_scales(amax, FAST)
    tl.store(s_ptrs, scale)
    q = _quotients(x, divisor[:, None], y_hi[:, None], y_lo[:, None], zero_tile[:, None], FAST)
    q0, q1, q2, q3 = _split4(q)
    tl.store(q_ptrs, q0.to(tl.float8e4nv))
    tl.store(q_ptrs + stride, q1.to(tl.float8e4nv))
    tl.store(q_ptrs + 2 * stride, q2.to(tl.float8e4nv))
    tl.store(q_ptrs + 3 * stride, q3.to(tl.float8e4nv))


@triton.jit
def _token_tiles(x, amax, qt_ptrs, s_ptrs, FAST: tl.constexpr, PTX: tl.constexpr):
    """128x1 quantization of the joined sub-tiles x (32, C', 2, 2) with column amax (C',): words of four
    consecutive tokens, transposed, into qt_ptrs (C', 32); scales into s_ptrs (C',)."""
    scale, divisor, y_hi, y_lo, zero_tile = _tile_scales(amax, FAST)
    tl.store(s_ptrs, scale)
    divisor, y_hi, y_lo = divisor[None, :, None, None], y_hi[None, :, None, None], y_lo[None, :, None, None]
    words = _e4m3_words(_quotients(x, divisor, y_hi, y_lo, zero_tile[None, :, None, None], FAST), PTX)
    tl.store(qt_ptrs, tl.trans(words))


def _token_configs() -> list[triton.Config]:
    """(BLOCK_ROWS, BLOCK_COLS, warps, register cap) of the token kernel; :func:`_fitting_token_configs`
    picks those of the requested outputs. Rowwise tiles need 128 columns, token tiles 128 rows, both
    128x128. Memory-bound, so the point is bytes in flight per SM: several CTAs an SM, so that one CTA's
    loads are in flight while another computes. Register use on sm_90 (Triton 3.6, bf16 input):
    rowwise 32x128 / 64x128, 4 warps: 64 / 96 registers (8 / 5 CTAs an SM); token tiles 128x64, 4 / 8
    warps: 126 / 79 (4 / 3 CTAs); both 128x128: 4 warps ~255 registers (2 CTAs of 4 warps, the fewest
    instructions an element: per-tile work is shared by more elements a thread) or 8 warps capped at 128
    (2 CTAs of 8 warps); both spill a little in the ``div_rn`` branch only. (4 warps capped at 168 for 3
    CTAs spills on the fast path; 16 warps capped at 64 spills and runs the most instructions.)"""
    shapes = [
        (32, 128, 4, None),
        (64, 128, 4, None),
        (128, 64, 4, None),
        (128, 64, 8, None),
        (128, 128, 4, None),
        (128, 128, 8, 128),
    ]
    return [
        triton.Config({"BLOCK_ROWS": r, "BLOCK_COLS": c}, num_warps=w, num_stages=1, maxnreg=m) for r, c, w, m in shapes
    ]


def _fitting_token_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune prune: the tile shapes for the requested outputs: rowwise only (or a plain output) 32 or 64
    rows x 128 columns, token tiles only 128 rows x 64 columns, both 128x128."""
    rowwise, tiles = kwargs["ROWWISE"] or kwargs["PLAIN"], kwargs["TOKEN_TILES"]
    rows = (BLOCK,) if tiles else (32, 64)
    return [c for c in configs if (c.kwargs["BLOCK_COLS"] == BLOCK) == rowwise and c.kwargs["BLOCK_ROWS"] in rows]


# Source modes of the token kernel: what padded row p, column c of the value it quantizes is (m = row_map[p];
# the row is padding, value 0, where m < 0; see :func:`_source_rows`).
GATHER, SCALED_GATHER, SWIGLU, SWIGLU_BACKWARD = 0, 1, 2, 3
_GATHER, _SCALED_GATHER, _SWIGLU, _SWIGLU_BACKWARD = (tl.constexpr(v) for v in range(4))


@triton.jit
def _silu_parts(g):
    """(sigmoid(g), silu(g)) of fp32 g: ``1 / (1 + exp(-g))`` and ``g / (1 + exp(-g))``, torch's formulas,
    with Triton's ``exp`` and fp32 division (on a GPU ``ex2.approx`` and ``div.full``: a few ulp from
    torch's; NumPy's fp32 ``exp`` and IEEE division under the interpreter)."""
    d = 1.0 + tl.exp(-g)
    return 1.0 / d, g / d


@triton.jit
def _source_rows(
    x_ptr,
    stride_x,
    y_ptr,
    stride_y,
    row_map_ptr,
    prow,
    cols,
    half,
    up,
    SOURCE: tl.constexpr,
    DIVISOR: tl.constexpr,
    PLAIN: tl.constexpr,
    PTX: tl.constexpr,
):
    """Rows prow (R',) x columns cols (C',) of the token kernel's value in fp32 (PLAIN GATHER: in x's dtype),
    for ``m = row_map[prow]``; rows with m < 0 are never read and hold +0. :func:`_flush`-ed (the recipe's
    first step) unless PLAIN.

    - GATHER: ``x[m // DIVISOR, c]`` (x any float dtype);
    - SCALED_GATHER: ``y[m] * x[m // DIVISOR, c]``, one fp32 product (:func:`_mul_rn`; y: flat factors);
    - SWIGLU: ``silu(g) * u``, ``g = x[p, c]``, ``u = x[p, half + c]`` (x: h, gate | up);
    - SWIGLU_BACKWARD: dh's gate half ``da * u * (sig * (1 + g * (1 - sig)))``, or where ``up`` (a runtime
      bool) its up half ``da * (g * sig)``; ``sig = sigmoid(g)``, g and u as SWIGLU, ``da = y[p, c]``
      (torch's order of operations).
    """
    m = tl.load(row_map_ptr + prow)
    valid = m >= 0
    if SOURCE <= _SCALED_GATHER:  # GATHER or SCALED_GATHER
        src = m
        if DIVISOR > 1:
            src = m // DIVISOR
        ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_x + cols[None, :]
        if SOURCE == _SCALED_GATHER:
            v = tl.load(ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
            v = _mul_rn(tl.load(y_ptr + m, mask=valid, other=0.0).to(tl.float32)[:, None], v, PTX)
            if not PLAIN:
                v = _flush(v, PTX)
        elif PLAIN:
            v = tl.load(ptrs, mask=valid[:, None], other=0.0)  # x's dtype: rounded only if the output's differs
        else:
            v = _load_flushed(ptrs, valid[:, None], PTX)
    else:
        ptrs = x_ptr + prow.to(tl.int64)[:, None] * stride_x + cols[None, :]
        g = tl.load(ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        sig, silu = _silu_parts(g)
        if SOURCE == _SWIGLU:
            v = silu * tl.load(ptrs + half, mask=valid[:, None], other=0.0).to(tl.float32)
        else:
            da_ptrs = y_ptr + prow.to(tl.int64)[:, None] * stride_y + cols[None, :]
            da = tl.load(da_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
            if up:
                v = da * (g * sig)
            else:
                u = tl.load(ptrs + half, mask=valid[:, None], other=0.0).to(tl.float32)
                v = da * u * (sig * (1.0 + g * (1.0 - sig)))
        if not PLAIN:
            v = _flush(v, PTX)
    return v


@triton.jit
def _store_tile(
    x0,
    x1,
    x2,
    x3,
    first,
    row_block,
    col_block,
    row_expert_ptr,
    padded_starts_ptr,
    padded_sizes_ptr,
    num_groups,
    num_padded_rows,
    num_cols,
    q_ptr,
    s_ptr,
    qt_words_ptr,
    st_ptr,
    out_ptr,
    ROWWISE: tl.constexpr,
    TOKEN_TILES: tl.constexpr,
    PLAIN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    PTX: tl.constexpr,
):
    """Write the tile of padded rows ``[first, first + BLOCK_ROWS)``, columns of block col_block, given as
    its four sub-tiles x0..x3 (fp32 and flushed, or for PLAIN of any float dtype; sub-tile a holds rows
    ``first + 4 b + a``):
    PLAIN: as out's dtype into out (Mp, C); ROWWISE and/or TOKEN_TILES: quantized into those layouts (see
    :func:`_quantize_tokens_kernel`)."""
    b = tl.arange(0, BLOCK_ROWS // 4)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    rows = first + 4 * b  # sub-tile a holds padded rows 4 b + a
    if PLAIN:
        o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * num_cols + cols[None, :]
        tl.store(o_ptrs, _cast(x0, out_ptr.dtype.element_ty, PTX))
        tl.store(o_ptrs + num_cols, _cast(x1, out_ptr.dtype.element_ty, PTX))
        tl.store(o_ptrs + 2 * num_cols, _cast(x2, out_ptr.dtype.element_ty, PTX))
        tl.store(o_ptrs + 3 * num_cols, _cast(x3, out_ptr.dtype.element_ty, PTX))
    else:
        x = _join4(x0, x1, x2, x3)

        if ROWWISE:
            amax = _join4(_row_amax(x0), _row_amax(x1), _row_amax(x2), _row_amax(x3))
            s_ptrs = s_ptr + col_block * num_padded_rows + _join4(rows, rows + 1, rows + 2, rows + 3)
            q_ptrs = q_ptr + rows.to(tl.int64)[:, None] * num_cols + cols[None, :]
            if _all_fast(amax):
                _rowwise(x, amax, q_ptrs, num_cols, s_ptrs, True)
            else:
                _rowwise(x, amax, q_ptrs, num_cols, s_ptrs, False)

        if TOKEN_TILES:
            amax = _col_amax(x0, x1, x2, x3)
            s_ptrs = st_ptr + row_block * num_cols + cols
            # The K-major block this token block lies in: its group's (the block's first row is a real row of
            # it), or the tail block past the last group.
            group = tl.load(row_expert_ptr + first)
            is_tail = group < 0
            group = tl.where(is_tail, num_groups - 1, group)
            start = tl.load(padded_starts_ptr + group)
            length = tl.load(padded_sizes_ptr + group)
            tail_start = start + length
            start = tl.where(is_tail, tail_start, start)
            length = tl.where(is_tail, num_padded_rows - tail_start, length)
            # Element C * start + c * length + (first - start) + t, in words (every term is a multiple of 128);
            # word b of a column holds its tokens 4b .. 4b+3.
            base = tl.multiple_of((start.to(tl.int64) * num_cols + (first - start)) // 4, 32)
            length_words = tl.multiple_of(length // 4, 32)
            qt_ptrs = qt_words_ptr + base + cols.to(tl.int64)[:, None] * length_words + b[None, :]
            if _all_fast(amax):
                _token_tiles(x, amax, qt_ptrs, s_ptrs, True, PTX)
            else:
                _token_tiles(x, amax, qt_ptrs, s_ptrs, False, PTX)


@triton.autotune(
    configs=_token_configs(),
    key=["num_cols", "SOURCE", "DIVISOR", "ROWWISE", "TOKEN_TILES", "PLAIN"],
    prune_configs_by={"early_config_prune": _fitting_token_configs},
)
@triton.jit
def _quantize_tokens_kernel(
    x_ptr,
    stride_x,
    y_ptr,
    stride_y,
    row_map_ptr,
    row_expert_ptr,
    padded_starts_ptr,
    padded_sizes_ptr,
    num_groups,
    num_padded_rows,
    num_cols,
    q_ptr,
    s_ptr,
    qt_words_ptr,
    st_ptr,
    out_ptr,
    SOURCE: tl.constexpr,
    DIVISOR: tl.constexpr,
    ROWWISE: tl.constexpr,
    TOKEN_TILES: tl.constexpr,
    PLAIN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    PTX: tl.constexpr,
):
    """One BLOCK_ROWS x BLOCK_COLS tile of the padded layout (Mp rows, C = num_cols output columns), its
    value read once from the sources by SOURCE (:func:`_source_rows`; ``row_map`` (Mp,) int32/int64: -1 on
    padding rows, which are written as zeros). A 1-D grid, column blocks fastest: consecutive CTAs read
    neighbouring spans of the same rows. A SWIGLU_BACKWARD tile is one of dh's gate half or of its up half;
    both read the same columns of h and da (the second read mostly from L2: the two tiles are C/2 columns,
    a few CTAs, apart; one CTA computing both halves spills).

    ROWWISE (BLOCK_COLS == 128): q (Mp, C) e4m3 and s (C/128, Mp) fp32. TOKEN_TILES (BLOCK_ROWS == 128): the
    flat K-major codes through their int32 view qt_words (C * Mp / 4,) and st (Mp/128, C) fp32. PLAIN (alone):
    out (Mp, C) in its dtype, unquantized (and unflushed). The tile is four sub-tiles of BLOCK_ROWS/4 rows,
    sub-tile a holding rows 4 b + a (module docstring).
    """
    col_blocks = num_cols // BLOCK_COLS
    row_block = tl.program_id(0) // col_blocks
    col_block = tl.program_id(0) % col_blocks
    first = row_block * BLOCK_ROWS
    rows = first + 4 * tl.arange(0, BLOCK_ROWS // 4)
    src_cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)  # the columns read (written: _store_tile)
    half = num_cols  # where the up half of h starts (SWIGLU)
    up = False
    if SOURCE == _SWIGLU_BACKWARD:  # a tile of dh's gate half or of its up half (CTA-uniform), read at cols % F
        half = num_cols // 2
        up = col_block * BLOCK_COLS >= half
        src_cols = (col_block * BLOCK_COLS) % half + tl.arange(0, BLOCK_COLS)
    x0 = _source_rows(
        x_ptr, stride_x, y_ptr, stride_y, row_map_ptr, rows, src_cols, half, up, SOURCE, DIVISOR, PLAIN, PTX
    )
    x1 = _source_rows(
        x_ptr, stride_x, y_ptr, stride_y, row_map_ptr, rows + 1, src_cols, half, up, SOURCE, DIVISOR, PLAIN, PTX
    )
    x2 = _source_rows(
        x_ptr, stride_x, y_ptr, stride_y, row_map_ptr, rows + 2, src_cols, half, up, SOURCE, DIVISOR, PLAIN, PTX
    )
    x3 = _source_rows(
        x_ptr, stride_x, y_ptr, stride_y, row_map_ptr, rows + 3, src_cols, half, up, SOURCE, DIVISOR, PLAIN, PTX
    )
    _store_tile(
        x0,
        x1,
        x2,
        x3,
        first,
        row_block,
        col_block,
        row_expert_ptr,
        padded_starts_ptr,
        padded_sizes_ptr,
        num_groups,
        num_padded_rows,
        num_cols,
        q_ptr,
        s_ptr,
        qt_words_ptr,
        st_ptr,
        out_ptr,
        ROWWISE,
        TOKEN_TILES,
        PLAIN,
        BLOCK_ROWS,
        BLOCK_COLS,
        PTX,
    )


# ---- weights -----------------------------------------------------------------------------------------------


@triton.jit
def _weight_block(
    x, amax, q_ptrs, K, s_ptrs, qt_ptrs, st_ptrs, TRANSPOSED: tl.constexpr, FAST: tl.constexpr, PTX: tl.constexpr
):
    """128x128 quantization of the joined sub-tiles x (32, 128, 2, 2) with block amax (scalar): codes of
    sub-tile a at ``q_ptrs + a * K`` (q_ptrs (32, 128): the rows of sub-tile 0), and if TRANSPOSED words of
    four consecutive rows, transposed, at qt_ptrs (128, 32); the scale at s_ptrs (and st_ptrs)."""
    scale, divisor, y_hi, y_lo, zero_tile = _tile_scales(amax, FAST)
    tl.store(s_ptrs, scale)
    q = _quotients(x, divisor, y_hi, y_lo, zero_tile, FAST)
    q0, q1, q2, q3 = _split4(q)
    tl.store(q_ptrs, q0.to(tl.float8e4nv))
    tl.store(q_ptrs + K, q1.to(tl.float8e4nv))
    tl.store(q_ptrs + 2 * K, q2.to(tl.float8e4nv))
    tl.store(q_ptrs + 3 * K, q3.to(tl.float8e4nv))
    if TRANSPOSED:
        tl.store(st_ptrs, scale)
        tl.store(qt_ptrs, tl.trans(_e4m3_words(q, PTX)))


def _weight_configs() -> list[triton.Config]:
    """Warps of the weight kernel, one 128x128 block a CTA: 4 (~180 registers, the fewest instructions an
    element) or 8 (128): two CTAs an SM either way. (16 warps need a cap of 64
    registers for two CTAs and run ~1.8x the instructions of 4.)"""
    return [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


@triton.autotune(configs=_weight_configs(), key=["N", "K", "TRANSPOSED"])
@triton.jit
def _quantize_weight_kernel(
    w_ptr, q_ptr, s_ptr, qt_words_ptr, st_ptr, N, K, TRANSPOSED: tl.constexpr, TILE: tl.constexpr, PTX: tl.constexpr
):
    """One 128x128 block of w (E, N, K) per program (1-D grid over (e, n block, k block), k fastest): codes
    q (E, N, K) e4m3 and scale s (E, N/128, K/128); if TRANSPOSED the same codes transposed into qt (E, K,
    N) through its int32 view qt_words (E * K * N / 4,) and the scale into st (E, K/128, N/128). The block
    is four sub-tiles of 32 rows, sub-tile a holding rows 4 b + a (module docstring)."""
    pid = tl.program_id(0)
    k_blocks = K // TILE
    n_blocks = N // TILE
    k_block = pid % k_blocks
    n_block = (pid // k_blocks) % n_blocks
    expert = pid // (k_blocks * n_blocks)
    b = tl.arange(0, TILE // 4)
    rows = n_block * TILE + 4 * b  # sub-tile a holds rows 4 b + a of the block
    cols = k_block * TILE + tl.arange(0, TILE)
    w_ptrs = w_ptr + expert.to(tl.int64) * N * K + rows.to(tl.int64)[:, None] * K + cols[None, :]
    w0 = _load_flushed(w_ptrs, None, PTX)
    w1 = _load_flushed(w_ptrs + K, None, PTX)
    w2 = _load_flushed(w_ptrs + 2 * K, None, PTX)
    w3 = _load_flushed(w_ptrs + 3 * K, None, PTX)
    amax = tl.max(_col_amax(w0, w1, w2, w3).to(tl.int32, bitcast=True), 0).to(tl.float32, bitcast=True)
    x = _join4(w0, w1, w2, w3)
    s_ptrs = s_ptr + (expert * n_blocks + n_block) * k_blocks + k_block
    q_ptrs = q_ptr + expert.to(tl.int64) * N * K + rows.to(tl.int64)[:, None] * K + cols[None, :]
    qt_ptrs, st_ptrs = q_ptrs, s_ptrs  # unused unless TRANSPOSED
    if TRANSPOSED:
        st_ptrs = st_ptr + (expert * k_blocks + k_block) * n_blocks + n_block
        n_words = N // 4  # row k of qt holds N codes, N / 4 words; word b of this block holds rows 4b .. 4b+3
        qt_ptrs = (
            qt_words_ptr
            + expert.to(tl.int64) * K * n_words
            + cols.to(tl.int64)[:, None] * n_words
            + n_block * (TILE // 4)
            + b[None, :]
        )
    if _is_fast(amax):
        _weight_block(x, amax, q_ptrs, K, s_ptrs, qt_ptrs, st_ptrs, TRANSPOSED, True, PTX)
    else:
        _weight_block(x, amax, q_ptrs, K, s_ptrs, qt_ptrs, st_ptrs, TRANSPOSED, False, PTX)


# ---- host side -----------------------------------------------------------------------------------------------


def _ptx(t: Tensor) -> bool:
    """Whether the kernels may use inline PTX: on a CUDA tensor, not under the Triton interpreter (which
    runs the portable equivalents instead)."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes")


def _check_tokens(x: object, layout: object, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout: expected a GroupLayout, got {type(layout).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (M, C) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name}: expected dtype bf16, fp16 or fp32, got {x.dtype}")
    if x.shape[1] % BLOCK:
        raise ValueError(f"{name}: columns must be a multiple of {BLOCK}, got shape {tuple(x.shape)}")
    if x.shape[0] != layout.num_rows:
        raise ValueError(f"{name}: expected {layout.num_rows} rows (layout.num_rows), got {x.shape[0]}")
    if x.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride along columns, got strides {x.stride()}")
    if x.device != layout.offsets.device:
        raise ValueError(f"{name}: expected device {layout.offsets.device} (that of layout), got {x.device}")


def quantize_tokens(
    x: Tensor,
    layout: GroupLayout,
    *,
    rowwise: bool = True,
    token_tiles: bool = True,
    name: str = "x",
    token_tiles_out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """Quantize tokens x (M, C) bf16/fp16/fp32 (unit column stride, any row stride; M = ``layout.num_rows``,
    C a multiple of 128) into the grouped layouts of ``layout``, reading x once.

    Returns, in this order, for what is asked:

    - ``rowwise``: ``(xq (Mp, C) e4m3 row-major, sx (C/128, Mp) fp32 contiguous)``: 1x128 tiles in the
      128-row-padded grouped layout (the M-grouped GEMM's operand: x in the forward, dy in the dgrad);
    - ``token_tiles``: ``(xt (C * Mp,) e4m3, sxt (Mp/128, C) fp32 contiguous)``: 128x1 per-group token
      tiles, K-major flat per group (the K-grouped wgrad GEMM's operand: x and dy);

    (Mp = ``layout.num_padded_rows``) in the layouts of the module docstring; padding is written as code 0,
    scale 0. ``name`` is the argument's name in error messages (``"dy"`` for gradients).
    ``token_tiles_out``: buffers (contiguous, of exactly those shapes and dtypes) the token-tile pair is
    written into and returned as.
    """
    _check_tokens(x, layout, name)
    for flag, value in (("rowwise", rowwise), ("token_tiles", token_tiles)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}: expected a bool, got {type(value).__name__}")
    if not (rowwise or token_tiles):
        raise ValueError("rowwise, token_tiles: expected at least one output layout, got both False")
    return _padded_pass(
        GATHER, x, None, layout.padded_to_row, layout, x.shape[1], rowwise, token_tiles, token_tiles_out=token_tiles_out
    )


def _padded_pass(
    source: int,
    x: Tensor,
    y: Tensor | None,
    row_map: Tensor,
    layout: GroupLayout,
    num_cols: int,
    rowwise: bool,
    token_tiles: bool,
    plain: torch.dtype | None = None,
    divisor: int = 1,
    token_tiles_out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """The token kernel in source mode ``source`` (GATHER, SCALED_GATHER, SWIGLU, SWIGLU_BACKWARD; see
    :func:`_source_rows`): the (Mp, num_cols) value of the padded layout read once from x (and y), written
    as the rowwise pair and/or the token-tile pair (as :func:`quantize_tokens` returns them), or, with
    ``plain`` a dtype, as one (Mp, num_cols) tensor of that dtype (unquantized; then rowwise and
    token_tiles are ignored). ``row_map`` (Mp,) int32/int64 on x's device: -1 on padding rows. Arguments
    are the caller's to check (x, y: unit column stride; num_cols a multiple of 128, of 256 for
    SWIGLU_BACKWARD)."""
    mp = layout.num_padded_rows
    rowwise, token_tiles = rowwise and plain is None, token_tiles and plain is None
    out = x.new_empty((mp, num_cols), dtype=plain) if plain is not None else None
    q = x.new_empty((mp, num_cols), dtype=FP8_DTYPE) if rowwise else None  # None: compiled out of the kernel
    s = x.new_empty((num_cols // BLOCK, mp), dtype=torch.float32) if rowwise else None
    if token_tiles and token_tiles_out is not None:  # the caller's buffers (the JAX bridge's residuals)
        qt = check_out("token_tiles_out[0]", token_tiles_out[0], (num_cols * mp,), FP8_DTYPE, x.device)
        st = check_out("token_tiles_out[1]", token_tiles_out[1], (mp // BLOCK, num_cols), torch.float32, x.device)
    else:
        qt = x.new_empty((num_cols * mp,), dtype=FP8_DTYPE) if token_tiles else None
        st = x.new_empty((mp // BLOCK, num_cols), dtype=torch.float32) if token_tiles else None
    if mp and num_cols:

        def grid(meta: dict) -> tuple[int]:
            return ((mp // meta["BLOCK_ROWS"]) * (num_cols // meta["BLOCK_COLS"]),)

        direct(_quantize_tokens_kernel)[grid](
            x,
            x.stride(0),
            y,
            y.stride(0) if y is not None else 0,
            row_map,
            layout.row_expert,
            layout.padded_starts,
            layout.padded_sizes,
            layout.num_groups,
            mp,
            num_cols,
            q,
            s,
            qt.view(torch.int32) if token_tiles else None,
            st,
            out,
            SOURCE=source,
            DIVISOR=divisor,
            ROWWISE=rowwise,
            TOKEN_TILES=token_tiles,
            PLAIN=plain is not None,
            PTX=_ptx(x),
        )
    if out is not None:
        return (out,)
    return tuple(t for t in (q, s, qt, st) if t is not None)


def _check_out_t(out_t: object, shapes: tuple[tuple[int, ...], tuple[int, ...]], device: torch.device):
    if not isinstance(out_t, (tuple, list)) or len(out_t) != 2:
        raise TypeError(f"out_t: expected a pair of tensors (wq_t, sw_t), got {type(out_t).__name__}")
    return (
        check_out("out_t[0]", out_t[0], shapes[0], FP8_DTYPE, device),
        check_out("out_t[1]", out_t[1], shapes[1], torch.float32, device),
    )


def quantize_weight(
    w: Tensor, transposed: bool, *, out_t: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """128x128 blocks of w (E, N, K) bf16/fp16/fp32 (N, K multiples of 128), from one read of w.

    Returns ``(wq (E, N, K) e4m3, sw (E, N/128, K/128) fp32, wq_t (E, K, N) e4m3, sw_t (E, K/128, N/128)
    fp32)``, all contiguous; ``wq_t``/``sw_t`` hold the same blocks and scales transposed (the dgrad's
    operand) and are empty tensors when ``transposed`` is False. ``out_t``: contiguous buffers of exactly
    those shapes, dtypes and w's device that ``(wq_t, sw_t)`` are written into and returned as (only with
    ``transposed``). A non-contiguous w is copied first. fp32 w takes the single-read kernel only when
    :data:`FP32_WEIGHT_SINGLE_READ`; otherwise ``wq_t``/``sw_t`` are transposed copies of ``wq``/``sw``.
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 3 or w.shape[1] % BLOCK or w.shape[2] % BLOCK:
        raise ValueError(
            f"w: expected an (E, N, K) tensor with N and K multiples of {BLOCK}, got shape {tuple(w.shape)}"
        )
    if w.dtype not in _INPUT_DTYPES:
        raise TypeError(f"w: expected dtype bf16, fp16 or fp32, got {w.dtype}")
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed: expected a bool, got {type(transposed).__name__}")
    if out_t is not None and not transposed:
        raise ValueError("out_t: buffers for the transposed outputs given, but transposed is False")
    w = w.contiguous()
    e, n, k = w.shape
    wq = torch.empty_like(w, dtype=FP8_DTYPE)
    sw = w.new_empty((e, n // BLOCK, k // BLOCK), dtype=torch.float32)
    shapes_t = ((e, k, n), (e, k // BLOCK, n // BLOCK))
    if out_t is not None:
        wq_t, sw_t = _check_out_t(out_t, shapes_t, w.device)
    else:
        wq_t = w.new_empty(shapes_t[0] if transposed else (0,), dtype=FP8_DTYPE)
        sw_t = w.new_empty(shapes_t[1] if transposed else (0,), dtype=torch.float32)
    fused = transposed and (w.dtype != torch.float32 or FP32_WEIGHT_SINGLE_READ)
    if w.numel():
        direct(_quantize_weight_kernel)[(e * (n // BLOCK) * (k // BLOCK),)](
            w,
            wq,
            sw,
            wq_t.view(torch.int32) if fused else None,
            sw_t if fused else None,
            n,
            k,
            TRANSPOSED=fused,
            TILE=BLOCK,
            PTX=_ptx(w),
        )
    if transposed and not fused:
        wq_t.copy_(wq.transpose(1, 2))
        sw_t.copy_(sw.transpose(1, 2))
    return wq, sw, wq_t, sw_t


__all__ = ["FP32_WEIGHT_SINGLE_READ", "quantize_tokens", "quantize_weight"]
