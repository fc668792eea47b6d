"""An independent float64/numpy implementation of the recipe, for tests only.

It shares no code with :mod:`fp8moe.quant`: e4m3 rounding is done by hand (round half to even on the
e4m3 grid, subnormals below 2**-6, saturation at 448), scales and divisions follow the recipe's fp32
arithmetic, and the GEMMs run in float64.
"""

from __future__ import annotations

import numpy as np

E4M3_MAX = 448.0
TILE = 128
MIN_NORMAL = 2.0**-126  # values below read as zero; a tile whose scale is below it is a zero tile


def round_e4m3(v: np.ndarray) -> np.ndarray:
    """Round float values to the nearest e4m3fn value (ties to even), saturating at +-448; NaN stays NaN."""
    v = np.asarray(v, dtype=np.float64)
    mag = np.abs(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    quantum = np.exp2(np.maximum(exponent, -6.0) - 3.0)  # 3 mantissa bits; subnormal step 2**-9
    rounded = np.round(v / quantum) * quantum  # np.round rounds half to even
    return np.clip(rounded, -E4M3_MAX, E4M3_MAX)


def quantize_tiles(tiles: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Fake-quantize ``tiles`` (one tile spans ``axes``): returns the dequantized float64 values."""
    t32 = tiles.astype(np.float32)
    t32 = np.where(np.abs(t32) < MIN_NORMAL, np.float32(0), t32)
    amax = np.max(np.abs(t32), axis=axes, keepdims=True)
    scale = (amax / np.float32(E4M3_MAX)).astype(np.float32)
    zero_tile = scale < MIN_NORMAL
    scale = np.where(zero_tile, np.float32(0), scale)
    divisor = np.where(zero_tile, np.float32(1), scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = round_e4m3((t32 / divisor).astype(np.float32))
        q = np.where(zero_tile, 0.0, q)
        return q * scale.astype(np.float64)


def fq_rows(x: np.ndarray) -> np.ndarray:
    """1x128 tiles along the last axis of x (..., K)."""
    tiles = x.reshape(*x.shape[:-1], -1, TILE)
    return quantize_tiles(tiles, (-1,)).reshape(x.shape)


def fq_blocks(w: np.ndarray) -> np.ndarray:
    """128x128 blocks over the last two axes of w (E, N, K)."""
    e, n, k = w.shape
    tiles = w.reshape(e, n // TILE, TILE, k // TILE, TILE)
    return quantize_tiles(tiles, (2, 4)).reshape(w.shape)


def fq_token_tiles(t: np.ndarray) -> np.ndarray:
    """128x1 tiles along rows of one group t (m, C), zero-padded to a multiple of 128 rows."""
    m = t.shape[0]
    padded = np.zeros((-(-m // TILE) * TILE, t.shape[1]), dtype=np.float64)
    padded[:m] = t
    tiles = padded.reshape(-1, TILE, t.shape[1])
    return quantize_tiles(tiles, (1,)).reshape(padded.shape)[:m]


def bounds(offsets: np.ndarray) -> list[tuple[int, int]]:
    ends = [int(v) for v in offsets]
    return list(zip([0] + ends[:-1], ends))


def grouped_mm_fwd_bwd(x: np.ndarray, w: np.ndarray, offsets: np.ndarray, dy: np.ndarray):
    """The recipe's y, dx, dw in float64 for x (M, K), w (E, N, K), dy (M, N)."""
    m, k = x.shape
    e, n, _ = w.shape
    xd, wd, dyd = fq_rows(x), fq_blocks(w), fq_rows(dy)
    y, dx, dw = np.zeros((m, n)), np.zeros((m, k)), np.zeros((e, n, k))
    for g, (lo, hi) in enumerate(bounds(offsets)):
        if hi == lo:
            continue
        y[lo:hi] = xd[lo:hi] @ wd[g].T
        dx[lo:hi] = dyd[lo:hi] @ wd[g]
        dw[g] = fq_token_tiles(dy[lo:hi]).T @ fq_token_tiles(x[lo:hi])
    return y, dx, dw
