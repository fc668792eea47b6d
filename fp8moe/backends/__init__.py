"""Backends: named compositions of a quantizer and two GEMM providers, resolved once per device.

| backend | quantizer | forward / dgrad (M-grouped) | wgrad (K-grouped, default) |
|---|---|---|---|
| ``reference`` | torch | torch, fp32 per expert | torch |
| ``triton`` | Triton | Triton | Triton |
| ``deepgemm`` | Triton | DeepGEMM | DeepGEMM |

The wgrad provider is an option of every backend (``wgrad="reference" | "triton" | "deepgemm"``): a
resolved backend is named by its *key*, ``"deepgemm"`` or ``"deepgemm/wgrad=triton"``, the one string that
custom ops, ``torch.compile`` and the JAX bridge carry.

``"auto"`` picks, in order: DeepGEMM (``deep_gemm`` imports, the GPU is SM90, the CUDA toolkit is present),
then Triton (a CUDA GPU of compute capability 9.0 or newer), then the reference backend (CPU or any
device). ``FP8MOE_BACKEND`` (other than "auto") overrides ``"auto"``. A backend named explicitly
(argument or environment) that cannot run raises; it is never swapped. Resolution is cached per
(request, wgrad, ``FP8MOE_BACKEND``, device): nothing is probed again on later calls.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

from fp8moe.backends.base import Backend

# provider name -> module; each module may define unavailable_reason(device)
_MODULES = {
    "reference": "fp8moe.backends.reference",
    "triton": "fp8moe.backends.triton",
    "deepgemm": "fp8moe.backends.deepgemm",
}
# provider name -> (quantizer, M-grouped, K-grouped) attributes of its module
_PROVIDERS = {
    "reference": ("ReferenceQuantizer", "reference_m_grouped", "ReferenceKGrouped"),
    "triton": ("TritonQuantizer", "triton_m_grouped", "TritonKGrouped"),
    "deepgemm": (None, "deepgemm_m_grouped", "DeepGEMMKGrouped"),
}
# backend -> (quantizer provider, M-grouped provider); in "auto" preference order
_BACKENDS = {
    "deepgemm": ("triton", "deepgemm"),
    "triton": ("triton", "triton"),
    "reference": ("reference", "reference"),
}
BACKEND_NAMES: tuple[str, ...] = ("auto", *_BACKENDS)
WGRAD_NAMES: tuple[str, ...] = tuple(_MODULES)
ENV_VAR = "FP8MOE_BACKEND"


@functools.cache
def _module(provider: str) -> Any:
    """The provider's module, or the reason it failed to import (a str)."""
    try:
        return importlib.import_module(_MODULES[provider])
    except Exception as exc:  # absent package, ABI mismatch, broken toolkit: report, never crash
        return f"import of {_MODULES[provider]} failed: {type(exc).__name__}: {exc}"


def _provider_reason(provider: str, device: torch.device) -> str | None:
    module = _module(provider)
    if isinstance(module, str):
        return module
    check = getattr(module, "unavailable_reason", None)
    return check(device) if check is not None else None


def _unavailable_reason(name: str, wgrad: str, device: torch.device) -> str | None:
    quantizer, m_grouped = _BACKENDS[name]
    for provider in dict.fromkeys((m_grouped, quantizer, wgrad)):  # the backend's own provider first
        reason = _provider_reason(provider, device)
        if reason is not None:
            return reason if provider in _BACKENDS[name] else f"wgrad provider {provider!r}: {reason}"
    return None


def backend_key(name: str, wgrad: str | None = None) -> str:
    """The key of backend ``name`` with wgrad provider ``wgrad`` (None: its own)."""
    wgrad = name if wgrad is None else wgrad
    return name if wgrad == name else f"{name}/wgrad={wgrad}"


def _parse_key(key: str) -> tuple[str, str]:
    name, _, option = key.partition("/")
    wgrad = option.removeprefix("wgrad=") if option else name
    if name not in _BACKENDS or wgrad not in WGRAD_NAMES or (option and not option.startswith("wgrad=")):
        raise ValueError(f"backend: unknown backend {key!r}, expected one of {tuple(_BACKENDS)}")
    return name, wgrad


@functools.cache
def load_backend(key: str) -> Backend:
    """The backend of ``key`` ("deepgemm", "deepgemm/wgrad=triton", ...; not "auto"), with no check of the
    device; ``RuntimeError`` with the reason if a provider fails to import."""
    name, wgrad = _parse_key(key)
    quantizer_provider, m_provider = _BACKENDS[name]
    modules = {}
    for provider in (quantizer_provider, m_provider, wgrad):
        module = _module(provider)
        if isinstance(module, str):
            raise RuntimeError(f"backend {key!r} cannot run: {module}")
        modules[provider] = module
    quantizer = getattr(modules[quantizer_provider], _PROVIDERS[quantizer_provider][0])()
    m_grouped = getattr(modules[m_provider], _PROVIDERS[m_provider][1])
    k_grouped = getattr(modules[wgrad], _PROVIDERS[wgrad][2])()
    return Backend(name, wgrad, quantizer, m_grouped, k_grouped)


def _requested_name(name: object) -> tuple[str, str]:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, got {type(name).__name__}")
    if name == "auto" and os.environ.get(ENV_VAR, "auto") != "auto":
        name, origin = os.environ[ENV_VAR], f"environment variable {ENV_VAR}"
    else:
        origin = "argument backend"
    if name not in BACKEND_NAMES:
        raise ValueError(f"{origin}: unknown backend {name!r}, expected one of {BACKEND_NAMES}")
    return name, origin


def _first_runnable(device: torch.device, wgrad: str | None) -> tuple[str, str]:
    """The first backend in preference order that can run on ``device``, and why."""
    skipped = []
    for name in _BACKENDS:
        reason = _unavailable_reason(name, name if wgrad is None else wgrad, device)
        if reason is None:
            return name, f"auto on {device.type}: " + ("; ".join(skipped) or "first choice")
        skipped.append(f"{name} skipped ({reason})")
    raise RuntimeError("no fp8moe backend can run: " + "; ".join(skipped))


def check_wgrad(wgrad: object) -> str | None:
    if wgrad is not None and not isinstance(wgrad, str):
        raise TypeError(f"wgrad: expected None or a str, got {type(wgrad).__name__}")
    if wgrad is not None and wgrad not in WGRAD_NAMES:
        raise ValueError(f"wgrad: unknown wgrad provider {wgrad!r}, expected None or one of {WGRAD_NAMES}")
    return wgrad


@functools.cache
def _select(name: str, wgrad: str | None, env: str | None, device: torch.device) -> tuple[str, str]:
    del env  # part of the cache key only: _requested_name reads the environment itself
    name, origin = _requested_name(name)
    if name == "auto":
        name, why = _first_runnable(device, wgrad)
    else:
        reason = _unavailable_reason(name, name if wgrad is None else wgrad, device)
        if reason is not None:
            raise RuntimeError(f"{origin}: backend {name!r} cannot run: {reason}")
        why = f"requested by {origin}"
    return backend_key(name, wgrad), why


def select_backend(name: object, device: torch.device, wgrad: object = None) -> tuple[Backend, str]:
    """Resolve ``name`` ("auto" or a backend name) and ``wgrad`` for a call on ``device``: (backend, why).

    Raises ``TypeError``/``ValueError`` for a bad name and ``RuntimeError`` naming the reason when an
    explicitly named backend cannot run. Cached per (name, wgrad, ``FP8MOE_BACKEND``, device).
    """
    _requested_name(name)
    key, why = _select(name, check_wgrad(wgrad), os.environ.get(ENV_VAR), device)
    return load_backend(key), why


@torch.compiler.assume_constant_result
def resolve_backend(name: str, device: torch.device, wgrad: str | None = None) -> str:
    """:func:`select_backend` reduced to the backend's key; ``torch.compile`` runs it once at trace time."""
    return select_backend(name, device, wgrad)[0].key


def backend_info(device: torch.device | str | None = None) -> dict:
    """What "auto" picks on ``device`` (default: CUDA if present, else CPU) and why.

    Returns ``{"device": str, "auto": name, "reason": str, "backends": {name: reason or None}}``; a None
    reason means that backend can run on the device. ``FP8MOE_BACKEND``, when set, is what "auto" uses.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    reasons = {name: _unavailable_reason(name, name, device) for name in _BACKENDS}
    auto, origin = _requested_name("auto")
    if auto == "auto":
        auto, why = _first_runnable(device, None)
    else:
        why = f"set by {origin}"
    return {"device": str(device), "auto": auto, "reason": why, "backends": reasons}


__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "WGRAD_NAMES",
    "Backend",
    "backend_info",
    "backend_key",
    "check_wgrad",
    "load_backend",
    "resolve_backend",
    "select_backend",
]
