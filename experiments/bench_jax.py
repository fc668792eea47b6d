"""JAX companion of bench_grouped_mm: the bridge beside the torch-native call and beside bf16 ragged_dot.

In one run, on one GPU, for each fp8moe GPU backend: ``jax_bridge.grouped_mm`` jitted (forward, and
forward + backward through ``jax.vjp``) beside ``fp8moe.grouped_mm`` called from torch on the same
values, and ``jax.lax.ragged_dot`` in bf16 (forward, and forward + backward) as the JAX baseline. Every
case is timed the same way: median over repeats of the wall time of back-to-back calls ended by one
device synchronisation, divided by the number of calls (so host overheads that do not overlap the GPU
count). Also checks that the bridge returns the torch op's bits. Prints a markdown table and writes
bench_jax.md / bench_jax.json to ``--out``.

    python experiments/bench_jax.py [--experts 8 --rows 32768 --n 2048 --k 7168] [--routing balanced]
                                    [--backends triton,deepgemm] [--out experiments/results]

Without a CUDA device seen by both JAX and torch it runs a tiny CPU smoke test of the same code
(reference backend; the timings mean nothing).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax is imported: share the GPU with torch

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from bench_grouped_mm import make_offsets  # noqa: E402  (same routings as the torch benchmark)

import fp8moe  # noqa: E402
import jax_bridge  # noqa: E402

CPU_SMOKE_SHAPE = dict(experts=4, rows=512, n=256, k=256)


@dataclass
class Row:
    case: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    note: str = ""


def median_ms(fn: Callable[[], object], sync: Callable[[object], object], iters: int, repeats: int) -> float:
    """Median over ``repeats`` of (wall time of ``iters`` back-to-back calls + one sync) / ``iters``, in ms."""
    sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - start) / iters)
    return 1e3 * statistics.median(times)


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


def torch_functions(backend: str, x, w, offsets, dy) -> tuple[Callable, Callable]:
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return fp8moe.grouped_mm(x, w, offsets, backend=backend)

    def fwd_bwd():
        y = fp8moe.grouped_mm(xg, wg, offsets, backend=backend)
        return (y, *torch.autograd.grad(y, (xg, wg), dy))

    return fwd, fwd_bwd


def same_bits(got: tuple, want: tuple) -> bool:
    return all(torch.equal(torch.from_dlpack(g), w) for g, w in zip(got, want, strict=True))


def time_backend(backend: str, torch_args: tuple, jax_args: tuple, iters: int, repeats: int) -> list[Row]:
    """Rows for the torch-native op and the jitted bridge on one backend, same values (x, w, offsets, dy)."""
    t_fwd, t_fwd_bwd = torch_functions(backend, *torch_args)
    want = t_fwd_bwd()  # eager warm-up: DeepGEMM JIT compilation, Triton autotuning
    torch_sync(None)
    torch_row = Row(
        f"torch fp8moe.grouped_mm ({backend})",
        median_ms(t_fwd, torch_sync, iters, repeats),
        median_ms(t_fwd_bwd, torch_sync, iters, repeats),
    )
    j_fwd, j_fwd_bwd = bridge_functions(backend)
    x, w, offsets, dy = jax_args
    bits = "bit-identical y, dx, dw" if same_bits(j_fwd_bwd(*jax_args), want) else "DIFFERENT BITS from the torch op"
    del want
    bridge_row = Row(
        f"jax_bridge.grouped_mm ({backend})",
        median_ms(lambda: j_fwd(x, w, offsets), jax.block_until_ready, iters, repeats),
        median_ms(lambda: j_fwd_bwd(x, w, offsets, dy), jax.block_until_ready, iters, repeats),
        bits,
    )
    return [torch_row, bridge_row]


def run(args: argparse.Namespace, on_gpu: bool) -> tuple[list[Row], dict]:
    dev = "cuda" if on_gpu else "cpu"
    e, m, n, k = args.experts, args.rows, args.n, args.k
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(e, n, k, device=dev) / math.sqrt(k)).to(torch.bfloat16)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    offsets = make_offsets(args.routing, m, e, dev)
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
    timing = dict(sync=jax.block_until_ready, iters=args.iters, repeats=args.repeats)
    rows = [
        Row(
            "jax.lax.ragged_dot bf16",
            median_ms(lambda: ragged_fwd(xj, w_t, sizes), **timing),
            median_ms(lambda: ragged_fwd_bwd(xj, w_t, sizes, dyj), **timing),
        )
    ]
    print(rows[-1], flush=True)
    for backend in backends:
        try:
            rows += time_backend(backend, (x, w, offsets, dy), (xj, wj, offj, dyj), args.iters, args.repeats)
        except Exception as exc:  # noqa: BLE001  report a backend that fails instead of losing the whole table
            rows.append(
                Row(f"backend {backend}", note=f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
            )
        print(*rows[-2:], sep="\n", flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    info = {"offsets": offsets.tolist(), "backends": backends, "routed_rows": int(offsets[-1])}
    return rows, info


def table(rows: list[Row], flops_fwd: float) -> list[str]:
    by_case = {r.case: r for r in rows}
    ragged = by_case.get("jax.lax.ragged_dot bf16")

    def ms(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "-"

    def tflops(v: float | None, factor: int) -> str:
        return f"{factor * flops_fwd / v / 1e9:.4g}" if v else "-"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    out = [
        (
            "| case | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | bridge overhead vs torch (fwd / fwd+bwd) "
            "| speedup vs ragged_dot (fwd / fwd+bwd) | note |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = "-"
        if r.case.startswith("jax_bridge"):
            native = by_case.get(r.case.replace("jax_bridge.grouped_mm", "torch fp8moe.grouped_mm"))
            if native and native.fwd_ms and r.fwd_ms and native.fwd_bwd_ms and r.fwd_bwd_ms:
                fwd, fwd_bwd = r.fwd_ms / native.fwd_ms - 1, r.fwd_bwd_ms / native.fwd_bwd_ms - 1
                overhead = f"{100 * fwd:+.1f}% / {100 * fwd_bwd:+.1f}%"
        speedup = "-"
        if ragged and r is not ragged:
            speedup = f"{ratio(ragged.fwd_ms, r.fwd_ms)} / {ratio(ragged.fwd_bwd_ms, r.fwd_bwd_ms)}"
        out.append(
            f"| {r.case} | {ms(r.fwd_ms)} | {ms(r.fwd_bwd_ms)} | {tflops(r.fwd_ms, 1)} | {tflops(r.fwd_bwd_ms, 3)} "
            f"| {overhead} | {speedup} | {r.note} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--k", type=int, default=7168)
    parser.add_argument("--routing", default="balanced", choices=("balanced", "skewed", "random"))
    parser.add_argument(
        "--backends", default="", help="comma-separated fp8moe backends (default: every GPU backend available)"
    )
    parser.add_argument("--iters", type=int, default=10, help="back-to-back calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: experiments/results (GPU), experiments/runs (CPU smoke run)"
    )
    args = parser.parse_args()

    on_gpu = jax_gpu_available()
    if on_gpu:
        device = torch.cuda.get_device_name()
    else:
        print("no CUDA device seen by both JAX and torch: CPU smoke run on a tiny shape (timings mean nothing)")
        vars(args).update(CPU_SMOKE_SHAPE, iters=2, repeats=3)
        device = "CPU (smoke run)"
    out = args.out or Path("experiments/results" if on_gpu else "experiments/runs")
    rows, info = run(args, on_gpu)
    flops_fwd = 2 * info["routed_rows"] * args.n * args.k
    date = datetime.date.today().isoformat()
    lines = [
        f"# jax_bridge grouped GEMM vs torch-native and jax.lax.ragged_dot, {device}, {date}",
        "",
        (
            f"E={args.experts}, M={args.rows}, N={args.n}, K={args.k}, routing {args.routing}, x/w/dy bf16; "
            f"jax {jax.__version__}, torch {torch.__version__}. Median ms of {args.iters} back-to-back jitted (JAX) "
            f"or eager (torch) calls ended by one sync, over {args.repeats} repeats; fwd+bwd returns y, dx, dw. "
            "TFLOP/s counts 2*M_routed*N*K per GEMM. Targets (issue 5): bridge fwd+bwd overhead <= 10% of "
            "torch-native, fwd+bwd >= 10x faster than ragged_dot's."
        ),
        "",
        *table(rows, flops_fwd),
    ]
    text = "\n".join(lines)
    print(text)
    report = {
        "date": date,
        "device": device,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "shape": dict(experts=args.experts, rows=args.rows, n=args.n, k=args.k),
        "routing": args.routing,
        "timing": dict(iters=args.iters, repeats=args.repeats),
        "backend_info": fp8moe.backend_info("cuda" if on_gpu else "cpu"),
        **info,
        "rows": [asdict(r) for r in rows],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_jax.md").write_text(text + "\n")
    (out / "bench_jax.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'bench_jax.md'} and bench_jax.json")


if __name__ == "__main__":
    main()
