"""A cache of quantized weights, valid while the weight is unchanged.

The weight changes once per optimizer step, but it is quantized at every forward: micro-batches of a
gradient-accumulation step, activation recomputation and the two GEMMs of a layer called twice reuse the
same FP8 weight. An entry is keyed on the weight tensor *object* (held weakly: the entry goes when the
weight is freed) and validated on every lookup against the weight's storage address, its version counter
(``_version``, bumped by every in-place update such as the optimizer's), shape, strides, dtype and the
backend that produced it; any difference quantizes again. So a stale entry is never served after an
in-place update, a ``.data`` swap (a new storage) or a new tensor at a reused address (a new object).

Only eager calls use it: under ``torch.compile`` the weight is quantized inside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(frozen=True)
class _Entry:
    stamp: tuple
    quantized: tuple[Tensor, Tensor, Tensor, Tensor]  # wq, sw, wq_t, sw_t (the last two may be empty)
    transposed: bool


_entries: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _stamp(w: Tensor, backend: str) -> tuple:
    return (w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype, w.device, backend)


def lookup(w: Tensor, backend: str, transposed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The cached (wq, sw, wq_t, sw_t) of ``w`` if still valid and holding the transposed operand when
    ``transposed``; else None."""
    entry = _entries.get(w)
    if entry is None or entry.stamp != _stamp(w, backend) or (transposed and not entry.transposed):
        return None
    return entry.quantized


def store(w: Tensor, backend: str, transposed: bool, quantized: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    """Remember ``quantized`` for ``w`` as it is now."""
    _entries[w] = _Entry(_stamp(w, backend), quantized, transposed)


def clear_weight_cache() -> None:
    """Drop every cached quantized weight (their memory returns to the allocator)."""
    _entries.clear()


def cached_weights() -> int:
    """How many weights have an entry (live weights only)."""
    return len(_entries)
