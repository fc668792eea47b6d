"""The interface every GEMM backend implements.

A backend computes the three GEMMs of one expert layer for the recipe in :mod:`fp8moe.quant` and owns
whatever group plan it needs (built from ``offsets`` inside its own methods). The quantized weight is
the one object shared between the forward and the backward, in one format for every backend:

- ``wq`` (E, N, K) e4m3 and ``sw`` (E, N/128, K/128) fp32: the forward operand, 128x128 blocks;
- ``wq_t`` (E, K, N) e4m3 and ``sw_t`` (E, K/128, N/128) fp32: the same values and scales transposed,
  the dgrad operand (empty tensors when no dgrad will run).

Every result can be written into a caller's buffer (``out_t``, ``out``, ``dx_out``, ``dw_out``: contiguous,
of the result's exact shape, dtype and device; that buffer is then returned). The JAX bridge uses this to
write straight into XLA's output buffers.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from fp8moe.validation import check_out


def into(name: str, out: Tensor | None, value: Tensor) -> Tensor:
    """``value``, or a copy of it in ``out`` (checked like :func:`check_out`) when ``out`` is given."""
    if out is None:
        return value
    return check_out(name, out, tuple(value.shape), value.dtype, value.device).copy_(value)


def cuda_capability_reason(device: torch.device, accepts: Callable[[int], bool], needs: str) -> str | None:
    """None when ``device`` is a CUDA GPU whose major compute capability ``accepts``, else why not
    (``needs``: what the backend needs, for the message)."""
    if device.type != "cuda":
        return f"needs a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return "needs a CUDA device, but torch sees none (a CPU build of torch, or no visible GPU)"
    major, minor = torch.cuda.get_device_capability(device)
    return None if accepts(major) else f"needs {needs}, got sm_{major}{minor}"


def check_grad_buffers(
    dy: Tensor,
    x: Tensor,
    num_groups: int,
    dx_dtype: torch.dtype,
    dw_dtype: torch.dtype,
    dx_out: Tensor | None,
    dw_out: Tensor | None,
) -> None:
    """Check the ``dx_out`` (M, K) / ``dw_out`` (E, N, K) buffers handed to :meth:`Backend.backward`."""
    if dx_out is not None:
        check_out("dx_out", dx_out, tuple(x.shape), dx_dtype, x.device)
    if dw_out is not None:
        check_out("dw_out", dw_out, (num_groups, dy.shape[1], x.shape[1]), dw_dtype, x.device)


class Backend(abc.ABC):
    """Forward, dgrad and wgrad of ``y[rows of e] = x[rows of e] @ w[e].T`` in blockwise FP8."""

    name: ClassVar[str]

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (None when it can)."""
        return None

    @abc.abstractmethod
    def quantize_weight(
        self, w: Tensor, transposed: bool, *, out_t: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """w (E, N, K) bf16/fp32 -> (wq, sw, wq_t, sw_t) as in the module docstring; ``out_t``: buffers
        for (wq_t, sw_t) when ``transposed``."""

    @abc.abstractmethod
    def forward(
        self, x: Tensor, wq: Tensor, sw: Tensor, offsets: Tensor, out_dtype: torch.dtype, *, out: Tensor | None = None
    ) -> Tensor:
        """x (M, K) bf16/fp32 row-major, offsets (E,) int32 cumulative ends -> y (M, N) ``out_dtype``
        (written into ``out`` when given).

        Rows at or past ``offsets[-1]`` are zero.
        """

    @abc.abstractmethod
    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        wq_t: Tensor,
        sw_t: Tensor,
        offsets: Tensor,
        need_dx: bool,
        need_dw: bool,
        dx_dtype: torch.dtype,
        dw_dtype: torch.dtype,
        *,
        dx_out: Tensor | None = None,
        dw_out: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """dy (M, N), x (M, K) -> (dx (M, K) ``dx_dtype`` or None, dw (E, N, K) ``dw_dtype`` or None),
        written into ``dx_out`` / ``dw_out`` when given.

        dgrad uses ``dy`` in 1x128 tiles along N; wgrad uses ``dy`` and ``x`` in 128x1 token tiles within
        each group (groups padded to 128 tokens with zeros). Rows of dx past ``offsets[-1]`` are zero.
        """
