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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.dlpack import DLDeviceType

from fp8moe.backends import load_backend
from fp8moe.plan import GroupLayout
from fp8moe.recipe import FP8_DTYPE

_CPU_DEVICES = (DLDeviceType.kDLCPU, DLDeviceType.kDLCUDAHost, DLDeviceType.kDLROCMHost)


def as_torch(buf: Any) -> Tensor:
    """A torch view of an XLA buffer (anything with ``__dlpack__``), zero copy. Do not keep it after the
    callback returns. Call it inside :func:`on_xla_stream` on a GPU."""
    return torch.from_dlpack(buf)


@functools.cache
def _external_stream(pointer: int, device_index: int) -> torch.cuda.ExternalStream:
    # Creating an ExternalStream costs 10-15 us; XLA's compute streams live as long as the process.
    return torch.cuda.ExternalStream(pointer, device=torch.device("cuda", device_index))


def _flushes_denormals() -> bool:
    """Whether this thread's floating-point mode flushes subnormals (XLA's CPU threads do)."""
    return (torch.tensor([2.0**-140]) * 1.0).item() == 0.0


@contextlib.contextmanager
def _ieee_denormals() -> Iterator[None]:
    """Run torch with IEEE subnormals on this thread (as it runs outside the callback), then restore the
    flush-to-zero mode XLA's thread had: the bridge then returns the torch op's bits for any input."""
    flushing = _flushes_denormals()
    if flushing:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(True)


@contextlib.contextmanager
def on_xla_stream(ctx: Any, buf: Any) -> Iterator[None]:
    """Make XLA's stream (and the device of ``buf``) current for torch; on the host, IEEE subnormals."""
    device_type, index = buf.__dlpack_device__()
    if device_type in _CPU_DEVICES:
        with _ieee_denormals():
            yield
        return
    with torch.cuda.stream(_external_stream(ctx.stream, index)):
        yield


def _fp8(buf_u8: Any) -> Tensor:
    return as_torch(buf_u8).view(FP8_DTYPE)


@dataclass(frozen=True)
class ForwardCallback:
    """``(ctx, out, x, w, offsets)``: plan the routing, quantize w, run the forward GEMM.

    ``out`` is ``(y,)``, then the residuals the backward needs: when ``with_dx`` the dgrad operand wq_t
    (E, K, N) uint8 (e4m3 bits) and sw_t (E, K/128, N/128) fp32; when ``with_dw`` x's token tiles xt
    (K * Mp,) uint8 and sxt (Mp/128, K) fp32; and, when either, the packed plan (int32).
    """

    backend: str
    out_dtype: torch.dtype
    with_dx: bool
    with_dw: bool

    def __call__(self, ctx: Any, out: Sequence[Any], x: Any, w: Any, offsets: Any) -> None:
        with on_xla_stream(ctx, x):
            x_t, w_t, offsets_t = as_torch(x), as_torch(w), as_torch(offsets)
            backend = load_backend(self.backend)
            results = iter(out[1:])
            out_t = (_fp8(next(results)), as_torch(next(results))) if self.with_dx else None
            tiles_out = (_fp8(next(results)), as_torch(next(results))) if self.with_dw else None
            plan = backend.plan(offsets_t, x_t.shape[0])
            if self.with_dx or self.with_dw:
                as_torch(next(results)).copy_(plan.data)
            wq, sw, _, _ = backend.quantize_weight(w_t, self.with_dx, out_t=out_t)
            backend.forward(
                x_t, wq, sw, plan, self.out_dtype, token_tiles=self.with_dw, out=as_torch(out[0]), tiles_out=tiles_out
            )


@dataclass(frozen=True)
class BackwardCallback:
    """``(ctx, out, dy, offsets, plan_data[, wq_t, sw_t][, xt, sxt])``: dgrad and/or wgrad.

    The residuals of :class:`ForwardCallback` (wq_t when ``need_dx``, xt when ``need_dw``). ``out`` holds
    dx (M, K) ``dx_dtype`` when ``need_dx``, then dw (E, N, K) ``dw_dtype`` when ``need_dw``.
    """

    backend: str
    need_dx: bool
    need_dw: bool
    dx_dtype: torch.dtype
    dw_dtype: torch.dtype

    def __call__(self, ctx: Any, out: Sequence[Any], dy: Any, offsets: Any, plan_data: Any, *residuals: Any) -> None:
        with on_xla_stream(ctx, dy):
            dy_t = as_torch(dy)
            plan = GroupLayout.from_data(as_torch(offsets), as_torch(plan_data), dy_t.shape[0])
            inputs = iter(residuals)
            empty_fp8 = torch.empty(0, dtype=FP8_DTYPE, device=dy_t.device)
            empty_f32 = torch.empty(0, dtype=torch.float32, device=dy_t.device)
            wq_t, sw_t = (_fp8(next(inputs)), as_torch(next(inputs))) if self.need_dx else (empty_fp8, empty_f32)
            xt, sxt = (_fp8(next(inputs)), as_torch(next(inputs))) if self.need_dw else (None, None)
            grads = iter(as_torch(buf) for buf in out)
            dx_out = next(grads) if self.need_dx else None
            dw_out = next(grads) if self.need_dw else None
            load_backend(self.backend).backward(
                dy_t,
                xt,
                sxt,
                wq_t,
                sw_t,
                plan,
                self.need_dx,
                self.need_dw,
                self.dx_dtype,
                self.dw_dtype,
                dx_out=dx_out,
                dw_out=dw_out,
            )


def _where_routed(a: Tensor, offsets: Tensor, out: Tensor) -> None:
    """``out = a`` on the rows before ``offsets[-1]`` and 0 after them (``torch._grouped_mm`` leaves those rows
    undefined), in one pass; ``offsets`` stays on the device."""
    routed = (torch.arange(a.shape[0], device=a.device) < offsets[-1]).unsqueeze(1)
    torch.where(routed, a, torch.zeros((), dtype=a.dtype, device=a.device), out=out)


@dataclass(frozen=True)
class Bf16ForwardCallback:
    """``(ctx, out, x, w, offsets)``: ``y = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)``, x (M, K)
    and w (E, N, K) bf16, written into ``out[0]`` (M, N) bf16 with the unrouted rows zeroed. No residuals:
    the backward reads x and w themselves."""

    def __call__(self, ctx: Any, out: Sequence[Any], x: Any, w: Any, offsets: Any) -> None:
        with on_xla_stream(ctx, x):
            offsets_t = as_torch(offsets)
            y = torch._grouped_mm(as_torch(x), as_torch(w).transpose(1, 2), offs=offsets_t)
            _where_routed(y, offsets_t, as_torch(out[0]))


@dataclass(frozen=True)
class Bf16BackwardCallback:
    """``(ctx, out, dy, offsets[, w][, x])``: the gradients of :class:`Bf16ForwardCallback`, bf16.

    ``w`` is passed when ``need_dx`` and ``x`` when ``need_dw``; ``out`` holds dx (M, K) when ``need_dx``
    (``torch._grouped_mm(dy, w, offs)``, unrouted rows zeroed), then dw (E, N, K) when ``need_dw``
    (``torch._grouped_mm(dy.T, x, offs)``, the K-grouped GEMM; an empty group gets zeros). These are the
    GEMMs torch's autograd runs for ``torch._grouped_mm``: the same bits.
    """

    need_dx: bool
    need_dw: bool

    def __call__(self, ctx: Any, out: Sequence[Any], dy: Any, offsets: Any, *operands: Any) -> None:
        with on_xla_stream(ctx, dy):
            dy_t, offsets_t = as_torch(dy), as_torch(offsets)
            inputs = iter(operands)
            grads = iter(out)
            if self.need_dx:
                dx = torch._grouped_mm(dy_t, as_torch(next(inputs)), offs=offsets_t)
                _where_routed(dx, offsets_t, as_torch(next(grads)))
            if self.need_dw:
                as_torch(next(grads)).copy_(torch._grouped_mm(dy_t.T, as_torch(next(inputs)), offs=offsets_t))
