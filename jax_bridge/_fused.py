"""``jax_bridge.fused_experts``: fp8moe's fused routed-SwiGLU expert block as one ``jax.custom_vjp``.

The JAX face of :func:`fp8moe.moe.fused_experts`: dispatch -> GEMM1 -> SwiGLU -> GEMM2 -> combine is ONE
``buffer_callback`` forward and ONE ``buffer_callback`` backward (not one per GEMM), each running the torch
block (``fp8moe.moe.fused._block_forward`` / ``_block_backward``) on XLA's buffers, zero copy, on XLA's
stream. The forward callback plans the routing (:func:`fp8moe.moe.plan_routing`, on the device, no host
read) from the ``expert_ids`` input; so the router, softmax, top-k and aux loss stay in JAX and the block
takes the routing as arrays.

Static shapes: every residual's shape is a function of (T, k, E, D, F) only (the padded row count is the
routing-independent bound :func:`fp8moe.plan.padded_rows_bound`), so a jitted step compiles once whatever
the routing.

Residuals (what the torch block saves, listed by :func:`fp8moe.moe.fused.saved_spec`), each an output
buffer of the forward callback and an input of the backward one: the routing plan (offsets, packed plan,
and the int64 ``pos`` / ``row_assignment`` carried as pairs of int32), FP8 operands as uint8 arrays of
e4m3 bits (x's and a's token tiles, the transposed quantized weights) with their fp32 scales, h and the
expert outputs bf16 in the padded layout, the valid-row mask as uint8. The combine weights, and in bf16 the
bf16 weights (and pre-quantized weights' transposed halves), are the inputs themselves (no copy). The
transposed quantized weights, h and the expert outputs (and, in the backward, the weight gradients) are
written by the quantizer and the GEMMs straight into XLA's buffers; the rest is one copy each: y, dx, dc,
the valid-row mask, and the token tiles (one read and write of Mp x (D + F) bytes, until the block's
quantization can write into a caller's buffer).

Weights: no torch object survives a callback, so the torch weight cache (``fp8moe.weight_cache``) cannot
help here: by default every forward quantizes both weights (one read of each; what ``fused_experts(...,
cache_weight=False)`` does in torch), so under ``lax.scan`` over the micro-batches of one step each
micro-batch quantizes them again. :func:`quantize_weight` quantizes a weight once, as JAX arrays, and
``fused_experts(..., quantized_weights=...)`` uses them instead (the JAX side of the weight cache).

On a GPU with the DeepGEMM backend the weight gradient needs the padded group sizes on the host: the
backward callback starts that read at its top and waits for it at the first wgrad launch (the torch block
starts it in the forward; here the plan does not outlive the forward callback).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jax.experimental.buffer_callback import buffer_callback
from torch import Tensor

from fp8moe.backends import BACKEND_NAMES, load_backend, resolve_backend
from fp8moe.moe import fused as torch_fused
from fp8moe.moe.fused import SavedSpec, saved_spec
from fp8moe.moe.routing import RoutingPlan, plan_routing
from fp8moe.plan import GroupLayout, padded_rows_bound, plan_data_size
from fp8moe.quant.reference import quantize_rowwise
from fp8moe.recipe import BLOCK, FP8_DTYPE
from jax_bridge._callbacks import as_torch, on_xla_stream
from jax_bridge._grouped_mm import _platform_of, _torch_device, _vary, _varying_axes

PRECISIONS = torch_fused.PRECISIONS
FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
ID_DTYPES = (jnp.dtype(jnp.int32), jnp.dtype(jnp.int64))
_TORCH = {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float32): torch.float32}
# torch dtype of a residual -> the JAX dtype of its buffer (fp8 and bool travel as their bytes)
_JAX = {
    torch.bfloat16: jnp.bfloat16,
    torch.float32: jnp.float32,
    torch.int32: jnp.int32,
    FP8_DTYPE: jnp.uint8,
    torch.bool: jnp.uint8,
}

Spec = tuple[tuple[str, Any], ...]  # saved_spec as a hashable tuple of (key, entry)


# --- the torch side ---------------------------------------------------------------------------------------------


def _view(buf: Any, dtype: torch.dtype) -> Tensor:
    t = as_torch(buf)
    return t.view(dtype) if t.dtype != dtype else t


def _store(name: str, dest: Tensor, value: Tensor) -> None:
    """``dest[...] = value`` unless ``value`` already lives there (written in place by a GEMM)."""
    if value.dtype != dest.dtype or tuple(value.shape) != tuple(dest.shape):
        raise RuntimeError(
            f"jax_bridge.fused_experts: the torch block saved {name} as {value.dtype} {tuple(value.shape)}, "
            f"but fp8moe.moe.fused.saved_spec says {dest.dtype} {tuple(dest.shape)}: keep the two in step"
        )
    if value.data_ptr() != dest.data_ptr() or value.stride() != dest.stride():
        dest.copy_(value)


def _entries(spec: Spec, inputs: dict[str, bool]) -> Iterator[tuple[str, int, SavedSpec]]:
    """(key, index in the entry's tuple or -1, spec) of every saved tensor that travels as its own buffer."""
    for key, entry in spec:
        if entry is None or inputs.get(key, False):
            continue
        if isinstance(entry, SavedSpec):
            yield key, -1, entry
        else:
            for i, part in enumerate(entry):
                yield key, i, part


class _Fp8IntoXla:
    """The fused block's FP8 GEMM providers (``_Fp8Gemms`` without the weight cache) writing what the
    forward keeps straight into XLA's buffers: the transposed quantized weights (``quantize_weight(out_t=)``),
    h and the expert outputs (the M-grouped GEMM's ``out``); in the backward the weight gradients (the
    K-grouped GEMM's ``out``). Everything else is delegated unchanged."""

    def __init__(self, key: str, weight_dests: Sequence[tuple[Tensor, Any, Any, Any]] = (), wgrad_dests=()) -> None:
        self.inner = torch_fused._Fp8Gemms(key, cache_weight=False)
        self.impl = self.inner.impl
        # (w, (wq_t, sw_t) buffers or None, mm out buffer or None, pre-quantized (wq, sw, wq_t, sw_t) or None)
        self.weight_dests = weight_dests
        self.wgrad_dests = wgrad_dests  # (token-tile operand tuple, dw buffer or None)
        self.mm_dests: list[tuple[tuple, Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def weight(self, w: Tensor, transposed: bool):
        out_t = mm_out = given = None
        for candidate, t_dest, mm_dest, quantized in self.weight_dests:
            if w is candidate:
                out_t, mm_out, given = (t_dest if transposed else None), mm_dest, quantized
        wq, sw, wq_t, sw_t = given if given is not None else self.impl.quantize_weight(w, transposed, out_t=out_t)
        op = (wq, sw)
        if mm_out is not None:
            self.mm_dests.append((op, mm_out))
        return op, ((wq_t, sw_t) if transposed else None)

    def prefetch(self, layout: GroupLayout) -> None:
        """Nothing: the forward's plan does not reach the backward callback (which rebuilds it from the plan
        residuals and starts the wgrad provider's host read there, as early as the block's backward asks)."""

    def mm(self, a, w, layout: GroupLayout) -> Tensor:
        out = next((dest for op, dest in self.mm_dests if op is w), None)
        return self.impl.m_grouped(*a, *w, layout, torch.bfloat16, out, padded=True)

    def wgrad(self, layout: GroupLayout):
        prepared = self.impl.k_grouped.prepare(layout)

        def run(d, a, dtype):
            out = next((dest for tiles, dest in self.wgrad_dests if tiles is a), None)
            if out is not None and out.dtype != dtype:
                out = None
            return prepared(*d, *a, dtype, out, False)

        return run


@dataclass(frozen=True)
class FusedForwardCallback:
    """``(ctx, out, x, w_gate_up, w_down, expert_ids, combine)``: plan the routing, run the torch block.

    ``out``: y (T, D) in x's dtype; then, when any gradient is needed, the plan (offsets (E,), packed plan,
    pos and row_assignment as int32 pairs) and the saved tensors that are not inputs, in ``spec`` order.
    With ``prequantized``, eight more inputs: (wq, sw, wq_t, sw_t) of w_gate_up, then of w_down (FP8 as
    uint8), used instead of quantizing the weights. With ``x_fp8``, two more (last): x's 1x128 codes (T, D)
    uint8 and scales (T, D/128) fp32, GEMM1's rows instead of quantizing x (the torch block's ``x_fp8=``)."""

    precision: str
    key: str
    needs: tuple[bool, bool, bool, bool]
    spec: Spec
    inputs: tuple[tuple[str, bool], ...]  # saved keys that are the block's inputs
    prequantized: bool = False
    x_fp8: bool = False

    def __call__(self, ctx: Any, out: Sequence[Any], x: Any, w1: Any, w2: Any, ids: Any, c: Any, *q: Any) -> None:
        with on_xla_stream(ctx, x):
            x_t, w1_t, w2_t, ids_t, c_t = (as_torch(b) for b in (x, w1, w2, ids, c))
            x_fp8 = None
            if self.x_fp8:
                *q, codes, scales = q
                x_fp8 = (_view(codes, FP8_DTYPE), as_torch(scales))
            q1 = q2 = None
            if self.prequantized:
                qt = [_view(b, FP8_DTYPE) if i % 2 == 0 else as_torch(b) for i, b in enumerate(q)]
                q1, q2 = tuple(qt[:4]), tuple(qt[4:])
            plan = plan_routing(ids_t, w1_t.shape[0])
            results = iter(out)
            y_out = as_torch(next(results))
            inputs = dict(self.inputs)
            dests: dict[str, Any] = {}
            if any(self.needs):
                layout = plan.layout
                for value in (layout.offsets, layout.data, plan.pos.reshape(-1), plan.row_assignment):
                    dest = _view(next(results), torch.int64 if value.dtype == torch.int64 else torch.int32)
                    dest.copy_(value)
                for key, index, part in _entries(self.spec, inputs):
                    buf = _view(next(results), part.dtype)
                    dests[key] = buf if index < 0 else (*dests.get(key, ()), buf)
            if self.precision == "fp8":
                gemms = _Fp8IntoXla(
                    self.key,
                    (
                        (w1_t, dests.get("w1_t"), dests.get("h"), q1),
                        (w2_t, dests.get("w2_t"), dests.get("out"), q2),
                    ),
                )
            else:
                gemms = torch_fused._Bf16Gemms()
            with torch.autocast(x_t.device.type, enabled=False):
                y, saved = torch_fused._block_forward(gemms, x_t, w1_t, w2_t, c_t, plan, self.needs, x_fp8)
            _store("y", y_out, y)
            passed = {"c": c_t, "w1_t": q1[2:] if q1 else w1_t, "w2_t": q2[2:] if q2 else w2_t}
            for key, entry in self.spec:
                value = saved.get(key)
                if (entry is None) != (value is None):
                    raise RuntimeError(f"jax_bridge.fused_experts: saved[{key!r}] does not match fused.saved_spec")
                if entry is None:
                    continue
                if inputs.get(key, False):
                    pairs = zip(value, passed[key], strict=True) if isinstance(value, tuple) else [(value, passed[key])]
                    if any(v.data_ptr() != p.data_ptr() for v, p in pairs):
                        raise RuntimeError(f"jax_bridge.fused_experts: saved[{key!r}] is no longer the block's input")
                elif isinstance(entry, SavedSpec):
                    _store(key, dests[key], value)
                else:
                    for i, (d, v) in enumerate(zip(dests[key], value, strict=True)):
                        _store(f"{key}[{i}]", d, v)


@dataclass(frozen=True)
class FusedBackwardCallback:
    """``(ctx, out, dy, offsets, plan_data, pos, row_assignment, *saved)``: the block's backward.

    ``saved``: the residuals of :class:`FusedForwardCallback` with the pass-through inputs in their places
    (``spec`` order). ``out``: dx, dw_gate_up, dw_down, dc, those needed, in the dtypes ``dtypes``."""

    precision: str
    key: str
    needs: tuple[bool, bool, bool, bool]
    spec: Spec
    dtypes: tuple[torch.dtype, ...]
    num_tokens: int
    top_k: int

    def __call__(
        self, ctx: Any, out: Sequence[Any], dy: Any, offsets: Any, data: Any, pos: Any, rows: Any, *saved: Any
    ):
        with on_xla_stream(ctx, dy):
            dy_t = as_torch(dy)
            m = self.num_tokens * self.top_k
            layout = GroupLayout.from_data(as_torch(offsets), as_torch(data), m)
            plan = RoutingPlan(
                layout, _view(pos, torch.int64).view(self.num_tokens, self.top_k), _view(rows, torch.int64)
            )
            buffers = iter(saved)
            saved_t: dict[str, Any] = {}
            for key, entry in self.spec:
                if entry is None:
                    saved_t[key] = None
                elif isinstance(entry, SavedSpec):
                    saved_t[key] = _view(next(buffers), entry.dtype)
                else:
                    saved_t[key] = tuple(_view(next(buffers), part.dtype) for part in entry)
            grads = [as_torch(b) for b in out]
            slots = iter(grads)
            dests = [next(slots) if need else None for need in self.needs]
            if self.precision == "fp8":
                tiles = ((saved_t.get("x_tiles"), dests[1]), (saved_t.get("a_tiles"), dests[2]))
                gemms = _Fp8IntoXla(self.key, wgrad_dests=tuple((t, d) for t, d in tiles if t is not None))
            else:
                gemms = torch_fused._Bf16Gemms()
            with torch.autocast(dy_t.device.type, enabled=False):
                results = torch_fused._block_backward(gemms, dy_t.contiguous(), saved_t, plan, self.needs, self.dtypes)
            for name, dest, value in zip(("dx", "dw_gate_up", "dw_down", "dcombine"), dests, results, strict=True):
                if dest is not None:
                    _store(name, dest, value)


@dataclass(frozen=True)
class QuantizeWeightCallback:
    """``(ctx, out, w)``: the backend's 128x128 quantization of w (E, N, K) into ``out`` = (wq (E, N, K) uint8,
    sw (E, N/128, K/128), wq_t (E, K, N) uint8, sw_t (E, K/128, N/128)), what the torch weight cache holds."""

    key: str

    def __call__(self, ctx: Any, out: Sequence[Any], w: Any) -> None:
        with on_xla_stream(ctx, w):
            wq_out, sw_out = _view(out[0], FP8_DTYPE), as_torch(out[1])
            out_t = (_view(out[2], FP8_DTYPE), as_torch(out[3]))
            wq, sw, _, _ = load_backend(self.key).quantize_weight(as_torch(w), True, out_t=out_t)
            _store("wq", wq_out, wq)
            _store("sw", sw_out, sw)


@dataclass(frozen=True)
class QuantizeRowsCallback:
    """``(ctx, out, x)``: the recipe's 1x128 quantization of x (R, D) into ``out`` = (codes (R, D) uint8, scales
    (R, D/128) fp32): :func:`fp8moe.quant.reference.quantize_rowwise`, what the torch EP layer sends."""

    def __call__(self, ctx: Any, out: Sequence[Any], x: Any) -> None:
        with on_xla_stream(ctx, x):
            codes, scales = quantize_rowwise(as_torch(x))
            _store("codes", _view(out[0], FP8_DTYPE), codes)
            _store("scales", as_torch(out[1]), scales)


# --- the JAX side ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    """Static configuration (a ``nondiff_argnums`` argument): precision and the resolved backend key."""

    precision: str
    key: str


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["plan", "saved"],
    meta_fields=["needs", "spec", "dtypes", "dims"],
)
@dataclass(frozen=True)
class _Residuals:
    plan: tuple[jax.Array, ...]
    saved: tuple[jax.Array, ...]
    needs: tuple[bool, bool, bool, bool]
    spec: Spec
    dtypes: tuple[np.dtype, ...]  # x, w_gate_up, w_down, combine (as the callback sees them)
    dims: tuple[int, int, int, int, int]  # T, k, E, D, F


def _spec(cfg: _Config, x, w1, ids, c, needs) -> Spec:
    (t, d), (e, two_f, _), k = x.shape, w1.shape, ids.shape[1]
    return tuple(saved_spec(cfg.precision, t, k, e, d, two_f // 2, needs, _TORCH[jnp.dtype(c.dtype)]).items())


def _passthrough(cfg: _Config, spec: Spec, c, w1, w2, q) -> dict[str, tuple[jax.Array, ...]]:
    """The saved entries that are the block's own inputs (decided statically), with those inputs: the combine
    weights; in bf16 the bf16 weights (``w.to(bf16)`` is ``w`` itself); with pre-quantized weights their
    transposed halves (wq_t, sw_t)."""
    candidates = {"c": (c,)}
    if cfg.precision == "bf16":
        candidates |= {"w1_t": (w1,), "w2_t": (w2,)}
    elif q is not None:
        candidates |= {"w1_t": tuple(q[0][2:]), "w2_t": tuple(q[1][2:])}
    result = {}
    for key, entry in spec:
        if entry is None or key not in candidates:
            continue
        parts = (entry,) if isinstance(entry, SavedSpec) else entry
        arrays = candidates[key]
        if len(parts) == len(arrays) and all(
            tuple(a.shape) == p.shape and _JAX[p.dtype] == a.dtype for a, p in zip(arrays, parts)
        ):
            result[key] = arrays
    return result


def _forward(cfg: _Config, x, w1, w2, ids, c, q, xq, needs) -> tuple[jax.Array, _Residuals | None]:
    (t, _), (e, _, _), k = x.shape, w1.shape, ids.shape[1]
    m, spec = t * k, _spec(cfg, x, w1, ids, c, needs)
    passed = _passthrough(cfg, spec, c, w1, w2, q)
    inputs = {key: True for key in passed}
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if any(needs):
        mp = padded_rows_bound(m, e)
        shapes += [
            jax.ShapeDtypeStruct((e,), jnp.int32),
            jax.ShapeDtypeStruct((plan_data_size(m, e),), jnp.int32),
            jax.ShapeDtypeStruct((2 * m,), jnp.int32),  # pos, int64
            jax.ShapeDtypeStruct((2 * mp,), jnp.int32),  # row_assignment, int64
        ]
        shapes += [jax.ShapeDtypeStruct(p.shape, _JAX[p.dtype]) for _, _, p in _entries(spec, inputs)]
    quantized = () if q is None else (*q[0], *q[1])
    callback = FusedForwardCallback(
        cfg.precision,
        cfg.key,
        needs,
        spec,
        tuple(sorted(inputs.items())),
        prequantized=q is not None,
        x_fp8=xq is not None,
    )
    operands = (x, w1, w2, ids, c, *quantized, *(() if xq is None else xq))
    axes = frozenset().union(*(_varying_axes(a) for a in operands))
    y, *rest = (_vary(r, axes) for r in buffer_callback(callback, tuple(shapes))(*operands))
    if not any(needs):
        return y, None
    plan, produced = tuple(rest[:4]), iter(rest[4:])
    saved = []
    for key, entry in spec:
        if entry is None:
            continue
        if key in passed:
            saved += passed[key]
        else:
            saved += [next(produced) for _ in range(1 if isinstance(entry, SavedSpec) else len(entry))]
    dtypes = tuple(jnp.dtype(a.dtype) for a in (x, w1, w2, c))
    dims = (t, k, e, x.shape[1], w2.shape[2])
    return y, _Residuals(plan, tuple(saved), needs, spec, dtypes, dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(x, w1, w2, ids, c, q, xq, cfg: _Config) -> jax.Array:
    return _forward(cfg, x, w1, w2, ids, c, q, xq, (False,) * 4)[0]  # no gradient: the inference path


def _fused_fwd(x: CustomVJPPrimal, w1, w2, ids, c, q, xq, cfg: _Config):
    needs = (x.perturbed, w1.perturbed, w2.perturbed, c.perturbed)
    quantized, x_fp8 = jax.tree_util.tree_map(
        lambda p: p.value, (q, xq), is_leaf=lambda p: isinstance(p, CustomVJPPrimal)
    )
    return _forward(cfg, x.value, w1.value, w2.value, ids.value, c.value, quantized, x_fp8, needs)


def _fused_bwd(cfg: _Config, res: _Residuals | None, dy) -> tuple[Any, ...]:
    if res is None or isinstance(dy, SymbolicZero):
        return None, None, None, None, None, None, None
    t, k, e, d, f = res.dims
    shapes = [(t, d), (e, 2 * f, d), (e, d, f), (t, k)]
    out = tuple(jax.ShapeDtypeStruct(s, dt) for s, dt, need in zip(shapes, res.dtypes, res.needs) if need)
    callback = FusedBackwardCallback(
        cfg.precision, cfg.key, res.needs, res.spec, tuple(_TORCH[dt] for dt in res.dtypes), t, k
    )
    axes = _varying_axes(dy) | frozenset().union(*(_varying_axes(a) for a in res.plan))
    grads = iter(_vary(g, axes) for g in buffer_callback(callback, out)(dy, *res.plan, *res.saved))
    dx, dw1, dw2, dc = (next(grads) if need else None for need in res.needs)
    return dx, dw1, dw2, None, dc, None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def _check(name: str, a: object, ndim: int, dtypes: tuple[np.dtype, ...]) -> None:
    if not isinstance(a, (jax.Array, np.ndarray)):
        raise TypeError(f"{name}: expected a jax.Array, got {type(a).__name__}")
    if a.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {tuple(str(d) for d in dtypes)}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(a.shape)}")


def fused_experts(
    x: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    expert_ids: jax.Array,
    combine: jax.Array,
    *,
    backend: str = "auto",
    precision: str = "fp8",
    quantized_weights: tuple[QuantizedWeight, QuantizedWeight] | None = None,
    x_fp8: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Routed SwiGLU experts as one fused block, ``y[t] = sum_j combine[t, j] * expert_{e_tj}(x[t])``: the JAX
    face of :func:`fp8moe.moe.fused_experts` (same arguments, rules and bits).

    ``expert_e(v) = w_down[e] @ (silu(g) * u)`` with ``[g; u] = w_gate_up[e] @ v``.

    Args:
        x: (T, D) bfloat16 or float32 tokens (D a positive multiple of 128); in fp8 quantized from its dtype.
        w_gate_up: (E, 2F, D) bfloat16 or float32 (rows [:F] gate, [F:] up; F a positive multiple of 128).
        w_down: (E, D, F) bfloat16 or float32.
        expert_ids: (T, k) int32 (or int64 under x64) expert of each assignment, e.g. from ``lax.top_k``; ids
            outside [0, E) route nowhere (zero contribution). May be traced: never read on the host.
        combine: (T, k) bfloat16 or float32 combine weights (differentiable).
        backend: fp8moe backend for ``precision="fp8"`` ("auto", "reference", "triton", "deepgemm";
            "reference" on CPU), resolved once at trace time.
        precision: "fp8" (blockwise-FP8 GEMMs) or "bf16" (``torch._grouped_mm`` on the same padded layout;
            the weights are cast to bf16 in JAX, before the callback, which is the cast the torch block does).
        quantized_weights: ``(quantize_weight(w_gate_up), quantize_weight(w_down))`` computed once for several
            calls (fp8 only): the block then uses them instead of quantizing the weights itself (the torch
            block's weight cache). They must be the quantization of the weights passed (not checked); the weight
            gradients still reach ``w_gate_up`` and ``w_down``.
        x_fp8: x already quantized 1x128, ``(codes (T, D) uint8 (e4m3 bits) or float8_e4m3fn, scales (T, D/128)
            float32)`` (e.g. :func:`quantize_rows`; FP8 dispatch under expert parallelism), fp8 only: GEMM1's
            rows are these codes, not re-quantized (the torch block's ``x_fp8=``). x must hold the values they
            decode to (not checked) and is used for the rest: GEMM1's token tiles for ``w_gate_up``'s gradient
            are quantized from x (a second quantization), dx comes back in x's dtype. Not differentiable.

    Returns:
        y: (T, D) in x's dtype, accumulated in fp32 from the bf16 expert outputs. Differentiable in x, the
        weights and ``combine`` (gradients in their dtypes) under ``jax.grad``/``vjp``, ``jit``, ``lax.scan``
        and ``jax.checkpoint``; only what is differentiated is saved and computed (a call that is not
        differentiated is the torch block's inference path). One forward and one backward callback per call;
        the routing may change between calls without recompiling. Not batchable with ``jax.vmap``.

    Without ``quantized_weights`` the weights are quantized inside every forward (no torch weight cache
    across callbacks; see the module docstring). Bad shapes, dtypes or options raise ``TypeError`` /
    ``ValueError`` naming the argument, at trace time.
    """
    _check("x", x, 2, FLOAT_DTYPES)
    _check("w_gate_up", w_gate_up, 3, FLOAT_DTYPES)
    _check("w_down", w_down, 3, FLOAT_DTYPES)
    _check("expert_ids", expert_ids, 2, ID_DTYPES)
    _check("combine", combine, 2, FLOAT_DTYPES)
    num_tokens, d_model, num_experts, d_ff = torch_fused.check_block_shapes(x, w_gate_up, w_down, expert_ids, combine)
    if not isinstance(precision, str):
        raise TypeError(f"precision: expected a str, got {type(precision).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    q = None
    if quantized_weights is not None:
        if precision != "fp8":
            raise ValueError("quantized_weights: only with precision='fp8'")
        q = _check_quantized(quantized_weights, w_gate_up, w_down)
    xq = None
    if x_fp8 is not None:
        if precision != "fp8":
            raise ValueError("x_fp8: pre-quantized rows need precision='fp8'")
        xq = _check_rows_fp8(x_fp8, num_tokens, d_model)
    device = _torch_device(_platform_of(x))
    key = resolve_backend(backend, device) if precision == "fp8" else ""
    if precision == "bf16":  # the torch block's w.to(bf16), done by XLA: the callback then saves the input itself
        w_gate_up, w_down = w_gate_up.astype(jnp.bfloat16), w_down.astype(jnp.bfloat16)
    operands = (x, w_gate_up, w_down, expert_ids, combine)
    leaves = (*operands, *jax.tree_util.tree_leaves(q), *jax.tree_util.tree_leaves(xq))
    axes = frozenset().union(*(_varying_axes(a) for a in leaves))
    x, w_gate_up, w_down, expert_ids, combine = (_vary(jnp.asarray(a), axes) for a in operands)
    q, xq = jax.tree_util.tree_map(lambda a: _vary(a, axes), (q, xq))
    return _fused(x, w_gate_up, w_down, expert_ids, combine, q, xq, _Config(precision, key))


class QuantizedWeight(NamedTuple):
    """An expert weight (E, N, K) quantized 128x128 for the fused block (:func:`quantize_weight`): e4m3 bits
    as uint8 and fp32 dequantization scales, in both layouts (the forward GEMM's and the dgrad GEMM's)."""

    wq: jax.Array  # (E, N, K) uint8
    sw: jax.Array  # (E, N/128, K/128) float32
    wq_t: jax.Array  # (E, K, N) uint8
    sw_t: jax.Array  # (E, K/128, N/128) float32


def quantize_weight(w: jax.Array, *, backend: str = "auto") -> QuantizedWeight:
    """Quantize an expert weight once, for several :func:`fused_experts` calls (``quantized_weights=``).

    The JAX counterpart of torch's weight cache, which cannot live across callbacks: e.g. quantize both
    weights once per jitted step and feed them to every micro-batch's block (``lax.scan`` over micro-batches),
    instead of quantizing them in every block forward. The same bits as the block's own quantization (the
    backend's ``quantize_weight``). Not differentiable (the gradient reaches ``w`` through ``fused_experts``,
    which still takes ``w``).

    Args:
        w: (E, N, K) bfloat16 or float32, N and K multiples of 128.
        backend: as in :func:`fused_experts` ("reference" on CPU).
    """
    _check("w", w, 3, FLOAT_DTYPES)
    e, n, k = w.shape
    if n % BLOCK or k % BLOCK or not (e and n and k):
        raise ValueError(f"w: expected shape (E, N, K) with N and K positive multiples of {BLOCK}, got {w.shape}")
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    key = resolve_backend(backend, _torch_device(_platform_of(w)))
    shapes = QuantizedWeight(
        jax.ShapeDtypeStruct((e, n, k), jnp.uint8),
        jax.ShapeDtypeStruct((e, n // BLOCK, k // BLOCK), jnp.float32),
        jax.ShapeDtypeStruct((e, k, n), jnp.uint8),
        jax.ShapeDtypeStruct((e, k // BLOCK, n // BLOCK), jnp.float32),
    )
    w = jax.lax.stop_gradient(w)
    axes = _varying_axes(w)
    return QuantizedWeight(*(_vary(a, axes) for a in buffer_callback(QuantizeWeightCallback(key), tuple(shapes))(w)))


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantize token rows 1x128 (one scale per row and 128 columns), the recipe's rowwise quantization
    (:func:`fp8moe.quant.reference.quantize_rowwise`, through one callback): the tiles of GEMM1's rows, so
    ``fused_experts(x, ..., x_fp8=quantize_rows(x))`` gives the forward of ``fused_experts(x, ...)`` bit for bit.
    FP8 dispatch under expert parallelism sends these instead of bf16 rows (:mod:`jax_bridge.parallel`).

    Args:
        x: (R, D) bfloat16 or float32, D a positive multiple of 128.

    Returns:
        (codes (R, D) uint8: the e4m3 bits; scales (R, D/128) float32 dequantization scales). Not
        differentiable; :func:`dequantize_rows` decodes them.
    """
    _check("x", x, 2, FLOAT_DTYPES)
    rows, d = x.shape
    if d % BLOCK or d == 0:
        raise ValueError(f"x: expected a last dimension that is a positive multiple of {BLOCK}, got {d}")
    shapes = (jax.ShapeDtypeStruct((rows, d), jnp.uint8), jax.ShapeDtypeStruct((rows, d // BLOCK), jnp.float32))
    x = jax.lax.stop_gradient(x)
    axes = _varying_axes(x)
    codes, scales = (_vary(a, axes) for a in buffer_callback(QuantizeRowsCallback(), shapes)(x))
    return codes, scales


def dequantize_rows(codes: jax.Array, scales: jax.Array) -> jax.Array:
    """(codes (R, D) uint8 e4m3 bits, scales (R, D/128) fp32) -> (R, D) fp32 ``code * scale``, in JAX: the bits
    of :func:`fp8moe.quant.reference.dequantize_rowwise` (one fp32 product per element)."""
    values = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).astype(jnp.float32)
    return (values.reshape(*scales.shape, BLOCK) * scales[..., None]).reshape(codes.shape)


def _check_rows_fp8(x_fp8: object, num_tokens: int, d_model: int) -> tuple[jax.Array, jax.Array]:
    if not isinstance(x_fp8, (tuple, list)) or len(x_fp8) != 2:
        raise TypeError("x_fp8: expected a pair (codes, scales), e.g. from quantize_rows")
    codes, scales = x_fp8
    expected = ((num_tokens, d_model), (num_tokens, d_model // BLOCK))
    for name, a, dtypes, shape in (
        ("x_fp8[0]", codes, (jnp.dtype(jnp.uint8), jnp.dtype(jnp.float8_e4m3fn)), expected[0]),
        ("x_fp8[1]", scales, (jnp.dtype(jnp.float32),), expected[1]),
    ):
        _check(name, a, 2, dtypes)
        if tuple(a.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (from x's), got {tuple(a.shape)}")
    codes = jnp.asarray(codes)
    if codes.dtype != jnp.uint8:
        codes = jax.lax.bitcast_convert_type(codes, jnp.uint8)
    return jax.lax.stop_gradient(codes), jax.lax.stop_gradient(jnp.asarray(scales))


def _check_quantized(quantized: object, w1: jax.Array, w2: jax.Array) -> tuple[tuple[jax.Array, ...], ...]:
    if not isinstance(quantized, (tuple, list)) or len(quantized) != 2:
        raise TypeError("quantized_weights: expected a pair (quantize_weight(w_gate_up), quantize_weight(w_down))")
    result = []
    for name, q, w in zip(("quantized_weights[0]", "quantized_weights[1]"), quantized, (w1, w2)):
        if not isinstance(q, (tuple, list)) or len(q) != 4:
            raise TypeError(f"{name}: expected a QuantizedWeight (wq, sw, wq_t, sw_t)")
        e, n, k = w.shape
        expected = QuantizedWeight(
            ((e, n, k), jnp.uint8),
            ((e, n // BLOCK, k // BLOCK), jnp.float32),
            ((e, k, n), jnp.uint8),
            ((e, k // BLOCK, n // BLOCK), jnp.float32),
        )
        for field, a, (shape, dtype) in zip(QuantizedWeight._fields, q, expected):
            if not isinstance(a, (jax.Array, np.ndarray)) or tuple(a.shape) != shape or a.dtype != dtype:
                got = f"{getattr(a, 'dtype', type(a).__name__)} {tuple(getattr(a, 'shape', ()))}"
                raise ValueError(
                    f"{name}.{field}: expected {jnp.dtype(dtype)} {shape} (from the weight's shape), got {got}"
                )
        result.append(tuple(jnp.asarray(a) for a in q))
    return tuple(result)
