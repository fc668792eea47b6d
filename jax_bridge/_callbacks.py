"""The torch side of the bridge: ``buffer_callback`` bodies that run an fp8moe backend on XLA's buffers.

Each callback receives ``(ctx, out, *args)``: XLA device buffers, valid only during the call. They are
wrapped as torch tensors through DLPack (zero copy), and the fp8moe backend that :func:`fp8moe.grouped_mm`
would run (the same methods its custom ops call, so the results are the same bits) is handed the torch
views of the ``out`` buffers to write into (the Triton kernels write there directly; see the backends'
``out`` parameters for the cases that copy). On a GPU everything is enqueued on XLA's own CUDA
stream (``ctx.stream``), so it is ordered with the surrounding XLA work without any synchronisation.

FP8 residuals cross as ``uint8`` buffers holding the e4m3 bits (viewed as ``torch.float8_e4m3fn`` on the
torch side): no torch version has to accept fp8 DLPack capsules.

The callbacks are frozen dataclasses: equal configurations hash equal, so JAX's compilation caches (eager
dispatch included) see one callback per configuration.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.dlpack import DLDeviceType

from fp8moe.backends import ENV_VAR, load_backend, resolve_backend_name
from fp8moe.recipe import FP8_DTYPE

_CPU_DEVICES = (DLDeviceType.kDLCPU, DLDeviceType.kDLCUDAHost, DLDeviceType.kDLROCMHost)


@functools.cache
def _backend_name(requested: str, env_override: str | None, device: torch.device) -> str:
    del env_override  # part of the cache key only: resolve_backend_name reads the environment itself
    return resolve_backend_name(requested, device)


def backend_name(requested: str, device: torch.device) -> str:
    """The fp8moe backend that ``requested`` ("auto" or a name) resolves to on ``device``; resolved once
    per (request, ``FP8MOE_BACKEND``, device), then cached."""
    return _backend_name(requested, os.environ.get(ENV_VAR), device)


def as_torch(buf: Any) -> Tensor:
    """A torch view of an XLA buffer (anything with ``__dlpack__``), zero copy. Do not keep it after the
    callback returns. Call it inside :func:`on_xla_stream` on a GPU."""
    return torch.from_dlpack(buf)


@functools.cache
def _external_stream(pointer: int, device_index: int) -> torch.cuda.ExternalStream:
    # Creating an ExternalStream costs 10-15 us; XLA's compute streams live as long as the process.
    return torch.cuda.ExternalStream(pointer, device=torch.device("cuda", device_index))


@contextlib.contextmanager
def on_xla_stream(ctx: Any, buf: Any) -> Iterator[None]:
    """Make XLA's stream (and the device of ``buf``) current for torch; a no-op for host buffers."""
    device_type, index = buf.__dlpack_device__()
    if device_type in _CPU_DEVICES:
        yield
        return
    with torch.cuda.stream(_external_stream(ctx.stream, index)):
        yield


def _fp8(buf_u8: Any) -> Tensor:
    return as_torch(buf_u8).view(FP8_DTYPE)


@dataclass(frozen=True)
class ForwardCallback:
    """``(ctx, out, x, w, offsets)``: quantize w, run the forward GEMM.

    ``out`` is ``(y,)``, or ``(y, wq_t, sw_t)`` with the dgrad operand when ``with_residuals``:
    y (M, N) ``out_dtype``, wq_t (E, K, N) uint8 (e4m3 bits), sw_t (E, K/128, N/128) fp32.
    """

    backend: str
    out_dtype: torch.dtype
    with_residuals: bool

    def __call__(self, ctx: Any, out: Sequence[Any], x: Any, w: Any, offsets: Any) -> None:
        with on_xla_stream(ctx, x):
            x_t, w_t, offsets_t = as_torch(x), as_torch(w), as_torch(offsets)
            backend = load_backend(backend_name(self.backend, x_t.device))
            out_t = (_fp8(out[1]), as_torch(out[2])) if self.with_residuals else None
            wq, sw, _, _ = backend.quantize_weight(w_t, self.with_residuals, out_t=out_t)
            backend.forward(x_t, wq, sw, offsets_t, self.out_dtype, out=as_torch(out[0]))


@dataclass(frozen=True)
class BackwardCallback:
    """``(ctx, out, dy, x, offsets[, wq_t, sw_t])``: dgrad and/or wgrad.

    dy (M, N), x (M, K), offsets (E,) int32, and when ``need_dx`` the forward's residuals wq_t (uint8
    e4m3 bits) and sw_t. ``out`` holds dx (M, K) ``dx_dtype`` when ``need_dx``, then dw (E, N, K)
    ``dw_dtype`` when ``need_dw``.
    """

    backend: str
    need_dx: bool
    need_dw: bool
    dx_dtype: torch.dtype
    dw_dtype: torch.dtype

    def __call__(self, ctx: Any, out: Sequence[Any], dy: Any, x: Any, offsets: Any, *residuals: Any) -> None:
        with on_xla_stream(ctx, dy):
            dy_t, x_t, offsets_t = as_torch(dy), as_torch(x), as_torch(offsets)
            if self.need_dx:
                wq_t, sw_t = _fp8(residuals[0]), as_torch(residuals[1])
            else:  # what quantize_weight(w, transposed=False) gives the torch op: empty operands
                wq_t = torch.empty(0, dtype=FP8_DTYPE, device=dy_t.device)
                sw_t = torch.empty(0, dtype=torch.float32, device=dy_t.device)
            backend = load_backend(backend_name(self.backend, x_t.device))
            grads = iter(as_torch(buf) for buf in out)
            dx_out = next(grads) if self.need_dx else None
            dw_out = next(grads) if self.need_dw else None
            backend.backward(
                dy_t,
                x_t,
                wq_t,
                sw_t,
                offsets_t,
                self.need_dx,
                self.need_dw,
                self.dx_dtype,
                self.dw_dtype,
                dx_out=dx_out,
                dw_out=dw_out,
            )
