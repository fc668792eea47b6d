"""``jax_bridge.grouped_mm``: fp8moe's blockwise-FP8 grouped GEMM as a ``jax.custom_vjp``.

The forward and the backward are each one ``jax.experimental.buffer_callback`` running the torch
backend (see :mod:`jax_bridge._callbacks`). The custom VJP uses symbolic zeros, so, as in the torch
autograd function, only the GEMMs whose gradients are needed run: the forward keeps the transposed
quantized weight only when ``dx`` will be needed, and the backward computes ``dx`` and ``dw`` only for
the inputs being differentiated.

Residuals (everything the backward needs is an input or output of a callback): ``x``, ``offsets`` and,
when ``dx`` is needed, the forward callback's extra outputs ``wq_t`` (E, K, N) (e4m3 bits as uint8) and
``sw_t`` (E, K/128, N/128) fp32: the weight is quantized once per step, as in torch.
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

from fp8moe.recipe import BLOCK
from fp8moe.validation import check_grouped_mm_shapes
from jax_bridge._callbacks import BackwardCallback, ForwardCallback, backend_name

INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
OUTPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_TORCH_DTYPES = {
    jnp.dtype(jnp.bfloat16): torch.bfloat16,
    jnp.dtype(jnp.float16): torch.float16,
    jnp.dtype(jnp.float32): torch.float32,
}


@dataclass(frozen=True)
class _Config:
    """Static configuration of one call (a ``nondiff_argnums`` argument: hashable, never traced)."""

    backend: str
    out_dtype: np.dtype


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["x", "offsets", "weight_t"],
    meta_fields=["need_dx", "need_dw", "w_dtype"],
)
@dataclass(frozen=True)
class _Residuals:
    """What the backward needs: x, offsets, the dgrad weight operand (wq_t, sw_t) when ``need_dx`` (else
    ``()``); which gradients to compute and w's dtype are static."""

    x: jax.Array
    offsets: jax.Array
    weight_t: tuple[jax.Array, ...]
    need_dx: bool
    need_dw: bool
    w_dtype: np.dtype


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


def _forward(cfg: _Config, x: jax.Array, w: jax.Array, offsets: jax.Array, with_residuals: bool) -> list[jax.Array]:
    """y (M, N) ``cfg.out_dtype``, then wq_t (E, K, N) uint8 and sw_t (E, K/128, N/128) fp32 if asked."""
    (m, k), (e, n, _) = x.shape, w.shape
    shapes = [jax.ShapeDtypeStruct((m, n), cfg.out_dtype)]
    if with_residuals:
        shapes += [
            jax.ShapeDtypeStruct((e, k, n), jnp.uint8),
            jax.ShapeDtypeStruct((e, k // BLOCK, n // BLOCK), jnp.float32),
        ]
    callback = ForwardCallback(cfg.backend, _TORCH_DTYPES[cfg.out_dtype], with_residuals)
    axes = _varying_axes(x)
    return [_vary(out, axes) for out in buffer_callback(callback, tuple(shapes))(x, w, offsets)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_mm(x: jax.Array, w: jax.Array, offsets: jax.Array, cfg: _Config) -> jax.Array:
    return _forward(cfg, x, w, offsets, with_residuals=False)[0]


def _grouped_mm_fwd(
    x: CustomVJPPrimal, w: CustomVJPPrimal, offsets: CustomVJPPrimal, cfg: _Config
) -> tuple[jax.Array, _Residuals]:
    need_dx, need_dw = x.perturbed, w.perturbed
    y, *weight_t = _forward(cfg, x.value, w.value, offsets.value, with_residuals=need_dx)
    return y, _Residuals(x.value, offsets.value, tuple(weight_t), need_dx, need_dw, w.value.dtype)


def _grouped_mm_bwd(cfg: _Config, res: _Residuals, dy: jax.Array | SymbolicZero) -> tuple[Any, ...]:
    if isinstance(dy, SymbolicZero) or not (res.need_dx or res.need_dw):
        return None, None, None
    (m, k), e, n = res.x.shape, res.offsets.shape[0], dy.shape[1]
    shapes = ([jax.ShapeDtypeStruct((m, k), res.x.dtype)] if res.need_dx else []) + (
        [jax.ShapeDtypeStruct((e, n, k), res.w_dtype)] if res.need_dw else []
    )
    callback = BackwardCallback(
        cfg.backend, res.need_dx, res.need_dw, _TORCH_DTYPES[res.x.dtype], _TORCH_DTYPES[res.w_dtype]
    )
    axes = _varying_axes(res.x)
    grads = iter(
        _vary(g, axes) for g in buffer_callback(callback, tuple(shapes))(dy, res.x, res.offsets, *res.weight_t)
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

    Returns:
        y: (M, N) ``out_dtype``. Differentiable in ``x`` and ``w`` (cotangents in their dtypes; none for
        ``offsets``) under ``jax.grad``/``jax.vjp``, ``jax.jit``, ``lax.scan`` and ``jax.checkpoint``.
        Not batchable with ``jax.vmap``. One device per call: inside ``jax.shard_map`` each device runs its
        own; a weight replicated over the mesh then gets its gradient summed over the devices.

    K and N must be multiples of 128. Bad shapes or dtypes raise ``TypeError``/``ValueError`` naming the
    argument, at trace time, with the rules of the torch op.
    """
    _check_array("x", x, 2, INPUT_DTYPES)
    _check_array("w", w, 3, INPUT_DTYPES)
    _check_array("offsets", offsets, 1, (jnp.dtype(jnp.int32),))
    dtype = _out_dtype(out_dtype)
    check_grouped_mm_shapes(tuple(x.shape), tuple(w.shape), tuple(offsets.shape))
    # Resolve once at trace time, for the errors (unknown or unusable backend) to surface here; the
    # callbacks resolve again (cached) for the device the buffers are actually on.
    backend_name(backend, _torch_device(_platform_of(x)))
    # Inside shard_map: give all operands the same varying axes (a replicated w then gets its gradient summed).
    axes = _varying_axes(x) | _varying_axes(w) | _varying_axes(offsets)
    return _grouped_mm(_vary(x, axes), _vary(w, axes), _vary(offsets, axes), _Config(backend, dtype))
