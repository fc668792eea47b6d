"""Direct launches of compiled Triton kernels: Triton's launcher without its per-call Python.

``direct(kernel)[grid](*args, **kwargs)`` does what ``kernel[grid](*args, **kwargs)`` does (``kernel``: a
``@triton.jit`` function, optionally under ``@triton.autotune``), at a fraction of the host time. Each call
of ``kernel[grid]`` binds every argument in Python, computes Triton's specialization of each, builds and
formats the compile key, re-reads Triton's knobs, and for an autotuned kernel builds the autotune key and
several argument dicts: 30-140 us of CPU a launch on the device's host. Here:

- the first call of a *specialization* goes through Triton unchanged (it compiles, autotunes, launches) and
  the returned ``CompiledKernel`` (and an autotuner's chosen ``Config``) is cached under a key that covers
  everything Triton specializes on: the device, the number of positional arguments, per argument the
  dtype and 16-byte alignment of a tensor, Triton's own specialization of every other value (``i32`` /
  ``i64`` / ``u64``, ``== 1``, divisibility by 16, bool, float, None, a tensor descriptor's dtype and
  block shape), the values of constexpr arguments and of launch options (``num_warps``, ...). The key is
  finer than Triton's (it specializes every argument as if nothing were ``do_not_specialize``), which
  costs at most an extra trip through Triton, never a wrong kernel. The autotune key (the values of the
  autotuner's ``key`` arguments) is a function of the positional arguments' values, not of their
  specialization, so for an autotuned kernel the key also holds those values.
- later calls assemble the argument list the JIT's binder would (positional arguments, then keyword,
  config and default values in signature order), run the config's ``pre_hook`` (the GEMM's TMA boxes),
  evaluate the grid, and call the compiled kernel's launcher with the arguments ``JITFunction.run``
  passes it: ``run(grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
  launch_enter_hook, launch_exit_hook, *args)``. This form is the same in Triton 3.6 (the device's) and
  3.9 (the CPU machine's); see ``triton/runtime/jit.py``, ``JITFunction.run``.

Never a stale kernel: a cached entry is used only while the autotuner still holds the same config list and
the same chosen config for its key (a test that swaps ``configs`` or clears ``cache`` gets a fresh trip
through Triton), the kernel has no ``pre_run_hooks``, no launch hook is installed (profilers such as
proton install them: then every launch is Triton's), ``TRITON_DEBUG`` is as it was, and the kernel's
global constants are unchanged (the check ``JITFunction.run`` makes). Anything unexpected (an object that
is not a ``JITFunction`` or an ``Autotuner`` over one, a return value without a launcher, an exception
while assembling a launch) sends that kernel back to Triton's own launch for good, with one warning.

Off under the Triton interpreter (``TRITON_INTERPRET=1``: the kernels are then ``InterpretedFunction``
objects and launch as before) and when ``FP8MOE_DIRECT_LAUNCH=0`` (read at import; :func:`set_enabled`
switches it at run time). The launch itself is Triton's, on the current stream, so CUDA-graph capture is
unaffected (a first call, which compiles or autotunes, must still run outside a capture, as before).
Assumed, as Triton itself assumes after a compile: Triton's compilation knobs other than ``TRITON_DEBUG``
(e.g. ``TRITON_INSTRUMENTATION_MODE``) are not changed while the process runs.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

ENV_VAR = "FP8MOE_DIRECT_LAUNCH"

_OFF = ("0", "false", "off", "no")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in _OFF


_enabled = os.environ.get(ENV_VAR, "1").lower() not in _OFF and not _interpreting()


def enabled() -> bool:
    """Whether :func:`direct` launches skip Triton's per-call Python (see the module docstring)."""
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Switch direct launches on or off (never on under the Triton interpreter); returns the old setting."""
    global _enabled
    old = _enabled
    _enabled = bool(flag) and not _interpreting()
    return old


def direct(kernel: Any) -> DirectLauncher:
    """The direct launcher of ``kernel`` (made once per kernel): ``direct(kernel)[grid](*args, **kwargs)``."""
    launcher = getattr(kernel, "_fp8moe_direct", None)
    if launcher is None:
        launcher = DirectLauncher(kernel)
        try:
            kernel._fp8moe_direct = launcher
        except (AttributeError, TypeError):  # an object without a __dict__: a new launcher each call
            pass
    return launcher


class _Keyword:
    """An argument taken from the call's keywords at each launch (a non-constexpr passed by name)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Entry:
    """What a later launch of one specialization needs."""

    __slots__ = (
        "compiled",
        "tail",
        "by_keyword",
        "config",
        "configs",
        "config_kwargs",
        "tune_key",
        "pre_hook",
        "debug",
    )

    def __init__(self, compiled, tail, config, configs, tune_key, debug) -> None:
        self.compiled = compiled
        self.tail = tuple(tail)  # the arguments after the positional ones, in signature order
        self.by_keyword = any(isinstance(v, _Keyword) for v in self.tail)
        self.config = config
        self.configs = configs
        self.config_kwargs = config.all_kwargs() if config is not None else {}
        self.tune_key = tune_key
        self.pre_hook = getattr(config, "pre_hook", None)
        self.debug = debug


class DirectLauncher:
    """``kernel[grid](...)`` through cached compiled kernels; see the module docstring."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.tuner = None
        self.jit = None
        self.entries: dict[tuple, _Entry] = {}
        self._backends: dict[int, Any] = {}
        try:
            from triton.runtime.autotuner import Autotuner
            from triton.runtime.jit import JITFunction
        except Exception:  # noqa: BLE001  no Triton: plain launches (which will fail as they would anyway)
            return
        fn = kernel
        if isinstance(fn, Autotuner):
            self.tuner, fn = fn, fn.fn
        if not isinstance(fn, JITFunction):  # the interpreter's InterpretedFunction, Heuristics, ...
            return
        self.jit = fn
        self.names = tuple(fn.arg_names)
        self.params = {p.name: p for p in fn.params}
        self.constexprs = frozenset(p.name for p in fn.params if p.is_constexpr)
        self.runtime_params = frozenset(p.name for p in fn.params if not p.is_constexpr)
        self.positional_constexpr = tuple(p.is_constexpr for p in fn.params)
        self.defaults = {name: p.default for name, p in fn.signature.parameters.items()}
        if self.tuner is not None:  # where the autotune key's arguments are: position, name
            self.tune_args = tuple((self.names.index(k), k) for k in self.tuner.keys if k in self.names)

    def __getitem__(self, grid) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    # ---- per call ---------------------------------------------------------------------------------------

    def launch(self, grid, args: tuple, kwargs: dict) -> Any:
        if not _enabled or self.jit is None:
            return self.kernel[grid](*args, **kwargs)
        try:
            device = _current_device()
            key = self.key(device, args, kwargs)
            entry = self.entries.get(key)
            if entry is not None and self._valid(entry):
                return self._launch(entry, device, grid, args, kwargs)
        except Exception as exc:  # noqa: BLE001  anything unexpected before the launch: Triton's, for good
            self._give_up(f"{type(exc).__name__}: {exc}")
            return self.kernel[grid](*args, **kwargs)
        compiled = self.kernel[grid](*args, **kwargs)  # a new specialization: Triton compiles, tunes, launches
        try:
            self._remember(key, args, kwargs, compiled)
        except Exception as exc:  # noqa: BLE001
            self._give_up(f"{type(exc).__name__}: {exc}")
        return compiled

    def key(self, device: int, args: tuple, kwargs: dict) -> tuple:
        """The cache key of a call (see the module docstring); public for the tests."""
        backend = self._backends.get(device) or self._backend(device)
        specialize = _native_impl or _native()
        tensor = torch.Tensor
        parts: list[Any] = [device, len(args)]
        append = parts.append
        for arg, constexpr in zip(args, self.positional_constexpr):
            if constexpr:
                append(arg)
            elif type(arg) is tensor:
                append((arg.dtype, arg.data_ptr() & 15 == 0))
            else:
                append(specialize(backend, arg, False, True, True))
        if kwargs:
            runtime_params = self.runtime_params
            for name, value in kwargs.items():
                if name in runtime_params:
                    if type(value) is tensor:
                        value = (value.dtype, value.data_ptr() & 15 == 0)
                    else:
                        value = specialize(backend, value, False, True, True)
                append((name, value))
        if self.tuner is not None:  # the autotune key's values (its dtype part is in the parts above)
            n = len(args)
            append(tuple(args[i] if i < n else kwargs.get(name, _MISSING) for i, name in self.tune_args))
        return tuple(parts)

    def _valid(self, entry: _Entry) -> bool:
        jit, tuner = self.jit, self.tuner
        runtime = _knobs().runtime
        if jit.pre_run_hooks or entry.debug != bool(jit.debug or runtime.debug):
            return False
        if getattr(runtime.launch_enter_hook, "calls", True) or getattr(runtime.launch_exit_hook, "calls", True):
            return False  # a launch hook (a profiler) sees Triton's own launches
        if tuner is not None:
            configs = tuner.configs
            if configs is not entry.configs:
                return False
            if (tuner.cache.get(entry.tune_key) if len(configs) > 1 else configs[0]) is not entry.config:
                return False
        missing = _MISSING
        for (name, _), (value, globals_dict) in jit.used_global_vals.items():
            if globals_dict.get(name, missing) != value:
                return False  # Triton's own launch raises the error it raises
        return True

    def _launch(self, entry: _Entry, device: int, grid, args: tuple, kwargs: dict) -> Any:
        if entry.by_keyword:
            bound = args + tuple(kwargs[v.name] if isinstance(v, _Keyword) else v for v in entry.tail)
        else:
            bound = args + entry.tail
        if entry.pre_hook is not None:
            entry.pre_hook({**dict(zip(self.names, args)), **kwargs, **entry.config_kwargs})
        if callable(grid):
            grid = grid(dict(zip(self.names, bound)))
        size = len(grid)
        compiled = entry.compiled
        runtime = _knobs_module.runtime
        compiled.run(
            grid[0],
            grid[1] if size > 1 else 1,
            grid[2] if size > 2 else 1,
            _current_stream(device),
            compiled.function,
            compiled.packed_metadata,
            None,  # launch metadata: only launch hooks read it, and with a hook installed Triton launches
            runtime.launch_enter_hook,
            runtime.launch_exit_hook,
            *bound,
        )
        return compiled

    # ---- first call of a specialization -----------------------------------------------------------------

    def _remember(self, key: tuple, args: tuple, kwargs: dict, compiled: Any) -> None:
        """After Triton's own launch of a new specialization: cache what later launches need."""
        if hasattr(compiled, "result") and not hasattr(compiled, "packed_metadata"):
            return  # an asynchronous compile's future: the next call comes back here
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            raise _Unsupported(f"the launch returned {type(compiled).__name__}, not a compiled kernel")
        if compiled.function is None:  # not loaded (a warm-up): the next call comes back here
            return
        config, configs, tune_key, extra = None, None, None, {}
        tuner = self.tuner
        if tuner is not None:
            config, configs, tune_key = tuner.best_config, tuner.configs, self._tune_key(args, kwargs)
            chosen = tuner.cache.get(tune_key) if len(configs) > 1 else configs[0]
            if chosen is not config:
                raise _Unsupported("the autotuner's cache key is not computed as here")
            extra = config.all_kwargs()
        merged = {**kwargs, **extra}
        tail: list[Any] = []
        for name in self.names[len(args) :]:
            if name in kwargs and name not in self.constexprs:
                tail.append(_Keyword(name))
            elif name in merged:
                tail.append(merged[name])
            elif self.defaults[name] is not _EMPTY:
                tail.append(self.defaults[name])
            else:
                raise _Unsupported(f"no value for argument {name}")
        self.entries[key] = _Entry(
            compiled, tail, config, configs, tune_key, bool(self.jit.debug or _knobs().runtime.debug)
        )

    def _tune_key(self, args: tuple, kwargs: dict) -> tuple:
        """The autotuner's cache key of a call, computed as ``Autotuner.run`` computes it."""
        tuner = self.tuner
        names = tuner.arg_names
        named = {**dict(zip(names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in names}
        key = [named[k] for k in tuner.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return tuple(key)

    def _backend(self, device: int) -> Any:
        backend = self._backends.get(device)
        if backend is None:
            from triton.backends.compiler import BaseBackend

            caches = self.jit.device_caches[device]
            backend = next((c for c in caches if isinstance(c, BaseBackend)), None)
            if backend is None:
                raise _Unsupported("no compiler backend in the kernel's device cache")
            self._backends[device] = backend
        return backend

    def _give_up(self, why: str) -> None:
        warnings.warn(
            f"fp8moe direct launch of {self.kernel!r} disabled ({why}); it launches through Triton",
            RuntimeWarning,
            stacklevel=3,
        )
        self.jit = None


class _Unsupported(Exception):
    pass


_MISSING = object()
_EMPTY = inspect.Parameter.empty


_native_impl = None


def _native():
    global _native_impl
    if _native_impl is None:
        from triton._C.libtriton import native_specialize_impl

        _native_impl = native_specialize_impl
    return _native_impl


_knobs_module = None


def _knobs():
    global _knobs_module
    if _knobs_module is None:
        from triton import knobs

        _knobs_module = knobs
    return _knobs_module


def _current_device() -> int:
    """The device Triton launches on (``JITFunction.run``: ``driver.active.get_current_device()``)."""
    return _driver().active.get_current_device()


def _current_stream(device: int) -> int:
    """The stream Triton launches on (torch's current stream, through Triton's driver)."""
    return _driver().active.get_current_stream(device)


_driver_config = None


def _driver():
    global _driver_config
    if _driver_config is None:
        from triton.runtime.driver import driver

        _driver_config = driver
    return _driver_config


__all__ = ["ENV_VAR", "DirectLauncher", "direct", "enabled", "set_enabled"]
