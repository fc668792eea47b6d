"""GPU check of direct Triton launches (fp8moe.kernels.launch) and of the backward's memory order.

    python experiments/check_launch.py [--e 8 --m 32768 --n 2048 --k 7168] [--out DIR] [--calls 30]

On a CUDA device (H100/H200; DeepGEMM rows where ``deep_gemm`` runs):

1. **Bits**: every hot kernel (plan, token and weight quantizers in each mode, M-grouped GEMM unpadded and
   padded, zero-unrouted, K-grouped GEMM plain and accumulating, the unpadding of DeepGEMM's dgrad runs),
   launched through Triton (direct launches off) and directly (on, after a first call that fills the cache),
   must give the same bits; and each launcher must actually have taken the direct path (a cache entry, not
   given up). Then ``fp8moe.grouped_mm`` fwd+bwd (DeepGEMM and Triton backends): y, dx, dw equal with
   direct launches on and off, and the DeepGEMM dgrad in runs equal to the one-run gather.
2. **CUDA graph**: the Triton backend's fwd+bwd captured with direct launches on replays bit-identical to
   eager on new inputs and a new routing.
3. **Host time** per call of ``fp8moe.grouped_mm`` fwd and fwd+bwd (seed shape, balanced routing; fresh and
   cached weight) with direct launches on and off (``fp8moe.testing.time_call``: CPU ms, launches, GPU ms,
   peak MiB), and the host time of one launch of each hot kernel alone, Triton's vs direct.
4. **Peak memory** of fwd+bwd against ``experiments/memory_account.py``'s prediction from shapes.

Writes check_launch.json and check_launch.md to ``--out`` (default ``$OUT`` or /tmp/fp8moe-out) and exits
non-zero if a bit check fails. Targets (issue 11): forward <= 0.25 ms CPU, fwd+bwd <= 0.6 ms (DeepGEMM
backend), peak <= 1.5x bf16's 800 MiB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script (python experiments/check_launch.py): the repo root first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fp8moe  # noqa: E402
from experiments import memory_account  # noqa: E402
from fp8moe.kernels import launch  # noqa: E402
from fp8moe.testing import routing_offsets, time_call  # noqa: E402

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(f"{name} {detail}")


def bits(t):
    if isinstance(t, (tuple, list)):
        return [bits(u) for u in t]
    if t is None:
        return None
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def same(a, b) -> bool:
    a, b = bits(a), bits(b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def direct_vs_triton(name: str, fn, kernels) -> None:
    """fn() twice with direct launches (the first fills the cache), once without; same bits."""
    launch.set_enabled(True)
    fn()
    torch.cuda.synchronize()
    direct = fn()
    launch.set_enabled(False)
    triton_own = fn()
    launch.set_enabled(True)
    torch.cuda.synchronize()
    check(f"bits {name}", same(direct, triton_own))
    for kernel in kernels:
        d = launch.direct(kernel)
        check(f"direct path taken {name} {kernel!r}", d.jit is not None and bool(d.entries))


def kernel_checks(e: int, m: int, n: int, k: int) -> None:
    from fp8moe.kernels import gemm, plan, quantize

    gen = torch.Generator(device="cuda").manual_seed(0)
    offsets = routing_offsets("skewed", m, e, align=1, device="cuda")
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(e, n, k, device="cuda", generator=gen) / math.sqrt(k)).bfloat16()
    layout = fp8moe.plan_groups(offsets, m)
    direct_vs_triton("plan", lambda: plan.plan_groups_kernel(offsets, m).data, [plan._plan_kernel])
    for rows, tiles in ((True, True), (True, False), (False, True)):
        direct_vs_triton(
            f"quantize_tokens rows={rows} tiles={tiles}",
            lambda r=rows, t=tiles: quantize.quantize_tokens(x, layout, rowwise=r, token_tiles=t),
            [quantize._quantize_tokens_kernel],
        )
    for transposed in (True, False):
        direct_vs_triton(
            f"quantize_weight transposed={transposed}",
            lambda t=transposed: quantize.quantize_weight(w, t),
            [quantize._quantize_weight_kernel],
        )
    xq, sx, xt, sxt = quantize.quantize_tokens(x, layout)
    dyq, sdy, dyt, sdyt = quantize.quantize_tokens(dy, layout, name="dy")
    wq, sw, wq_t, sw_t = quantize.quantize_weight(w, True)
    real = layout.padded_to_row >= 0  # padded=True leaves all-padding tiles unwritten: compare real rows
    for padded in (False, True):
        for dtype in (torch.bfloat16, torch.float32):
            direct_vs_triton(
                f"m_grouped_gemm padded={padded} {dtype}",
                lambda p=padded, d=dtype: gemm.m_grouped_gemm(xq, sx, wq, sw, layout, d, padded=p)[real if p else ...],
                [gemm._m_grouped_kernel] + ([] if padded else [gemm._zero_unrouted_rows_kernel]),
            )
    direct_vs_triton(
        "k_grouped_gemm",
        lambda: gemm.k_grouped_gemm(dyt, sdyt, xt, sxt, layout, torch.bfloat16),
        [gemm._k_grouped_kernel],
    )
    base = torch.randn(e, n, k, device="cuda", generator=gen)
    direct_vs_triton(
        "k_grouped_gemm accumulate",
        lambda: gemm.k_grouped_gemm(dyt, sdyt, xt, sxt, layout, torch.float32, base.clone(), accumulate=True),
        [gemm._k_grouped_kernel],
    )
    src = torch.randn(layout.num_padded_rows, k, device="cuda", generator=gen).bfloat16()

    def unpad():
        y = torch.full((m, k), float("nan"), device="cuda")
        for first in range(0, layout.num_padded_rows, 1024):
            gemm.unpad_rows(src[first : first + 1024], layout, first, y)
        gemm.zero_unrouted_rows(y, layout)
        return y

    direct_vs_triton("unpad_rows + zero_unrouted_rows", unpad, [gemm._unpad_rows_kernel])
    want = torch.cat([src.float(), src.new_zeros(1, k).float()])[layout.row_to_padded.long()]
    check("unpad_rows == gather", same(unpad(), want))
    if "deepgemm" in available_backends():
        from fp8moe.backends import deepgemm

        for dtype in (torch.bfloat16, torch.float32):
            whole = deepgemm.deepgemm_m_grouped(dyq, sdy, wq_t, sw_t, layout, dtype, None)
            saved = deepgemm._LOW_MEMORY_MIN_BYTES
            deepgemm._LOW_MEMORY_MIN_BYTES = 0
            try:
                runs = deepgemm.deepgemm_m_grouped(dyq, sdy, wq_t, sw_t, layout, dtype, None, low_memory=True)
            finally:
                deepgemm._LOW_MEMORY_MIN_BYTES = saved
            check(f"deepgemm dgrad in runs == one run + gather ({dtype})", same(runs, whole))


def available_backends() -> list[str]:
    info = fp8moe.backend_info("cuda")["backends"]
    return [b for b in ("deepgemm", "triton") if info.get(b) is None]


def fwd_bwd(backend: str, x, w, offsets, dy, **options):
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fp8moe.grouped_mm(xs, ws, offsets, backend=backend, **options)
    y.backward(dy)
    return y.detach(), xs.grad, ws.grad


def op_checks(e: int, m: int, n: int, k: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(e, n, k, device="cuda", generator=gen) / math.sqrt(k)).bfloat16()
    dy = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    for routing in ("balanced", "skewed"):
        offsets = routing_offsets(routing, m, e, align=16, device="cuda")
        for backend in available_backends():
            launch.set_enabled(True)
            fwd_bwd(backend, x, w, offsets, dy, cache_weight=False)
            on = fwd_bwd(backend, x, w, offsets, dy, cache_weight=False)
            launch.set_enabled(False)
            off = fwd_bwd(backend, x, w, offsets, dy, cache_weight=False)
            launch.set_enabled(True)
            check(f"grouped_mm {backend} {routing}: y, dx, dw direct == Triton's launches", same(on, off))


def graph_check(e: int, m: int, n: int, k: int) -> None:
    if "triton" not in available_backends():
        return
    m, k = min(m, 4096), min(k, 1024)
    offs = routing_offsets("balanced", m, e, align=16, device="cuda")
    x = torch.randn(m, k, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(e, n, k, device="cuda") / math.sqrt(k)).bfloat16().requires_grad_()
    dy = torch.randn(m, n, device="cuda").bfloat16()
    launch.set_enabled(True)

    def step():
        y = fp8moe.grouped_mm(x, w, offs, backend="triton")
        return (y, *torch.autograd.grad(y, (x, w), dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        step()  # the second eager call launches directly
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x)), dy.copy_(torch.randn_like(dy))
        offs.copy_(routing_offsets("skewed", m, e, align=16, device="cuda"))
    graph.replay()
    eager = step()
    check("triton fwd+bwd CUDA graph (direct launches) replay == eager", same(list(captured), list(eager)))


def launch_host_us(e: int, m: int, n: int, k: int, reps: int = 200) -> dict:
    """Host us of one launch of each hot kernel: Triton's own vs direct (outputs allocated outside)."""
    from fp8moe.kernels import gemm, plan, quantize

    offsets = routing_offsets("balanced", m, e, align=16, device="cuda")
    layout = fp8moe.plan_groups(offsets, m)
    x = torch.randn(m, k, device="cuda").bfloat16()
    w = torch.randn(e, n, k, device="cuda").bfloat16()
    calls = {
        "plan_groups": lambda: plan.plan_groups_kernel(offsets, m),
        "quantize_tokens (both)": lambda: quantize.quantize_tokens(x, layout),
        "quantize_weight (both)": lambda: quantize.quantize_weight(w, True),
    }
    xq, sx, xt, sxt = quantize.quantize_tokens(x, layout)
    wq, sw, _, _ = quantize.quantize_weight(w, True)
    calls["m_grouped_gemm"] = lambda: gemm.m_grouped_gemm(xq, sx, wq, sw, layout, torch.bfloat16)
    result = {}
    for name, fn in calls.items():
        row = {}
        for label, on in (("triton", False), ("direct", True)):
            launch.set_enabled(on)
            fn(), fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
                if len(times) % 20 == 0:
                    torch.cuda.synchronize()
            times.sort()
            row[label] = 1e6 * times[len(times) // 2]
        launch.set_enabled(True)
        result[name] = row
        print(f"host us per call {name:26s} triton {row['triton']:7.1f}  direct {row['direct']:7.1f}", flush=True)
    return result


def timings(e: int, m: int, n: int, k: int, calls: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(e, n, k, device="cuda") / math.sqrt(k)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    offsets = routing_offsets("balanced", m, e, align=16, device="cuda")
    shape = memory_account.Shape(e, m, n, k)
    rows = []
    for backend in available_backends():
        for cached in (False, True):
            for on in (True, False):
                launch.set_enabled(on)
                fp8moe.clear_weight_cache()

                def fwd():
                    return fp8moe.grouped_mm(x, w, offsets, backend=backend, cache_weight=cached)

                def fwd_bwd():
                    fwd().backward(dy)
                    x.grad = None
                    w.grad = None

                row = {"backend": backend, "weight": "cached" if cached else "fresh", "direct": on}
                for label, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                    t = time_call(fn, warmup=3, calls=calls, cpu_calls=10, profile_calls=3)
                    row[label] = {
                        "ms": t.median_ms,
                        "cpu_ms": t.cpu_ms,
                        "launches": t.launches,
                        "gpu_kernel_ms": t.gpu_kernel_ms,
                        "peak_mib": t.peak_mib,
                    }
                predicted = memory_account.peak_mib(shape, backend, cached)["after"]
                row["predicted_peak_mib"] = predicted
                rows.append(row)
                f, b = row["fwd"], row["fwd_bwd"]
                print(
                    f"{backend:8s} {row['weight']:6s} direct={on!s:5s} fwd {f['ms']:.3f} ms cpu {f['cpu_ms']:.3f} "
                    f"launches {f['launches']} | fwd+bwd {b['ms']:.3f} ms cpu {b['cpu_ms']:.3f} launches "
                    f"{b['launches']} peak {b['peak_mib']:.0f} MiB (predicted {predicted:.0f})",
                    flush=True,
                )
    launch.set_enabled(True)
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"# check_launch, {report['device']}, {report['date']}",
        "",
        f"torch {torch.__version__}, triton {report['triton']}, shape {report['shape']}",
        "",
        "| backend | weight | direct | fwd ms | fwd CPU ms | fwd launches | fwd+bwd ms | fwd+bwd CPU ms "
        "| fwd+bwd launches | peak MiB | predicted peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["timings"]:
        f, b = r["fwd"], r["fwd_bwd"]
        lines.append(
            f"| {r['backend']} | {r['weight']} | {r['direct']} | {f['ms']:.3f} | {f['cpu_ms']:.3f} | {f['launches']} "
            f"| {b['ms']:.3f} | {b['cpu_ms']:.3f} | {b['launches']} | {b['peak_mib']:.0f} "
            f"| {r['predicted_peak_mib']:.0f} |"
        )
    lines += ["", "| kernel | host us Triton | host us direct |", "|---|---|---|"]
    for name, row in report["launch_host_us"].items():
        lines.append(f"| {name} | {row['triton']:.1f} | {row['direct']:.1f} |")
    lines += ["", f"bit checks: {'all passed' if not report['failures'] else report['failures']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("e", 8), ("m", 32768), ("n", 2048), ("k", 7168)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/fp8moe-out")))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_launch needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    shape = (args.e, args.m, args.n, args.k)
    report = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "triton": triton.__version__,
        "shape": dict(zip("emnk", shape)),
        "backends": available_backends(),
        "direct_launch_default": launch.enabled(),
    }
    print(report, flush=True)
    for step in (kernel_checks, op_checks, graph_check):
        try:
            step(*shape)
        except Exception:  # noqa: BLE001  report and go on to the measurements
            FAILURES.append(f"{step.__name__} raised:\n{traceback.format_exc()}")
            print(FAILURES[-1], flush=True)
    report["launch_host_us"] = launch_host_us(*shape)
    torch.cuda.empty_cache()
    report["timings"] = timings(*shape, args.calls)
    report["failures"] = FAILURES
    print(memory_account.report(memory_account.Shape(*shape)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check_launch.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (args.out / "check_launch.md").write_text(text)
    print(text)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
