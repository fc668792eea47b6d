"""Triton quantization kernels that write the GEMM operands straight into the layouts the GEMMs read.

Every kernel reads its bf16/fp16/fp32 input once, applies the recipe of :mod:`fp8moe.quant.reference`
bit for bit (scale = amax / 448 and value = clamp(v / scale, -448, 448) with IEEE round-to-nearest
divisions, round-to-nearest-even conversion to e4m3, all-zero tile -> scale 0 and values 0, NaN/Inf
propagated to the tile's scale) and takes the destination rows from the on-device
:class:`~fp8moe.layout.GroupLayout`, so nothing synchronises with the host and padding is written by the
kernel itself. Layouts (Mp = ``layout.num_padded_rows``, C = columns of the input, E = groups):

- *rowwise* (1x128 tiles along C) into the 128-row-padded grouped layout: values ``(Mp, C)`` e4m3
  row-major, scales ``(C/128, Mp)`` fp32 contiguous (its ``.T`` is the MN-major ``(Mp, C/128)`` scale
  tensor DeepGEMM's M-grouped kernels take without a copy). Padding rows (between groups and past the
  last group) hold value 0 and scale 0.
- *token tiles* (128x1 tiles along tokens, within each group, groups zero-padded to 128 tokens): values
  flat ``(C * Mp,)`` e4m3, group g stored K-major as a row-major ``(C, k_g)`` block (``k_g =
  padded_sizes[g]``) that starts at element ``C * padded_starts[g]``, so token t of group g, column c is
  at ``C * padded_starts[g] + c * k_g + t``; the tail past the last group is one more such block of
  ``Mp - padded_ends[-1]`` zero tokens. Scales ``(Mp/128, C)`` fp32 contiguous: token block b (padded
  rows ``[128 b, 128 b + 128)``), column c at ``[b, c]``; ``scales[:sum_k/128].T`` is the ``(C,
  sum_k/128)`` operand DeepGEMM's K-grouped kernel takes.
- *weights* (128x128 blocks): ``(E, N, K)`` values with ``(E, N/128, K/128)`` scales, and optionally the
  same blocks transposed, ``(E, K, N)`` with ``(E, K/128, N/128)`` scales, from one read of ``w``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fp8moe.plan import GroupLayout
from fp8moe.recipe import BLOCK, FP8_DTYPE, FP8_MAX, MIN_NORMAL
from fp8moe.validation import check_out

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX = tl.constexpr(FP8_MAX)  # jit code reads only constexpr globals
_MIN_NORMAL = tl.constexpr(MIN_NORMAL)


def _token_configs() -> list[triton.Config]:
    """Tile shapes of the token kernel (rows, columns, warps): small tiles give many CTAs per SM, so one
    CTA's loads overlap another's arithmetic; rowwise tiles need 128 columns and token tiles 128 rows."""
    shapes = [(32, 128, 4), (64, 128, 4), (128, 32, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (128, 128, 16)]
    return [triton.Config({"BLOCK_ROWS": r, "BLOCK_COLS": c}, num_warps=w) for r, c, w in shapes]


def _fitting_token_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune prune: the tile shapes that can hold the requested outputs' tiles."""
    return [
        c
        for c in configs
        if (c.kwargs["BLOCK_COLS"] == BLOCK or not kwargs["ROWWISE"])
        and (c.kwargs["BLOCK_ROWS"] == BLOCK or not kwargs["TOKEN_TILES"])
    ]


@triton.jit
def _abs_max(x, axis: tl.constexpr):
    """max of ``|x|`` along ``axis``, NaN when any element is NaN (``tl.max`` may drop NaN; the sum
    of the non-negative ``|x|`` is NaN exactly when an element is NaN)."""
    a = tl.abs(x)
    total = tl.sum(a, axis)
    return tl.where(total != total, total, tl.max(a, axis))


@triton.jit
def _quantize(x, amax):
    """fp32 tile ``x`` and its tile amax (broadcastable) -> (e4m3 values, fp32 dequant scales shaped like
    amax).

    Both divisions are IEEE round-to-nearest (Triton's ``/`` on fp32 is approximate), so the bits match
    torch's; the clamp keeps NaN, and the e4m3 conversion rounds to nearest even.
    """
    scale = tl.div_rn(amax, _MAX)
    zero_tile = scale < _MIN_NORMAL  # False for NaN
    scale = tl.where(zero_tile, 0.0, scale)
    values = tl.div_rn(x, tl.where(zero_tile, 1.0, scale))
    values = tl.clamp(values, -_MAX, _MAX, propagate_nan=tl.PropagateNan.ALL)
    values = tl.where(zero_tile, 0.0, values)
    return values.to(tl.float8e4nv), scale


@triton.jit
def _flush_tiny(x):
    """x in fp32 with |v| < 2^-126 (subnormals) replaced by +0 (the recipe's rule for tiny values)."""
    x = x.to(tl.float32)
    return tl.where(tl.abs(x) < _MIN_NORMAL, 0.0, x)


@triton.autotune(
    configs=_token_configs(),
    key=["num_cols", "ROWWISE", "TOKEN_TILES"],
    prune_configs_by={"early_config_prune": _fitting_token_configs},
)
@triton.jit
def _quantize_tokens_kernel(
    x_ptr,
    stride_x,
    padded_to_row_ptr,
    row_expert_ptr,
    padded_starts_ptr,
    padded_sizes_ptr,
    num_groups,
    num_padded_rows,
    num_cols,
    q_ptr,
    s_ptr,
    qt_ptr,
    st_ptr,
    ROWWISE: tl.constexpr,
    TOKEN_TILES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """One BLOCK_ROWS x BLOCK_COLS tile of the padded layout, read once from x (M, C).

    ROWWISE (needs BLOCK_COLS == 128) writes q (Mp, C) / s (C/128, Mp); TOKEN_TILES (needs BLOCK_ROWS ==
    128) writes qt (C * Mp,) / st (Mp/128, C); both in the module docstring's layouts. Padding rows are
    read as zeros.
    """
    row_block = tl.program_id(0)
    col_block = tl.program_id(1)
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # padded rows
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    src = tl.load(padded_to_row_ptr + rows)
    x_ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_x + cols[None, :]
    x = _flush_tiny(tl.load(x_ptrs, mask=src[:, None] >= 0, other=0.0))

    if ROWWISE:
        q, s = _quantize(x, _abs_max(x, 1)[:, None])
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * num_cols + cols[None, :], q)
        tl.store(s_ptr + col_block * num_padded_rows + rows, tl.reshape(s, (BLOCK_ROWS,)))

    if TOKEN_TILES:
        # The group of this token block (its first row is a real row unless it is tail padding), and the
        # start and padded length of the K-major block that group's tokens are stored in.
        group = tl.load(row_expert_ptr + row_block * BLOCK_ROWS)
        is_tail = group < 0
        group = tl.where(is_tail, num_groups - 1, group)
        start = tl.load(padded_starts_ptr + group)
        length = tl.load(padded_sizes_ptr + group)
        tail_start = start + length
        start = tl.multiple_of(tl.where(is_tail, tail_start, start), 128)  # lets the stores vectorize
        length = tl.multiple_of(tl.where(is_tail, num_padded_rows - tail_start, length), 128)

        qt, st = _quantize(x, _abs_max(x, 0)[None, :])
        tokens = row_block * BLOCK_ROWS - start + tl.arange(0, BLOCK_ROWS)
        qt_ptrs = qt_ptr + start.to(tl.int64) * num_cols + cols[None, :].to(tl.int64) * length + tokens[:, None]
        tl.store(qt_ptrs, qt)
        tl.store(st_ptr + row_block * num_cols + cols, tl.reshape(st, (BLOCK_COLS,)))


@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8, 16)], key=["N", "K", "TRANSPOSED"])
@triton.jit
def _quantize_weight_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, TRANSPOSED: tl.constexpr, TILE: tl.constexpr):
    """One 128x128 block of w (E, N, K): q (E, N, K), s (E, N/128, K/128), and if TRANSPOSED the same
    block transposed into qt (E, K, N) and its scale into st (E, K/128, N/128)."""
    n_block = tl.program_id(0)
    k_block = tl.program_id(1)
    expert = tl.program_id(2)
    rows = n_block * TILE + tl.arange(0, TILE)
    cols = k_block * TILE + tl.arange(0, TILE)
    base = expert.to(tl.int64) * N * K
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    w = _flush_tiny(tl.load(w_ptr + base + rows[:, None] * K + cols[None, :]))
    amax = _abs_max(_abs_max(w, 1), 0)
    q, s = _quantize(w, amax)
    n_blocks = N // TILE
    k_blocks = K // TILE
    tl.store(q_ptr + base + rows[:, None] * K + cols[None, :], q)
    tl.store(s_ptr + (expert * n_blocks + n_block) * k_blocks + k_block, s)
    if TRANSPOSED:
        # Quantize the transposed fp32 tile (elementwise with the same amax: the same codes) and store
        # it row-major; an e4m3 tile stored through transposed pointers loses elements on Triton 3.6.
        q_t, _ = _quantize(tl.trans(w), amax)
        tl.store(qt_ptr + base + cols[:, None] * N + rows[None, :], q_t)
        tl.store(st_ptr + (expert * k_blocks + k_block) * n_blocks + n_block, s)


def _check_tokens(x: Tensor, layout: GroupLayout, name: str) -> None:
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


def _quantize_tokens(x: Tensor, layout: GroupLayout, rowwise: bool, token_tiles: bool) -> tuple[Tensor, ...]:
    """Launch the token kernel; returns the rowwise pair, then the token-tile pair, for what was asked."""
    mp, cols = layout.num_padded_rows, x.shape[1]
    q = x.new_empty((mp, cols), dtype=FP8_DTYPE) if rowwise else None  # None: compiled out of the kernel
    s = x.new_empty((cols // BLOCK, mp), dtype=torch.float32) if rowwise else None
    qt = x.new_empty((cols * mp,), dtype=FP8_DTYPE) if token_tiles else None
    st = x.new_empty((mp // BLOCK, cols), dtype=torch.float32) if token_tiles else None
    if mp and cols:

        def grid(meta: dict) -> tuple[int, int]:
            return (mp // meta["BLOCK_ROWS"], cols // meta["BLOCK_COLS"])

        _quantize_tokens_kernel[grid](
            x,
            x.stride(0),
            layout.padded_to_row,
            layout.row_expert,
            layout.padded_starts,
            layout.padded_sizes,
            layout.num_groups,
            mp,
            cols,
            q,
            s,
            qt,
            st,
            ROWWISE=rowwise,
            TOKEN_TILES=token_tiles,
        )
    return tuple(t for t in (q, s, qt, st) if t is not None)


def quantize_tokens(
    x: Tensor, layout: GroupLayout, *, rows: bool = True, token_tiles: bool = True
) -> tuple[Tensor, ...]:
    """x (M, C) -> the outputs of :func:`quantize_rows_padded` (if ``rows``) then of
    :func:`quantize_token_tiles` (if ``token_tiles``), from one read of x."""
    _check_tokens(x, layout, "x")
    if not (rows or token_tiles):
        return ()
    return _quantize_tokens(x, layout, rowwise=rows, token_tiles=token_tiles)


def quantize_rows_padded(x: Tensor, layout: GroupLayout) -> tuple[Tensor, Tensor]:
    """1x128 tiles of x (M, C) written into the 128-row-padded grouped layout of ``layout``.

    Returns ``(xq (Mp, C) e4m3 row-major, sx (C/128, Mp) fp32 contiguous)``; padding rows are 0 with
    scale 0. Used for x in the forward and dy in the dgrad.
    """
    _check_tokens(x, layout, "x")
    return _quantize_tokens(x, layout, rowwise=True, token_tiles=False)


def quantize_token_tiles(x: Tensor, layout: GroupLayout) -> tuple[Tensor, Tensor]:
    """128x1 per-group token tiles of x (M, C) in the flat K-major layout the wgrad GEMM reads.

    Returns ``(xt (C * Mp,) e4m3, sxt (Mp/128, C) fp32 contiguous)`` as in the module docstring.
    Used for x (C = K) and dy (C = N) in the wgrad.
    """
    _check_tokens(x, layout, "x")
    return _quantize_tokens(x, layout, rowwise=False, token_tiles=True)


def quantize_grad_output(dy: Tensor, layout: GroupLayout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both dgrad and wgrad operands of dy (M, N) from one read of dy.

    Returns ``(dyq, sdy, dyt, sdyt)``: the outputs of :func:`quantize_rows_padded` and then of
    :func:`quantize_token_tiles` for ``dy``.
    """
    _check_tokens(dy, layout, "dy")
    return _quantize_tokens(dy, layout, rowwise=True, token_tiles=True)


def quantize_weight(
    w: Tensor, transposed: bool, *, out_t: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """128x128 blocks of w (E, N, K) bf16/fp16/fp32, from one read of w (fp32 w: plus one read of wq).

    Returns ``(wq (E, N, K) e4m3, sw (E, N/128, K/128) fp32, wq_t (E, K, N) e4m3, sw_t (E, K/128, N/128)
    fp32)``, all contiguous; ``wq_t``/``sw_t`` hold the same blocks and scales transposed (the dgrad
    operand) and are empty tensors when ``transposed`` is False. ``out_t``: buffers the kernel writes
    ``(wq_t, sw_t)`` into (contiguous, of those shapes and dtypes), returned in their place.
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
    w = w.contiguous()
    e, n, k = w.shape
    wq = torch.empty_like(w, dtype=FP8_DTYPE)
    sw = w.new_empty((e, n // BLOCK, k // BLOCK), dtype=torch.float32)
    if transposed and out_t is not None:
        wq_t = check_out("out_t[0]", out_t[0], (e, k, n), FP8_DTYPE, w.device)
        sw_t = check_out("out_t[1]", out_t[1], (e, k // BLOCK, n // BLOCK), torch.float32, w.device)
    else:
        wq_t = w.new_empty((e, k, n) if transposed else (0,), dtype=FP8_DTYPE)
        sw_t = w.new_empty((e, k // BLOCK, n // BLOCK) if transposed else (0,), dtype=torch.float32)
    # Triton 3.6 miscompiles the two-layout kernel for fp32 input (on an H100: wrong, run-to-run varying
    # codes in both outputs); fp32 weights get wq_t as a transposed copy of wq instead.
    fused = transposed and w.dtype != torch.float32
    if w.numel():
        _quantize_weight_kernel[(n // BLOCK, k // BLOCK, e)](
            w, wq, sw, wq_t if fused else None, sw_t if fused else None, n, k, TRANSPOSED=fused, TILE=BLOCK
        )
    if transposed and not fused:
        wq_t.copy_(wq.transpose(1, 2))
        sw_t.copy_(sw.transpose(1, 2))
    return wq, sw, wq_t, sw_t


__all__ = ["quantize_grad_output", "quantize_rows_padded", "quantize_token_tiles", "quantize_weight"]
