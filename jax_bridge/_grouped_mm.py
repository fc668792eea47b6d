"""``jax_bridge.grouped_mm``: fp8moe's blockwise-FP8 grouped GEMM as a ``jax.custom_vjp``;
``jax_bridge.grouped_mm_bf16``: ``torch._grouped_mm`` in bf16 through the same bridge.

The forward and the backward are each one ``jax.experimental.buffer_callback`` running the torch
backend (see :mod:`jax_bridge._callbacks`). The custom VJP uses symbolic zeros, so, as in the torch
autograd function, only the GEMMs whose gradients are needed run: the forward keeps the transposed
quantized weight only when ``dx`` will be needed, and the backward computes ``dx`` and ``dw`` only for
the inputs being differentiated.

Residuals (everything the backward needs is an input or output of a callback), what the torch op saves:
``offsets`` and the packed group plan (int32), the dgrad weight operand ``wq_t`` (E, K, N) (e4m3 bits as
uint8) and ``sw_t`` (E, K/128, N/128) fp32 when ``dx`` is needed (the weight is quantized once per step),
and x's 128x1 token tiles ``xt`` (K * Mp,) uint8 and ``sxt`` (Mp/128, K) fp32 when ``dw`` is needed
(FP8, not x: half of x's bytes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jax.experimental.buffer_callback import buffer_callback

from fp8moe.backends import check_wgrad, resolve_backend
from fp8moe.plan import padded_rows_bound, plan_data_size
from fp8moe.recipe import BLOCK
from fp8moe.validation import check_grouped_mm_shapes
from jax_bridge._callbacks import BackwardCallback, Bf16BackwardCallback, Bf16ForwardCallback, ForwardCallback

INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
OUTPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_TORCH_DTYPES = {
    jnp.dtype(jnp.bfloat16): torch.bfloat16,
    jnp.dtype(jnp.float16): torch.float16,
    jnp.dtype(jnp.float32): torch.float32,
}


@dataclass(frozen=True)
class _Config:
    """Static configuration of one call (a ``nondiff_argnums`` argument: hashable, never traced);
    ``backend`` is the resolved backend's key (:func:`fp8moe.backends.resolve_backend`)."""

    backend: str
    out_dtype: np.dtype


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["offsets", "plan", "saved"],
    meta_fields=["need_dx", "need_dw", "x_dtype", "w_dtype", "k"],
)
@dataclass(frozen=True)
class _Residuals:
    """What the backward needs: offsets, the packed plan, then (wq_t, sw_t) when ``need_dx`` and (xt, sxt)
    when ``need_dw``; which gradients to compute, the dtypes of x and w and K are static."""

    offsets: jax.Array
    plan: jax.Array
    saved: tuple[jax.Array, ...]
    need_dx: bool
    need_dw: bool
    x_dtype: np.dtype
    w_dtype: np.dtype
    k: int


def _check_array(name: str, a: object, ndim: int, dtypes: tuple[np.dtype, ...]) -> None:
    if not isinstance(a, (jax.Array, np.ndarray)):
        raise TypeError(f"{name}: expected a jax.Array, got {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(a.shape)}")
    if a.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {tuple(str(d) for d in dtypes)}, got {a.dtype}")


def _out_dtype(out_dtype: object) -> np.dtype:
    try:
        dtype = jnp.dtype(out_dtype)
    except (TypeError, ValueError):  # not a dtype at all
        dtype = None
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {tuple(str(d) for d in OUTPUT_DTYPES)}, got {out_dtype!r}")
    return dtype


def _platform_of(x: object) -> str:
    """The platform the computation on ``x`` will run on, as far as trace time can tell: the device of a
    concrete array, else the default device (which is what ``jax.jit`` uses for uncommitted inputs)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return next(iter(x.devices())).platform
    default = jax.config.jax_default_device
    if default is not None:
        return getattr(default, "platform", default)
    return jax.default_backend()


def _torch_device(platform: str) -> torch.device:
    if platform == "cpu":
        return torch.device("cpu")
    if platform in ("gpu", "cuda", "rocm"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"jax_bridge: JAX runs on {platform} but this torch ({torch.__version__}) has no GPU support"
            )
        return torch.device("cuda")
    raise RuntimeError(f"jax_bridge: buffer callbacks run on CPU and CUDA/ROCm devices only, got platform {platform!r}")


def _varying_axes(a: jax.Array) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) over which ``a`` varies; empty elsewhere (and on JAX
    versions without manual axis types)."""
    mat = getattr(jax.typeof(a), "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def _vary(a: jax.Array, axes: frozenset) -> jax.Array:
    """``a`` marked as varying over ``axes`` (a no-op outside shard_map). buffer_callback's results carry no
    varying axes, so the bridge marks them; marking inputs makes JAX psum the cotangent of a replicated one."""
    missing = tuple(sorted(axes - _varying_axes(a), key=str))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def _forward(
    cfg: _Config, x: jax.Array, w: jax.Array, offsets: jax.Array, with_dx: bool, with_dw: bool
) -> list[jax.Array]:
    """y (M, N) ``cfg.out_dtype``, then the residuals of :class:`jax_bridge._callbacks.ForwardCallback`."""
    (m, k), (e, n, _) = x.shape, w.shape
    mp = padded_rows_bound(m, e)
    shapes = [jax.ShapeDtypeStruct((m, n), cfg.out_dtype)]
    if with_dx:
        shapes += [
            jax.ShapeDtypeStruct((e, k, n), jnp.uint8),
            jax.ShapeDtypeStruct((e, k // BLOCK, n // BLOCK), jnp.float32),
        ]
    if with_dw:
        shapes += [jax.ShapeDtypeStruct((k * mp,), jnp.uint8), jax.ShapeDtypeStruct((mp // BLOCK, k), jnp.float32)]
    if with_dx or with_dw:
        shapes += [jax.ShapeDtypeStruct((plan_data_size(m, e),), jnp.int32)]
    callback = ForwardCallback(cfg.backend, _TORCH_DTYPES[cfg.out_dtype], with_dx, with_dw)
    axes = _varying_axes(x)
    return [_vary(out, axes) for out in buffer_callback(callback, tuple(shapes))(x, w, offsets)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_mm(x: jax.Array, w: jax.Array, offsets: jax.Array, cfg: _Config) -> jax.Array:
    return _forward(cfg, x, w, offsets, with_dx=False, with_dw=False)[0]


def _grouped_mm_fwd(
    x: CustomVJPPrimal, w: CustomVJPPrimal, offsets: CustomVJPPrimal, cfg: _Config
) -> tuple[jax.Array, _Residuals | None]:
    need_dx, need_dw = x.perturbed, w.perturbed
    y, *residuals = _forward(cfg, x.value, w.value, offsets.value, with_dx=need_dx, with_dw=need_dw)
    if not residuals:
        return y, None
    *saved, plan = residuals
    res = _Residuals(
        offsets.value, plan, tuple(saved), need_dx, need_dw, x.value.dtype, w.value.dtype, x.value.shape[1]
    )
    return y, res


def _grouped_mm_bwd(cfg: _Config, res: _Residuals | None, dy: jax.Array | SymbolicZero) -> tuple[Any, ...]:
    if isinstance(dy, SymbolicZero) or res is None:
        return None, None, None
    (m, n), e, k = dy.shape, res.offsets.shape[0], res.k
    shapes = ([jax.ShapeDtypeStruct((m, k), res.x_dtype)] if res.need_dx else []) + (
        [jax.ShapeDtypeStruct((e, n, k), res.w_dtype)] if res.need_dw else []
    )
    callback = BackwardCallback(
        cfg.backend, res.need_dx, res.need_dw, _TORCH_DTYPES[res.x_dtype], _TORCH_DTYPES[res.w_dtype]
    )
    axes = _varying_axes(dy) | _varying_axes(res.offsets)
    grads = iter(
        _vary(g, axes) for g in buffer_callback(callback, tuple(shapes))(dy, res.offsets, res.plan, *res.saved)
    )
    dx = next(grads) if res.need_dx else None
    dw = next(grads) if res.need_dw else None
    return dx, dw, None


_grouped_mm.defvjp(_grouped_mm_fwd, _grouped_mm_bwd, symbolic_zeros=True)


def grouped_mm(
    x: jax.Array,
    w: jax.Array,
    offsets: jax.Array,
    *,
    backend: str = "auto",
    out_dtype: Any = jnp.bfloat16,
    wgrad: str | None = None,
) -> jax.Array:
    """Blockwise-FP8 grouped GEMM ``y[rows of e] = x[rows of e] @ w[e].T``, the JAX face of
    :func:`fp8moe.grouped_mm` (same shapes, dtypes, recipe and bits).

    Args:
        x: (M, K) bfloat16 or float32; tokens sorted by expert.
        w: (E, N, K) bfloat16 or float32; a stack of per-expert weights (out x in).
        offsets: (E,) int32, cumulative end row of each expert's group: non-decreasing, ``offsets[-1] <= M``
            (not checked: its values are never read on the host). May be traced. Empty groups are allowed;
            rows at or past ``offsets[-1]`` get zero output and zero gradient.
        backend: "auto" | "reference" | "triton" | "deepgemm" (``FP8MOE_BACKEND`` overrides "auto"); the
            torch backend run by the callbacks ("reference" on CPU).
        out_dtype: dtype of ``y``: bfloat16, float16 or float32.
        wgrad: the K-grouped GEMM of the weight gradient, as in :func:`fp8moe.grouped_mm`.

    Returns:
        y: (M, N) ``out_dtype``. Differentiable in ``x`` and ``w`` (cotangents in their dtypes; none for
        ``offsets``) under ``jax.grad``/``jax.vjp``, ``jax.jit``, ``lax.scan`` and ``jax.checkpoint``.
        Not batchable with ``jax.vmap``. One device per call: inside ``jax.shard_map`` each device runs its
        own; a weight replicated over the mesh then gets its gradient summed over the devices.

    K and N must be multiples of 128. Bad shapes or dtypes raise ``TypeError``/``ValueError`` naming the
    argument, at trace time, with the rules of the torch op.
    """
    axes = _check_args(x, w, offsets)
    dtype = _out_dtype(out_dtype)
    # Resolved once, at trace time (errors surface here); the callbacks load the resolved key.
    key = resolve_backend(backend, _torch_device(_platform_of(x)), check_wgrad(wgrad))
    # Inside shard_map: give all operands the same varying axes (a replicated w then gets its gradient summed).
    return _grouped_mm(_vary(x, axes), _vary(w, axes), _vary(offsets, axes), _Config(key, dtype))


# --- bf16: torch._grouped_mm through the same bridge ---------------------------------------------------------


def _check_args(x: object, w: object, offsets: object) -> frozenset:
    """The argument rules of :func:`grouped_mm` (trace time); the varying manual axes of the operands."""
    _check_array("x", x, 2, INPUT_DTYPES)
    _check_array("w", w, 3, INPUT_DTYPES)
    _check_array("offsets", offsets, 1, (jnp.dtype(jnp.int32),))
    check_grouped_mm_shapes(tuple(x.shape), tuple(w.shape), tuple(offsets.shape))
    return _varying_axes(x) | _varying_axes(w) | _varying_axes(offsets)


def _forward_bf16(x: jax.Array, w: jax.Array, offsets: jax.Array) -> jax.Array:
    shape = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.bfloat16)
    (y,) = buffer_callback(Bf16ForwardCallback(), (shape,))(x, w, offsets)
    return _vary(y, _varying_axes(x))


@jax.custom_vjp
def _grouped_mm_bf16(x: jax.Array, w: jax.Array, offsets: jax.Array) -> jax.Array:
    return _forward_bf16(x, w, offsets)


def _grouped_mm_bf16_fwd(
    x: CustomVJPPrimal, w: CustomVJPPrimal, offsets: CustomVJPPrimal
) -> tuple[jax.Array, tuple[jax.Array, jax.Array | None, jax.Array | None] | None]:
    y = _forward_bf16(x.value, w.value, offsets.value)
    if not (x.perturbed or w.perturbed):
        return y, None
    # dx needs w and dw needs x: the residuals are the inputs themselves (no copies), only those needed.
    return y, (offsets.value, w.value if x.perturbed else None, x.value if w.perturbed else None)


def _grouped_mm_bf16_bwd(res: tuple | None, dy: jax.Array | SymbolicZero) -> tuple[Any, ...]:
    if isinstance(dy, SymbolicZero) or res is None:
        return None, None, None
    offsets, w, x = res
    need_dx, need_dw = w is not None, x is not None
    m, n = dy.shape
    shapes = ([jax.ShapeDtypeStruct((m, w.shape[2]), jnp.bfloat16)] if need_dx else []) + (
        [jax.ShapeDtypeStruct((offsets.shape[0], n, x.shape[1]), jnp.bfloat16)] if need_dw else []
    )
    operands = [a for a in (w, x) if a is not None]
    axes = _varying_axes(dy) | _varying_axes(offsets)
    callback = Bf16BackwardCallback(need_dx, need_dw)
    grads = iter(_vary(g, axes) for g in buffer_callback(callback, tuple(shapes))(dy, offsets, *operands))
    dx = next(grads) if need_dx else None
    dw = next(grads) if need_dw else None
    return dx, dw, None


_grouped_mm_bf16.defvjp(_grouped_mm_bf16_fwd, _grouped_mm_bf16_bwd, symbolic_zeros=True)


def grouped_mm_bf16(x: jax.Array, w: jax.Array, offsets: jax.Array) -> jax.Array:
    """bf16 grouped GEMM ``y[rows of e] = x[rows of e] @ w[e].T`` running ``torch._grouped_mm`` through the
    bridge (cuBLAS/CUTLASS grouped GEMM on a GPU; zero copy, on XLA's stream), with the argument rules of
    :func:`grouped_mm`.

    Args:
        x: (M, K) bfloat16 or float32; tokens sorted by expert.
        w: (E, N, K) bfloat16 or float32 (e.g. fp32 master weights).
        offsets: (E,) int32, cumulative end row of each expert's group, as in :func:`grouped_mm` (may be
            traced; never read on the host). Rows at or past ``offsets[-1]`` get zero output and zero
            gradient; an empty group's weight gets a zero gradient.

    Returns:
        y: (M, N) bfloat16. x and w are cast to bf16 in JAX (an XLA convert, before the callback), so the
        GEMM is ``torch._grouped_mm`` on bf16 operands with fp32 accumulation, the bits torch gives for
        ``torch._grouped_mm(x.bfloat16(), w.bfloat16().transpose(1, 2), offs=offsets)`` (and its autograd
        gradients, cast back to x's and w's dtypes by the transpose of the cast). Only the gradients needed
        run (dgrad for x, the K-grouped wgrad for w). Same transformations and limits as :func:`grouped_mm`
        (jit, grad, scan, checkpoint, shard_map; no vmap).

    K and N must be multiples of 128, as for :func:`grouped_mm` (``torch._grouped_mm`` itself needs only
    16-byte aligned rows; the rules are kept identical so the two are interchangeable). Bad shapes or
    dtypes raise ``TypeError``/``ValueError`` naming the argument, at trace time.
    """
    axes = _check_args(x, w, offsets)
    _torch_device(_platform_of(x))  # CPU/CUDA/ROCm only, and a torch with the GPU JAX runs on
    # Marked varying before the cast: a replicated w's gradient is summed over the devices in w's dtype.
    bf16 = jnp.bfloat16
    return _grouped_mm_bf16(_vary(x, axes).astype(bf16), _vary(w, axes).astype(bf16), _vary(offsets, axes))
