"""End-to-end benchmark of one MoE expert GEMM (forward, and forward + backward) against the peers.

In one run, on one GPU: every available fp8moe backend, bf16 ``torch._grouped_mm``, DeepGEMM's raw
kernels on pre-quantized operands (the GEMM-only floor), and torchao 0.18's blockwise FP8 grouped GEMM
with its DeepGEMM and emulated backends. Reports median ms (triton.testing.do_bench, L2 flushed), ratios,
TFLOP/s and the peak memory of one forward + backward.

    python experiments/bench_grouped_mm.py [--experts 8 --rows 32768 --n 2048 --k 7168] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fp8moe
from fp8moe.testing import random_offsets


@dataclass
class Row:
    case: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_mib: float | None = None
    note: str = ""


def median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated during one call, above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_offsets(routing: str, rows: int, experts: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if routing == "balanced":
        return torch.arange(1, experts + 1, dtype=torch.int32, device=device) * (rows // experts)
    if routing == "skewed":  # one expert takes 40% of the tokens, two get none
        return random_offsets(rows, experts, generator=gen, empty_groups=2, skew=0.4, device=device)
    return random_offsets(rows, experts, generator=gen, device=device)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in os.environ for the duration of the block."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


# Cases that are an fp8moe backend run under an environment setting (forward and backward).
CASE_ENV = {"fp8moe deepgemm (Triton wgrad)": {"FP8MOE_DEEPGEMM_WGRAD": "triton"}}


def differentiable_cases(offsets: torch.Tensor) -> dict[str, Callable]:
    """name -> f(x, w) -> y for every differentiable implementation available here."""
    cases: dict[str, Callable] = {
        "bf16 torch._grouped_mm": lambda x, w: torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets),
    }
    info = fp8moe.backend_info("cuda")
    for name, reason in info["backends"].items():
        if reason is None and name != "reference":
            cases[f"fp8moe {name}"] = lambda x, w, name=name: fp8moe.grouped_mm(x, w, offsets, backend=name)
    if info["backends"].get("deepgemm") is None:
        cases["fp8moe deepgemm (Triton wgrad)"] = cases["fp8moe deepgemm"]
    try:
        from torchao.prototype.moe_training.blockwise_fp8.grouped_mm import (
            _to_fp8_blockwise_then_scaled_grouped_mm as torchao_mm,
        )
        from torchao.quantization.quantize_.common import KernelPreference
    except ImportError as exc:
        print(f"torchao not available: {exc}")
    else:
        for label, pref in (("deepgemm", KernelPreference.AUTO), ("emulated", KernelPreference.EMULATED)):
            cases[f"torchao 0.18 blockwise ({label})"] = lambda x, w, pref=pref: torchao_mm(
                x, w.transpose(-2, -1), offs=offsets, kernel_preference=pref
            )
    return cases


def time_case(fn: Callable, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> Row:
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return fn(x, w)

    def fwd_bwd():
        y = fn(xg, wg)
        return torch.autograd.grad(y, (xg, wg), dy)

    return Row(case="", fwd_ms=median_ms(fwd), fwd_bwd_ms=median_ms(fwd_bwd), peak_mib=peak_mib(fwd_bwd))


def raw_deepgemm_rows(x, w, dy, offsets) -> list[tuple[str, float, float]]:
    """(name, ms, TFLOP/s) of DeepGEMM's three kernels and the Triton backend's alone, on the same operands
    quantized by fp8moe's kernels (the Triton ones write unpadded rows, DeepGEMM's the padded layout)."""
    import deep_gemm

    from fp8moe.backends import deepgemm
    from fp8moe.backends.triton.kernels import k_grouped_gemm, m_grouped_gemm
    from fp8moe.layout import plan_groups
    from fp8moe.quant import triton as tq

    layout = plan_groups(offsets, x.shape[0])
    wq, sw, wq_t, sw_t = tq.quantize_weight(w, True)
    xq, sx = tq.quantize_rows_padded(x, layout)
    dyq, sdy, dyt, sdyt = tq.quantize_grad_output(dy, layout)
    xt, sxt = tq.quantize_token_tiles(x, layout)
    mp, (n, k) = layout.num_padded_rows, w.shape[1:]
    ks = layout.padded_sizes.tolist()
    routed = int(offsets[-1])
    flops = 2 * routed * n * k
    y_pad = torch.empty(mp, n, dtype=torch.bfloat16, device=x.device)
    dx_pad = torch.empty(mp, k, dtype=torch.bfloat16, device=x.device)
    recipe = dict(recipe_a=(1, 128), recipe_b=(128, 128), disable_ue8m0_cast=True)
    kernels = {
        "DeepGEMM m-grouped NT (forward)": lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
            (xq, sx.T), (wq, sw), y_pad, layout.row_expert, **recipe
        ),
        "DeepGEMM m-grouped NT (dgrad, wq_t)": lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
            (dyq, sdy.T), (wq_t, sw_t), dx_pad, layout.row_expert, **recipe
        ),
        "DeepGEMM k-grouped NT (wgrad, fp32 out)": lambda: deepgemm.k_grouped_gemm(
            dyt, sdyt, xt, sxt, ks, layout, torch.float32, None
        ),
        "DeepGEMM k-grouped NT (wgrad, + cast to bf16)": lambda: deepgemm.k_grouped_gemm(
            dyt, sdyt, xt, sxt, ks, layout, torch.bfloat16, None
        ),
        "Triton m-grouped (forward)": lambda: m_grouped_gemm(xq, sx, wq, sw, layout, torch.bfloat16),
        "Triton m-grouped (dgrad)": lambda: m_grouped_gemm(dyq, sdy, wq_t, sw_t, layout, torch.bfloat16),
        "Triton k-grouped (wgrad, bf16 out)": lambda: k_grouped_gemm(dyt, sdyt, xt, sxt, layout, torch.bfloat16),
    }
    times = {name: median_ms(fn) for name, fn in kernels.items()}
    return [(name, t, flops / t / 1e9) for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--k", type=int, default=7168)
    parser.add_argument("--routings", default="balanced,skewed")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_grouped_mm needs a CUDA device")

    torch.manual_seed(0)
    dev = "cuda"
    e, m, n, k = args.experts, args.rows, args.n, args.k
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(e, n, k, device=dev) / math.sqrt(k)).to(torch.bfloat16)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    device_name = torch.cuda.get_device_name()
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device_name,
        "torch": torch.__version__,
        "shape": dict(experts=e, rows=m, n=n, k=k),
        "backend_info": fp8moe.backend_info("cuda"),
        "routings": {},
    }
    lines = [
        f"# grouped GEMM fwd / fwd+bwd, {device_name}, {report['date']}",
        f"E={e}, M={m}, N={n}, K={k}, x/w/dy bf16, torch {torch.__version__}; median ms (do_bench, L2 flushed);"
        " peak = max memory allocated during one fwd+bwd above the inputs.",
    ]
    for routing in args.routings.split(","):
        offsets = make_offsets(routing, m, e, dev)
        rows = []
        for name, fn in differentiable_cases(offsets).items():
            try:
                with environment(CASE_ENV.get(name, {})):
                    row = time_case(fn, x, w, dy)
            except Exception as exc:  # report a peer that fails instead of losing the whole table
                row = Row(case=name, note=f"failed: {type(exc).__name__}: {str(exc)[:120]}")
            row.case = name
            rows.append(row)
            print(row, flush=True)
        raw = []
        if fp8moe.backend_info("cuda")["backends"]["deepgemm"] is None:
            raw = raw_deepgemm_rows(x, w, dy, offsets)
        report["routings"][routing] = {
            "offsets": offsets.tolist(),
            "rows": [asdict(r) for r in rows],
            "raw_gemms": [dict(kernel=a, ms=b, tflops=c) for a, b, c in raw],
        }
        lines += table(routing, rows, raw, 2 * int(offsets[-1]) * n * k)
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_grouped_mm.md").write_text(text + "\n")
    (args.out / "bench_grouped_mm.json").write_text(json.dumps(report, indent=1))


def table(routing: str, rows: list[Row], raw: list, flops: float) -> list[str]:
    by_name = {r.case: r for r in rows}
    bf16 = by_name.get("bf16 torch._grouped_mm")
    peer = by_name.get("torchao 0.18 blockwise (deepgemm)")

    def ratio(ref: Row | None, row: Row, attr: str) -> str:
        a, b = (getattr(ref, attr, None) if ref else None), getattr(row, attr)
        return f"{a / b:.2f}x" if a and b else "-"

    def ms(v):
        return f"{v:.3f}" if v is not None else "-"

    out = [
        "",
        f"## routing: {routing}",
        "",
        "| case | fwd ms | fwd+bwd ms | fwd speedup vs bf16 | fwd+bwd speedup vs bf16 "
        "| fwd+bwd speedup vs torchao (DeepGEMM) | fwd TFLOP/s | peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tflops = f"{flops / r.fwd_ms / 1e9:.0f}" if r.fwd_ms else "-"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        out.append(
            f"| {r.case} | {ms(r.fwd_ms)} | {ms(r.fwd_bwd_ms)} | {ratio(bf16, r, 'fwd_ms')} | "
            f"{ratio(bf16, r, 'fwd_bwd_ms')} | {ratio(peer, r, 'fwd_bwd_ms')} | {tflops} | {peak} | {r.note} |"
        )
    if raw:
        out += ["", "| raw kernel (pre-quantized operands) | ms | TFLOP/s |", "|---|---|---|"]
        out += [f"| {name} | {t:.3f} | {tf:.0f} |" for name, t, tf in raw]
    return out


if __name__ == "__main__":
    main()
