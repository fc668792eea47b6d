"""Expert-parallel MoE layer benchmark: per-rank layer time, all-to-all time and bytes, bf16 vs FP8 dispatch.

Runs ``MoE(..., ep_group=WORLD)`` (forward + backward, :mod:`fp8moe.moe.parallel`) on every rank of the
launch, each rank with its own ``--tokens`` tokens and E / world experts, and reports per rank:

- layer ms: median wall time of one forward + backward (device synchronised, ranks barrier-aligned before
  each call), and tokens/s of the whole group (``world * tokens / max over ranks of the layer time``);
- all-to-all ms and MB: one more call with every all-to-all recorded (:func:`fp8moe.moe.parallel.
  record_all_to_all`: synchronised before and after each, so the sum is the time spent in them, not hidden
  behind compute), the bytes this rank sent to the other ranks, forward and backward separately (forward:
  rows, ids, combine weights out and the partials back; backward: dy out, the partial dx and the combine
  weights' gradients back), and its whole send buffers (its own rows too: at EP=1 the bytes the dispatch
  would move);
- per dispatch (bf16, FP8) and per ``--partials`` setting (``MoE(ep_partials=...)``: fp32, the default and
  exact, or bf16, 2D bytes less per returned row in each direction);
- the same layer on one device (``MoE(fused=True)`` holding all E experts, the rank's tokens, no
  communication; rank 0): what EP costs or gains against it.

FP8 dispatch rows need ``--precision fp8`` (the default). With one process (no ``torchrun``) it starts a
group of one itself (gloo on a CPU, NCCL on a GPU): EP=1 through the same code path, testable on one GPU.

    torchrun --nproc-per-node 8 experiments/bench_ep.py [--tokens 4096 --d-model 2048 ...]   # 8 GPUs
    python experiments/bench_ep.py --tokens 256 --d-model 256 --d-ff 256 --backend reference  # one CPU

Writes ``--out``/bench_ep.md and bench_ep.json when ``--out`` is given (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fp8moe.backends import BACKEND_NAMES
from fp8moe.moe import MoE
from fp8moe.moe.parallel import EP_PARTIALS, record_all_to_all
from fp8moe.testing import run_environment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64, help="E (a multiple of the world size)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--precision", choices=("bf16", "fp8"), default="fp8")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="auto")
    parser.add_argument(
        "--partials", nargs="+", choices=EP_PARTIALS, default=list(EP_PARTIALS),
        help="MoE(ep_partials=...) settings to run: the dtype of the partials and partial dx sent back",
    )  # fmt: skip
    parser.add_argument("--calls", type=int, default=10, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, help="folder for bench_ep.md and bench_ep.json (rank 0)")
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_layer(layer: MoE, x: torch.Tensor, dy: torch.Tensor, calls: int, warmup: int, group) -> float:
    """Median ms of one forward + backward, ranks aligned by a barrier before each call."""

    def step() -> None:
        y, aux = layer(x)
        y.backward(dy, retain_graph=False)

    times = []
    for i in range(warmup + calls):
        if group is not None:
            dist.barrier(group)
        _sync(x.device)
        start = time.perf_counter()
        step()
        _sync(x.device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        layer.zero_grad(set_to_none=True)
    return statistics.median(times)


def _init(device: torch.device) -> tuple[bool, str | None]:
    """Join the torchrun group, or start a group of one. Returns (started here, store dir to clean)."""
    if dist.is_initialized():
        return False, None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
        return True, None
    store = tempfile.mkdtemp()
    dist.init_process_group(backend, init_method=f"file://{store}/store", rank=0, world_size=1)
    return True, store


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started, _ = _init(device)
    try:
        return _run(args, device)
    finally:
        if started:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, device: torch.device) -> list[dict]:
    group, world, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    if args.experts % world:
        raise SystemExit(f"--experts: {args.experts} is not a multiple of the world size {world}")
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(args.tokens, args.d_model, generator=gen).to(device, torch.bfloat16).requires_grad_()
    dy = torch.randn(args.tokens, args.d_model, generator=gen).to(device, torch.bfloat16)
    shape = dict(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k)
    rows = []
    dispatches = (False, True) if args.precision == "fp8" else (False,)
    for fp8_dispatch in dispatches:
        for partials in args.partials:
            torch.manual_seed(0)
            layer = MoE(
                **shape, precision=args.precision, backend=args.backend, ep_group=group, fp8_dispatch=fp8_dispatch,
                ep_partials=partials,
            ).to(device)  # fmt: skip
            ms = _time_layer(layer, x, dy, args.calls, args.warmup, group)
            with record_all_to_all() as forward:
                y = layer(x)[0]
            with record_all_to_all() as backward:
                y.backward(dy)
            row = {
                "rank": rank,
                "layer": f"EP={world}, {'fp8' if fp8_dispatch else 'bf16'} dispatch, {partials} partials",
                "layer_ms": ms,
                "all_to_all_ms": (forward.total_seconds + backward.total_seconds) * 1e3,
                "all_to_all_mb_fwd": forward.total_bytes / 1e6,
                "all_to_all_mb_bwd": backward.total_bytes / 1e6,
                "all_to_all_mb": (forward.total_bytes + backward.total_bytes) / 1e6,
                "all_to_all_mb_moved": (forward.total_bytes_moved + backward.total_bytes_moved) / 1e6,
                "all_to_all_calls": len(forward.seconds) + len(backward.seconds),
            }
            rows.append(row)
            del layer, y
    if rank == 0:  # the same layer on one device: all experts, this rank's tokens, no communication
        torch.manual_seed(0)
        single = MoE(**shape, precision=args.precision, backend=args.backend, fused=True).to(device)
        ms = _time_layer(single, x, dy, args.calls, args.warmup, None)
        rows.append({"rank": 0, "layer": "one device (all experts)", "layer_ms": ms, "all_to_all_ms": 0.0,
                     "all_to_all_mb_fwd": 0.0, "all_to_all_mb_bwd": 0.0, "all_to_all_mb": 0.0,
                     "all_to_all_mb_moved": 0.0, "all_to_all_calls": 0})  # fmt: skip
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows, group=group)
    all_rows = [row for part in gathered for row in part]
    for row in all_rows:
        same = [r["layer_ms"] for r in all_rows if r["layer"] == row["layer"]]
        ranks = world if row["layer"].startswith("EP") else 1
        row["tokens_per_s"] = ranks * args.tokens / (max(same) / 1e3)
    if rank == 0:
        report(args, world, all_rows, device)
    return all_rows


def report(args: argparse.Namespace, world: int, rows: list[dict], device: torch.device) -> None:
    env = run_environment()
    header = (
        f"bench_ep: world {world}, {args.tokens} tokens/rank, D={args.d_model}, F={args.d_ff}, E={args.experts}, "
        f"top_k={args.top_k}, precision {args.precision}, backend {args.backend}, device {env.get('device', device)}, "
        f"commit {env.get('commit', '?')}, {env.get('date', '')}"
    )
    columns = ["layer", "rank", "layer ms (fwd+bwd)", "all-to-all ms", "MB to other ranks: fwd", "bwd", "total"]
    columns += ["all-to-all MB (own rows too)", "tokens/s (group)"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in sorted(rows, key=lambda r: (r["layer"], r["rank"])):
        lines.append(
            f"| {row['layer']} | {row['rank']} | {row['layer_ms']:.2f} | {row['all_to_all_ms']:.2f} | "
            f"{row['all_to_all_mb_fwd']:.3f} | {row['all_to_all_mb_bwd']:.3f} | {row['all_to_all_mb']:.3f} | "
            f"{row['all_to_all_mb_moved']:.3f} | {row['tokens_per_s']:,.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_ep.md").write_text(text + "\n")
        record = {"args": vars(args) | {"out": str(args.out)}, "env": env, "rows": rows}
        (args.out / "bench_ep.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
