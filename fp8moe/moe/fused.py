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

The memory passes (dispatch, SwiGLU, combine and their backwards, each fused with the quantization of the
GEMM operand it feeds) run as the Triton kernels of :mod:`fp8moe.kernels.moe` on CUDA tensors (both
precisions; not with ``backend="reference"``), and as the pure-torch functions of :mod:`fp8moe.moe.pieces`
(their ground truth) everywhere else (:data:`PASSES` overrides the choice). The kernels give the pieces'
bits except for silu/sigmoid (a few ulp apart, so a and dh, and their FP8 codes at rounding boundaries)
and d_c's summation order. The GEMMs are the backend's. h is kept for the backward (not recomputed).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fp8moe import weight_cache
from fp8moe.backends import BACKEND_NAMES, load_backend, resolve_backend
from fp8moe.moe import pieces
from fp8moe.moe.fused_ops import fused_experts_compiled
from fp8moe.moe.routing import RoutingPlan, plan_routing
from fp8moe.plan import GroupLayout, padded_rows_bound
from fp8moe.recipe import BLOCK, FP8_DTYPE

PRECISIONS = ("bf16", "fp8")
_FLOAT_DTYPES = (torch.bfloat16, torch.float32)

#: Which implementation runs the block's memory passes: ``"auto"`` (the Triton kernels of
#: :mod:`fp8moe.kernels.moe` for CUDA tensors unless the backend is ``"reference"``, the pieces of
#: :mod:`fp8moe.moe.pieces` otherwise), ``"kernels"`` (the Triton kernels on any device: on CPU under
#: ``TRITON_INTERPRET=1``, for tests) or ``"pieces"``. Read once per forward and once per backward.
PASSES = "auto"
_PASSES = ("auto", "kernels", "pieces")


class _Fp8Gemms:
    """The backend's providers on the padded layout; operands quantized by :func:`pieces.quantize_padded`
    (on the pieces' path)."""

    fp8 = True

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

    fp8, key = False, ""

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


class _PiecesPasses:
    """The memory passes in torch (:mod:`pieces`), operands through ``gemms.operands``. Each operand method
    returns (rows operand or None, token-tile operand or None)."""

    def __init__(self, gemms) -> None:
        self.operands = gemms.operands

    def dispatch(self, x: Tensor, plan: RoutingPlan, rows: bool, tiles: bool):
        return self.operands(pieces.dispatch(x, plan), plan.layout, rows, tiles)

    def swiglu(self, h: Tensor, valid: Tensor, plan: RoutingPlan, rows: bool, tiles: bool):
        return self.operands(pieces.swiglu(h, valid), plan.layout, rows, tiles)

    def combine(self, out: Tensor, c: Tensor, plan: RoutingPlan, dtype: torch.dtype) -> Tensor:
        return pieces.combine(out, c, plan).to(dtype)

    def combine_backward(self, dy, out, c, plan: RoutingPlan, rows: bool, tiles: bool, need_dc: bool):
        """-> (d_out rows, d_out token tiles, d_c fp32 or None)."""
        d_out, dc = pieces.combine_backward(dy, out, c, plan, rows or tiles, need_dc)
        ops = self.operands(d_out, plan.layout, rows, tiles) if rows or tiles else (None, None)
        return (*ops, dc)

    def swiglu_backward(self, h: Tensor, da: Tensor, valid: Tensor, plan: RoutingPlan, rows: bool, tiles: bool):
        return self.operands(pieces.swiglu_backward(h, da, valid), plan.layout, rows, tiles)

    def undispatch(self, dxs: Tensor, plan: RoutingPlan, dtype: torch.dtype) -> Tensor:
        return pieces.undispatch(dxs, plan).to(dtype)


class _KernelPasses:
    """The same passes as :class:`_PiecesPasses` through the Triton kernels of :mod:`fp8moe.kernels.moe`,
    writing FP8 operands (``fp8``) or bf16 ones (the bf16 GEMMs' rows and token tiles are one tensor)."""

    def __init__(self, fp8: bool) -> None:
        from fp8moe.kernels import moe as kernels

        self.kernels, self.fp8 = kernels, fp8

    def _split(self, result, rows: bool, tiles: bool):
        if not self.fp8:
            return (result if rows else None), (result if tiles else None)
        return (tuple(result[:2]) if rows else None), (tuple(result[-2:]) if tiles else None)

    def dispatch(self, x: Tensor, plan: RoutingPlan, rows: bool, tiles: bool):
        return self._split(self.kernels.dispatch(x, plan, rowwise=rows, token_tiles=tiles, fp8=self.fp8), rows, tiles)

    def swiglu(self, h: Tensor, valid: Tensor, plan: RoutingPlan, rows: bool, tiles: bool):
        return self._split(self.kernels.swiglu(h, plan, rowwise=rows, token_tiles=tiles, fp8=self.fp8), rows, tiles)

    def combine(self, out: Tensor, c: Tensor, plan: RoutingPlan, dtype: torch.dtype) -> Tensor:
        return self.kernels.combine(out, c, plan, dtype)

    def combine_backward(self, dy, out, c, plan: RoutingPlan, rows: bool, tiles: bool, need_dc: bool):
        ops = (None, None)
        if rows or tiles:
            d_out = self.kernels.combine_backward(dy, c, plan, rowwise=rows, token_tiles=tiles, fp8=self.fp8)
            ops = self._split(d_out, rows, tiles)
        return (*ops, self.kernels.combine_weight_grad(dy, out, plan) if need_dc else None)

    def swiglu_backward(self, h: Tensor, da: Tensor, valid: Tensor, plan: RoutingPlan, rows: bool, tiles: bool):
        dh = self.kernels.swiglu_backward(h, da, plan, rowwise=rows, token_tiles=tiles, fp8=self.fp8)
        return self._split(dh, rows, tiles)

    def undispatch(self, dxs: Tensor, plan: RoutingPlan, dtype: torch.dtype) -> Tensor:
        return self.kernels.undispatch(dxs, plan, dtype)


def _passes(gemms, device: torch.device):
    """The memory passes for tensors on ``device`` with these GEMMs, by :data:`PASSES`. The kernels need to
    know the operands the GEMMs take: GEMM objects declare ``fp8`` (FP8 pairs, or bf16 tensors) and ``key``
    (their backend); one that does not gets the pieces, through its ``operands``."""
    if PASSES not in _PASSES:
        raise ValueError(f"fp8moe.moe.fused.PASSES: expected one of {_PASSES}, got {PASSES!r}")
    fp8, key = getattr(gemms, "fp8", None), getattr(gemms, "key", "")
    on_device = PASSES == "auto" and device.type == "cuda" and key != "reference"
    use_kernels = fp8 is not None and (PASSES == "kernels" or on_device)
    return _KernelPasses(fp8) if use_kernels else _PiecesPasses(gemms)


def _x_operands(passes, x: Tensor, x_fp8, plan: RoutingPlan, need_dw1: bool):
    """GEMM1's x operands: dispatched and quantized from x, or (``x_fp8``, FP8 dispatch) the rows gathered
    from the given codes and only the token tiles quantized from x (see :func:`fp8moe.moe.parallel.pad_fp8_rows`)."""
    if x_fp8 is None:
        return passes.dispatch(x, plan, True, need_dw1)
    from fp8moe.moe.parallel import pad_fp8_rows

    tiles = passes.dispatch(x, plan, False, True)[1] if need_dw1 else None
    return pad_fp8_rows(*x_fp8, plan), tiles


def _block_forward(
    gemms, x: Tensor, w1: Tensor, w2: Tensor, c: Tensor, plan: RoutingPlan, needs: tuple[bool, ...], x_fp8=None
):
    """The forward; returns (y (T, D) in x's dtype, saved: dict of what the backward needs, empty if nothing)."""
    need_dx, need_dw1, need_dw2, need_dc = needs
    need_da = need_dx or need_dw1
    layout = plan.layout
    passes = _passes(gemms, x.device)
    w1_op, w1_t = gemms.weight(w1, need_dx)
    w2_op, w2_t = gemms.weight(w2, need_da)
    if need_dw1 or need_dw2:
        gemms.prefetch(layout)
    valid = pieces.valid_rows(plan)
    x_rows, x_tiles = _x_operands(passes, x, x_fp8, plan, need_dw1)
    h = gemms.mm(x_rows, w1_op, layout)
    del x_rows
    a_rows, a_tiles = passes.swiglu(h, valid, plan, True, need_dw2)
    out = gemms.mm(a_rows, w2_op, layout)
    del a_rows
    y = passes.combine(out, c, plan, x.dtype)
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
    passes = _passes(gemms, dy.device)
    wgrad = gemms.wgrad(layout) if need_dw1 or need_dw2 else None
    dx = dw1 = dw2 = None
    do_rows, do_tiles, dc = passes.combine_backward(dy, saved["out"], saved["c"], plan, need_da, need_dw2, need_dc)
    if need_da or need_dw2:
        da = gemms.mm(do_rows, saved["w2_t"], layout) if need_da else None
        del do_rows
        if need_dw2:
            dw2 = wgrad(do_tiles, saved["a_tiles"], dtypes[2])
        del do_tiles
        if need_da:
            dh_rows, dh_tiles = passes.swiglu_backward(saved["h"], da, saved["valid"], plan, need_dx, need_dw1)
            del da
            if need_dx:
                dx = passes.undispatch(gemms.mm(dh_rows, saved["w1_t"], layout), plan, dtypes[0])
            del dh_rows
            if need_dw1:
                dw1 = wgrad(dh_tiles, saved["x_tiles"], dtypes[1])
    if dc is not None:
        dc = dc.to(dtypes[3])
    return dx, dw1, dw2, dc


class SavedSpec(NamedTuple):
    """Shape and dtype of one tensor of the block's saved dict (see :func:`saved_spec`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def saved_spec(
    precision: str,
    num_tokens: int,
    top_k: int,
    num_experts: int,
    d_model: int,
    d_ff: int,
    needs: tuple[bool, ...],
    combine_dtype: torch.dtype,
) -> dict[str, SavedSpec | tuple[SavedSpec, ...] | None]:
    """The static layout of the ``saved`` dict :func:`_block_forward` returns for these sizes and ``needs``
    (a public hook for callers that must allocate the residuals up front, e.g. the JAX bridge): per key,
    None, a :class:`SavedSpec`, or a tuple of them (an FP8 operand pair). Empty when nothing is needed.
    Keep it in step with :func:`_block_forward` (tests/test_jax_fused.py checks the two agree)."""
    if not any(needs):
        return {}
    need_dx, need_dw1, need_dw2, need_dc = needs
    need_da = need_dx or need_dw1
    mp = padded_rows_bound(num_tokens * top_k, num_experts)
    e, d, f, bf16 = num_experts, d_model, d_ff, torch.bfloat16

    def operand(cols: int) -> SavedSpec | tuple[SavedSpec, ...]:  # token tiles (fp8) or the bf16 rows
        if precision == "fp8":
            return SavedSpec((cols * mp,), FP8_DTYPE), SavedSpec((mp // BLOCK, cols), torch.float32)
        return SavedSpec((mp, cols), bf16)

    def weight_t(n: int, k: int) -> SavedSpec | tuple[SavedSpec, ...]:  # dgrad operand of a weight (E, n, k)
        if precision == "fp8":
            return SavedSpec((e, k, n), FP8_DTYPE), SavedSpec((e, k // BLOCK, n // BLOCK), torch.float32)
        return SavedSpec((e, n, k), bf16)

    return {
        "valid": SavedSpec((mp,), torch.bool),
        "c": SavedSpec((num_tokens, top_k), combine_dtype),
        "x_tiles": operand(d) if need_dw1 else None,
        "a_tiles": operand(f) if need_dw2 else None,
        "w1_t": weight_t(2 * f, d) if need_dx else None,
        "w2_t": weight_t(d, f) if need_da else None,
        "h": SavedSpec((mp, 2 * f), bf16) if need_da else None,
        "out": SavedSpec((mp, d), bf16) if need_dc else None,
    }


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
                "fp8moe.moe.fused_experts is differentiable once: its backward was called with create_graph=True; "
                "for second-order gradients use the op-by-op bf16 layer, MoE(..., precision='bf16', fused=False)"
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


def check_block_shapes(x, w_gate_up, w_down, expert_ids, combine) -> tuple[int, int, int, int]:
    """The block's shape rules on anything with a ``.shape`` (torch tensors, JAX arrays): x (T, D) with D a
    positive multiple of 128, w_gate_up (E, 2F, D) with E >= 1 and F a positive multiple of 128, w_down (E, D,
    F), expert_ids and combine (T, k) with k >= 1. Returns (T, D, E, F); ValueError naming the argument."""
    num_tokens, d_model = x.shape
    num_experts, two_f, _ = w_gate_up.shape
    d_ff = two_f // 2
    if d_model % BLOCK or d_model == 0:
        raise ValueError(f"x: expected a last dimension that is a positive multiple of {BLOCK}, got {d_model}")
    if two_f % (2 * BLOCK) or two_f == 0 or w_gate_up.shape[2] != d_model or num_experts == 0:
        raise ValueError(
            f"w_gate_up: expected shape (E, 2F, {d_model}) with E >= 1 and F a positive multiple of {BLOCK}, "
            f"got {tuple(w_gate_up.shape)}"
        )
    if tuple(w_down.shape) != (num_experts, d_model, d_ff):
        raise ValueError(f"w_down: expected shape {(num_experts, d_model, d_ff)}, got {tuple(w_down.shape)}")
    if expert_ids.shape[0] != num_tokens or expert_ids.shape[1] < 1:
        raise ValueError(f"expert_ids: expected shape ({num_tokens}, k) with k >= 1, got {tuple(expert_ids.shape)}")
    if tuple(combine.shape) != tuple(expert_ids.shape):
        raise ValueError(f"combine: expected shape {tuple(expert_ids.shape)}, got {tuple(combine.shape)}")
    return num_tokens, d_model, num_experts, d_ff


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
        cache_weight: reuse the quantized weights while unchanged (see :mod:`fp8moe.weight_cache`). Eager
            calls only: under ``torch.compile`` the block runs as the custom ops of :mod:`fp8moe.moe.fused_ops`
            and quantizes the weights in every call.
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
    num_tokens, d_model, num_experts, _ = check_block_shapes(x, w_gate_up, w_down, expert_ids, combine)
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
    if torch.compiler.is_compiling():  # custom ops the compiler traces whole (fp8moe.moe.fused_ops)
        if x_fp8 is not None:
            raise NotImplementedError("x_fp8: FP8 dispatch is not supported under torch.compile yet")
        return fused_experts_compiled(x, w_gate_up, w_down, combine, plan, precision, key)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, combine))):
        # inference: no autograd node, nothing saved, no token tiles, no transposed weights
        gemms = _Fp8Gemms(key, cache_weight) if precision == "fp8" else _Bf16Gemms()
        with torch.autocast(x.device.type, enabled=False):
            return _block_forward(gemms, x, w_gate_up, w_down, combine, plan, (False,) * 4, x_fp8)[0]
    return _FusedExperts.apply(x, w_gate_up, w_down, combine, plan, precision, key, cache_weight, x_fp8)


__all__ = ["PASSES", "PRECISIONS", "SavedSpec", "check_block_shapes", "fused_experts", "saved_spec"]
