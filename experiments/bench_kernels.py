"""Per-kernel benchmark of the GPU kernels (quantization and grouped GEMMs) and the end-to-end Triton backend.

In one run, on one GPU, for each shape (default: E=8, M=32768, N=2048, K=7168; its transpose N=7168,
K=2048; M=16384; and a skewed routing with one expert at 40% of the tokens and two empty):
- each quantization kernel alone: GB/s (bytes read once + bytes written) and % of the device-to-device
  copy bandwidth measured in the same run;
- each grouped GEMM alone on pre-quantized operands: TFLOP/s (2 * routed rows * N * K) and % of dense FP8
  ``torch._scaled_mm`` (per-tensor scales) measured in the same run at the same (M, N, K);
- end to end: forward and forward + backward of each case in ``E2E_CASES`` (``grouped_mm(backend=
  "triton")`` beside bf16 ``torch._grouped_mm``).
Times are medians of ``triton.testing.do_bench`` (which also flushes L2 before every call), with inputs
rotated among enough copies that L2 never holds them. Kernel cases are a list of named ``KernelCase``
objects and end-to-end cases a dict, so other backends' kernels (e.g. DeepGEMM) can be added as rows.

    python experiments/bench_kernels.py [--shape NAME:E,M,N,K,ROUTING ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import fp8moe
from fp8moe.backends.triton.kernels import k_grouped_gemm, m_grouped_gemm
from fp8moe.layout import GroupLayout, plan_groups
from fp8moe.quant import triton as tq
from fp8moe.testing import random_offsets

DEFAULT_SHAPES = (
    "seed:8,32768,2048,7168,balanced",
    "transposed:8,32768,7168,2048,balanced",
    "M=16384:8,16384,2048,7168,balanced",
    "skewed:8,32768,2048,7168,skewed",
)


@dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    rows: int
    n: int
    k: int
    routing: str  # "balanced" | "skewed"

    @staticmethod
    def parse(spec: str) -> Shape:
        name, _, rest = spec.partition(":")
        e, m, n, k, routing = rest.split(",")
        if routing not in ("balanced", "skewed"):
            raise ValueError(f"--shape: routing must be balanced or skewed, got {routing!r}")
        return Shape(name, int(e), int(m), int(n), int(k), routing)


@dataclass
class Problem:
    """The bf16 inputs of one shape (``copies`` independent sets, to rotate) and their routing."""

    shape: Shape
    offsets: torch.Tensor
    layout: GroupLayout
    xs: list[torch.Tensor]
    ws: list[torch.Tensor]
    dys: list[torch.Tensor]

    @property
    def routed(self) -> int:
        return int(self.offsets[-1])

    @property
    def flops(self) -> float:
        return 2.0 * self.routed * self.shape.n * self.shape.k

    @functools.cached_property
    def operands(self) -> list[dict[str, torch.Tensor]]:
        """Pre-quantized GEMM operands of the first two input sets (each set is larger than L2)."""
        sets = []
        for x, w, dy in zip(self.xs[:2], self.ws[:2], self.dys[:2]):
            quantized = zip(("wq", "sw", "wq_t", "sw_t"), tq.quantize_weight(w, True))
            rows = zip(("xq", "sx"), tq.quantize_rows_padded(x, self.layout))
            grads = zip(("dyq", "sdy", "dyt", "sdyt"), tq.quantize_grad_output(dy, self.layout))
            tiles = zip(("xt", "sxt"), tq.quantize_token_tiles(x, self.layout))
            sets.append(dict(itertools.chain(quantized, rows, grads, tiles)))
        return sets


@dataclass(frozen=True)
class KernelCase:
    """One kernel timed alone. ``setup(problem)`` returns one call per input set and the work of one call:
    bytes moved for unit "GB/s" (compared with the copy bandwidth), flops for "TFLOP/s" (compared with
    dense FP8 at the shape in ``GEMM_CEILING_SHAPES``)."""

    name: str
    unit: str
    setup: Callable[[Problem], tuple[list[Callable[[], object]], float]]


@dataclass
class Result:
    shape: str
    case: str
    ms: float
    rate: float
    unit: str
    percent_of_ceiling: float
    note: str = ""


@dataclass
class Report:
    date: str
    device: str
    versions: dict
    copy_gbps: float
    dense_fp8_tflops: dict = field(default_factory=dict)
    kernels: list[Result] = field(default_factory=list)
    end_to_end: list[dict] = field(default_factory=list)
    autotuned: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)
    compiled: list[str] = field(default_factory=list)


def median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs the next of ``calls`` each time (so consecutive calls read other buffers)."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copies_needed(bytes_per_set: int) -> int:
    """Input sets to rotate so that the sets not in use exceed twice the L2 size."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, math.ceil(2 * l2 / max(bytes_per_set, 1)) + 1)


def make_problem(shape: Shape, copies: int) -> Problem:
    gen = torch.Generator().manual_seed(0)
    if shape.routing == "balanced":
        offsets = (torch.arange(1, shape.experts + 1, dtype=torch.int32) * (shape.rows // shape.experts)).cuda()
    else:  # one expert takes 40% of the tokens, two get none
        offsets = random_offsets(shape.rows, shape.experts, generator=gen, empty_groups=2, skew=0.4, device="cuda")
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    return Problem(
        shape=shape,
        offsets=offsets,
        layout=plan_groups(offsets, shape.rows),
        xs=[torch.randn(shape.rows, shape.k, **bf16) for _ in range(copies)],
        ws=[torch.randn(shape.experts, shape.n, shape.k, **bf16) / math.sqrt(shape.k) for _ in range(copies)],
        dys=[torch.randn(shape.rows, shape.n, **bf16) for _ in range(copies)],
    )


# ---- kernel cases ----------------------------------------------------------------------------------------


def _quant_case(inputs: str, quantize: Callable[[Problem, torch.Tensor], tuple]) -> Callable:
    """Setup of a quantization kernel case: ``quantize(problem, t)`` for each tensor t of ``problem.<inputs>``;
    the work is the bytes of one input plus all outputs."""

    def setup(p: Problem):
        tensors = getattr(p, inputs)
        out = quantize(p, tensors[0])
        return [functools.partial(quantize, p, t) for t in tensors], nbytes(tensors[0], *out)

    return setup


def _gemm_case(gemm: Callable[[Problem, dict], torch.Tensor]) -> Callable:
    """Setup of a GEMM case: ``gemm(problem, operands)`` for each set of pre-quantized operands."""

    def setup(p: Problem):
        return [functools.partial(gemm, p, ops) for ops in p.operands], p.flops

    return setup


KERNEL_CASES: list[KernelCase] = [
    KernelCase(
        "quant x 1x128 -> padded rows (fwd LHS)",
        "GB/s",
        _quant_case("xs", lambda p, x: tq.quantize_rows_padded(x, p.layout)),
    ),
    KernelCase(
        "quant x 128x1 -> token tiles (wgrad RHS)",
        "GB/s",
        _quant_case("xs", lambda p, x: tq.quantize_token_tiles(x, p.layout)),
    ),
    KernelCase(
        "quant dy -> padded rows + token tiles (one read)",
        "GB/s",
        _quant_case("dys", lambda p, dy: tq.quantize_grad_output(dy, p.layout)),
    ),
    KernelCase(  # the alternative to the one-read kernel, same bytes counted
        "quant dy -> the same by two kernels (two reads)",
        "GB/s",
        _quant_case("dys", lambda p, dy: tq.quantize_rows_padded(dy, p.layout) + tq.quantize_token_tiles(dy, p.layout)),
    ),
    KernelCase(
        "quant w 128x128 -> (E,N,K) + (E,K,N) (one read)",
        "GB/s",
        _quant_case("ws", lambda p, w: tq.quantize_weight(w, True)),
    ),
    KernelCase(
        "triton m-grouped NT: forward",
        "TFLOP/s",
        _gemm_case(lambda p, o: m_grouped_gemm(o["xq"], o["sx"], o["wq"], o["sw"], p.layout, torch.bfloat16)),
    ),
    KernelCase(
        "triton m-grouped NT: dgrad (wq_t)",
        "TFLOP/s",
        _gemm_case(lambda p, o: m_grouped_gemm(o["dyq"], o["sdy"], o["wq_t"], o["sw_t"], p.layout, torch.bfloat16)),
    ),
    KernelCase(
        "triton k-grouped NT: wgrad (bf16 dw)",
        "TFLOP/s",
        _gemm_case(lambda p, o: k_grouped_gemm(o["dyt"], o["sdyt"], o["xt"], o["sxt"], p.layout, torch.bfloat16)),
    ),
]

# The dense FP8 shape each GEMM case is compared with: (M, N, K) of a plain (M, K) x (K, N) product.
GEMM_CEILING_SHAPES: dict[str, Callable[[Shape], tuple[int, int, int]]] = {
    "triton m-grouped NT: forward": lambda s: (s.rows, s.n, s.k),
    "triton m-grouped NT: dgrad (wq_t)": lambda s: (s.rows, s.k, s.n),
    "triton k-grouped NT: wgrad (bf16 dw)": lambda s: (s.n, s.k, s.rows),
}

E2E_CASES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bf16 torch._grouped_mm": lambda x, w, offsets: torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets),
    "fp8moe grouped_mm(backend='triton')": lambda x, w, offsets: fp8moe.grouped_mm(x, w, offsets, backend="triton"),
}


# ---- ceilings ----------------------------------------------------------------------------------------------


def copy_bandwidth_gbps() -> float:
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * nbytes(src) / median_ms(lambda: dst.copy_(src)) / 1e6


def dense_fp8_tflops(m: int, n: int, k: int) -> float:
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).T  # column-major, as _scaled_mm wants
    one = torch.ones((), device="cuda")
    ms = median_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return 2.0 * m * n * k / ms / 1e9


# ---- runs ------------------------------------------------------------------------------------------------


def _tuners() -> dict:
    """The autotuned Triton kernels, by name."""
    from fp8moe.backends.triton import kernels

    gemms = {name: getattr(kernels, name) for name in ("_m_grouped_kernel", "_k_grouped_kernel")}
    return gemms | {name: getattr(tq, name) for name in ("_quantize_tokens_kernel", "_quantize_weight_kernel")}


def _short(config) -> str:
    """A Triton config as "k=v ... wW sS"."""
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"w{config.num_warps}", f"s{config.num_stages}"])


def run_kernels(p: Problem, report: Report) -> None:
    for case in KERNEL_CASES:
        before = {name: getattr(tuner, "configs_timings", None) for name, tuner in _tuners().items()}
        try:
            calls, work = case.setup(p)
            calls[0]()  # compile and autotune outside the timing
            ms = median_ms(rotating(calls))
        except Exception as exc:  # report a failing kernel instead of losing the table
            note = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
            report.kernels.append(Result(p.shape.name, case.name, math.nan, math.nan, case.unit, math.nan, note))
            print(report.kernels[-1], flush=True)
            continue
        for name, tuner in _tuners().items():  # every config's time, when this case ran the autotuner
            timings = getattr(tuner, "configs_timings", None)
            if timings is not None and timings is not before[name]:
                report.tuning[f"{p.shape.name} / {case.name}"] = {_short(c): t[0] for c, t in timings.items()}
        if case.unit == "GB/s":
            rate = work / ms / 1e6
            ceiling = report.copy_gbps
        else:
            rate = work / ms / 1e9
            dims = GEMM_CEILING_SHAPES[case.name](p.shape)
            key = "x".join(map(str, dims))
            if key not in report.dense_fp8_tflops:
                report.dense_fp8_tflops[key] = dense_fp8_tflops(*dims)
            ceiling = report.dense_fp8_tflops[key]
        report.kernels.append(Result(p.shape.name, case.name, ms, rate, case.unit, 100 * rate / ceiling))
        print(report.kernels[-1], flush=True)
        del calls
        torch.cuda.empty_cache()


def graphed(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` captured once in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def run_end_to_end(p: Problem, report: Report) -> None:
    x, w, dy = p.xs[0], p.ws[0], p.dys[0]
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    row = {"shape": p.shape.name}
    for name, fn in E2E_CASES.items():

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x, w, p.offsets)

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(xg, wg, p.offsets), (xg, wg), dy)

        try:
            fwd_bwd()  # compile and autotune outside the timing
            row[name] = {"fwd_ms": median_ms(fwd), "fwd_bwd_ms": median_ms(fwd_bwd)}
            row[name]["fwd_bwd_graph_ms"] = median_ms(graphed(fwd_bwd))
        except Exception as exc:
            row.setdefault(name, {})["note"] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        print(name, row[name], flush=True)
    report.end_to_end.append(row)


def autotuned_configs() -> dict:
    """The config each autotuned Triton kernel picked, per autotune key."""
    return {
        name: {str(key): _short(config) for key, config in tuner.cache.items()} for name, tuner in _tuners().items()
    }


def compiled_resources() -> list[str]:
    """Registers, spills and shared memory of every compiled variant of the Triton kernels (diagnostics;
    read from Triton's JIT cache, whose layout is internal: empty if it changed)."""
    lines = []
    for name, tuner in _tuners().items():
        for cache in tuner.fn.device_caches.values():
            for compiled in cache[0].values():
                md = compiled.metadata
                lines.append(
                    f"{name}: warps={md.num_warps} stages={md.num_stages} shared={md.shared} B "
                    f"regs={getattr(compiled, 'n_regs', '?')} spills={getattr(compiled, 'n_spills', '?')}"
                )
    return lines


def markdown(report: Report) -> str:
    lines = [
        f"# Kernel benchmark, {report.device}, {report.date}",
        "",
        f"Versions: {report.versions}. Median of `triton.testing.do_bench` (L2 flushed, inputs rotated).",
        f"Device-to-device copy: **{report.copy_gbps:.0f} GB/s** (read + write). Dense FP8 `torch._scaled_mm` "
        "(per-tensor scales, bf16 out): "
        + ", ".join(f"{k}: **{v:.0f} TFLOP/s**" for k, v in report.dense_fp8_tflops.items())
        + ".",
        "",
        "## Kernels alone",
        "",
        "| shape | kernel | ms | rate | % of ceiling | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.kernels:
        ceiling = "copy" if r.unit == "GB/s" else "dense FP8"
        rate = f"{r.rate:.0f} {r.unit} | {r.percent_of_ceiling:.0f}% of {ceiling}"
        lines.append(f"| {r.shape} | {r.case} | {r.ms:.3f} | {rate} | {r.note} |")
    names = list(E2E_CASES)
    lines += [
        "",
        "## End to end (x, w, dy bf16)",
        "",
        "Eager calls include the host's launch overhead; the CUDA-graph column replays the captured fwd+bwd.",
        "",
        "| shape | case | fwd ms | fwd+bwd ms | fwd+bwd vs bf16 | fwd+bwd ms, CUDA graph | note |",
        "|---|---|---|---|---|---|---|",
    ]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for row in report.end_to_end:
        base = row.get(names[0], {}).get("fwd_bwd_ms")
        for name in names:
            cell = row.get(name, {})
            both = cell.get("fwd_bwd_ms")
            speed = f"{base / both:.2f}x" if base and both else "-"
            lines.append(
                f"| {row['shape']} | {name} | {ms(cell.get('fwd_ms'))} | {ms(both)} | {speed} | "
                f"{ms(cell.get('fwd_bwd_graph_ms'))} | {cell.get('note', '')} |"
            )
    lines += ["", "## Autotuned configs", ""]
    lines += [
        f"- `{kernel}` {key}: {config}" for kernel, picks in report.autotuned.items() for key, config in picks.items()
    ]
    lines += ["", "## Autotuning: every config's median ms where a case ran the autotuner", ""]
    for case, timings in report.tuning.items():
        lines.append(f"- {case}: " + "; ".join(f"{c}: {t:.3f}" for c, t in timings.items()))
    lines += ["", "## Compiled kernel variants", ""] + [f"- {line}" for line in report.compiled]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="NAME:E,M,N,K,ROUTING (repeatable; default: the issue's four)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device")
    import triton

    shapes = [Shape.parse(s) for s in (args.shape or DEFAULT_SHAPES)]
    torch.manual_seed(0)
    report = Report(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name(),
        versions={"torch": torch.__version__, "triton": triton.__version__},
        copy_gbps=copy_bandwidth_gbps(),
    )
    print(f"copy bandwidth {report.copy_gbps:.0f} GB/s", flush=True)
    for shape in shapes:
        input_bytes = 2 * (shape.rows * shape.k + shape.rows * shape.n + shape.experts * shape.n * shape.k)
        problem = make_problem(shape, copies_needed(input_bytes))
        print(f"== {shape} (routed {problem.routed}, {len(problem.xs)} input sets)", flush=True)
        run_kernels(problem, report)
        if not args.skip_end_to_end:
            run_end_to_end(problem, report)
        del problem
        torch.cuda.empty_cache()
    report.autotuned = autotuned_configs()
    try:
        report.compiled = compiled_resources()
    except (AttributeError, IndexError, TypeError) as exc:  # Triton internals moved: skip the diagnostics
        report.compiled = [f"unavailable: {type(exc).__name__}: {exc}"]
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_kernels.md").write_text(text)
    (args.out / "bench_kernels.json").write_text(json.dumps(asdict(report), indent=1, default=str))


if __name__ == "__main__":
    main()
