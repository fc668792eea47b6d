"""JAX companion of bench_grouped_mm: the bridge beside the torch-native call and beside bf16 ragged_dot.

In one run, on one GPU, for each fp8moe GPU backend: ``jax_bridge.grouped_mm`` jitted (forward, and
forward + backward through ``jax.vjp``, returning y, dx, dw) beside ``fp8moe.grouped_mm`` called from torch
on the same values (forward under ``no_grad``; forward + backward through ``torch.autograd.grad``; with
``cache_weight=False`` where that option exists, since the bridge quantizes the weight in every call),
and ``jax.lax.ragged_dot`` in bf16 (forward, and forward + backward) as the JAX baseline, with
``jax_bridge.grouped_mm_bf16`` (``torch._grouped_mm`` in bf16 through the bridge) beside it. Also checks that
the bridge returns the torch op's bits.

Every row is timed the same way, by the benchmarks' one timer :func:`fp8moe.testing.time_call` with a
``sync``: wall time of one call followed by a wait for its outputs (``jax.block_until_ready``; for the
torch rows ``torch.cuda.synchronize``), median over ``--calls`` calls; CUDA events are not used because
XLA runs on its own stream. Also per call: host ms to issue it (its outputs not waited for), GPU operations
launched and GPU kernel ms (from one torch.profiler trace; CUPTI sees XLA's kernels as well as torch's).
TFLOP/s counts 2 * routed rows * N * K per GEMM (one in fwd, three in fwd+bwd).

Prints only the markdown table (progress and notes go to stderr) and writes bench_jax.md / bench_jax.json
to ``--out`` (default ``experiments/results``).

    python experiments/bench_jax.py [--experts 8 --rows 32768 --n 2048 --k 7168] [--routing balanced]
                                    [--backends triton,deepgemm] [--calls 20] [--no-profile] [--out DIR]

Without a CUDA device seen by both JAX and torch it runs a tiny CPU smoke test of the same code (reference
backend; the timings mean nothing) that writes files only when ``--out`` is given.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported: share the GPU with torch

import argparse  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import fp8moe  # noqa: E402
import jax_bridge  # noqa: E402
from fp8moe.testing import (  # noqa: E402
    ROUTING_PRESETS,
    Timing,
    check_size_flags,
    failure,
    fmt,
    pair,
    routing_offsets,
    run_environment,
    time_call,
    write_report,
)

CPU_SMOKE_SHAPE = dict(experts=4, rows=256, n=128, k=128)
RAGGED = "jax.lax.ragged_dot bf16"
BRIDGE_BF16 = "jax_bridge.grouped_mm_bf16"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    case: str
    fwd: Timing | None = None
    fwd_bwd: Timing | None = None
    note: str = ""


def torch_sync(_: object) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def jax_gpu_available() -> bool:
    try:
        return bool(jax.devices("gpu")) and torch.cuda.is_available()
    except RuntimeError:
        return False


def bridge_functions(backend: str) -> tuple[Callable, Callable]:
    """Jitted (fwd, fwd+bwd) through the bridge: f(x, w, offsets[, dy]) -> y or (y, dx, dw)."""

    def fwd(x, w, offsets):
        return jax_bridge.grouped_mm(x, w, offsets, backend=backend)

    def fwd_bwd(x, w, offsets, dy):
        y, pullback = jax.vjp(lambda x, w: fwd(x, w, offsets), x, w)
        return (y, *pullback(dy))

    return jax.jit(fwd), jax.jit(fwd_bwd)


def ragged_dot_functions() -> tuple[Callable, Callable]:
    """Jitted (fwd, fwd+bwd) of bf16 ragged_dot; w_t (E, K, N) is ragged_dot's own weight layout."""

    def fwd(x, w_t, sizes):
        return jax.lax.ragged_dot(x, w_t, sizes)

    def fwd_bwd(x, w_t, sizes, dy):
        y, pullback = jax.vjp(lambda x, w_t: fwd(x, w_t, sizes), x, w_t)
        return (y, *pullback(dy))

    return jax.jit(fwd), jax.jit(fwd_bwd)


def bridge_bf16_functions() -> tuple[Callable, Callable]:
    """Jitted (fwd, fwd+bwd) of ``jax_bridge.grouped_mm_bf16`` (torch._grouped_mm through the bridge)."""

    def fwd(x, w, offsets):
        return jax_bridge.grouped_mm_bf16(x, w, offsets)

    def fwd_bwd(x, w, offsets, dy):
        y, pullback = jax.vjp(lambda x, w: fwd(x, w, offsets), x, w)
        return (y, *pullback(dy))

    return jax.jit(fwd), jax.jit(fwd_bwd)


def torch_functions(backend: str, x, w, offsets, dy) -> tuple[Callable, Callable]:
    """(fwd, fwd+bwd) of the torch op, doing what the bridge does: the weight quantized in every call."""
    options = {"cache_weight": False} if "cache_weight" in inspect.signature(fp8moe.grouped_mm).parameters else {}
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return fp8moe.grouped_mm(x, w, offsets, backend=backend, **options)

    def fwd_bwd():
        y = fp8moe.grouped_mm(xg, wg, offsets, backend=backend, **options)
        return (y, *torch.autograd.grad(y, (xg, wg), dy))

    return fwd, fwd_bwd


def same_bits(got: tuple, want: tuple) -> bool:
    return all(torch.equal(torch.from_dlpack(g), w) for g, w in zip(got, want, strict=True))


def time_backend(backend: str, torch_args: tuple, jax_args: tuple, timer: dict) -> list[Row]:
    """Rows for the torch-native op and the jitted bridge on one backend, same values (x, w, offsets, dy)."""
    t_fwd, t_fwd_bwd = torch_functions(backend, *torch_args)
    want = t_fwd_bwd()  # eager warm-up: DeepGEMM JIT compilation, Triton autotuning
    torch_sync(None)
    torch_row = Row(
        f"torch fp8moe.grouped_mm ({backend})",
        time_call(t_fwd, sync=torch_sync, **timer),
        time_call(t_fwd_bwd, sync=torch_sync, **timer),
    )
    j_fwd, j_fwd_bwd = bridge_functions(backend)
    x, w, offsets, dy = jax_args
    bits = "bit-identical y, dx, dw" if same_bits(j_fwd_bwd(*jax_args), want) else "DIFFERENT BITS from the torch op"
    del want
    bridge_row = Row(
        f"jax_bridge.grouped_mm ({backend})",
        time_call(lambda: j_fwd(x, w, offsets), sync=jax.block_until_ready, **timer),
        time_call(lambda: j_fwd_bwd(x, w, offsets, dy), sync=jax.block_until_ready, **timer),
        bits,
    )
    return [torch_row, bridge_row]


def run(args: argparse.Namespace, on_gpu: bool, timer: dict) -> tuple[list[Row], dict]:
    dev = "cuda" if on_gpu else "cpu"
    e, m, n, k = args.experts, args.rows, args.n, args.k
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(e, n, k, device=dev) / math.sqrt(k)).to(torch.bfloat16)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    offsets = routing_offsets(args.routing, m, e, device=dev)
    # JAX copies of the same values, on the same device.
    xj, wj, offj, dyj = (jnp.array(jax.dlpack.from_dlpack(t), copy=True) for t in (x, w, offsets, dy))
    if args.backends:
        backends = args.backends.split(",")
    elif on_gpu:
        backends = [b for b, why in fp8moe.backend_info("cuda")["backends"].items() if why is None and b != "reference"]
    else:
        backends = ["reference"]

    ragged_fwd, ragged_fwd_bwd = ragged_dot_functions()
    w_t, sizes = jnp.swapaxes(wj, 1, 2), jnp.diff(offj, prepend=0)
    bf16_fwd, bf16_fwd_bwd = bridge_bf16_functions()
    baselines = {  # case -> (fwd, fwd+bwd), the JAX bf16 rows
        RAGGED: (lambda: ragged_fwd(xj, w_t, sizes), lambda: ragged_fwd_bwd(xj, w_t, sizes, dyj)),
        BRIDGE_BF16: (lambda: bf16_fwd(xj, wj, offj), lambda: bf16_fwd_bwd(xj, wj, offj, dyj)),
    }
    rows = []
    for case, (fwd, fwd_bwd) in baselines.items():
        try:
            rows.append(
                Row(
                    case,
                    time_call(fwd, sync=jax.block_until_ready, **timer),
                    time_call(fwd_bwd, sync=jax.block_until_ready, **timer),
                )
            )
        except Exception as exc:  # noqa: BLE001  a baseline that fails is a row with a note
            rows.append(Row(case, note=failure(exc)))
        print(f"{rows[-1].case}: {rows[-1].note or 'done'}", file=sys.stderr)
    for backend in backends:
        try:
            rows += time_backend(backend, (x, w, offsets, dy), (xj, wj, offj, dyj), timer)
        except Exception as exc:  # noqa: BLE001  report a backend that fails instead of losing the whole table
            rows.append(Row(f"backend {backend}", note=failure(exc)))
        print(f"backend {backend}: {rows[-1].note or 'done'}", file=sys.stderr)
        if on_gpu:
            torch.cuda.empty_cache()
    info = {"offsets": offsets.tolist(), "backends": backends, "routed_rows": int(offsets[-1])}
    return rows, info


def table(rows: list[Row], flops_fwd: float) -> list[str]:
    by_case = {r.case: r for r in rows}
    ragged = by_case.get(RAGGED)

    def ms(row: Row | None, which: str) -> float | None:
        t = getattr(row, which) if row else None
        return t.median_ms if t else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def attr(row: Row, name: str) -> tuple[float | None, float | None]:
        return tuple(getattr(t, name) if t else None for t in (row.fwd, row.fwd_bwd))

    out = [
        "| case | fwd ms | fwd+bwd ms | TFLOP/s fwd / fwd+bwd | CPU ms per call fwd / fwd+bwd | launches fwd / fwd+bwd "
        "| GPU kernel ms fwd / fwd+bwd | bridge overhead vs torch fwd / fwd+bwd | speed-up vs ragged_dot fwd / fwd+bwd "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = "-"
        if r.case.startswith("jax_bridge.grouped_mm ("):
            native = by_case.get(r.case.replace("jax_bridge.grouped_mm", "torch fp8moe.grouped_mm"))
            over = [ratio(ms(r, which), ms(native, which)) for which in ("fwd", "fwd_bwd")]
            if all(over):
                overhead = f"{100 * (over[0] - 1):+.1f}% / {100 * (over[1] - 1):+.1f}%"
        speedup = "-" if r is ragged else pair(*(ratio(ms(ragged, w), ms(r, w)) for w in ("fwd", "fwd_bwd")), 2)
        tflops = [ratio(gemms * flops_fwd / 1e9, ms(r, which)) for gemms, which in ((1, "fwd"), (3, "fwd_bwd"))]
        notes = [r.note] + [t.note for t in (r.fwd, r.fwd_bwd) if t and t.note]
        out.append(
            f"| {r.case} | {fmt(ms(r, 'fwd'))} | {fmt(ms(r, 'fwd_bwd'))} | {pair(*tflops, 0)} "
            f"| {pair(*attr(r, 'cpu_ms'))} | {pair(*attr(r, 'launches'), 0)} | {pair(*attr(r, 'gpu_kernel_ms'))} "
            f"| {overhead} | {speedup} | {'; '.join(n for n in notes if n)} |"
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--k", type=int, default=7168)
    parser.add_argument("--routing", default="balanced", choices=ROUTING_PRESETS)
    parser.add_argument(
        "--backends", default="", help="comma-separated fp8moe backends (default: every GPU backend available)"
    )
    parser.add_argument("--calls", type=int, default=20, help="timed calls per measurement (median)")
    parser.add_argument("--no-profile", action="store_true", help="no profiler trace (no launches, GPU kernel ms)")
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/results (GPU); none on CPU")
    args = parser.parse_args(argv)
    check_size_flags(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    on_gpu = jax_gpu_available()
    if on_gpu:
        timer = dict(warmup=3, calls=args.calls, cpu_calls=10, profile_calls=0 if args.no_profile else 3, memory=False)
        out = args.out or REPO / "experiments" / "results"
    else:
        print(
            "no CUDA device seen by both JAX and torch: CPU smoke run, tiny shape (timings mean nothing)",
            file=sys.stderr,
        )
        vars(args).update(CPU_SMOKE_SHAPE)
        timer = dict(warmup=1, calls=3, cpu_calls=2, profile_calls=0, memory=False)
        out = args.out
    rows, info = run(args, on_gpu, timer)
    env = run_environment(("torch", "triton", "deep_gemm", "jax", "jaxlib"))
    device = env["device"] if on_gpu else "CPU (smoke run)"
    v = env["versions"]
    lines = [
        f"# jax_bridge grouped GEMM vs torch-native and jax.lax.ragged_dot, {device}, {env['date']}",
        "",
        (
            f"E={args.experts}, M={args.rows}, N={args.n}, K={args.k}, routing {args.routing}, x/w/dy bf16; "
            f"jax {v['jax']}, jaxlib {v['jaxlib']}, torch {v['torch']}, triton {v['triton']}, DeepGEMM "
            f"{v['deep_gemm']}; git commit {env['commit']}. Median ms of one call followed by a wait for its "
            f"outputs (jitted JAX: block_until_ready; eager torch: synchronize), over {timer['calls']} calls; "
            "fwd+bwd returns y, dx, dw. CPU ms: host time to issue one call; launches and GPU kernel ms per call "
            f"from one profiler trace of {timer['profile_calls']} calls. TFLOP/s counts 2*M_routed*N*K per GEMM. "
            "Targets (issue 5): bridge fwd+bwd overhead <= 10% of torch-native, fwd+bwd >= 10x faster than "
            "ragged_dot's."
        ),
        "",
        *table(rows, 2 * info["routed_rows"] * args.n * args.k),
    ]
    text = "\n".join(lines)
    print(text)
    report = {
        **env,
        "device": device,
        "shape": dict(experts=args.experts, rows=args.rows, n=args.n, k=args.k),
        "routing": args.routing,
        "timer": timer,
        "backend_info": fp8moe.backend_info("cuda" if on_gpu else "cpu"),
        **info,
        "rows": rows,
    }
    write_report(out, "bench_jax", text, report)
    if out is not None:
        print(f"wrote {out / 'bench_jax.md'} and bench_jax.json", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
