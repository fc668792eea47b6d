"""``fused_experts``: the whole routed SwiGLU expert block as one ``torch.autograd.Function``.

Forward, on one :class:`~fp8moe.moe.routing.RoutingPlan` (Mp padded rows, T tokens, k slots, E experts):

1. dispatch: x (T, D) gathered by the routing straight into GEMM1's operands in the 128-row-padded layout
   (rows; token tiles when ``w_gate_up`` needs a gradient, saved instead of any copy of x);
2. GEMM1 (gate/up, N = 2F) through the backend's M-grouped provider into h (Mp, 2F) bf16, *kept padded*;
3. SwiGLU: a = silu(g) * u in fp32 from h, quantized into GEMM2's rows (and token tiles, saved);
4. GEMM2 (down, N = D) into out (Mp, D) bf16, padded;
5. combine: y[t] = sum_j c[t, j] * out[pos(t, j)] in fp32, read from the padded rows (slot order).

The backward mirrors it: d_out = c * dy at the padded rows into both FP8 layouts, d_c[t, j] = <dy[t],
out[pos(t, j)]>; dgrad2 and wgrad2; SwiGLU backward -> dh in both layouts; dgrad1 and wgrad1; un-dispatch
dx[t] = sum_j dxs[pos(t, j)] (slot order, no atomics: bitwise deterministic). Only the GEMMs and operands
whose gradients are needed run or are saved; a forward without gradients saves nothing.

``precision="bf16"`` runs the same plan and the same dispatch / SwiGLU / combine code with bf16 operands
and ``torch._grouped_mm`` on the padded layout, so the two precisions differ only in the GEMMs.

Phase 1: the memory passes are the pure-torch functions of :mod:`fp8moe.moe.pieces` on every backend
(correct on any device; the Triton kernels that fuse them are still to come); the GEMMs are the backend's.
h is kept for the backward (not recomputed).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fp8moe import weight_cache
from fp8moe.backends import BACKEND_NAMES, load_backend, resolve_backend
from fp8moe.moe import pieces
from fp8moe.moe.routing import RoutingPlan, plan_routing
from fp8moe.plan import GroupLayout
from fp8moe.recipe import BLOCK

PRECISIONS = ("bf16", "fp8")
_FLOAT_DTYPES = (torch.bfloat16, torch.float32)


class _Fp8Gemms:
    """The backend's providers on the padded layout; operands quantized by :func:`pieces.quantize_padded`."""

    def __init__(self, key: str, cache_weight: bool) -> None:
        self.key, self.impl, self.cache_weight = key, load_backend(key), cache_weight

    def weight(self, w: Tensor, transposed: bool) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        use_cache = self.cache_weight and not (w.is_cuda and torch.cuda.is_current_stream_capturing())
        quantized = weight_cache.lookup(w, self.key, transposed) if use_cache else None
        if quantized is None:
            quantized = self.impl.quantize_weight(w, transposed)
            if use_cache:
                weight_cache.store(w, self.key, transposed, quantized)
        wq, sw, wq_t, sw_t = quantized
        return (wq, sw), ((wq_t, sw_t) if transposed else None)

    def operands(self, v: Tensor, layout: GroupLayout, rows: bool, tiles: bool) -> tuple[object, object]:
        parts = list(pieces.quantize_padded(v, layout, rows, tiles))
        return (tuple(parts[:2]) if rows else None), (tuple(parts[-2:]) if tiles else None)

    def mm(self, a: tuple[Tensor, Tensor], w: tuple[Tensor, Tensor], layout: GroupLayout) -> Tensor:
        return self.impl.m_grouped(*a, *w, layout, torch.bfloat16, None, padded=True)

    def prefetch(self, layout: GroupLayout) -> None:
        if hasattr(self.impl.k_grouped, "prefetch"):
            self.impl.k_grouped.prefetch(layout)

    def wgrad(self, layout: GroupLayout):
        prepared = self.impl.k_grouped.prepare(layout)
        return lambda d, a, dtype: prepared(*d, *a, dtype, None, False)


class _Bf16Gemms:
    """bf16 operands and ``torch._grouped_mm`` on the padded layout (groups end at the padded ends)."""

    def weight(self, w: Tensor, transposed: bool) -> tuple[Tensor, Tensor | None]:
        wb = w.to(torch.bfloat16)
        return wb.transpose(1, 2), (wb if transposed else None)

    def operands(self, v: Tensor, layout: GroupLayout, rows: bool, tiles: bool) -> tuple[object, object]:
        vb = v.to(torch.bfloat16)
        return (vb if rows else None), (vb if tiles else None)

    @staticmethod
    def _ends(layout: GroupLayout) -> Tensor:
        return (layout.padded_starts + layout.padded_sizes).to(torch.int32)

    def mm(self, a: Tensor, w: Tensor, layout: GroupLayout) -> Tensor:
        return torch._grouped_mm(a, w, offs=self._ends(layout))

    def prefetch(self, layout: GroupLayout) -> None:
        pass

    def wgrad(self, layout: GroupLayout):
        ends = self._ends(layout)
        return lambda d, a, dtype: torch._grouped_mm(d.T, a, offs=ends).to(dtype)


def _x_operands(gemms, x: Tensor, x_fp8, plan: RoutingPlan, need_dw1: bool):
    """GEMM1's x operands: quantized from x, or (``x_fp8``, FP8 dispatch) the rows gathered from the given
    codes and only the token tiles quantized from x (see :func:`fp8moe.moe.parallel.pad_fp8_rows`)."""
    if x_fp8 is None:
        return gemms.operands(pieces.dispatch(x, plan), plan.layout, True, need_dw1)
    from fp8moe.moe.parallel import pad_fp8_rows

    tiles = gemms.operands(pieces.dispatch(x, plan), plan.layout, False, True)[1] if need_dw1 else None
    return pad_fp8_rows(*x_fp8, plan), tiles


def _block_forward(
    gemms, x: Tensor, w1: Tensor, w2: Tensor, c: Tensor, plan: RoutingPlan, needs: tuple[bool, ...], x_fp8=None
):
    """The forward; returns (y (T, D) in x's dtype, saved: dict of what the backward needs, empty if nothing)."""
    need_dx, need_dw1, need_dw2, need_dc = needs
    need_da = need_dx or need_dw1
    layout = plan.layout
    w1_op, w1_t = gemms.weight(w1, need_dx)
    w2_op, w2_t = gemms.weight(w2, need_da)
    if need_dw1 or need_dw2:
        gemms.prefetch(layout)
    valid = pieces.valid_rows(plan)
    x_rows, x_tiles = _x_operands(gemms, x, x_fp8, plan, need_dw1)
    h = gemms.mm(x_rows, w1_op, layout)
    del x_rows
    a_rows, a_tiles = gemms.operands(pieces.swiglu(h, valid), layout, True, need_dw2)
    out = gemms.mm(a_rows, w2_op, layout)
    del a_rows
    y = pieces.combine(out, c, plan).to(x.dtype)
    saved = {}
    if any(needs):
        saved = {"valid": valid, "c": c, "x_tiles": x_tiles, "a_tiles": a_tiles, "w1_t": w1_t, "w2_t": w2_t}
        saved |= {"h": h if need_da else None, "out": out if need_dc else None}
    return y, saved


def _block_backward(gemms, dy: Tensor, saved: dict, plan: RoutingPlan, needs: tuple[bool, ...], dtypes):
    """dy (T, D) -> (dx, dw1, dw2, dc) (None where not needed), in the dtypes of x, w1, w2, c."""
    need_dx, need_dw1, need_dw2, need_dc = needs
    need_da = need_dx or need_dw1
    layout = plan.layout
    wgrad = gemms.wgrad(layout) if need_dw1 or need_dw2 else None
    dx = dw1 = dw2 = None
    d_out, dc = pieces.combine_backward(dy, saved["out"], saved["c"], plan, need_da or need_dw2, need_dc)
    if need_da or need_dw2:
        do_rows, do_tiles = gemms.operands(d_out, layout, need_da, need_dw2)
        del d_out
        da = gemms.mm(do_rows, saved["w2_t"], layout) if need_da else None
        del do_rows
        if need_dw2:
            dw2 = wgrad(do_tiles, saved["a_tiles"], dtypes[2])
        del do_tiles
        if need_da:
            dh = pieces.swiglu_backward(saved["h"], da, saved["valid"])
            del da
            dh_rows, dh_tiles = gemms.operands(dh, layout, need_dx, need_dw1)
            del dh
            if need_dx:
                dx = pieces.undispatch(gemms.mm(dh_rows, saved["w1_t"], layout), plan).to(dtypes[0])
            del dh_rows
            if need_dw1:
                dw1 = wgrad(dh_tiles, saved["x_tiles"], dtypes[1])
    if dc is not None:
        dc = dc.to(dtypes[3])
    return dx, dw1, dw2, dc


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, c, plan, precision, key, cache_weight, x_fp8):
        needs = tuple(ctx.needs_input_grad[:4])
        gemms = _Fp8Gemms(key, cache_weight) if precision == "fp8" else _Bf16Gemms()
        with torch.autocast(x.device.type, enabled=False):
            y, saved = _block_forward(gemms, x, w1, w2, c, plan, needs, x_fp8)
        ctx.gemms, ctx.plan, ctx.needs = gemms, plan, needs
        ctx.dtypes = (x.dtype, w1.dtype, w2.dtype, c.dtype)
        # save_for_backward takes tensors (or None): the FP8 operand pairs are flattened
        ctx.layout = [(name, len(v) if isinstance(v, tuple) else 0) for name, v in saved.items()]
        ctx.save_for_backward(*(t for v in saved.values() for t in (v if isinstance(v, tuple) else (v,))))
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fp8moe.moe.fused_experts is differentiable once: its backward was called with create_graph=True"
            )
        return _FusedExperts._backward(ctx, dy)

    @staticmethod
    @once_differentiable
    def _backward(ctx, dy):
        tensors, saved = iter(ctx.saved_tensors), {}
        for name, count in ctx.layout:
            saved[name] = tuple(next(tensors) for _ in range(count)) if count else next(tensors)
        with torch.autocast(dy.device.type, enabled=False):
            grads = _block_backward(ctx.gemms, dy.contiguous(), saved, ctx.plan, ctx.needs, ctx.dtypes)
        return (*grads, None, None, None, None, None)


def _check_tensor(name: str, t: object, dims: int, dtypes: tuple[torch.dtype, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {dtypes}, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
    return t


def fused_experts(
    x: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    expert_ids: Tensor,
    combine: Tensor,
    *,
    backend: str = "auto",
    precision: str = "fp8",
    plan: RoutingPlan | None = None,
    cache_weight: bool = True,
    x_fp8: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Routed SwiGLU experts as one fused block: ``y[t] = sum_j combine[t, j] * expert_{e_tj}(x[t])``.

    ``expert_e(v) = w_down[e] @ (silu(g) * u)`` with ``[g; u] = w_gate_up[e] @ v``.

    Args:
        x: (T, D) bf16 or fp32 tokens (D a multiple of 128). In fp8 quantized from its own dtype.
        w_gate_up: (E, 2F, D) bf16 or fp32 (rows [:F] gate, [F:] up; F a multiple of 128).
        w_down: (E, D, F) bf16 or fp32.
        expert_ids: (T, k) int32/int64 expert of each assignment; ids outside [0, E) route nowhere (zero
            contribution: a capacity drop).
        combine: (T, k) bf16/fp32 combine weights (differentiable: d_c[t, j] = <dy[t], out_tj>).
        backend: fp8moe backend for ``precision="fp8"`` ("auto", "reference", "triton", "deepgemm").
        precision: "fp8" (blockwise FP8 GEMMs; weights through the weight cache) or "bf16"
            (``torch._grouped_mm`` on the same padded layout).
        plan: ``plan_routing(expert_ids, E)`` if already computed (built here otherwise).
        cache_weight: reuse the quantized weights while unchanged (see :mod:`fp8moe.weight_cache`).
        x_fp8: x already quantized 1x128 (FP8 dispatch under expert parallelism, :mod:`fp8moe.moe.parallel`):
            ``(codes (T, D) e4m3, scales (T, D/128) fp32)``, ``precision="fp8"`` only. GEMM1's rows are
            these codes, not re-quantized; x must hold the values they decode to and is used for the rest
            (GEMM1's token tiles for the weight gradient: a second quantization; dx in x's dtype).

    Returns:
        y: (T, D) in x's dtype, accumulated in fp32 from the bf16 expert outputs. Differentiable once in
        x, the weights (gradients in their dtypes: fp32 master weights get fp32 gradients) and ``combine``.
    """
    x = _check_tensor("x", x, 2, _FLOAT_DTYPES)
    w_gate_up = _check_tensor("w_gate_up", w_gate_up, 3, _FLOAT_DTYPES)
    w_down = _check_tensor("w_down", w_down, 3, _FLOAT_DTYPES)
    expert_ids = _check_tensor("expert_ids", expert_ids, 2, (torch.int32, torch.int64))
    combine = _check_tensor("combine", combine, 2, _FLOAT_DTYPES)
    num_tokens, d_model = x.shape
    num_experts, two_f, _ = w_gate_up.shape
    d_ff = two_f // 2
    if d_model % BLOCK or d_model == 0:
        raise ValueError(f"x: expected a last dimension that is a positive multiple of {BLOCK}, got {d_model}")
    if two_f % (2 * BLOCK) or two_f == 0 or w_gate_up.shape[2] != d_model:
        raise ValueError(
            f"w_gate_up: expected shape (E, 2F, {d_model}) with F a positive multiple of {BLOCK}, "
            f"got {tuple(w_gate_up.shape)}"
        )
    if tuple(w_down.shape) != (num_experts, d_model, d_ff):
        raise ValueError(f"w_down: expected shape {(num_experts, d_model, d_ff)}, got {tuple(w_down.shape)}")
    if expert_ids.shape[0] != num_tokens or expert_ids.shape[1] < 1:
        raise ValueError(f"expert_ids: expected shape ({num_tokens}, k) with k >= 1, got {tuple(expert_ids.shape)}")
    if combine.shape != expert_ids.shape:
        raise ValueError(f"combine: expected shape {tuple(expert_ids.shape)}, got {tuple(combine.shape)}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down), ("expert_ids", expert_ids), ("combine", combine)):
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (that of x), got {t.device}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    if not isinstance(cache_weight, bool):
        raise TypeError(f"cache_weight: expected a bool, got {type(cache_weight).__name__}")
    if plan is None:
        plan = plan_routing(expert_ids, num_experts)
    elif not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan: expected a RoutingPlan or None, got {type(plan).__name__}")
    elif plan.pos.shape != expert_ids.shape or plan.layout.num_groups != num_experts:
        raise ValueError(f"plan: planned for {tuple(plan.pos.shape)} assignments over {plan.layout.num_groups} experts")
    if x_fp8 is not None:
        if precision != "fp8":
            raise ValueError("x_fp8: pre-quantized rows need precision='fp8'")
        _check_tensor("x_fp8[0]", x_fp8[0], 2, (torch.float8_e4m3fn,))
        _check_tensor("x_fp8[1]", x_fp8[1], 2, (torch.float32,))
        if x_fp8[0].shape != x.shape or x_fp8[1].shape != (num_tokens, d_model // BLOCK):
            raise ValueError(f"x_fp8: expected shapes {tuple(x.shape)} and {(num_tokens, d_model // BLOCK)}")
    key = resolve_backend(backend, x.device) if precision == "fp8" else ""
    x, w_gate_up, w_down, combine = (t.contiguous() for t in (x, w_gate_up, w_down, combine))
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, combine))):
        # inference: no autograd node, nothing saved, no token tiles, no transposed weights
        gemms = _Fp8Gemms(key, cache_weight) if precision == "fp8" else _Bf16Gemms()
        with torch.autocast(x.device.type, enabled=False):
            return _block_forward(gemms, x, w_gate_up, w_down, combine, plan, (False,) * 4, x_fp8)[0]
    return _FusedExperts.apply(x, w_gate_up, w_down, combine, plan, precision, key, cache_weight, x_fp8)


__all__ = ["PRECISIONS", "fused_experts"]
