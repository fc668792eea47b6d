"""Triton FP8 blockwise grouped GEMMs: M-grouped NT (forward and dgrad) and K-grouped NT (wgrad).

Both read the group plan from device memory (no host reads, CUDA-graph capturable), multiply e4m3
operands on the tensor cores one 128-deep K block at a time, and apply that block's fp32 dequantization
scales to the partial product before adding it to an fp32 accumulator:

- :func:`m_grouped_gemm`: ``y[rows of g] = a[rows of g] @ b[g].T``, ``a`` in the 128-row-padded grouped
  layout with 1x128 scales, ``b`` with 128x128 block scales. Each output tile takes its expert from the
  first row of its 128-row block (``layout.row_expert``) and is skipped when that row is padding; results
  go straight to the unpadded rows (``layout.padded_to_row``), and rows past ``offsets[-1]`` are zeroed;
  or (``padded=True``) stay in the padded layout, for the fused MoE block.
- :func:`k_grouped_gemm`: ``d[g] = a_g @ b_g.T`` contracting over expert g's padded tokens, both operands
  in the flat per-group token-tile layout of :mod:`fp8moe.kernels.quantize` with 128x1 scales; ``d`` is
  written once, in its final dtype (no fp32 (E, N, K) temporary), or added into (``accumulate``: an fp32
  gradient-accumulation buffer); an expert with no tokens gets zeros (adds nothing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from fp8moe.kernels.launch import direct
from fp8moe.plan import GroupLayout
from fp8moe.recipe import BLOCK, FP8_DTYPE
from fp8moe.validation import check_out


def _set_descriptor_blocks(nargs: dict) -> None:
    """Autotune pre-hook: the TMA boxes follow the config's tile shape."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], BLOCK]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], BLOCK]


def _configs(pre_hook=None) -> list[triton.Config]:
    """A few tile shapes: 128x128 with two warpgroups (one CTA per SM) at three pipeline depths, and
    half-size tiles with one warpgroup (two or three CTAs per SM, so one CTA's scale FMAs can overlap
    another's MMAs)."""
    shapes = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 8, 5), (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 3)]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps, num_stages=stages, pre_hook=pre_hook
        )
        for bm, bn, warps, stages in shapes
    ]


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile index -> (row tile, column tile), row-tile-fastest within bands of GROUP_M row tiles so the
    CTAs in flight share operand rows in L2."""
    per_band = GROUP_M * num_n
    band = tile // per_band
    first_m = band * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    within = tile % per_band
    return first_m + within % band_m, within // band_m


@triton.autotune(configs=_configs(_set_descriptor_blocks), key=["N", "K", "PADDED"])
@triton.jit
def _m_grouped_kernel(
    a_desc,
    sa_ptr,
    b_desc,
    sb_ptr,
    y_ptr,
    stride_y,
    padded_to_row_ptr,
    row_expert_ptr,
    num_padded_rows,
    N,
    K,
    PADDED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y (M, N) <- a (Mp, K) @ b[expert] (N, K)^T per BLOCK_M x BLOCK_N tile (see m_grouped_gemm); with
    PADDED, y (Mp, N) takes the tile's rows where they are (padding rows of a tile with valid rows get the
    product of a's zero rows)."""
    BLOCK_K: tl.constexpr = 128
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_padded_rows // BLOCK_M, N // BLOCK_N, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    # Valid rows come first in every 128-row block, so a tile whose first row is padding is all padding.
    expert = tl.load(row_expert_ptr + m0)
    if expert >= 0:
        k_blocks = K // BLOCK_K
        sa_ptrs = sa_ptr + m0 + tl.arange(0, BLOCK_M)  # sa (K/128, Mp)
        sb_ptrs = sb_ptr + (expert * (N // BLOCK_K) + n0 // BLOCK_K) * k_blocks  # sb (E, N/128, K/128)
        b_row = expert * N + n0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k_blocks):
            a = a_desc.load([m0, kb * BLOCK_K])
            b = b_desc.load([b_row, kb * BLOCK_K])
            scale = tl.load(sa_ptrs + kb * num_padded_rows) * tl.load(sb_ptrs + kb)
            acc += tl.dot(a, b.T) * scale[:, None]
        if PADDED:
            rows = m0 + tl.arange(0, BLOCK_M)
        else:
            rows = tl.load(padded_to_row_ptr + m0 + tl.arange(0, BLOCK_M))
        cols = n0 + tl.arange(0, BLOCK_N)
        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=rows[:, None] >= 0)


@triton.jit
def _zero_unrouted_rows_kernel(
    y_ptr, stride_y, offsets_ptr, num_groups, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Zero the rows of y (M, N) at or past offsets[-1] (rows that belong to no group)."""
    first = tl.program_id(0) * BLOCK_M
    routed = tl.load(offsets_ptr + num_groups - 1)
    if first + BLOCK_M > routed:
        rows = first + tl.arange(0, BLOCK_M)
        mask = ((rows >= routed) & (rows < M))[:, None]
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], zeros, mask=mask)


@triton.jit
def _unpad_rows_kernel(
    src_ptr, stride_src, y_ptr, stride_y, padded_to_row_ptr, first, rows, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """y[padded_to_row[first + r]] = src[r] (converted to y's dtype) for the rows r < rows of src whose
    padded row ``first + r`` is a real row (padded_to_row >= 0); one BLOCK_M x BLOCK_N tile a program."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dest = tl.load(padded_to_row_ptr + first + r, mask=r < rows, other=-1)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (dest >= 0)[:, None]
    v = tl.load(src_ptr + r.to(tl.int64)[:, None] * stride_src + cols[None, :], mask=mask)
    tl.store(y_ptr + dest.to(tl.int64)[:, None] * stride_y + cols[None, :], v.to(y_ptr.dtype.element_ty), mask=mask)


# restore_value: autotuning times every config on the real buffer, which an accumulating launch adds into.
@triton.autotune(configs=_configs(), key=["N", "K", "ACCUMULATE"], restore_value=["d_ptr"])
@triton.jit
def _k_grouped_kernel(
    a_ptr,
    sa_ptr,
    b_ptr,
    sb_ptr,
    d_ptr,
    padded_starts_ptr,
    padded_sizes_ptr,
    N,
    K,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """d[g] (N, K) <- (d[g] if ACCUMULATE) + a_g (N, k_g) @ b_g (K, k_g)^T per BLOCK_M x BLOCK_N tile (see
    k_grouped_gemm)."""
    BLOCK_T: tl.constexpr = 128
    num_m = N // BLOCK_M
    num_n = K // BLOCK_N
    tiles_per_group = num_m * num_n
    group = tl.program_id(0) // tiles_per_group
    pid_m, pid_n = _tile_coords(tl.program_id(0) % tiles_per_group, num_m, num_n, GROUP_M)
    start = tl.multiple_of(tl.load(padded_starts_ptr + group), BLOCK_T)
    length = tl.multiple_of(tl.load(padded_sizes_ptr + group), BLOCK_T)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_T)
    a_ptrs = a_ptr + start.to(tl.int64) * N + rm.to(tl.int64)[:, None] * length + rt[None, :]
    b_ptrs = b_ptr + start.to(tl.int64) * K + rn.to(tl.int64)[:, None] * length + rt[None, :]
    sa_ptrs = sa_ptr + (start // BLOCK_T) * N + rm  # sa (Mp/128, N)
    sb_ptrs = sb_ptr + (start // BLOCK_T) * K + rn  # sb (Mp/128, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(length // BLOCK_T):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        scale = tl.load(sa_ptrs)[:, None] * tl.load(sb_ptrs)[None, :]
        acc += tl.dot(a, b.T) * scale
        a_ptrs += BLOCK_T
        b_ptrs += BLOCK_T
        sa_ptrs += N
        sb_ptrs += K
    d_ptrs = d_ptr + group.to(tl.int64) * N * K + rm.to(tl.int64)[:, None] * K + rn[None, :]
    if ACCUMULATE:
        acc += tl.load(d_ptrs).to(tl.float32)
    tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty))


def unpad_rows(src: Tensor, layout: GroupLayout, first: int, y: Tensor) -> None:
    """Write the rows of ``src`` (R, N), rows ``[first, first + R)`` of the padded layout of ``layout``,
    to their unpadded rows of ``y`` (M, N) (any float dtype: converted); padding rows are skipped. ``first``
    and R are multiples of 128 (a run of the padded layout, e.g. one of several GEMM launches)."""
    rows, n = src.shape
    if rows == 0 or n == 0:
        return
    block_n = 256 if n % 256 == 0 else BLOCK
    grid = (triton.cdiv(rows, 32), n // block_n)
    direct(_unpad_rows_kernel)[grid](
        src, src.stride(0), y, y.stride(0), layout.padded_to_row, first, rows, BLOCK_M=32, BLOCK_N=block_n, num_warps=4
    )


def zero_unrouted_rows(y: Tensor, layout: GroupLayout) -> None:
    """Zero the rows of y (M, N) at or past ``offsets[-1]`` (rows of no group); N a multiple of 128."""
    if y.numel() == 0:
        return
    direct(_zero_unrouted_rows_kernel)[(triton.cdiv(layout.num_rows, 64),)](
        y,
        y.stride(0),
        layout.offsets,
        layout.num_groups,
        layout.num_rows,
        y.shape[1],
        BLOCK_M=64,
        BLOCK_N=BLOCK,
        num_warps=4,
    )


def _check_fp8(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != FP8_DTYPE:
        raise TypeError(f"{name}: expected dtype {FP8_DTYPE}, got {t.dtype}")
    if tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor of shape {shape}, got {tuple(t.shape)} with strides {t.stride()}"
        )


def _check_scales(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")
    if tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor of shape {shape}, got {tuple(t.shape)} with strides {t.stride()}"
        )


def m_grouped_gemm(
    a: Tensor,
    sa: Tensor,
    b: Tensor,
    sb: Tensor,
    layout: GroupLayout,
    out_dtype: torch.dtype,
    out: Tensor | None = None,
    *,
    padded: bool = False,
    low_memory: bool = False,
) -> Tensor:
    """M-grouped NT GEMM: ``y[rows of g] = dequant(a, sa)[padded rows of g] @ dequant(b[g], sb[g]).T``.

    Args:
        a: (Mp, K) e4m3 row-major in the 128-row-padded layout of ``layout`` (Mp = num_padded_rows).
        sa: (K/128, Mp) fp32 contiguous, 1x128 scales of ``a`` (``sa[kb, row]``).
        b: (E, N, K) e4m3 contiguous.
        sb: (E, N/128, K/128) fp32 contiguous, 128x128 block scales of ``b``.
        layout: the group plan ``a`` was quantized with.
        out_dtype: dtype of the result.
        out: optional contiguous (M, N) ``out_dtype`` buffer to write the result into ((Mp, N) when
            ``padded``).
        padded: keep the result in the padded layout of ``a``: (Mp, N), the groups' rows hold the products,
            the other rows are unspecified (tiles that are all padding are not written).
        low_memory: accepted for the M-grouped provider signature and ignored: this kernel writes the
            unpadded rows directly, with no padded temporary.

    Returns:
        y: (M, N) ``out_dtype`` in unpadded row order (``out`` when given); rows at or past
        ``offsets[-1]`` are zero. With ``padded``: (Mp, N) as above.
    """
    mp, k = layout.num_padded_rows, a.shape[-1]
    e, n = b.shape[0], b.shape[1]
    _check_fp8("a", a, (mp, k))
    _check_scales("sa", sa, (k // BLOCK, mp))
    _check_fp8("b", b, (layout.num_groups, n, k))
    _check_scales("sb", sb, (e, n // BLOCK, k // BLOCK))
    rows = mp if padded else layout.num_rows
    if out is None:
        y = torch.empty(rows, n, dtype=out_dtype, device=a.device)
    else:
        y = check_out("out", out, (rows, n), out_dtype, a.device)
    if y.numel() == 0:
        return y
    if k == 0:
        return y.zero_()
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK, BLOCK])  # boxes set per config by the pre-hook
    b_desc = TensorDescriptor.from_tensor(b.view(e * n, k), [BLOCK, BLOCK])

    def grid(meta: dict) -> tuple[int]:
        return ((mp // meta["BLOCK_M"]) * (n // meta["BLOCK_N"]),)

    direct(_m_grouped_kernel)[grid](
        a_desc, sa, b_desc, sb, y, y.stride(0), layout.padded_to_row, layout.row_expert, mp, n, k, PADDED=padded
    )
    if padded:
        return y
    zero_unrouted_rows(y, layout)
    return y


def k_grouped_gemm(
    a: Tensor,
    sa: Tensor,
    b: Tensor,
    sb: Tensor,
    layout: GroupLayout,
    out_dtype: torch.dtype,
    out: Tensor | None = None,
    *,
    accumulate: bool = False,
) -> Tensor:
    """K-grouped NT GEMM: ``d[g] = dequant(a_g) @ dequant(b_g).T`` over expert g's padded tokens.

    Args:
        a: (N * Mp,) e4m3 flat per-group token tiles of the left operand (dy), as written by
            :func:`fp8moe.kernels.quantize.quantize_tokens` (token tiles): group g is a row-major
            (N, k_g) block at element ``N * padded_starts[g]``.
        sa: (Mp/128, N) fp32 contiguous, its 128x1 scales.
        b: (K * Mp,) e4m3, the right operand (x) in the same layout.
        sb: (Mp/128, K) fp32 contiguous, its scales.
        layout: the group plan both were quantized with.
        out_dtype: dtype of the result (written directly from the fp32 accumulator).
        out: optional contiguous (E, N, K) ``out_dtype`` buffer to write the result into.
        accumulate: add the product into ``out`` (required) instead of overwriting it.

    Returns:
        d: (E, N, K) ``out_dtype`` (``out`` when given); zero (or unchanged) for experts with no tokens.
    """
    mp = layout.num_padded_rows
    n, k = sa.shape[1], sb.shape[1]
    _check_fp8("a", a, (n * mp,))
    _check_scales("sa", sa, (mp // BLOCK, n))
    _check_fp8("b", b, (k * mp,))
    _check_scales("sb", sb, (mp // BLOCK, k))
    if out is None:
        if accumulate:
            raise ValueError("out: accumulate=True needs the buffer to add into")
        d = torch.empty(layout.num_groups, n, k, dtype=out_dtype, device=a.device)
    else:
        d = check_out("out", out, (layout.num_groups, n, k), out_dtype, a.device)
    if d.numel() == 0:
        return d

    def grid(meta: dict) -> tuple[int]:
        return (layout.num_groups * (n // meta["BLOCK_M"]) * (k // meta["BLOCK_N"]),)

    direct(_k_grouped_kernel)[grid](
        a, sa, b, sb, d, layout.padded_starts, layout.padded_sizes, n, k, ACCUMULATE=accumulate
    )
    return d
