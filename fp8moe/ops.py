"""The backend entry points as plain functions and as ``torch.library`` custom ops.

The functions take only tensors, strings, bools and dtypes: the group plan crosses as ``offsets`` plus its
packed ``plan_data`` buffer (:meth:`fp8moe.plan.GroupLayout.from_data`), the backend as its key
(:func:`fp8moe.backends.resolve_backend`). Eager calls run the functions directly (a custom op's
dispatch costs ~20 us of CPU a call); under ``torch.compile`` the autograd function calls the custom ops,
whose fake implementations state the output shapes, so the compiler traces the op whole. Absent outputs
(no transposed weight, no token tiles, no dx or dw) are empty tensors, since custom ops return tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fp8moe.backends import load_backend
from fp8moe.plan import GroupLayout, plan_data_size, plan_groups
from fp8moe.recipe import BLOCK, FP8_DTYPE


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty(0, dtype=dtype)


def plan(offsets: Tensor, num_rows: int) -> Tensor:
    """offsets (E,) int32 -> the packed plan buffer (2E + 2Mp + M,) int32."""
    return plan_groups(offsets, num_rows).data


def quantize_weight(w: Tensor, backend: str, transposed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """w (E, N, K) -> wq (E, N, K) e4m3, sw (E, N/128, K/128) fp32, and when ``transposed`` the dgrad
    operand wq_t (E, K, N) e4m3, sw_t (E, K/128, N/128) fp32 (else two empty tensors)."""
    return load_backend(backend).quantize_weight(w, transposed)


def forward(
    x: Tensor,
    wq: Tensor,
    sw: Tensor,
    offsets: Tensor,
    plan_data: Tensor,
    backend: str,
    out_dtype: torch.dtype,
    token_tiles: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, K) -> y (M, N) ``out_dtype`` and, when ``token_tiles``, x's token tiles xt (K * Mp,) e4m3 and
    sxt (Mp/128, K) fp32 (else empty)."""
    layout = GroupLayout.from_data(offsets, plan_data, x.shape[0])
    y, xt, sxt = load_backend(backend).forward(x, wq, sw, layout, out_dtype, token_tiles=token_tiles)
    if not token_tiles:
        return y, _empty(x, FP8_DTYPE), _empty(x, torch.float32)
    return y, xt, sxt


def backward(
    dy: Tensor,
    xt: Tensor,
    sxt: Tensor,
    wq_t: Tensor,
    sw_t: Tensor,
    offsets: Tensor,
    plan_data: Tensor,
    main_grad: Tensor | None,
    backend: str,
    need_dx: bool,
    need_dw: bool,
    dx_dtype: torch.dtype,
    dw_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """dy (M, N) -> dx (M, K) ``dx_dtype``, dw (E, N, K) ``dw_dtype`` (empty when not needed, or when
    ``main_grad`` is given: the weight gradient is then added into it)."""
    layout = GroupLayout.from_data(offsets, plan_data, dy.shape[0])
    dx, dw = load_backend(backend).backward(
        dy, xt, sxt, wq_t, sw_t, layout, need_dx, need_dw, dx_dtype, dw_dtype, main_grad=main_grad
    )
    return (
        dx if dx is not None else _empty(dy, dx_dtype),
        dw if dw is not None and main_grad is None else _empty(dy, dw_dtype),
    )


# ---- the same functions as custom ops, for torch.compile --------------------------------------------

plan_op = torch.library.custom_op("fp8moe::plan", mutates_args=())(plan)
quantize_weight_op = torch.library.custom_op("fp8moe::quantize_weight", mutates_args=())(quantize_weight)
forward_op = torch.library.custom_op("fp8moe::grouped_mm_forward", mutates_args=())(forward)
backward_op = torch.library.custom_op("fp8moe::grouped_mm_backward", mutates_args=("main_grad",))(backward)


@plan_op.register_fake
def _(offsets: Tensor, num_rows: int) -> Tensor:
    return offsets.new_empty(plan_data_size(num_rows, offsets.shape[0]))


@quantize_weight_op.register_fake
def _(w: Tensor, backend: str, transposed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    e, n, k = w.shape
    wq = w.new_empty((e, n, k), dtype=FP8_DTYPE)
    sw = w.new_empty((e, n // BLOCK, k // BLOCK), dtype=torch.float32)
    if not transposed:
        return wq, sw, _empty(w, FP8_DTYPE), _empty(w, torch.float32)
    return (
        wq,
        sw,
        w.new_empty((e, k, n), dtype=FP8_DTYPE),
        w.new_empty((e, k // BLOCK, n // BLOCK), dtype=torch.float32),
    )


@forward_op.register_fake
def _(
    x: Tensor,
    wq: Tensor,
    sw: Tensor,
    offsets: Tensor,
    plan_data: Tensor,
    backend: str,
    out_dtype: torch.dtype,
    token_tiles: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    (m, k), mp = x.shape, (plan_data.shape[0] - 2 * offsets.shape[0] - x.shape[0]) // 2
    y = x.new_empty((m, wq.shape[1]), dtype=out_dtype)
    if not token_tiles:
        return y, _empty(x, FP8_DTYPE), _empty(x, torch.float32)
    return y, x.new_empty((k * mp,), dtype=FP8_DTYPE), x.new_empty((mp // BLOCK, k), dtype=torch.float32)


@backward_op.register_fake
def _(
    dy: Tensor,
    xt: Tensor,
    sxt: Tensor,
    wq_t: Tensor,
    sw_t: Tensor,
    offsets: Tensor,
    plan_data: Tensor,
    main_grad: Tensor | None,
    backend: str,
    need_dx: bool,
    need_dw: bool,
    dx_dtype: torch.dtype,
    dw_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    m, n = dy.shape
    k = sxt.shape[1] if need_dw else wq_t.shape[1]
    dx = dy.new_empty((m, k) if need_dx else (0,), dtype=dx_dtype)
    dw = dy.new_empty((offsets.shape[0], n, k) if need_dw and main_grad is None else (0,), dtype=dw_dtype)
    return dx, dw
