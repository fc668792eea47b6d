"""Triton kernels of the fused MoE block's memory passes (:func:`fp8moe.moe.fused_experts`): each is the
fused form of functions of :mod:`fp8moe.moe.pieces`, which stay the ground truth and the path off CUDA.

Shapes: T tokens, k slots a token, D = d_model, F = d_ff; one :class:`~fp8moe.moe.routing.RoutingPlan`:
Mp = ``plan.layout.num_padded_rows`` padded rows, ``plan.row_assignment`` (Mp,) the flat assignment
``t * k + j`` at each padded row (-1 on padding), ``plan.pos`` (T, k) the padded row of each assignment
(Mp for one routed nowhere).

Padded passes: one read of their sources into GEMM operands, through the token quantization kernel of
:mod:`fp8moe.kernels.quantize` in one of its source modes (padding rows are written as zeros, never read
from a source, so NaN in a GEMM result's padding cannot leak):

- :func:`dispatch`: x (T, D) -> the (Mp, D) rows ``x[row_assignment[p] // k]`` (GATHER with the row map
  ``row_assignment`` and divisor k; no padded bf16 copy of x);
- :func:`swiglu`: h (Mp, 2F) (gate | up) -> a = silu(g) * u (Mp, F) in fp32 (SWIGLU);
- :func:`combine_backward`: dy (T, D), c (T, k) -> d_out (Mp, D) = ``c[a] * dy[a // k]`` at a =
  ``row_assignment[p]``, one fp32 product (SCALED_GATHER);
- :func:`swiglu_backward`: h (Mp, 2F), da (Mp, F) -> dh (Mp, 2F) = [da u silu'(g) | da silu(g)] in fp32
  (SWIGLU_BACKWARD: a tile of either half reads the same columns of h and da).

Each writes, with ``fp8=True``, the rowwise pair ``(q (Mp, C) e4m3, s (C/128, Mp) fp32)`` if ``rowwise``,
then the token-tile pair ``(qt (C * Mp,) e4m3, st (Mp/128, C) fp32)`` if ``token_tiles`` (the layouts of
:mod:`fp8moe.kernels.quantize`; the recipe of :mod:`fp8moe.recipe`, tiny-value rule included, applied to the
fp32 value), as a tuple; with ``fp8=False`` one (Mp, C) bf16 tensor, the fp32 value rounded to bf16
(unflushed, as the pieces' ``.to(bfloat16)``: the bf16 GEMMs' rows and token tiles, ``precision="bf16"``).
A padded pass with no GEMM operand needed is not called (fp8: at least one of rowwise, token_tiles).

Token passes (no atomics: each output element is summed by one thread in slot order j = 0..k-1):

- :func:`combine`: y[t] = sum_j c[t, j] * out[pos(t, j)] in fp32 (starting from +0), in the given dtype;
- :func:`undispatch`: dx[t] = sum_j dxs[pos(t, j)] in fp32 (starting from +0), in the given dtype;
- :func:`combine_weight_grad`: d_c[t, j] = <dy[t], out[pos(t, j)]> fp32, 0 for an assignment routed
  nowhere.

Bits. Where the arithmetic is the pieces' (the gathers, ``c * dy``, the slot-order sums, the
quantization), the kernels give the pieces' bits on a GPU: every fp32 product and sum is a separately
rounded ``mul.rn``/``add.rn`` (explicit rounding modes are never contracted into an FMA; no ``.ftz``),
under the interpreter the plain operations (NumPy's IEEE fp32). Not bit-exact, by design: silu and
sigmoid (Triton's ``exp`` and fp32 division, a few ulp from torch's, and the division flushes subnormal
quotients on a GPU; so a, dh and their codes, an e4m3 code apart where the value sits at a rounding
boundary, and subnormal bf16 outputs of the SwiGLU passes, which may be zeros) and d_c (a dot product
over D: partial sums of BLOCK_D columns in a tree, then in column-block order; deterministic for a given
Triton build, not torch's order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fp8moe.kernels import quantize as kq
from fp8moe.kernels.quantize import _add_rn, _cast, _mul_rn
from fp8moe.moe.routing import RoutingPlan
from fp8moe.recipe import BLOCK
from fp8moe.validation import _tensor

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


# ---- token passes -------------------------------------------------------------------------------------------


@triton.jit
def _combine_kernel(
    src_ptr,
    stride_src,
    pos_ptr,
    c_ptr,
    y_ptr,
    num_tokens,
    num_cols,
    num_padded_rows,
    K: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PTX: tl.constexpr,
):
    """y[t, d] = sum_j (c[t, j] *) src[pos[t, j], d], fp32 from +0 in slot order, written in y's dtype: a 2-D
    grid of BLOCK_T tokens x BLOCK_D columns. src (Mp, D) any float dtype (row stride stride_src), pos (T,
    K) int64 (Mp: routed nowhere, a zero row), c (T, K) any float dtype (WEIGHTED), y (T, D) contiguous.
    The product and every sum are single roundings (:func:`_mul_rn`, :func:`_add_rn`): the bits of
    :func:`fp8moe.moe.pieces.combine` / :func:`~fp8moe.moe.pieces.undispatch`."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_range = t < num_tokens
    slots = t.to(tl.int64) * K
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + slots + j, mask=in_range, other=num_padded_rows)
        r_ptrs = src_ptr + p.to(tl.int64)[:, None] * stride_src + cols[None, :]
        r = tl.load(r_ptrs, mask=(p < num_padded_rows)[:, None], other=0.0).to(tl.float32)
        if WEIGHTED:
            cw = tl.load(c_ptr + slots + j, mask=in_range, other=0.0).to(tl.float32)
            r = _mul_rn(cw[:, None], r, PTX)
        acc = _add_rn(acc, r, PTX)
    y_ptrs = y_ptr + t.to(tl.int64)[:, None] * num_cols + cols[None, :]
    tl.store(y_ptrs, _cast(acc, y_ptr.dtype.element_ty, PTX), mask=in_range[:, None])


@triton.jit
def _combine_weight_grad_kernel(
    dy_ptr,
    stride_dy,
    out_ptr,
    stride_out,
    pos_ptr,
    dc_ptr,
    num_tokens,
    num_cols,
    num_padded_rows,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """d_c[t, j] = sum_d dy[t, d] * out[pos[t, j], d] in fp32 for BLOCK_T tokens a program: the (BLOCK_T,
    K_POW2, BLOCK_D) products of one column block summed over its columns (a tree), the blocks added in
    column order; 0 where pos is Mp (routed nowhere). dy (T, D), out (Mp, D) any float dtype, pos (T, K)
    int64, d_c (T, K) fp32 contiguous."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, K_POW2)
    in_range = t < num_tokens
    slot = in_range[:, None] & (j[None, :] < K)
    flat = t.to(tl.int64)[:, None] * K + j[None, :]
    p = tl.load(pos_ptr + flat, mask=slot, other=num_padded_rows)
    valid = p < num_padded_rows
    d = tl.arange(0, BLOCK_D)
    dy_rows = dy_ptr + t.to(tl.int64)[:, None] * stride_dy
    out_rows = out_ptr + p.to(tl.int64)[:, :, None] * stride_out
    acc = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for d0 in range(0, num_cols, BLOCK_D):
        g = tl.load(dy_rows + (d0 + d)[None, :], mask=in_range[:, None], other=0.0).to(tl.float32)
        r = tl.load(out_rows + (d0 + d)[None, None, :], mask=valid[:, :, None], other=0.0).to(tl.float32)
        acc += tl.sum(r * g[:, None, :], axis=2)
    tl.store(dc_ptr + flat, tl.where(valid, acc, 0.0), mask=slot)


# ---- host side ----------------------------------------------------------------------------------------------


def _check_plan(plan: object) -> RoutingPlan:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan: expected a RoutingPlan, got {type(plan).__name__}")
    return plan


def _check_2d(name: str, t: object, rows: int | None, cols: int | None, multiple: int, plan: RoutingPlan) -> Tensor:
    """A 2-D float tensor with unit column stride on the plan's device: ``rows``/``cols`` the expected sizes
    (None: any), the columns a positive multiple of ``multiple``."""
    t = _tensor(name, t, 2, _FLOATS)
    r, c = t.shape
    if (rows is not None and r != rows) or (cols is not None and c != cols) or c % multiple or c == 0:
        shape = (rows if rows is not None else "T", cols if cols is not None else f"a positive multiple of {multiple}")
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride along columns, got strides {t.stride()}")
    device = plan.row_assignment.device
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of the plan), got {t.device}")
    return t


def _check_weights(c: object, plan: RoutingPlan) -> Tensor:
    c = _tensor("combine_weights", c, 2, _FLOATS)
    device = plan.row_assignment.device
    if c.shape != plan.pos.shape or not c.is_contiguous() or c.device != device:
        raise ValueError(
            f"combine_weights: expected a contiguous tensor of shape {tuple(plan.pos.shape)} on {device}, got "
            f"shape {tuple(c.shape)}, strides {c.stride()} on {c.device}"
        )
    return c


def _check_flags(rowwise: object, token_tiles: object, fp8: object) -> None:
    for flag, value in (("rowwise", rowwise), ("token_tiles", token_tiles), ("fp8", fp8)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}: expected a bool, got {type(value).__name__}")
    if fp8 and not (rowwise or token_tiles):
        raise ValueError("rowwise, token_tiles: expected at least one output layout with fp8=True, got both False")


def _operands(source, x, y, plan, num_cols, rowwise, token_tiles, fp8, divisor=1):
    plain = None if fp8 else torch.bfloat16
    result = kq._padded_pass(
        source, x, y, plan.row_assignment, plan.layout, num_cols, rowwise, token_tiles, plain, divisor
    )
    return result if fp8 else result[0]


def dispatch(x: Tensor, plan: RoutingPlan, *, rowwise: bool = True, token_tiles: bool = False, fp8: bool = True):
    """x (T, D) bf16/fp16/fp32 (unit column stride) -> GEMM1's operands of the dispatched rows (Mp, D):
    padded row p holds token ``row_assignment[p] // k`` (zero on padding), quantized from x's own values
    (module docstring: a tuple of the requested FP8 pairs, or with ``fp8=False`` one (Mp, D) bf16
    tensor). Bits of ``quantize_padded(pieces.dispatch(x, plan))`` (or of its ``.to(bfloat16)``)."""
    plan = _check_plan(plan)
    x = _check_2d("x", x, plan.pos.shape[0], None, BLOCK, plan)
    _check_flags(rowwise, token_tiles, fp8)
    return _operands(kq.GATHER, x, None, plan, x.shape[1], rowwise, token_tiles, fp8, plan.top_k)


def swiglu(h: Tensor, plan: RoutingPlan, *, rowwise: bool = True, token_tiles: bool = False, fp8: bool = True):
    """h (Mp, 2F) (gate | up; unit column stride) -> GEMM2's operands of a = silu(g) * u (Mp, F), computed in
    fp32 on the plan's rows and zero on padding (h's padding rows are never read), quantized from fp32
    (module docstring; silu within a few ulp of torch's, see there)."""
    plan = _check_plan(plan)
    num_padded = plan.layout.num_padded_rows
    h = _check_2d("h", h, num_padded, None, 2 * BLOCK, plan)
    _check_flags(rowwise, token_tiles, fp8)
    return _operands(kq.SWIGLU, h, None, plan, h.shape[1] // 2, rowwise, token_tiles, fp8)


def combine_backward(
    dy: Tensor,
    combine_weights: Tensor,
    plan: RoutingPlan,
    *,
    rowwise: bool = True,
    token_tiles: bool = True,
    fp8: bool = True,
):
    """dy (T, D), combine_weights (T, k) (contiguous) -> the operands of d_out (Mp, D): ``c[a] * dy[a // k]``
    at a = ``row_assignment[p]``, one fp32 product, zero on padding (module docstring). Bits of
    ``quantize_padded(pieces.combine_backward(...)[0])``."""
    plan = _check_plan(plan)
    dy = _check_2d("dy", dy, plan.pos.shape[0], None, BLOCK, plan)
    c = _check_weights(combine_weights, plan)
    _check_flags(rowwise, token_tiles, fp8)
    return _operands(kq.SCALED_GATHER, dy, c, plan, dy.shape[1], rowwise, token_tiles, fp8, plan.top_k)


def swiglu_backward(
    h: Tensor, da: Tensor, plan: RoutingPlan, *, rowwise: bool = True, token_tiles: bool = True, fp8: bool = True
):
    """h (Mp, 2F), da (Mp, F) -> the operands of dh (Mp, 2F) = [da * u * silu'(g) | da * silu(g)] in fp32 on
    the plan's rows, zero on padding (rows of h and da there are never read); module docstring."""
    plan = _check_plan(plan)
    num_padded = plan.layout.num_padded_rows
    h = _check_2d("h", h, num_padded, None, 2 * BLOCK, plan)
    da = _check_2d("da", da, num_padded, h.shape[1] // 2, BLOCK, plan)
    _check_flags(rowwise, token_tiles, fp8)
    return _operands(kq.SWIGLU_BACKWARD, h, da, plan, h.shape[1], rowwise, token_tiles, fp8)


_COMBINE_BLOCK_T, _COMBINE_WARPS = 32, 4


def _combine(src: Tensor, c: Tensor | None, plan: RoutingPlan, dtype: torch.dtype) -> Tensor:
    num_tokens, num_cols = plan.pos.shape[0], src.shape[1]
    y = torch.empty(num_tokens, num_cols, dtype=dtype, device=src.device)
    if num_tokens:
        grid = (triton.cdiv(num_tokens, _COMBINE_BLOCK_T), num_cols // BLOCK)
        _combine_kernel[grid](
            src,
            src.stride(0),
            plan.pos,
            c,
            y,
            num_tokens,
            num_cols,
            plan.layout.num_padded_rows,
            K=plan.top_k,
            WEIGHTED=c is not None,
            BLOCK_T=_COMBINE_BLOCK_T,
            BLOCK_D=BLOCK,
            PTX=kq._ptx(src),
            num_warps=_COMBINE_WARPS,
        )
    return y


def _check_dtype(dtype: object) -> torch.dtype:
    if dtype not in _FLOATS:
        raise TypeError(f"dtype: expected one of {_FLOATS}, got {dtype!r}")
    return dtype


def combine(out: Tensor, combine_weights: Tensor, plan: RoutingPlan, dtype: torch.dtype) -> Tensor:
    """out (Mp, D) (unit column stride), combine_weights (T, k) (contiguous) -> y (T, D) ``dtype``: y[t] =
    sum_j c[t, j] * out[pos(t, j)] in fp32 from +0, slot order; the bits of ``pieces.combine(...).to(dtype)``
    (rows routed nowhere add ``c * 0``). Only the plan's rows of out are read."""
    plan = _check_plan(plan)
    out = _check_2d("out", out, plan.layout.num_padded_rows, None, BLOCK, plan)
    c = _check_weights(combine_weights, plan)
    return _combine(out, c, plan, _check_dtype(dtype))


def undispatch(dxs: Tensor, plan: RoutingPlan, dtype: torch.dtype) -> Tensor:
    """dxs (Mp, D) (unit column stride) -> dx (T, D) ``dtype``: dx[t] = sum_j dxs[pos(t, j)] in fp32 from +0,
    slot order; the bits of ``pieces.undispatch(...).to(dtype)``. Only the plan's rows of dxs are read."""
    plan = _check_plan(plan)
    dxs = _check_2d("dxs", dxs, plan.layout.num_padded_rows, None, BLOCK, plan)
    return _combine(dxs, None, plan, _check_dtype(dtype))


def combine_weight_grad(dy: Tensor, out: Tensor, plan: RoutingPlan) -> Tensor:
    """dy (T, D), out (Mp, D) (unit column strides) -> d_c (T, k) fp32: d_c[t, j] = <dy[t], out[pos(t, j)]>,
    0 for an assignment routed nowhere. Deterministic (one program sums a token's products in a fixed order),
    not torch's order: within rounding of ``pieces.combine_backward``'s d_c (module docstring)."""
    plan = _check_plan(plan)
    dy = _check_2d("dy", dy, plan.pos.shape[0], None, BLOCK, plan)
    out = _check_2d("out", out, plan.layout.num_padded_rows, dy.shape[1], BLOCK, plan)
    num_tokens, k = plan.pos.shape
    dc = torch.empty(num_tokens, k, dtype=torch.float32, device=dy.device)
    if num_tokens:
        k_pow2 = triton.next_power_of_2(k)
        block_t = max(1, 32 // k_pow2)
        _combine_weight_grad_kernel[(triton.cdiv(num_tokens, block_t),)](
            dy,
            dy.stride(0),
            out,
            out.stride(0),
            plan.pos,
            dc,
            num_tokens,
            dy.shape[1],
            plan.layout.num_padded_rows,
            K=k,
            K_POW2=k_pow2,
            BLOCK_T=block_t,
            BLOCK_D=BLOCK,
            num_warps=4,
        )
    return dc


__all__ = ["combine", "combine_backward", "combine_weight_grad", "dispatch", "swiglu", "swiglu_backward", "undispatch"]
