"""Backend registry and selection.

``"auto"`` picks, in order: DeepGEMM (``deep_gemm`` imports, the GPU is SM90, the CUDA toolkit is present),
then Triton (a CUDA GPU of compute capability 9.0 or newer), then the reference backend (CPU or any
device). ``FP8MOE_BACKEND`` (other than "auto") overrides ``"auto"``.
A backend named explicitly (argument or environment) that cannot run raises; it is never swapped.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch

from fp8moe.backends.base import Backend

# name -> (module, class); imported lazily so that a missing optional dependency never breaks import.
_REGISTRY: dict[str, tuple[str, str]] = {
    "deepgemm": ("fp8moe.backends.deepgemm", "DeepGEMMBackend"),
    "triton": ("fp8moe.backends.triton", "TritonBackend"),
    "reference": ("fp8moe.backends.reference", "ReferenceBackend"),
}
BACKEND_NAMES: tuple[str, ...] = ("auto", *_REGISTRY)
ENV_VAR = "FP8MOE_BACKEND"


@functools.cache
def _load(name: str) -> Backend | str:
    """The backend instance, or the reason it failed to import."""
    module_name, class_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # absent package, ABI mismatch, broken toolkit: report, never crash
        return f"import of {module_name} failed: {type(exc).__name__}: {exc}"
    return getattr(module, class_name)()


def load_backend(name: str) -> Backend:
    """The backend registered as ``name`` (not "auto"); ``RuntimeError`` with the reason if it fails to import."""
    if name not in _REGISTRY:
        raise ValueError(f"backend: unknown backend {name!r}, expected one of {tuple(_REGISTRY)}")
    backend = _load(name)
    if isinstance(backend, str):
        raise RuntimeError(f"backend {name!r} cannot run: {backend}")
    return backend


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    backend = _load(name)
    if isinstance(backend, str):
        return backend
    return backend.unavailable_reason(device)


@dataclass(frozen=True)
class Selection:
    """The backend chosen for one call and why."""

    backend: Backend
    reason: str


def _requested_name(name: str) -> tuple[str, str]:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, got {type(name).__name__}")
    if name == "auto" and os.environ.get(ENV_VAR, "auto") != "auto":
        name, origin = os.environ[ENV_VAR], f"environment variable {ENV_VAR}"
    else:
        origin = "argument backend"
    if name not in BACKEND_NAMES:
        raise ValueError(f"{origin}: unknown backend {name!r}, expected one of {BACKEND_NAMES}")
    return name, origin


def _first_runnable(device: torch.device) -> tuple[str, str]:
    """The first backend in preference order that can run on ``device``, and why."""
    skipped = []
    for name in _REGISTRY:
        reason = _unavailable_reason(name, device)
        if reason is None:
            return name, f"auto on {device.type}: " + ("; ".join(skipped) or "first choice")
        skipped.append(f"{name} skipped ({reason})")
    raise RuntimeError("no fp8moe backend can run: " + "; ".join(skipped))


def select_backend(name: str, device: torch.device) -> Selection:
    """Resolve ``name`` ("auto" or a backend name) for a call on ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` naming the reason when an explicitly
    named backend cannot run.
    """
    name, origin = _requested_name(name)
    if name == "auto":
        name, why = _first_runnable(device)
        return Selection(_load(name), why)
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"{origin}: backend {name!r} cannot run: {reason}")
    return Selection(_load(name), f"requested by {origin}")


@torch.compiler.assume_constant_result
def resolve_backend_name(name: str, device: torch.device) -> str:
    """:func:`select_backend` reduced to the chosen name; ``torch.compile`` runs it once at trace time."""
    return select_backend(name, device).backend.name


def backend_info(device: torch.device | str | None = None) -> dict:
    """What "auto" picks on ``device`` (default: CUDA if present, else CPU) and why.

    Returns ``{"device": str, "auto": name, "reason": str, "backends": {name: reason or None}}``; a None
    reason means that backend can run on the device. ``FP8MOE_BACKEND``, when set, is what "auto" uses.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    reasons = {name: _unavailable_reason(name, device) for name in _REGISTRY}
    auto, origin = _requested_name("auto")
    if auto == "auto":
        auto, why = _first_runnable(device)
    else:
        why = f"set by {origin}"
    return {"device": str(device), "auto": auto, "reason": why, "backends": reasons}


__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "Backend",
    "Selection",
    "backend_info",
    "load_backend",
    "resolve_backend_name",
    "select_backend",
]
