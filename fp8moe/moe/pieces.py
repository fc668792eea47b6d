"""The fused block's memory passes in plain torch (any device): the ground truth of their kernels.

Every function works on the 128-row-padded layout of a :class:`~fp8moe.moe.routing.RoutingPlan` (Mp =
``layout.num_padded_rows`` rows; D = d_model, F = d_ff, T tokens, k assignments each). Arithmetic is fp32;
sums over the k assignments of a token run in slot order j = 0..k-1 (deterministic, no atomics). Rows
outside the groups are never read from a GEMM result (they are unspecified there) and are written as
exact zeros into every GEMM operand (selected with ``torch.where``, so NaN in a GEMM result's padding
cannot leak).

Operand layouts (see :mod:`fp8moe.backends.base`): *rows* ``(Mp, C)`` e4m3 + ``(C/128, Mp)`` fp32 scales;
*token tiles* flat ``(C * Mp,)`` e4m3, group g a row-major (C, k_g) block at ``C * padded_starts[g]``, the
tail past the last group one more such block, + ``(Mp/128, C)`` fp32 scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fp8moe.moe.routing import RoutingPlan
from fp8moe.plan import GroupLayout
from fp8moe.quant.reference import quantize_colwise, quantize_rowwise
from fp8moe.recipe import FP8_DTYPE


def valid_rows(plan: RoutingPlan) -> Tensor:
    """(Mp,) bool: the padded rows that hold an assignment."""
    return plan.row_assignment >= 0


def token_tile_index(layout: GroupLayout, cols: int) -> Tensor:
    """(Mp, C) int64: the flat token-tile position of padded row p, column c (no host read)."""
    mp = layout.num_padded_rows
    starts, sizes = layout.padded_starts.long(), layout.padded_sizes.long()
    end = (starts + sizes)[-1:]
    starts = torch.cat([starts, end])  # the tail block of zero tokens past the last group
    sizes = torch.cat([sizes, mp - end])
    rows = torch.arange(mp, device=starts.device)
    block = torch.searchsorted(starts + sizes, rows, right=True).clamp(max=starts.numel() - 1)
    start, size = starts[block], sizes[block]
    base = cols * start + rows - start
    return base[:, None] + torch.arange(cols, device=rows.device)[None, :] * size[:, None]


def quantize_padded(v: Tensor, layout: GroupLayout, rows: bool, token_tiles: bool) -> tuple[Tensor, ...]:
    """v (Mp, C) (zero outside the groups) -> the rows pair (if ``rows``) then the token-tile pair (if
    ``token_tiles``), the bits :class:`~fp8moe.backends.reference.ReferenceQuantizer` writes for the same
    padded values."""
    result: tuple[Tensor, ...] = ()
    if rows:
        q, s = quantize_rowwise(v)
        result += (q, s.T.contiguous())
    if token_tiles:
        q, s = quantize_colwise(v)
        flat = torch.empty(v.numel(), dtype=FP8_DTYPE, device=v.device)
        flat[token_tile_index(layout, v.shape[1]).reshape(-1)] = q.reshape(-1)
        result += (flat, s)
    return result


def dispatch(x: Tensor, plan: RoutingPlan) -> Tensor:
    """x (T, D) -> (Mp, D) in x's dtype: the token of each padded row's assignment, zero on padding."""
    source = plan.row_assignment // plan.top_k
    valid = source >= 0
    gathered = x[source.clamp(min=0)] if x.shape[0] else x.new_zeros(source.numel(), x.shape[1])
    return torch.where(valid[:, None], gathered, torch.zeros((), dtype=x.dtype, device=x.device))


def gather_assignments(padded: Tensor, plan: RoutingPlan) -> Tensor:
    """padded (Mp, C) -> (T, k, C) fp32: the row of each assignment, zero for one routed nowhere."""
    mp = padded.shape[0]
    pos = plan.pos
    rows = padded[pos.clamp(max=max(mp - 1, 0)).reshape(-1)] if mp else padded.new_zeros(pos.numel(), padded.shape[1])
    rows = rows.view(*pos.shape, padded.shape[1]).float()
    return torch.where((pos < mp)[..., None], rows, torch.zeros((), device=rows.device))


def combine(out: Tensor, combine_weights: Tensor, plan: RoutingPlan) -> Tensor:
    """y[t] = sum_j c[t, j] * out[pos(t, j)]: out (Mp, D), c (T, k) -> (T, D) fp32 (slot order)."""
    rows = gather_assignments(out, plan)
    c = combine_weights.float()
    y = torch.zeros(rows.shape[0], rows.shape[2], dtype=torch.float32, device=out.device)
    for j in range(plan.top_k):
        y = y + c[:, j, None] * rows[:, j]
    return y


def combine_backward(
    dy: Tensor, out: Tensor | None, combine_weights: Tensor, plan: RoutingPlan, need_d_out: bool, need_dc: bool
) -> tuple[Tensor | None, Tensor | None]:
    """dy (T, D) -> (d_out (Mp, D) fp32: ``c[t, j] * dy[t]`` at row pos(t, j), zero on padding; d_c (T, k)
    fp32: ``<dy[t], out[pos(t, j)]>``, zero for an assignment routed nowhere)."""
    d_out = d_c = None
    dy32 = dy.float()
    if need_d_out:
        assignment = plan.row_assignment
        valid = assignment >= 0
        a = assignment.clamp(min=0)
        scale = combine_weights.float().reshape(-1)[a] if combine_weights.numel() else dy32.new_zeros(a.shape)
        rows = dy32[a // plan.top_k] if dy.shape[0] else dy32.new_zeros(a.numel(), dy.shape[1])
        d_out = torch.where(valid[:, None], scale[:, None] * rows, torch.zeros((), device=dy.device))
    if need_dc:
        d_c = (gather_assignments(out, plan) * dy32[:, None, :]).sum(-1)
        d_c = torch.where(plan.pos < out.shape[0], d_c, torch.zeros((), device=dy.device))  # also for NaN dy
    return d_out, d_c


def swiglu(h: Tensor, valid: Tensor) -> Tensor:
    """h (Mp, 2F) (gate | up) -> a = silu(g) * u (Mp, F) fp32, zero outside ``valid`` rows."""
    f = h.shape[1] // 2
    g, u = h[:, :f].float(), h[:, f:].float()
    return torch.where(valid[:, None], F.silu(g) * u, torch.zeros((), device=h.device))


def swiglu_backward(h: Tensor, da: Tensor, valid: Tensor) -> Tensor:
    """h (Mp, 2F), da (Mp, F) -> dh (Mp, 2F) fp32 = [da * u * silu'(g) | da * silu(g)], zero outside ``valid``."""
    f = h.shape[1] // 2
    g, u, da = h[:, :f].float(), h[:, f:].float(), da.float()
    sig = torch.sigmoid(g)
    dg = da * u * (sig * (1 + g * (1 - sig)))
    du = da * (g * sig)
    return torch.where(valid[:, None], torch.cat([dg, du], dim=1), torch.zeros((), device=h.device))


def undispatch(dxs: Tensor, plan: RoutingPlan) -> Tensor:
    """dx[t] = sum_j dxs[pos(t, j)]: dxs (Mp, D) -> (T, D) fp32 (slot order; no atomics)."""
    rows = gather_assignments(dxs, plan)
    dx = torch.zeros(rows.shape[0], rows.shape[2], dtype=torch.float32, device=dxs.device)
    for j in range(plan.top_k):
        dx = dx + rows[:, j]
    return dx
