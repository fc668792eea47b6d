"""The backend entry points as ``torch.library`` custom ops, so ``torch.compile`` traces them whole.

Each op takes the backend *name* (resolved by :func:`fp8moe.backends.select_backend` before the call)
and dispatches to that backend's method. The fake implementations state the output shapes and dtypes.
Absent outputs (no transposed weight, no dx, no dw) are empty tensors, since custom ops return tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fp8moe.backends import load_backend
from fp8moe.recipe import BLOCK, FP8_DTYPE


@torch.library.custom_op("fp8moe::quantize_weight", mutates_args=())
def quantize_weight(w: Tensor, backend: str, transposed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """w (E, N, K) -> wq (E, N, K) e4m3, sw (E, N/128, K/128) fp32, and when ``transposed`` the dgrad
    operand wq_t (E, K, N) e4m3, sw_t (E, K/128, N/128) fp32 (else two empty tensors)."""
    return load_backend(backend).quantize_weight(w, transposed)


@quantize_weight.register_fake
def _(w: Tensor, backend: str, transposed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    e, n, k = w.shape
    wq = w.new_empty((e, n, k), dtype=FP8_DTYPE)
    sw = w.new_empty((e, n // BLOCK, k // BLOCK), dtype=torch.float32)
    if not transposed:
        return wq, sw, w.new_empty(0, dtype=FP8_DTYPE), w.new_empty(0, dtype=torch.float32)
    return (
        wq,
        sw,
        w.new_empty((e, k, n), dtype=FP8_DTYPE),
        w.new_empty((e, k // BLOCK, n // BLOCK), dtype=torch.float32),
    )


@torch.library.custom_op("fp8moe::grouped_mm_forward", mutates_args=())
def grouped_mm_forward(
    x: Tensor, wq: Tensor, sw: Tensor, offsets: Tensor, backend: str, out_dtype: torch.dtype
) -> Tensor:
    """x (M, K), wq (E, N, K) e4m3, sw (E, N/128, K/128), offsets (E,) int32 -> y (M, N) ``out_dtype``."""
    return load_backend(backend).forward(x, wq, sw, offsets, out_dtype)


@grouped_mm_forward.register_fake
def _(x: Tensor, wq: Tensor, sw: Tensor, offsets: Tensor, backend: str, out_dtype: torch.dtype) -> Tensor:
    return x.new_empty((x.shape[0], wq.shape[1]), dtype=out_dtype)


@torch.library.custom_op("fp8moe::grouped_mm_backward", mutates_args=())
def grouped_mm_backward(
    dy: Tensor,
    x: Tensor,
    wq_t: Tensor,
    sw_t: Tensor,
    offsets: Tensor,
    backend: str,
    need_dx: bool,
    need_dw: bool,
    dx_dtype: torch.dtype,
    dw_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """dy (M, N), x (M, K) -> dx (M, K) ``dx_dtype``, dw (E, N, K) ``dw_dtype`` (empty when not needed)."""
    dx, dw = load_backend(backend).backward(dy, x, wq_t, sw_t, offsets, need_dx, need_dw, dx_dtype, dw_dtype)
    return (
        dx if dx is not None else x.new_empty(0, dtype=dx_dtype),
        dw if dw is not None else x.new_empty(0, dtype=dw_dtype),
    )


@grouped_mm_backward.register_fake
def _(
    dy: Tensor,
    x: Tensor,
    wq_t: Tensor,
    sw_t: Tensor,
    offsets: Tensor,
    backend: str,
    need_dx: bool,
    need_dw: bool,
    dx_dtype: torch.dtype,
    dw_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    dx = x.new_empty((m, k) if need_dx else (0,), dtype=dx_dtype)
    dw = x.new_empty((offsets.shape[0], dy.shape[1], k) if need_dw else (0,), dtype=dw_dtype)
    return dx, dw
