"""Micro-benchmark of the quantization kernels (fp8moe.kernels.quantize), checked bit-exact on the same GPU.

In one run, on one GPU, bf16 inputs unless a row says fp32:
- tokens, balanced routing over 8 experts: x (32768, 7168) and dy (32768, 2048), each quantized rowwise
  only (the M-grouped GEMM's operand), token tiles only (the wgrad's) and both from one read;
- weights (8, 2048, 7168) and (8, 7168, 2048), bf16 and fp32, with and without the transposed layout
  (fp32 + transposed twice: the single-read kernel, the default, and the transposed-copy path with
  ``FP32_WEIGHT_SINGLE_READ`` off).
Per case: the median ms of one call, timed by CUDA events around each call (no L2 flush in front; the
inputs rotate over three copies, each larger than L2), GB/s counting the bytes read (the input, once) and
written (every output), and % of a device-to-device copy of as many bytes (read + write) timed the same
way in the same run. Then a bit-exactness check of every output against the reference recipe on the same
input and GPU (``ReferenceQuantizer().tokens`` / ``fp8moe.quant.reference.quantize_blockwise``, which
divide tensor by tensor: the IEEE quotient on the GPU too; codes and scales compared as bits, mismatches
printed), and, per token tensor, two single-layout kernels (rowwise + token tiles) against one
both-layout kernel. The kernels autotune over their own configs, and every config's time is reported
where a case ran the autotuner.

    python experiments/bench_kernels.py [--out DIR] [--iters N]

Writes DIR/bench_kernels.md and DIR/bench_kernels.json. Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

COPIES = 3  # input sets rotated between calls (each input is larger than the 50 MB L2 of an H200)
EXPERTS = 8
TOKEN_SHAPES = {"x": (32768, 7168), "dy": (32768, 2048)}
WEIGHT_SHAPES = ((8, 2048, 7168), (8, 7168, 2048))
TOKEN_MODES = {"rowwise": (True, False), "tiles": (False, True), "both": (True, True)}


@dataclass
class Row:
    case: str
    impl: str
    ms: float
    gbps: float
    copy_ms: float
    percent_of_copy: float
    bytes: int
    note: str = ""


@dataclass
class Report:
    date: str
    device: str
    versions: dict
    rows: list[Row] = field(default_factory=list)
    exactness: list[dict] = field(default_factory=list)
    split_vs_both: list[dict] = field(default_factory=list)
    autotuned: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)
    seconds: float = 0.0


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def median_ms(fn: Callable[[int], object], iters: int, warmup: int) -> float:
    """Median of ``iters`` calls ``fn(i)``, each between two CUDA events (i rotates the input copy)."""
    for i in range(warmup):
        fn(i)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


class CopyCeiling:
    """Device-to-device copies of a given number of bytes moved (read + write), timed like the kernels."""

    def __init__(self, iters: int, warmup: int):
        self.iters, self.warmup, self.cache = iters, warmup, {}

    def ms(self, moved: int) -> float:
        if moved not in self.cache:
            n = moved // 2
            srcs = [torch.empty(n, dtype=torch.uint8, device="cuda").random_() for _ in range(COPIES)]
            dst = torch.empty(n, dtype=torch.uint8, device="cuda")
            self.cache[moved] = median_ms(lambda i: dst.copy_(srcs[i % COPIES]), self.iters, self.warmup)
            del srcs, dst
        return self.cache[moved]


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits as an integer tensor of the same shape (1-byte codes, 4-byte scales)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def compare(name: str, new: tuple, ref: tuple) -> dict:
    """Bitwise comparison of the kernel's outputs with the reference's; prints and returns the mismatches."""
    result = {"case": name, "outputs": []}
    if len(new) != len(ref):
        result["outputs"].append({"mismatch": f"{len(new)} outputs vs {len(ref)}"})
    for i, (a, b) in enumerate(zip(new, ref)):
        entry = {"output": i, "shape": list(a.shape), "dtype": str(a.dtype)}
        if a.shape != b.shape or a.dtype != b.dtype:
            entry["mismatch"] = f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        else:
            bad = (bits(a) != bits(b)).nonzero()
            entry["mismatches"] = int(bad.shape[0])
            if bad.numel():
                at = tuple(bad[0].tolist())
                entry["first"] = {"index": list(at), "kernel": int(bits(a)[at]), "reference": int(bits(b)[at])}
        result["outputs"].append(entry)
    bad = [e for e in result["outputs"] if e.get("mismatches", 1)]
    result["bit_exact"] = not bad
    print(f"exactness {name}: " + ("bit-exact" if not bad else f"MISMATCH {bad}"), flush=True)
    return result


def tuned(report: Report, case: str, tuner, call: Callable[[], object]) -> object:
    """``call()``, recording every config's time under ``case`` if it ran ``tuner``'s autotuning."""
    before = getattr(tuner, "configs_timings", None)
    result = call()
    timings = getattr(tuner, "configs_timings", None)
    if timings is not None and timings is not before:
        report.tuning[case] = {short(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
    return result


def short(config) -> str:
    """A Triton config as "K=V ... wW maxnreg=R"."""
    kw = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw} w{config.num_warps}" + (f" maxnreg={config.maxnreg}" if getattr(config, "maxnreg", None) else "")


def run_tokens(report: Report, ceiling: CopyCeiling, args, kq) -> None:
    from fp8moe.backends.reference import ReferenceQuantizer
    from fp8moe.plan import plan_groups

    for tensor, (m, c) in TOKEN_SHAPES.items():
        offsets = (torch.arange(1, EXPERTS + 1, dtype=torch.int32) * (m // EXPERTS)).cuda()
        layout = plan_groups(offsets, m)
        xs = [torch.randn(m, c, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
        times = {}
        for mode, (rowwise, tiles) in TOKEN_MODES.items():
            case = f"{tensor} {tuple(xs[0].shape)} bf16, {mode}"

            def fn(x, r=rowwise, t=tiles):
                return kq.quantize_tokens(x, layout, rowwise=r, token_tiles=t)

            first = xs[0]
            out = tuned(report, case, kq._quantize_tokens_kernel, lambda: fn(first))  # compile and autotune
            moved = nbytes(xs[0], *out)
            ms = median_ms(lambda i, xs=xs: fn(xs[i % COPIES]), args.iters, args.warmup)
            times[mode] = ms
            add_row(report, ceiling, case, "new", ms, moved)
            report.exactness.append(compare(case, out, ReferenceQuantizer().tokens(first, layout, rowwise, tiles)))
            del out
            torch.cuda.empty_cache()
        split = times["rowwise"] + times["tiles"]
        report.split_vs_both.append({"tensor": tensor, "split_ms": split, "both_ms": times["both"]})
        del xs
        torch.cuda.empty_cache()


def run_weights(report: Report, ceiling: CopyCeiling, args, kq) -> None:
    from fp8moe.quant.reference import quantize_blockwise

    for shape in WEIGHT_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            ws = [torch.randn(shape, device="cuda", dtype=dtype) / 64 for _ in range(COPIES)]
            wq, sw = quantize_blockwise(ws[0])
            for transposed in (False, True):
                impls = {"new": None}
                if dtype == torch.float32 and transposed:
                    impls = {"new, fp32 single read": True, "new, fp32 transposed copy": False}
                name = "bf16" if dtype == torch.bfloat16 else "fp32"
                case = f"w {shape} {name}, " + ("both layouts" if transposed else "(E,N,K) only")
                empty = (wq.new_empty(0), sw.new_empty(0))
                ref = (
                    wq,
                    sw,
                    *((wq.transpose(1, 2).contiguous(), sw.transpose(1, 2).contiguous()) if transposed else empty),
                )
                for impl, single_read in impls.items():
                    saved = kq.FP32_WEIGHT_SINGLE_READ
                    if single_read is not None:
                        kq.FP32_WEIGHT_SINGLE_READ = single_read
                    try:
                        first = ws[0]
                        out = tuned(
                            report,
                            f"{case} [{impl}]",
                            kq._quantize_weight_kernel,
                            lambda: kq.quantize_weight(first, transposed),
                        )
                        moved = nbytes(ws[0], *out)
                        ms = median_ms(
                            lambda i, ws=ws, t=transposed: kq.quantize_weight(ws[i % COPIES], t),
                            args.iters,
                            args.warmup,
                        )
                    finally:
                        kq.FP32_WEIGHT_SINGLE_READ = saved
                    add_row(report, ceiling, case, impl, ms, moved)
                    report.exactness.append(compare(f"{case} [{impl}]", out, ref))
                    del out
                del ref
            del ws, wq, sw
            torch.cuda.empty_cache()


def add_row(report: Report, ceiling: CopyCeiling, case: str, impl: str, ms: float, moved: int) -> None:
    copy_ms = ceiling.ms(moved)
    row = Row(case, impl, ms, moved / ms / 1e6, copy_ms, 100 * copy_ms / ms, moved)
    report.rows.append(row)
    print(f"{case:44s} {impl:24s} {ms:7.3f} ms {row.gbps:6.0f} GB/s {row.percent_of_copy:4.0f}% of copy", flush=True)


def autotuned(kq) -> dict:
    """The config each autotuned kernel picked, per autotune key."""
    tuners = {
        "_quantize_tokens_kernel": kq._quantize_tokens_kernel,
        "_quantize_weight_kernel": kq._quantize_weight_kernel,
    }
    return {name: {str(key): short(config) for key, config in t.cache.items()} for name, t in tuners.items()}


def markdown(report: Report) -> str:
    lines = [
        f"# Quantization kernels, {report.device}, {report.date}",
        "",
        f"Versions: {report.versions}. Median of per-call CUDA-event times, inputs rotated over {COPIES} copies "
        "(no L2 flush). GB/s: bytes read (the input once) + bytes written (all outputs). % of copy: a "
        f"device-to-device copy moving as many bytes, timed the same way. Run time {report.seconds:.0f} s.",
        "",
        "| case | impl | ms | GB/s | copy ms | % of copy |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.case} | {r.impl} | {r.ms:.3f} | {r.gbps:.0f} | {r.copy_ms:.3f} | {r.percent_of_copy:.0f}% |"
        )
    lines += ["", "## Two single-layout kernels (rowwise + token tiles) vs one both-layout kernel", ""]
    for e in report.split_vs_both:
        lines.append(f"- {e['tensor']}: {e['split_ms']:.3f} ms vs {e['both_ms']:.3f} ms")
    if report.split_vs_both:
        split = sum(e["split_ms"] for e in report.split_vs_both)
        both = sum(e["both_ms"] for e in report.split_vs_both)
        lines.append(f"- x+dy: two single-layout kernels {split:.3f} ms vs one both-layout kernel {both:.3f} ms")
    lines += ["", "## Bit-exactness against the reference recipe (same input, same device)", ""]
    for e in report.exactness:
        verdict = "bit-exact" if e["bit_exact"] else "**MISMATCH** " + json.dumps(e["outputs"])
        lines.append(f"- {e['case']}: {verdict}")
    lines += ["", "## Autotuned configs", ""]
    for kernel, picks in report.autotuned.items():
        for key, config in picks.items():
            lines.append(f"- {kernel} `{key}`: {config}")
    lines += ["", "## Every config's median ms where a case ran the autotuner", ""]
    for case, timings in report.tuning.items():
        lines.append(f"- {case}: " + "; ".join(f"{c}: {t:.3f}" for c, t in timings.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing to measure")
        return
    import triton

    from fp8moe.kernels import quantize as kq

    started = time.perf_counter()
    torch.manual_seed(0)
    report = Report(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name(),
        versions={"torch": torch.__version__, "triton": triton.__version__},
    )
    ceiling = CopyCeiling(args.iters, args.warmup)
    run_tokens(report, ceiling, args, kq)
    run_weights(report, ceiling, args, kq)
    report.autotuned = autotuned(kq)
    report.seconds = time.perf_counter() - started
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_kernels.md").write_text(text)
    (args.out / "bench_kernels.json").write_text(json.dumps(asdict(report), indent=1, default=str))


if __name__ == "__main__":
    main()
