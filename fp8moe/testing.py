"""Helpers shared by the tests, the benchmarks and the experiments.

- error metrics: :func:`sqnr_db`;
- routings: :func:`random_offsets` and the named presets of :func:`routing_offsets`; random problems:
  :func:`random_problem`;
- an independent float64/numpy model of the FP8 recipe (:func:`grouped_mm_fwd_bwd` and the fake
  quantizers ``fq_*``), sharing no code with :mod:`fp8moe.quant`;
- the one benchmark timer, :func:`time_call` (CUDA events, host time, launches, GPU kernel time, peak
  memory; also for JAX callables), :func:`saved_tensor_bytes` (bytes saved for the backward) and
  :func:`run_environment` (date, device, git commit, versions: a benchmark's header);
- :func:`capture_cuda_graph`: warm a callable up outside a capture, then capture one call in a CUDA graph.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import math
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor


def capture_cuda_graph(fn: Callable[[], Any], warmup: int = 1) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``(graph, outputs)``: ``fn()`` run ``warmup`` times on a side stream (Triton's compilation and
    autotuning, DeepGEMM's JIT, the allocator's first blocks: all outside the capture), then one call captured
    in a CUDA graph. ``outputs`` are that call's results, in the graph's memory: each ``graph.replay()``
    rewrites them from what the captured input tensors hold then (copy new values into those tensors first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB, in float64.

    ``inf`` when the two are identical; NaN in either input gives NaN.
    """
    if reference.shape != test.shape:
        raise ValueError(f"test: expected shape {tuple(reference.shape)} (that of reference), got {tuple(test.shape)}")
    ref = reference.detach().double().cpu()
    noise = (ref - test.detach().double().cpu()).square().sum().item()
    signal = ref.square().sum().item()
    if math.isnan(noise) or math.isnan(signal):
        return math.nan
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)


def random_offsets(
    num_rows: int,
    num_groups: int,
    *,
    generator: torch.Generator | None = None,
    empty_groups: int = 0,
    tail_rows: int = 0,
    skew: float | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random cumulative end offsets (E,) int32 for a ragged routing of ``num_rows`` rows.

    ``empty_groups`` groups (chosen at random) get no rows, the last ``tail_rows`` rows belong to no group
    (``offsets[-1] == num_rows - tail_rows``), and ``skew`` (a fraction in (0, 1)) gives one random group
    that share of the routed rows (all of them when it is the only non-empty group).
    """
    if not 0 <= empty_groups < num_groups:
        raise ValueError(f"empty_groups: expected 0 <= empty_groups < num_groups = {num_groups}, got {empty_groups}")
    if not 0 <= tail_rows <= num_rows:
        raise ValueError(f"tail_rows: expected 0 <= tail_rows <= num_rows = {num_rows}, got {tail_rows}")
    routed = num_rows - tail_rows
    order = torch.randperm(num_groups, generator=generator)
    active = order[empty_groups:]
    weights = torch.rand(active.numel(), generator=generator, dtype=torch.float64) + 0.05
    sizes = torch.zeros(num_groups, dtype=torch.int64)
    if skew is not None:
        if not 0 < skew < 1:
            raise ValueError(f"skew: expected a fraction in (0, 1), got {skew}")
        heavy = int(round(skew * routed)) if active.numel() > 1 else routed
        sizes[active[0]] = heavy
        routed, active, weights = routed - heavy, active[1:], weights[1:]
    if active.numel():
        share = torch.floor(weights / weights.sum() * routed).long()
        share[0] += routed - share.sum()
        sizes[active] += share
    return torch.cumsum(sizes, 0).to(torch.int32).to(device)


def random_problem(
    seed: int,
    *,
    m: int = 2048,
    n: int = 256,
    k: int = 512,
    e: int = 8,
    routing: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fresh random ``x (M, K)``, ``w (E, N, K)`` (scaled by 1/sqrt(K)), ``offsets (E,)`` int32 and
    ``dy (M, N)`` in ``dtype`` on ``device``. ``routing``: :func:`random_offsets` options, or None for one
    row per group (the rest unrouted)."""
    gen = torch.Generator().manual_seed(seed)
    if routing is None:
        offsets = torch.arange(1, e + 1, dtype=torch.int32, device=device)
    else:
        offsets = random_offsets(m, e, generator=gen, device=device, **routing)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(e, n, k, generator=gen) / math.sqrt(k)).to(device, dtype)
    dy = torch.randn(m, n, generator=gen).to(device, dtype)
    return x, w, offsets, dy


def backend_fwd_bwd(
    backend: str,
    x: Tensor,
    quantized_weight: tuple[Tensor, Tensor, Tensor, Tensor],
    offsets: Tensor,
    dy: Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """y, dx, dw of one backend's methods (no autograd) on a given quantized weight (wq, sw, wq_t, sw_t),
    every result in ``out_dtype``."""
    from fp8moe.backends import load_backend
    from fp8moe.plan import plan_groups

    impl = load_backend(backend)
    wq, sw, wq_t, sw_t = quantized_weight
    plan = plan_groups(offsets, x.shape[0])
    y, xt, sxt = impl.forward(x, wq, sw, plan, out_dtype, token_tiles=True)
    dx, dw = impl.backward(dy, xt, sxt, wq_t, sw_t, plan, True, True, out_dtype, out_dtype)
    return y, dx, dw


# ----------------------------------------------------------------------------------------------------
# Routing presets
# ----------------------------------------------------------------------------------------------------

ROUTING_PRESETS = ("balanced", "ragged", "skewed", "empty", "tail", "one_row")


def routing_offsets(
    preset: str,
    rows: int,
    experts: int,
    *,
    seed: int = 0,
    align: int = 1,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Cumulative end offsets (E,) int32 of a named routing of ``rows`` token rows over ``experts`` groups.

    Presets (random ones draw from ``torch.Generator().manual_seed(seed)`` through :func:`random_offsets`):

    - ``"balanced"``: equal groups (the first ``rows % experts`` get one row more), every row routed;
    - ``"ragged"``: random group sizes, every row routed;
    - ``"skewed"``: one expert takes 40% of the rows, two get none (one fewer with fewer than 3 experts);
    - ``"empty"``: random sizes with ``min(3, experts - 1)`` empty groups;
    - ``"tail"``: one empty group and the last ``max(1, rows // 4)`` rows routed to no expert;
    - ``"one_row"``: one row per expert, the rest unrouted (needs ``rows >= experts``).

    ``align`` > 1 rounds every group down to a multiple of ``align`` (kernels such as
    ``torch._scaled_grouped_mm`` need multiples of 16) and gives the rows this frees to the largest group,
    in whole multiples of ``align``; what remains (fewer than ``align`` rows) becomes unrouted tail rows.
    """
    if preset not in ROUTING_PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(ROUTING_PRESETS)}, got {preset!r}")
    if rows < 1 or experts < 1:
        raise ValueError(f"rows and experts: expected >= 1, got rows={rows}, experts={experts}")
    if align < 1:
        raise ValueError(f"align: expected >= 1, got {align}")
    gen = torch.Generator().manual_seed(seed)
    if preset == "balanced":
        sizes = torch.full((experts,), rows // experts, dtype=torch.int64)
        sizes[: rows % experts] += 1
        offsets = torch.cumsum(sizes, 0)
    elif preset == "one_row":
        if rows < experts:
            raise ValueError(f"rows: the one_row routing needs rows >= experts = {experts}, got {rows}")
        offsets = torch.arange(1, experts + 1)
    else:
        options = {
            "ragged": {},
            "skewed": {"empty_groups": min(2, experts - 1), "skew": 0.4},
            "empty": {"empty_groups": min(3, experts - 1)},
            "tail": {"empty_groups": min(1, experts - 1), "tail_rows": max(1, rows // 4)},
        }[preset]
        offsets = random_offsets(rows, experts, generator=gen, **options).long()
    if align > 1:
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
        aligned = sizes // align * align
        largest = int(torch.argmax(sizes))
        aligned[largest] += (int(sizes.sum()) - int(aligned.sum())) // align * align
        offsets = torch.cumsum(aligned, 0)
    return offsets.to(torch.int32).to(device)


# ----------------------------------------------------------------------------------------------------
# The recipe in float64/numpy, independent of fp8moe.quant
# ----------------------------------------------------------------------------------------------------
# It shares no code with fp8moe.quant (not even fp8moe.recipe's constants): e4m3 rounding is done by hand
# (round half to even on the e4m3 grid, subnormals below 2**-6, saturation at 448), scales and divisions
# follow the recipe's fp32 arithmetic (tiny values read as zero, a tile whose scale is below 2**-126 is a
# zero tile), and the GEMMs run in float64.

_E4M3_MAX = 448.0
_TILE = 128
_MIN_NORMAL = 2.0**-126  # values below read as zero; a tile whose scale is below it is a zero tile


def round_e4m3(v: np.ndarray) -> np.ndarray:
    """Round float values to the nearest e4m3fn value (ties to even), saturating at +-448; NaN stays NaN."""
    v = np.asarray(v, dtype=np.float64)
    mag = np.abs(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    quantum = np.exp2(np.maximum(exponent, -6.0) - 3.0)  # 3 mantissa bits; subnormal step 2**-9
    rounded = np.round(v / quantum) * quantum  # np.round rounds half to even
    return np.clip(rounded, -_E4M3_MAX, _E4M3_MAX)


def fake_quantize_tiles(tiles: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Fake-quantize ``tiles`` (one tile spans ``axes``): returns the dequantized float64 values."""
    t32 = tiles.astype(np.float32)
    t32 = np.where(np.abs(t32) < _MIN_NORMAL, np.float32(0), t32)
    amax = np.max(np.abs(t32), axis=axes, keepdims=True)
    scale = (amax / np.float32(_E4M3_MAX)).astype(np.float32)
    zero_tile = scale < _MIN_NORMAL
    scale = np.where(zero_tile, np.float32(0), scale)
    divisor = np.where(zero_tile, np.float32(1), scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = round_e4m3((t32 / divisor).astype(np.float32))
        q = np.where(zero_tile, 0.0, q)
        return q * scale.astype(np.float64)


def fq_rows(x: np.ndarray) -> np.ndarray:
    """1x128 tiles along the last axis of x (..., K), in float64."""
    tiles = x.reshape(*x.shape[:-1], -1, _TILE)
    return fake_quantize_tiles(tiles, (-1,)).reshape(x.shape)


def fq_blocks(w: np.ndarray) -> np.ndarray:
    """128x128 blocks over the last two axes of w (E, N, K), in float64."""
    e, n, k = w.shape
    tiles = w.reshape(e, n // _TILE, _TILE, k // _TILE, _TILE)
    return fake_quantize_tiles(tiles, (2, 4)).reshape(w.shape)


def fq_token_tiles(t: np.ndarray) -> np.ndarray:
    """128x1 tiles along rows of one group t (m, C), zero-padded to a multiple of 128 rows, in float64."""
    m = t.shape[0]
    padded = np.zeros((-(-m // _TILE) * _TILE, t.shape[1]), dtype=np.float64)
    padded[:m] = t
    tiles = padded.reshape(-1, _TILE, t.shape[1])
    return fake_quantize_tiles(tiles, (1,)).reshape(padded.shape)[:m]


def group_bounds(offsets: Iterable[int]) -> list[tuple[int, int]]:
    """[(start, end)] row range of each group from cumulative end offsets."""
    ends = [int(v) for v in offsets]
    return list(zip([0] + ends[:-1], ends))


def grouped_mm_fwd_bwd(
    x: np.ndarray, w: np.ndarray, offsets: np.ndarray, dy: np.ndarray, *, quantized: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y (M, N), dx (M, K), dw (E, N, K) in float64 for x (M, K), w (E, N, K), dy (M, N) (numpy arrays).

    ``quantized``: through the FP8 recipe (x and dy in 1x128 tiles, w in 128x128 blocks for y and dx; dy
    and x in 128x1 token tiles within each group for dw), else the exact product. Rows at or past
    ``offsets[-1]`` get zero y and dx.
    """
    m, k = x.shape
    e, n, _ = w.shape
    if quantized:
        xd, wd, dyd = fq_rows(x), fq_blocks(w), fq_rows(dy)
    else:
        xd, wd, dyd = (np.asarray(t, dtype=np.float64) for t in (x, w, dy))
    y, dx, dw = np.zeros((m, n)), np.zeros((m, k)), np.zeros((e, n, k))
    for g, (lo, hi) in enumerate(group_bounds(offsets)):
        if hi == lo:
            continue
        y[lo:hi] = xd[lo:hi] @ wd[g].T
        dx[lo:hi] = dyd[lo:hi] @ wd[g]
        if quantized:
            dw[g] = fq_token_tiles(dy[lo:hi]).T @ fq_token_tiles(x[lo:hi])
        else:
            dw[g] = dyd[lo:hi].T @ xd[lo:hi]
    return y, dx, dw


# ----------------------------------------------------------------------------------------------------
# The benchmark timer
# ----------------------------------------------------------------------------------------------------

# Device-side profiler events that are not operations the call launched (annotation ranges, sync markers).
_NOT_LAUNCHES = ("annotation", "sync", "range", "counter", "overhead")


@dataclass
class Timing:
    """What :func:`time_call` measured for one callable; ``None`` where a number was not measured here.

    - ``median_ms``: time of ONE call, median over ``calls`` calls. ``method == "cuda-events"`` (torch on a
      GPU): CUDA events recorded on the current stream right before and right after each call, calls
      issued back to back (no synchronisation between them, no L2 flush), so it is the GPU time of one
      call in steady state, host stalls included when the host is slower than the GPU. ``"wall+sync"``
      (a ``sync`` was given, e.g. JAX): wall time of the call followed by ``sync(output)``, per call.
      ``"wall"`` (no CUDA device): wall time of the call (CPU torch ops run synchronously).
    - ``cpu_ms``: host time to issue one call: wall time from just before the call to its return, with the
      device drained (synchronised, outside the measurement) before each call, so neither earlier work
      nor a full launch queue is counted; median over ``cpu_calls`` calls. A device-to-host read inside
      the call makes the host wait for the GPU, and that wait is counted (``cpu_ms`` close to
      ``median_ms`` means the host is the bottleneck or the call synchronises).
    - ``launches``: GPU operations per call (kernels, memsets, memcpys) counted in one ``torch.profiler``
      trace of ``profile_calls`` calls, divided by ``profile_calls``. The profiler (CUPTI) sees the whole
      process, so for a JAX callable it also counts XLA's kernels when CUPTI sees them; ``None`` when the
      trace holds no GPU operation (or there is no CUDA device).
    - ``gpu_kernel_ms``: sum of the durations of those operations per call (busy GPU time; less than
      ``median_ms`` by the gaps between kernels).
    - ``peak_mib``: peak memory allocated by torch's CUDA caching allocator during one call (plus the
      wait for its end) above what was allocated just before it, in MiB (outputs included). Measured by
      default only with ``method == "cuda-events"`` (XLA's allocator is not torch's).
    - ``note``: why a number is missing (the profiler failed), else empty.
    - ``kernels``: the ``top_kernels`` GPU operations by total time: name -> [launches, ms] per call.
    """

    median_ms: float
    cpu_ms: float | None = None
    launches: float | None = None
    gpu_kernel_ms: float | None = None
    peak_mib: float | None = None
    method: str = ""
    calls: int = 0
    note: str = ""
    kernels: dict[str, list[float]] | None = field(default=None, repr=False)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _drain(out: Any, sync: Callable[[Any], Any] | None) -> None:
    """Wait for ``out`` (``sync``) and for torch's CUDA work."""
    if sync is not None:
        sync(out)
    if _cuda():
        torch.cuda.synchronize()


def _median_cuda_events(fn: Callable[[], Any], calls: int) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        start.record()
        out = fn()
        end.record()
        del out
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _median_wall(fn: Callable[[], Any], sync: Callable[[Any], Any] | None, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        out = fn()
        if sync is not None:
            sync(out)
        times.append(time.perf_counter() - start)
        del out
    return 1e3 * statistics.median(times)


def _median_host(fn: Callable[[], Any], sync: Callable[[Any], Any] | None, calls: int) -> float:
    times = []
    for _ in range(calls):
        _drain(None, None)
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        _drain(out, sync)
        del out
    return 1e3 * statistics.median(times)


def _profile(
    fn: Callable[[], Any], sync: Callable[[Any], Any] | None, calls: int, top: int
) -> tuple[float | None, float | None, dict[str, list[float]] | None]:
    """(launches, GPU busy ms, top kernels) per call from one profiler trace of ``calls`` calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _drain(None, None)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            out = fn()
            _drain(out, sync)
            del out
    per_name: dict[str, list[float]] = {}
    for event in prof.events():
        kind = (getattr(event, "activity_type", None) or "").lower()
        if event.device_type != DeviceType.CUDA or any(word in kind for word in _NOT_LAUNCHES):
            continue
        entry = per_name.setdefault(event.name[:160], [0.0, 0.0])
        entry[0] += 1 / calls
        entry[1] += (event.time_range.end - event.time_range.start) / 1e3 / calls
    if not per_name:
        return None, None, None
    launches = sum(count for count, _ in per_name.values())
    busy_ms = sum(ms for _, ms in per_name.values())
    ranked = sorted(per_name.items(), key=lambda item: -item[1][1])[:top]
    return launches, busy_ms, {name: [round(c, 3), round(ms, 5)] for name, (c, ms) in ranked}


def _peak_mib(fn: Callable[[], Any], sync: Callable[[Any], Any] | None) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    _drain(out, sync)
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def time_call(
    fn: Callable[[], Any],
    *,
    sync: Callable[[Any], Any] | None = None,
    warmup: int = 3,
    calls: int = 30,
    cpu_calls: int = 10,
    profile_calls: int = 3,
    profile: bool | None = None,
    memory: bool | None = None,
    top_kernels: int = 12,
) -> Timing:
    """Time ``fn()`` (no arguments; its output is dropped after each call): the one timer of the benchmarks.

    ``sync``: called with each output to wait for it, e.g. ``jax.block_until_ready`` for JAX callables,
    whose work runs on XLA's stream (CUDA events on torch's stream do not see it). Without ``sync`` and
    with a CUDA device, calls are timed with CUDA events; without a CUDA device, with ``perf_counter``.
    Runs, in order: ``warmup`` calls (JIT compilation, autotuning), ``calls`` timed calls, ``cpu_calls``
    host-time calls, one profiler trace of ``profile_calls`` calls (``profile``: default on a CUDA
    device) and one call for peak memory (``memory``: default in CUDA-event mode). See :class:`Timing`
    for what each number means.
    """
    if calls < 1:
        raise ValueError(f"calls: expected >= 1, got {calls}")
    cuda = _cuda()
    method = "wall+sync" if sync is not None else ("cuda-events" if cuda else "wall")
    for _ in range(warmup):
        out = fn()
        _drain(out, sync)
        del out
    if method == "cuda-events":
        median = _median_cuda_events(fn, calls)
    else:
        median = _median_wall(fn, sync, calls)
    timing = Timing(median_ms=median, method=method, calls=calls)
    if cpu_calls > 0:
        timing.cpu_ms = _median_host(fn, sync, cpu_calls)
    if (cuda if profile is None else profile) and cuda and profile_calls > 0:
        try:
            timing.launches, timing.gpu_kernel_ms, timing.kernels = _profile(fn, sync, profile_calls, top_kernels)
        except Exception as exc:  # noqa: BLE001  a profiler that cannot run leaves the timing itself valid
            timing.note = f"profiler failed: {type(exc).__name__}: {exc}"[:200]
    if (method == "cuda-events" if memory is None else memory) and cuda:
        timing.peak_mib = _peak_mib(fn, sync)
    return timing


class SavedBytes(NamedTuple):
    """Bytes of the distinct storages saved for the backward: all of them, and those of ``inputs``."""

    total: int
    inputs: int

    @property
    def beyond_inputs(self) -> int:
        return self.total - self.inputs


def _storage_key(t: Tensor) -> tuple[Any, int]:
    try:
        storage = t.untyped_storage()
        return (t.device, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # tensors without a plain storage (subclasses)
        return ("object", id(t)), t.numel() * t.element_size()


def saved_tensor_bytes(fn: Callable[[], Any], inputs: Iterable[Tensor] = ()) -> tuple[SavedBytes, Any]:
    """Run ``fn()`` (a forward with autograd recording) and measure what it saves for the backward.

    Every tensor autograd saves (``ctx.save_for_backward``, built-in ops' saved inputs) passes through a
    ``torch.autograd.graph.saved_tensors_hooks`` pack hook; tensors sharing a storage (views, the same
    tensor saved twice) count once, with their storage's whole size. ``inputs`` (e.g. x and w) are
    counted apart, since every implementation keeps them alive anyway. Returns (SavedBytes, fn's output).
    """
    storages: dict[tuple[Any, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key, nbytes = _storage_key(t)
        storages[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    input_keys = {_storage_key(t)[0] for t in inputs}
    total = sum(storages.values())
    return SavedBytes(total, sum(n for key, n in storages.items() if key in input_keys)), out


# ----------------------------------------------------------------------------------------------------
# Benchmark headers
# ----------------------------------------------------------------------------------------------------

# Distribution names to try for each package's version (the module's __version__ is the fallback).
_DISTRIBUTIONS = {"deep_gemm": ("deepinfer-gemm", "deep_gemm", "deepgemm")}


def package_version(module: str) -> str:
    """Installed version of ``module`` (from its distribution's metadata, else its ``__version__``), or
    ``"not available (...)"``."""
    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        return str(importlib.import_module(module).__version__)
    except Exception as exc:  # noqa: BLE001  a broken optional package is reported, not raised
        return f"not available ({type(exc).__name__})"


def git_commit() -> str:
    """Short hash of the checkout fp8moe is imported from, ``-dirty`` when tracked files changed."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    if head.returncode:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_environment(packages: Iterable[str] = ("torch", "triton", "deep_gemm", "torchao")) -> dict[str, Any]:
    """What a benchmark's header states: date, device (CUDA device name or "CPU"), git commit, versions."""
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "commit": git_commit(),
        "versions": {name: package_version(name) for name in packages},
    }


def check_size_flags(parser, args, counts: tuple[str, ...] = ("experts", "rows", "calls")) -> None:
    """The command-line checks the benchmarks share, as one-line ``parser.error`` exits: each flag in
    ``counts`` >= 1, and ``--n`` / ``--k`` positive multiples of 128."""
    for flag in counts:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: expected >= 1, got {getattr(args, flag)}")
    for flag in ("n", "k"):
        if getattr(args, flag) < 1 or getattr(args, flag) % 128:
            parser.error(f"--{flag}: expected a positive multiple of 128, got {getattr(args, flag)}")


# ----------------------------------------------------------------------------------------------------
# Benchmark reports
# ----------------------------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """A benchmark's call counts for :func:`time_call`, and its time budget (cases still to run after it are
    skipped, with a note)."""

    calls: int
    warmup: int
    cpu_calls: int
    profile_calls: int
    budget_s: float
    start: float = field(default_factory=time.monotonic, repr=False)

    def timer(self, **kwargs) -> dict:
        """``time_call`` keyword arguments: the counts, updated by ``kwargs``."""
        counts = dict(warmup=self.warmup, calls=self.calls, cpu_calls=self.cpu_calls, profile_calls=self.profile_calls)
        return counts | kwargs

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def as_dict(self) -> dict:
        return {"calls": self.calls, "warmup": self.warmup, "cpu_calls": self.cpu_calls,
                "profile_calls": self.profile_calls, "budget_s": self.budget_s}  # fmt: skip


def failure(exc: BaseException) -> str:
    """A benchmark row's note for a case that raised: ``failed: Type: message`` on one line."""
    return f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def fmt(v: float | None, digits: int = 3) -> str:
    """A table cell: ``-`` for a number not measured (None or NaN)."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def pair(a: float | None, b: float | None, digits: int = 3) -> str:
    """Two numbers in one cell, ``a / b`` (fwd / fwd+bwd)."""
    return f"{fmt(a, digits)} / {fmt(b, digits)}"


def write_report(out: Path | None, stem: str, text: str, report: dict) -> None:
    """Write ``text`` to ``out/stem.md`` and ``report`` (dataclasses such as :class:`Timing` inside) to
    ``out/stem.json``; nothing when ``out`` is None."""
    if out is None:
        return
    import json
    from dataclasses import asdict, is_dataclass

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    as_json = json.dumps(report, indent=1, default=lambda o: asdict(o) if is_dataclass(o) else str(o))
    (out / f"{stem}.json").write_text(as_json)
