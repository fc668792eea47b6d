"""End-to-end benchmark of one MoE expert GEMM (forward, and forward + backward) against the peers.

One GPU run produces the whole table: for each routing (default "balanced" and "skewed": one expert takes
~40% of the tokens, two get none; group sizes rounded to multiples of 16 for torchao's row-wise kernel),
every case below, each timed by the one timer of the benchmarks, :func:`fp8moe.testing.time_call`:

- bf16 ``torch._grouped_mm`` (the baseline of the "vs bf16" ratios);
- torchao 0.18 row-wise FP8 (``_to_fp8_rowwise_then_scaled_grouped_mm``, ``torch._scaled_grouped_mm``;
  the baseline of the "vs torchao" ratios) and torchao 0.18 blockwise FP8 on DeepGEMM;
- fp8moe on the "deepgemm" and "triton" backends, each with a fresh weight quantization every call
  (``cache_weight=False``), with the quantized weight cached (``cache_weight=True``, the weight is not
  changed between calls) and cached + fp32 gradient accumulation (``main_grad``: an fp32 (E, N, K) buffer
  the weight gradient is added into); plus "deepgemm" with the Triton wgrad (``wgrad="triton"``);
- DeepGEMM's three raw kernels on operands quantized beforehand (the GEMM-only floor);
- ceilings measured in the same run: device-to-device copy (GB/s, read + write), dense FP8
  ``torch._scaled_mm`` and bf16 matmul (TFLOP/s).

x (M, K) and w (E, N, K) are bf16 and both require grad. "fwd" is the training forward (grad mode on, so
it includes what the forward prepares for the backward; the graph is dropped); "fwd+bwd" is
``y = f(x, w); y.backward(dy)`` with a fixed bf16 ``dy``, then ``x.grad = w.grad = None`` (grads are freed
inside the call, so every call allocates them anew). Per case: median ms of one call (CUDA events, no L2
flush), TFLOP/s (2 * routed rows * N * K per GEMM: one in fwd, three in fwd+bwd), speed-ups vs bf16 and
vs torchao row-wise (their ms / this ms), host (CPU) ms to issue one call, GPU operations launched per
call, GPU kernel ms per call (sum of kernel durations in a profiler trace), peak MiB of one call above
what was allocated before it, and MB saved for the backward (distinct storages; in brackets what is
saved beyond x and w themselves). The exact meaning of each number: ``fp8moe.testing.Timing``. A case
that cannot run here (missing peer, backend, API) is a row with a note, never a crash; cases still to
run when ``--budget-s`` is spent are skipped with a note (the run stays under ~4 minutes on an H200,
DeepGEMM's JIT of each new shape included).

Writes ``bench_grouped_mm.md`` and ``.json`` to ``--out`` (default ``experiments/results``; rewritten after
every routing, so a run cut short keeps what finished) and prints the markdown.

    python experiments/bench_grouped_mm.py [--experts 8 --rows 32768 --n 2048 --k 7168]
        [--routings balanced,skewed] [--calls 30] [--budget-s 180] [--no-profile] [--out DIR]

Without a CUDA device: a tiny smoke run (E=4, M=256, N=128, K=128) through the reference backend that
checks the script end to end (timings mean nothing) and writes files only when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import fp8moe
from fp8moe.testing import (
    ROUTING_PRESETS,
    BenchSettings,
    Timing,
    check_size_flags,
    failure,
    fmt,
    pair,
    routing_offsets,
    run_environment,
    saved_tensor_bytes,
    time_call,
    write_report,
)

SEED_SHAPE = dict(experts=8, rows=32768, n=2048, k=7168)
SMOKE_SHAPE = dict(experts=4, rows=256, n=128, k=128)
BF16 = "bf16 torch._grouped_mm"
TORCHAO_ROWWISE = "torchao row-wise FP8 (_scaled_grouped_mm)"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    case: str
    fwd: Timing | None = None
    fwd_bwd: Timing | None = None
    saved_bytes: int | None = None
    saved_beyond_inputs: int | None = None
    note: str = ""


@dataclass
class Rate:
    """A ceiling or a raw kernel: its time and its rate (TFLOP/s or GB/s)."""

    name: str
    timing: Timing | None = None
    rate: float | None = None
    unit: str = ""
    note: str = ""


# ---------------------------------------------------------------------------------------------- cases

# A differentiable case: f(x, w) -> y, or a note saying why it cannot run here.
CaseFn = Callable[[Tensor, Tensor], Tensor]


def missing_grouped_mm_options(*names: str) -> str | None:
    params = inspect.signature(fp8moe.grouped_mm).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    missing = [name for name in names if name not in params]
    return f"fp8moe.grouped_mm has no {', '.join(missing)} option yet" if missing else None


def fp8moe_cases(offsets: Tensor, w: Tensor, device: str) -> dict[str, CaseFn | str]:
    """fp8moe rows: per backend fresh / cached / cached + main_grad weight, and DeepGEMM with Triton wgrad."""
    info = fp8moe.backend_info(device)["backends"]
    backends = ("deepgemm", "triton") if device == "cuda" else ("reference",)
    cases: dict[str, CaseFn | str] = {}
    for backend in backends:
        reason = info.get(backend, "unknown backend")
        variants: dict[str, tuple[dict, tuple[str, ...]]] = {
            "fresh w": ({"cache_weight": False}, ("cache_weight",)),
            "cached w": ({"cache_weight": True}, ("cache_weight",)),
            "cached w + fp32 main_grad": ({"cache_weight": True, "main_grad": True}, ("cache_weight", "main_grad")),
        }
        if backend == "deepgemm":
            variants["cached w, wgrad=triton"] = ({"cache_weight": True, "wgrad": "triton"}, ("cache_weight", "wgrad"))
        if not reason and missing_grouped_mm_options("cache_weight"):  # before the caching API: the plain call
            cases[f"fp8moe {backend}, default options"] = fp8moe_call(offsets, backend)
        for label, (options, needs) in variants.items():
            name = f"fp8moe {backend}, {label}"
            cases[name] = reason or missing_grouped_mm_options(*needs) or fp8moe_call(offsets, backend, **options)
    return cases


def fp8moe_call(offsets: Tensor, backend: str, *, main_grad: bool = False, **options) -> CaseFn:
    """f(x, w) = fp8moe.grouped_mm(x, w, offsets, backend=backend, **options); with ``main_grad``, an fp32
    buffer shaped like w (allocated at the first call, freed with the function) takes the weight gradient."""
    buffer: list[Tensor] = []

    def call(x: Tensor, w: Tensor) -> Tensor:
        if main_grad and not buffer:
            buffer.append(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        extra = {"main_grad": buffer[0]} if main_grad else {}
        return fp8moe.grouped_mm(x, w, offsets, backend=backend, **options, **extra)

    return call


def torchao_cases(offsets: Tensor, device: str) -> dict[str, CaseFn | str]:
    cases: dict[str, CaseFn | str] = {}
    blockwise = "torchao blockwise FP8 (DeepGEMM)"
    try:
        from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm as rowwise
    except Exception as exc:  # noqa: BLE001  any import failure of the peer is a note
        cases[TORCHAO_ROWWISE] = f"torchao not available: {failure(exc)}"
    else:
        cases[TORCHAO_ROWWISE] = lambda x, w: rowwise(
            x, w.transpose(-2, -1), offsets, pad_token_groups_for_grouped_mm=False
        )
    try:
        from torchao.prototype.moe_training.blockwise_fp8.grouped_mm import (
            _to_fp8_blockwise_then_scaled_grouped_mm as blockwise_mm,
        )
        from torchao.quantization.quantize_.common import KernelPreference
    except Exception as exc:  # noqa: BLE001
        cases[blockwise] = f"torchao not available: {failure(exc)}"
    else:
        cases[blockwise] = lambda x, w: blockwise_mm(
            x, w.transpose(-2, -1), offs=offsets, kernel_preference=KernelPreference.AUTO
        )
    if device != "cuda":
        cases = {name: case if isinstance(case, str) else "needs a CUDA device" for name, case in cases.items()}
    return cases


def differentiable_cases(offsets: Tensor, w: Tensor, device: str) -> dict[str, CaseFn | str]:
    cases: dict[str, CaseFn | str] = {
        BF16: lambda x, w: torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets),
    }
    cases.update(torchao_cases(offsets, device))
    cases.update(fp8moe_cases(offsets, w, device))
    return cases


def measure(fn: CaseFn, x: Tensor, w: Tensor, dy: Tensor, settings: BenchSettings) -> Row:
    def fwd() -> Tensor:
        return fn(x, w)

    def fwd_bwd() -> None:
        fn(x, w).backward(dy)
        x.grad = None
        w.grad = None

    row = Row(case="", fwd=time_call(fwd, **settings.timer()), fwd_bwd=time_call(fwd_bwd, **settings.timer()))
    saved, y = saved_tensor_bytes(fwd, inputs=(x, w))
    del y
    row.saved_bytes, row.saved_beyond_inputs = saved.total, saved.beyond_inputs
    return row


def clear_weight_cache() -> None:
    clear = getattr(fp8moe, "clear_weight_cache", None)
    if clear is not None:
        clear()


# Cases run in this order (the rest after them), so that a spent time budget skips the least needed ones;
# rows are reported in the order of differentiable_cases.
RUN_FIRST = (BF16, TORCHAO_ROWWISE, "cached w", "fresh w", "default options")


def run_order(names: list[str]) -> list[str]:
    def rank(name: str) -> int:
        return next((i for i, key in enumerate(RUN_FIRST) if name == key or name.endswith(key)), len(RUN_FIRST))

    return sorted(names, key=rank)


def run_cases(offsets: Tensor, x: Tensor, w: Tensor, dy: Tensor, device: str, settings: BenchSettings) -> list[Row]:
    rows = []
    cases = differentiable_cases(offsets, w, device)
    display = list(cases)
    for name in run_order(display):
        fn = cases.pop(name)  # dropped after its row: frees what it holds (a main_grad buffer)
        if isinstance(fn, str):
            rows.append(Row(name, note=fn))
        elif settings.over_budget():
            rows.append(Row(name, note="skipped: --budget-s time budget spent"))
        else:
            clear_weight_cache()
            try:
                rows.append(measure(fn, x, w, dy, settings))
                rows[-1].case = name
            except Exception as exc:  # noqa: BLE001  a case that fails is a row with a note
                rows.append(Row(name, note=failure(exc)))
            finally:
                x.grad = w.grad = None
                del fn
                clear_weight_cache()
                if device == "cuda":
                    torch.cuda.empty_cache()
        print(f"[{settings.elapsed():6.1f} s] {rows[-1].case}: {rows[-1].note or 'done'}", file=sys.stderr)
    return sorted(rows, key=lambda row: display.index(row.case))


# ---------------------------------------------------------------------------------------------- floors and ceilings


def raw_deepgemm(x: Tensor, w: Tensor, dy: Tensor, offsets: Tensor, settings: BenchSettings) -> list[Rate]:
    """DeepGEMM's forward, dgrad and wgrad kernels alone, on operands quantized beforehand (by fp8moe's public
    reference quantizers, laid out as DeepGEMM wants them: 128-row padded groups, MN-major scales)."""
    names = ("DeepGEMM m-grouped NT (forward)", "DeepGEMM m-grouped NT (dgrad)", "DeepGEMM k-grouped NT (wgrad, fp32)")
    reason = fp8moe.backend_info(x.device)["backends"].get("deepgemm")
    if reason:
        return [Rate(name, note=reason) for name in names]
    if settings.over_budget():
        return [Rate(name, note="skipped: --budget-s time budget spent") for name in names]
    import deep_gemm

    e, n, k = w.shape
    dev = x.device
    ends = offsets.tolist()
    sizes = [hi - lo for lo, hi in zip([0] + ends[:-1], ends)]
    padded = [-(-s // 128) * 128 for s in sizes]
    starts = [sum(padded[:g]) for g in range(e)]
    mp, routed = sum(padded), ends[-1]
    dst = torch.cat([torch.arange(p, p + s) for p, s in zip(starts, sizes)]).to(dev)
    row_expert = torch.full((mp,), -1, dtype=torch.int32)
    for g, (p, s) in enumerate(zip(starts, sizes)):
        row_expert[p : p + s] = g
    row_expert = row_expert.to(dev)

    def pad_rows(t: Tensor) -> Tensor:  # (M, C) -> (Mp, C), each group at its 128-aligned start, zeros between
        view = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
        out = torch.zeros(mp, t.shape[1], dtype=view.dtype, device=dev).index_copy_(0, dst, view[:routed])
        return out.view(t.dtype)

    def rows_operand(t: Tensor) -> tuple[Tensor, Tensor]:  # 1x128 tiles, padded, scales (C/128, Mp) MN-major
        q, s = fp8moe.quantize_rowwise(t)
        return pad_rows(q), pad_rows(s).T.contiguous().T

    def token_tiles_operand(t: Tensor) -> tuple[Tensor, Tensor]:  # 128x1 tiles per group, K-major flat
        q, s = fp8moe.quantize_colwise(pad_rows(t))  # q (Mp, C), s (Mp/128, C)
        q8 = q.view(torch.uint8)
        flat = torch.cat([q8[p : p + kg].T.contiguous().flatten() for p, kg in zip(starts, padded)])
        return flat.view(torch.float8_e4m3fn), s.T

    wq, sw = fp8moe.quantize_blockwise(w)
    wq_t = wq.view(torch.uint8).transpose(1, 2).contiguous().view(torch.float8_e4m3fn)
    sw_t = sw.transpose(1, 2).contiguous()
    xq, sx = rows_operand(x)
    dyq, sdy = rows_operand(dy)
    dyt, sdyt = token_tiles_operand(dy)
    xt, sxt = token_tiles_operand(x)
    y_pad = torch.empty(mp, n, dtype=torch.bfloat16, device=dev)
    dx_pad = torch.empty(mp, k, dtype=torch.bfloat16, device=dev)
    dw = torch.zeros(e, n, k, dtype=torch.float32, device=dev)
    ks, ks_tensor = padded, torch.tensor(padded, dtype=torch.int32, device=dev)
    recipe = dict(recipe_a=(1, 128), recipe_b=(128, 128), disable_ue8m0_cast=True)
    kernels = {
        names[0]: lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous((xq, sx), (wq, sw), y_pad, row_expert, **recipe),
        names[1]: lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
            (dyq, sdy), (wq_t, sw_t), dx_pad, row_expert, **recipe
        ),
        names[2]: lambda: deep_gemm.k_grouped_fp8_gemm_nt_contiguous((dyt, sdyt), (xt, sxt), dw, ks, ks_tensor, c=dw),
    }
    flops = 2 * routed * n * k
    out = []
    for name, fn in kernels.items():
        try:
            t = time_call(fn, **settings.timer(memory=False))
            out.append(Rate(name, t, flops / t.median_ms / 1e9, "TFLOP/s"))
        except Exception as exc:  # noqa: BLE001
            out.append(Rate(name, note=failure(exc)))
    return out


def ceilings(m: int, n: int, k: int, settings: BenchSettings) -> list[Rate]:
    """Copy bandwidth, dense FP8 and bf16 GEMM throughput at (M, N, K) = (rows, N, K), in this run."""
    out = []
    dev = "cuda"

    def attempt(name: str, unit: str, per_ms: float, fn: Callable[[], object]) -> None:
        """``per_ms``: the work of one call in ``unit`` x milliseconds (rate = per_ms / ms)."""
        try:
            t = time_call(fn, **settings.timer(memory=False, profile=False, cpu_calls=0))
            out.append(Rate(name, t, per_ms / t.median_ms, unit))
        except Exception as exc:  # noqa: BLE001
            out.append(Rate(name, note=failure(exc)))

    def copy() -> Callable[[], object]:
        src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    attempt("device-to-device copy, 1 GiB (read + write)", "GB/s", 2 * (1 << 30) / 1e6, copy())
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    one = torch.ones((), device=dev)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    attempt(
        f"dense FP8 torch._scaled_mm ({m}x{k} @ {k}x{n}, per-tensor scales, fast accumulation)",
        "TFLOP/s",
        2 * m * n * k / 1e9,
        lambda: torch._scaled_mm(a8, b8.T, one, one, out_dtype=torch.bfloat16, use_fast_accum=True),
    )
    attempt(f"bf16 matmul ({m}x{k} @ {k}x{n})", "TFLOP/s", 2 * m * n * k / 1e9, lambda: a @ b.T)
    return out


# ---------------------------------------------------------------------------------------------- report


def routing_table(rows: list[Row], flops: float) -> list[str]:
    by_case = {r.case: r for r in rows}

    def ms(row: Row | None, which: str) -> float | None:
        t = getattr(row, which) if row else None
        return t.median_ms if t else None

    def speedup(ref: Row | None, row: Row, which: str) -> float | None:
        a, b = ms(ref, which), ms(row, which)
        return a / b if a and b else None

    def tflops(row: Row, which: str, gemms: int) -> float | None:
        t = ms(row, which)
        return gemms * flops / t / 1e9 if t else None

    def attr(row: Row, name: str) -> tuple[float | None, float | None]:
        return tuple(getattr(t, name) if t else None for t in (row.fwd, row.fwd_bwd))

    out = [
        "| case | fwd ms | fwd+bwd ms | TFLOP/s fwd / fwd+bwd | speed-up vs bf16 fwd / fwd+bwd "
        "| speed-up vs torchao row-wise fwd / fwd+bwd | CPU ms per call fwd / fwd+bwd | launches fwd / fwd+bwd "
        "| GPU kernel ms fwd / fwd+bwd | peak MiB fwd / fwd+bwd | saved for bwd MB (beyond x, w) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bf16, rowwise = by_case.get(BF16), by_case.get(TORCHAO_ROWWISE)
    for r in rows:
        saved = "-" if r.saved_bytes is None else f"{r.saved_bytes / 1e6:.1f} (+{r.saved_beyond_inputs / 1e6:.1f})"
        notes = [r.note] + [t.note for t in (r.fwd, r.fwd_bwd) if t and t.note]
        out.append(
            f"| {r.case} | {fmt(ms(r, 'fwd'))} | {fmt(ms(r, 'fwd_bwd'))} "
            f"| {pair(tflops(r, 'fwd', 1), tflops(r, 'fwd_bwd', 3), 0)} "
            f"| {pair(speedup(bf16, r, 'fwd'), speedup(bf16, r, 'fwd_bwd'), 2)} "
            f"| {pair(speedup(rowwise, r, 'fwd'), speedup(rowwise, r, 'fwd_bwd'), 2)} "
            f"| {pair(*attr(r, 'cpu_ms'))} | {pair(*attr(r, 'launches'), 0)} | {pair(*attr(r, 'gpu_kernel_ms'))} "
            f"| {pair(*attr(r, 'peak_mib'), 0)} | {saved} | {'; '.join(n for n in notes if n)} |"
        )
    return out


def rate_table(title: str, rates: list[Rate]) -> list[str]:
    out = [f"| {title} | ms | rate | launches per call | note |", "|---|---|---|---|---|"]
    for r in rates:
        rate = f"{r.rate:.0f} {r.unit}" if r.rate is not None else "-"
        t = r.timing
        cells = f"{fmt(t.median_ms if t else None)} | {rate} | {fmt(t.launches if t else None, 0)}"
        out.append(f"| {r.name} | {cells} | {'; '.join(n for n in (r.note, t.note if t else '') if n)} |")
    return out


def render(report: dict) -> str:
    s, v, timer = report["shape"], report["versions"], report["timer"]
    lines = [
        f"# fp8moe grouped GEMM: fwd and fwd+bwd against bf16 and torchao ({report['device']}, {report['date']})",
        "",
        f"Versions: torch {v['torch']}, triton {v['triton']}, DeepGEMM {v['deep_gemm']}, torchao {v['torchao']}; "
        f"git commit {report['commit']}.",
        "",
        f"E={s['experts']}, M={s['rows']}, N={s['n']}, K={s['k']}; x (M, K) and w (E, N, K) bf16, both requiring "
        "grad; group sizes rounded to multiples of 16 (torchao row-wise needs them). fwd: the training forward; "
        "fwd+bwd: `y = f(x, w); y.backward(dy)` with a fixed bf16 dy, grads freed in every call. Median ms of one "
        f"call over {timer['calls']} calls (CUDA events, calls back to back, no L2 flush; wall time without a GPU); "
        "CPU ms: host time to issue one call from an idle GPU; launches (kernels, memsets, copies) and GPU kernel "
        f"ms per call from one profiler trace of {timer['profile_calls']} calls; peak: max memory allocated during "
        "one call above what was allocated before it; saved: distinct storages autograd saves in the forward (in "
        "brackets: beyond x and w). TFLOP/s counts 2*routed*N*K per GEMM (1 GEMM fwd, 3 fwd+bwd); a speed-up is "
        "the reference's ms over this row's. Definitions: `fp8moe.testing.Timing`.",
    ]
    if report["ceilings"]:
        lines += ["", "## Ceilings (same run)", "", *rate_table("ceiling", report["ceilings"])]
    for routing, result in report["routings"].items():
        lines += [
            "",
            f"## Routing: {routing} (group sizes {result['group_sizes']}, {result['routed_rows']} routed rows)",
            "",
            *routing_table(result["rows"], result["flops_per_gemm"]),
        ]
        if result["raw"]:
            lines += ["", *rate_table("raw GEMM on pre-quantized operands", result["raw"])]
    return "\n".join(lines)


def write(report: dict, out: Path | None) -> str:
    """The markdown of ``report`` (Row, Rate and Timing objects inside), written with the JSON to ``out``."""
    text = render(report)
    write_report(out, "bench_grouped_mm", text, report)
    return text


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=SEED_SHAPE["experts"])
    parser.add_argument("--rows", type=int, default=SEED_SHAPE["rows"])
    parser.add_argument("--n", type=int, default=SEED_SHAPE["n"])
    parser.add_argument("--k", type=int, default=SEED_SHAPE["k"])
    parser.add_argument(
        "--routings", default="balanced,skewed", help=f"comma-separated, of {', '.join(ROUTING_PRESETS)}"
    )
    parser.add_argument("--calls", type=int, default=30, help="timed calls per measurement (median)")
    parser.add_argument("--budget-s", type=float, default=180.0, help="skip the cases still to run after this")
    parser.add_argument("--no-profile", action="store_true", help="no profiler trace (no launches, GPU kernel ms)")
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/results (GPU); none on CPU")
    args = parser.parse_args(argv)
    check_size_flags(parser, args)
    args.routings = args.routings.split(",")
    for routing in args.routings:
        if routing not in ROUTING_PRESETS:
            parser.error(f"--routings: {routing!r} is not one of {', '.join(ROUTING_PRESETS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        device, out = "cuda", args.out or REPO / "experiments" / "results"
        profile_calls = 0 if args.no_profile else 3
        settings = BenchSettings(
            args.calls, warmup=3, cpu_calls=10, profile_calls=profile_calls, budget_s=args.budget_s
        )
    else:
        print(
            "no CUDA device: smoke run of a tiny shape on the reference backend (timings mean nothing)", file=sys.stderr
        )
        vars(args).update(SMOKE_SHAPE)
        device, out = "cpu", args.out
        settings = BenchSettings(calls=3, warmup=1, cpu_calls=2, profile_calls=0, budget_s=args.budget_s)
    e, m, n, k = args.experts, args.rows, args.n, args.k
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(e, n, k, device=device) / math.sqrt(k)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    report: dict = {
        **run_environment(("torch", "triton", "deep_gemm", "torchao")),
        "device": torch.cuda.get_device_name() if on_gpu else "CPU (smoke run)",
        "shape": dict(experts=e, rows=m, n=n, k=k),
        "timer": settings.as_dict(),
        "backend_info": fp8moe.backend_info(device),
        "ceilings": [],
        "routings": {},
    }
    if on_gpu:
        try:
            report["ceilings"] = ceilings(m, n, k, settings)
        except Exception as exc:  # noqa: BLE001  the GEMM rows still run
            report["ceilings"] = [Rate("ceilings", note=failure(exc))]
        torch.cuda.empty_cache()
    for routing in args.routings:
        offsets = routing_offsets(routing, m, e, align=16, device=device)
        routed = int(offsets[-1])
        rows = run_cases(offsets, x, w, dy, device, settings)
        raw = []
        if on_gpu:
            try:
                raw = raw_deepgemm(x.detach(), w.detach(), dy, offsets, settings)
            except Exception as exc:  # noqa: BLE001  e.g. preparing the operands failed
                raw = [Rate("DeepGEMM raw GEMMs", note=failure(exc))]
            torch.cuda.empty_cache()
        report["routings"][routing] = {
            "offsets": offsets.tolist(),
            "group_sizes": torch.diff(offsets.cpu(), prepend=offsets.new_zeros(1).cpu()).tolist(),
            "routed_rows": routed,
            "flops_per_gemm": 2 * routed * n * k,
            "rows": rows,
            "raw": raw,
        }
        text = write(report, out)
    print(text)
    if out is not None:
        print(f"wrote {out / 'bench_grouped_mm.md'} and bench_grouped_mm.json", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
