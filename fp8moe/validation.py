"""Argument checks for the public ops: ``TypeError``/``ValueError`` naming the argument and the expectation."""

from __future__ import annotations

import torch
from torch import Tensor

from fp8moe.plan import GroupLayout
from fp8moe.recipe import BLOCK

INPUT_DTYPES = (torch.bfloat16, torch.float32)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {dtypes}, got {t.dtype}")
    return t


def _contiguous(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous row-major tensor (strides {_row_major_strides(t)}), "
            f"got strides {t.stride()}"
        )


def _row_major_strides(t: Tensor) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(t.shape):
        strides.append(acc)
        acc *= size
    return tuple(reversed(strides))


def check_grouped_mm_args(x: object, w: object, offsets: object, out_dtype: object) -> None:
    """Check the arguments of :func:`fp8moe.grouped_mm` (see its docstring for the contract).

    Shape, dtype, device and stride rules cost nothing and always run. The rules on the *values* of
    ``offsets`` (non-negative, non-decreasing, last <= M) need a host read: :func:`check_offsets_values`.
    """
    x = _tensor("x", x, 2, INPUT_DTYPES)
    w = _tensor("w", w, 3, INPUT_DTYPES)
    offsets = _tensor("offsets", offsets, 1, (torch.int32,))
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in OUTPUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {OUTPUT_DTYPES}, got {out_dtype!r}")
    if w.device != x.device:
        raise ValueError(f"w: expected device {x.device} (that of x), got {w.device}")
    if offsets.device != x.device:
        raise ValueError(f"offsets: expected device {x.device} (that of x), got {offsets.device}")
    _contiguous("x", x)
    _contiguous("w", w)
    _contiguous("offsets", offsets)
    check_grouped_mm_shapes(tuple(x.shape), tuple(w.shape), tuple(offsets.shape))


def check_main_grad(main_grad: object, w: Tensor) -> Tensor:
    """Raise unless ``main_grad`` is an fp32 contiguous tensor of w's shape on w's device."""
    if not isinstance(main_grad, Tensor):
        raise TypeError(f"main_grad: expected a torch.Tensor or None, got {type(main_grad).__name__}")
    if main_grad.requires_grad:
        raise ValueError("main_grad: expected a buffer that does not require grad")
    return check_out("main_grad", main_grad, tuple(w.shape), torch.float32, w.device)


def check_plan(plan: object, offsets: Tensor, num_rows: int) -> None:
    """Raise unless ``plan`` is the GroupLayout of ``offsets`` for ``num_rows`` rows."""
    if not isinstance(plan, GroupLayout):
        raise TypeError(f"plan: expected a GroupLayout (fp8moe.plan_groups) or None, got {type(plan).__name__}")
    if plan.offsets is not offsets or plan.num_rows != num_rows:
        raise ValueError(
            f"plan: expected the plan of these offsets for M = {num_rows} rows (fp8moe.plan_groups(offsets, M)), "
            f"got a plan of {plan.num_rows} rows for {'these' if plan.offsets is offsets else 'other'} offsets"
        )


def check_grouped_mm_shapes(x_shape: tuple[int, int], w_shape: tuple[int, int, int], offsets_shape: tuple[int]) -> None:
    """The rules between the shapes of x (M, K), w (E, N, K) and offsets (E,), on plain tuples.

    Framework-neutral (the torch op and the JAX bridge share it); the ranks are checked before.
    """
    k = x_shape[1]
    e, n, wk = w_shape
    if k % BLOCK:
        raise ValueError(f"x: K = x.shape[1] must be a multiple of {BLOCK}, got {k}")
    if n % BLOCK:
        raise ValueError(f"w: N = w.shape[1] must be a multiple of {BLOCK}, got {n}")
    if wk != k:
        raise ValueError(f"w: expected w.shape[2] == K == x.shape[1] == {k}, got {wk}")
    if e == 0:
        raise ValueError("w: expected at least one expert, got w.shape[0] == 0")
    if offsets_shape[0] != e:
        raise ValueError(f"offsets: expected shape ({e},) (one end offset per expert of w), got {offsets_shape}")


def check_offsets_values(offsets: Tensor, num_rows: int) -> None:
    """Host-side check that ``offsets`` is non-negative, non-decreasing and ends at or before ``num_rows``."""
    values = offsets.tolist()
    if values and values[0] < 0:
        raise ValueError(f"offsets: expected non-negative values, got offsets[0] = {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(
                f"offsets: expected non-decreasing values, got offsets[{i}] = {values[i]} < "
                f"offsets[{i - 1}] = {values[i - 1]}"
            )
    if values and values[-1] > num_rows:
        raise ValueError(f"offsets: expected offsets[-1] <= M = {num_rows}, got {values[-1]}")


def check_out(name: str, out: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Raise unless ``out`` is a contiguous tensor of ``shape``, ``dtype`` and ``device``; return it."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {out.dtype}")
    if tuple(out.shape) != tuple(shape) or not out.is_contiguous() or out.device != device:
        raise ValueError(
            f"{name}: expected a contiguous tensor of shape {tuple(shape)} on {device}, got shape "
            f"{tuple(out.shape)}, strides {out.stride()} on {out.device}"
        )
    return out
