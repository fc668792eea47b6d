"""One orchestration of the three GEMMs of an expert layer, composed from providers with one signature.

A :class:`Backend` is a quantizer (the recipe into the GEMM layouts) plus two GEMM providers: an
M-grouped one (forward and dgrad) and a K-grouped one (wgrad). Every provider reads and writes the same
layouts (``Mp`` = ``plan.num_padded_rows``, C = columns, E = groups):

- *rows*: 1x128 tiles in the 128-row-padded grouped layout, values ``(Mp, C)`` e4m3 row-major and scales
  ``(C/128, Mp)`` fp32 (padding rows: value 0, scale 0);
- *token tiles*: 128x1 tiles within each group, values flat ``(C * Mp,)`` e4m3 with group g a row-major
  (C, k_g) block at element ``C * padded_starts[g]`` (``k_g = padded_sizes[g]``), scales ``(Mp/128, C)``;
- *weight*: 128x128 blocks, ``wq`` (E, N, K) with ``sw`` (E, N/128, K/128), and the dgrad operand ``wq_t``
  (E, K, N) with ``sw_t`` (E, K/128, N/128): the same values and scales transposed.

So any quantizer feeds any GEMM: the DeepGEMM backend is the Triton quantizer with DeepGEMM's GEMMs, and
the wgrad provider is an option of every backend (``Backend.wgrad``).

Forward ``y = x @ w[e].T``: x is read once into its rows (the GEMM operand) and, when the weight
gradient will be needed, its token tiles, which the caller saves for the backward instead of x. Backward:
dy read once into both layouts; dgrad ``dx = dy @ w[e]`` on the rows; wgrad ``dw[e] = dy_e^T x_e`` on the
token tiles, written in ``dw_dtype`` or added into an fp32 gradient-accumulation buffer (``main_grad``).
Every result can be written into a caller's buffer (``out``, ``dx_out``, ``dw_out``, ``out_t``), which is
how the JAX bridge writes straight into XLA's buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from fp8moe.plan import GroupLayout, plan_groups
from fp8moe.validation import check_out


class Quantizer(Protocol):
    """The recipe of :mod:`fp8moe.recipe` written into the GEMM layouts."""

    def tokens(
        self, x: Tensor, plan: GroupLayout, rows: bool, token_tiles: bool, tiles_out: tuple | None = None
    ) -> tuple[Tensor, ...]:
        """x (M, C) -> the rows pair (if ``rows``) then the token-tile pair (if ``token_tiles``; written into
        ``tiles_out``, a (values, scales) pair of buffers, when given)."""

    def weight(self, w: Tensor, transposed: bool, out_t: tuple[Tensor, Tensor] | None) -> tuple[Tensor, ...]:
        """w (E, N, K) -> (wq, sw, wq_t, sw_t); the last two are empty tensors unless ``transposed``."""


class MGroupedGemm(Protocol):
    def __call__(
        self,
        a: Tensor,
        sa: Tensor,
        b: Tensor,
        sb: Tensor,
        plan: GroupLayout,
        out_dtype: torch.dtype,
        out: Tensor | None,
        padded: bool = False,
        low_memory: bool = False,
    ) -> Tensor:
        """a rows (Mp, K) @ b[g] (N, K)^T per group -> (M, N) ``out_dtype`` in unpadded order (into ``out``
        when given); rows at or past ``offsets[-1]`` are zero.

        ``padded=True``: the result stays in the 128-row-padded layout of ``a``, (Mp, N) ``out_dtype`` (into
        ``out`` of that shape when given), with no unpadding pass: the rows of the plan's groups hold the
        products, every other row (padding between groups, the tail past the last group) is unspecified
        (zero on the reference backend, garbage elsewhere) and must not be read. This is how the fused MoE
        block keeps its activations padded between its GEMMs.

        ``low_memory=True`` (the backward's dgrad): keep temporaries small, at the cost of more launches if
        need be (the DeepGEMM provider makes its padded result in runs of rows); the same values."""


# wgrad(a, sa, b, sb, out_dtype, out, accumulate) -> (E, N, K): a, b token tiles of dy and x
WgradGemm = Callable[[Tensor, Tensor, Tensor, Tensor, torch.dtype, "Tensor | None", bool], Tensor]


class KGroupedGemm(Protocol):
    """May also define ``prefetch(plan)``, called by a forward whose weight gradient will follow (a provider
    that needs host values starts reading them there)."""

    def prepare(self, plan: GroupLayout) -> WgradGemm:
        """The wgrad GEMM for ``plan``, prepared at the top of the backward and called at its end."""


@dataclass(frozen=True)
class Provider:
    """A named part of a backend and the check of whether it can run on a device."""

    name: str
    impl: object
    unavailable_reason: Callable[[torch.device], str | None]


def cuda_capability_reason(device: torch.device, accepts: Callable[[int], bool], needs: str) -> str | None:
    """None when ``device`` is a CUDA GPU whose major compute capability ``accepts``, else why not
    (``needs``: what the backend needs, for the message)."""
    if device.type != "cuda":
        return f"needs a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return "needs a CUDA device, but torch sees none (a CPU build of torch, or no visible GPU)"
    major, minor = torch.cuda.get_device_capability(device)
    return None if accepts(major) else f"needs {needs}, got sm_{major}{minor}"


def into(name: str, out: Tensor | None, value: Tensor) -> Tensor:
    """``value``, or a copy of it in ``out`` (checked like :func:`check_out`) when ``out`` is given."""
    if out is None:
        return value
    return check_out(name, out, tuple(value.shape), value.dtype, value.device).copy_(value)


@dataclass(frozen=True)
class Backend:
    """Forward, dgrad and wgrad of ``y[rows of e] = x[rows of e] @ w[e].T`` in blockwise FP8.

    Attributes:
        name: the backend's name ("reference", "triton", "deepgemm").
        wgrad: the name of the K-grouped GEMM provider that computes the weight gradient.
        quantizer, m_grouped, k_grouped: the providers (see the module docstring).
    """

    name: str
    wgrad: str
    quantizer: Quantizer
    m_grouped: MGroupedGemm
    k_grouped: KGroupedGemm

    @property
    def key(self) -> str:
        """``name``, or ``name/wgrad=<provider>`` when the wgrad provider is not the backend's own."""
        return self.name if self.wgrad == self.name else f"{self.name}/wgrad={self.wgrad}"

    def plan(self, offsets: Tensor, num_rows: int) -> GroupLayout:
        return plan_groups(offsets, num_rows)

    def quantize_weight(
        self, w: Tensor, transposed: bool, *, out_t: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """w (E, N, K) bf16/fp32 -> (wq, sw, wq_t, sw_t); ``out_t``: buffers for (wq_t, sw_t)."""
        return self.quantizer.weight(w, transposed, out_t)

    def forward(
        self,
        x: Tensor,
        wq: Tensor,
        sw: Tensor,
        plan: GroupLayout,
        out_dtype: torch.dtype,
        *,
        token_tiles: bool = False,
        out: Tensor | None = None,
        tiles_out: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (M, K) -> (y (M, N) ``out_dtype``, xt, sxt): x's token tiles (the wgrad operand, from the same
        read of x) when ``token_tiles``, else None; ``tiles_out``: buffers for (xt, sxt)."""
        if token_tiles and hasattr(self.k_grouped, "prefetch"):
            self.k_grouped.prefetch(plan)  # what the weight gradient's provider will need from the host
        xq, sx, *tiles = self.quantizer.tokens(x, plan, True, token_tiles, tiles_out)
        y = self.m_grouped(xq, sx, wq, sw, plan, out_dtype, out)
        xt, sxt = tiles if token_tiles else (None, None)
        return y, xt, sxt

    def backward(
        self,
        dy: Tensor,
        xt: Tensor | None,
        sxt: Tensor | None,
        wq_t: Tensor,
        sw_t: Tensor,
        plan: GroupLayout,
        need_dx: bool,
        need_dw: bool,
        dx_dtype: torch.dtype,
        dw_dtype: torch.dtype,
        *,
        dx_out: Tensor | None = None,
        dw_out: Tensor | None = None,
        main_grad: Tensor | None = None,
        release_tiles: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """dy (M, N) -> (dx (M, K) ``dx_dtype`` or None, dw (E, N, K) or None).

        ``xt``/``sxt``: x's token tiles from :meth:`forward` (needed for dw). dw is written in ``dw_dtype``
        (into ``dw_out`` when given) or, with ``main_grad`` (an fp32 (E, N, K) buffer), added into it and
        ``main_grad`` returned. ``release_tiles``: the caller owns ``xt``/``sxt`` and will not read them
        again (autograd's saved tensors of a graph that is not retained): their memory is freed (storage
        resized to 0) as soon as the wgrad has read them, before the dgrad's buffers exist.

        Order, for the peak memory (the seed shape's account, E=8, M=32768, N=2048, K=7168, bf16, MiB):
        dy is read once into both operands (dyq/sdy 67.8, dyt/sdyt 67.8); the wgrad runs first (dw 224
        and the DeepGEMM provider's fp32 scratch of half the experts 224, beside the saved x tiles 237 and
        transposed weight 112), then dyt and the x tiles are freed, then the dgrad (dx 448, with the DeepGEMM
        provider's scratch of a third of the padded rows 154) runs beside dw: peak 1134 MiB with the caller's
        y (was 1522: the padded dx beside dx, dy's operands and the x tiles). Dgrad first would keep dx, dw
        and the x tiles alive together (1218 MiB with y, before any scratch). experiments/memory_account.py
        lists every moment.
        """
        if need_dw and (xt is None or sxt is None):
            raise ValueError("xt: the weight gradient needs x's token tiles from the forward")
        m, k = dy.shape[0], (sxt.shape[1] if need_dw else wq_t.shape[1])
        if dx_out is not None:
            check_out("dx_out", dx_out, (m, k), dx_dtype, dy.device)
        if dw_out is not None:
            check_out("dw_out", dw_out, (plan.num_groups, dy.shape[1], k), dw_dtype, dy.device)
        wgrad = self.k_grouped.prepare(plan) if need_dw else None
        operands = list(self.quantizer.tokens(dy, plan, need_dx, need_dw)) if need_dx or need_dw else []
        dx = dw = None
        if need_dw:
            dyt, sdyt = operands[-2:]
            del operands[-2:]
            if main_grad is not None:
                dw = wgrad(dyt, sdyt, xt, sxt, torch.float32, main_grad, True)
            else:
                dw = wgrad(dyt, sdyt, xt, sxt, dw_dtype, dw_out, False)
            del dyt, sdyt  # the wgrad operands are freed before the dgrad's buffers exist
            if release_tiles and need_dx:
                for t in (xt, sxt):
                    storage = t.untyped_storage()
                    if t._base is None and storage.nbytes() == t.numel() * t.element_size():  # its own buffer
                        storage.resize_(0)
        if need_dx:
            dyq, sdy = operands
            del operands
            dx = self.m_grouped(dyq, sdy, wq_t, sw_t, plan, dx_dtype, dx_out, low_memory=True)
        return dx, dw
