"""The quantization recipe of :mod:`fp8moe.recipe`, written once in plain torch (CPU or GPU).

Tile shapes: *rowwise* 1x128 (one scale per row per 128 columns), *blockwise* 128x128, *colwise* 128x1
(one scale per column per 128 rows). The Triton kernels in :mod:`fp8moe.kernels` produce the same bits in
the layouts the GEMMs read; these functions are their ground truth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fp8moe.recipe import BLOCK, FP8_DTYPE, FP8_MAX, MIN_NORMAL


def quantize_tiles(tiles: Tensor, amax: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize fp32 ``tiles`` (tiny values already flushed, see :func:`flush_tiny`) given each tile's
    ``amax`` (broadcastable to ``tiles``).

    Returns ``(values e4m3 like tiles, scales fp32 like amax)``.
    """
    # A tensor divisor: CUDA torch divides by a Python scalar through its rounded reciprocal, which is
    # not the IEEE quotient; tensor / tensor is, on every device, so the recipe's bits do not depend on it.
    scale = amax / torch.full_like(amax, FP8_MAX)
    zero_tile = scale < MIN_NORMAL  # False for NaN: a NaN scale stays NaN
    scale = torch.where(zero_tile, torch.zeros_like(scale), scale)
    divisor = torch.where(zero_tile, torch.ones_like(scale), scale)
    values = (tiles / divisor).clamp(-FP8_MAX, FP8_MAX)
    values = torch.where(zero_tile, torch.zeros_like(values), values).to(FP8_DTYPE)
    return values, scale


def flush_tiny(x: Tensor) -> Tensor:
    """x upcast to fp32 with every ``|v| < MIN_NORMAL`` (subnormals) replaced by +0; NaN and Inf kept."""
    x = x.float()
    return torch.where(x.abs() < MIN_NORMAL, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _tile_amax(tiles: Tensor, dims: tuple[int, ...]) -> Tensor:
    # torch.amax propagates NaN, which is what makes a NaN input give a NaN scale.
    return tiles.abs().amax(dim=dims, keepdim=True)


def _check_multiple(t: Tensor, dim: int, name: str) -> None:
    if t.shape[dim] % BLOCK:
        raise ValueError(f"{name}: dimension {dim} must be a multiple of {BLOCK}, got shape {tuple(t.shape)}")


def quantize_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """1x128 tiles along the last dim. x (..., K) -> (values (..., K) e4m3, scales (..., K/128) fp32)."""
    _check_multiple(x, -1, "x")
    tiles = flush_tiny(x).unflatten(-1, (-1, BLOCK))
    values, scale = quantize_tiles(tiles, _tile_amax(tiles, (-1,)))
    return values.flatten(-2), scale.squeeze(-1)


def quantize_colwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """128x1 tiles along rows. x (R, C), R % 128 == 0 -> (values (R, C) e4m3, scales (R/128, C) fp32)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor, got shape {tuple(x.shape)}")
    _check_multiple(x, 0, "x")
    tiles = flush_tiny(x).unflatten(0, (-1, BLOCK))
    values, scale = quantize_tiles(tiles, _tile_amax(tiles, (1,)))
    return values.flatten(0, 1), scale.squeeze(1)


def quantize_blockwise(w: Tensor) -> tuple[Tensor, Tensor]:
    """128x128 blocks over the last two dims.

    w (..., N, K) -> (values (..., N, K) e4m3, scales (..., N/128, K/128) fp32).
    """
    _check_multiple(w, -1, "w")
    _check_multiple(w, -2, "w")
    n, k = w.shape[-2:]
    tiles = flush_tiny(w).reshape(*w.shape[:-2], n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    values, scale = quantize_tiles(tiles, _tile_amax(tiles, (-3, -1)))
    return values.reshape(w.shape), scale.squeeze(-1).squeeze(-2)


def dequantize_rowwise(values: Tensor, scales: Tensor) -> Tensor:
    """Inverse of :func:`quantize_rowwise`, in fp32."""
    return (values.float().unflatten(-1, (-1, BLOCK)) * scales.unsqueeze(-1)).flatten(-2)


def dequantize_colwise(values: Tensor, scales: Tensor) -> Tensor:
    """Inverse of :func:`quantize_colwise`, in fp32."""
    return (values.float().unflatten(0, (-1, BLOCK)) * scales.unsqueeze(1)).flatten(0, 1)


def dequantize_blockwise(values: Tensor, scales: Tensor) -> Tensor:
    """Inverse of :func:`quantize_blockwise`, in fp32."""
    expanded = scales.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return values.float() * expanded
