"""Benchmark of whole MoE layers (``fp8moe.moe.MoE``), forward and forward + backward, fused against op-by-op.

One GPU run produces the whole table: for each shape (T tokens, d_model D, d_ff F, E experts, top_k k), every
row below on the same weights (seed 0, fp32 master weights) and the same bf16 tokens x (T, D) that require grad:

- ``fused-fp8-deepgemm`` / ``fused-fp8-triton``: ``MoE(fused=True, precision="fp8", backend=...)``;
- ``fused-bf16``: ``MoE(fused=True, precision="bf16")``, the same routing, dispatch, SwiGLU and combine code
  with bf16 ``torch._grouped_mm`` (the "same-kernel bf16 layer": a comparison of precisions);
- ``op-fp8-deepgemm`` / ``op-fp8-triton``: today's op-by-op layer ``MoE(fused=False, precision="fp8")``;
- ``op-bf16``: today's op-by-op bf16 layer ``MoE(fused=False, precision="bf16")``;
- ``op-torchao``: the op-by-op layer with torchao's row-wise FP8 grouped GEMM
  (``torchao.prototype.moe_training.fp8_grouped_mm._to_fp8_rowwise_then_scaled_grouped_mm``, torchao 0.18)
  in place of both expert GEMMs, each GEMM's token groups padded to multiples of 16 rows by the layer
  (:class:`TorchaoRowwiseMoE`; torchao's own padding asserts in 0.18) and unpadded after it, the padding's
  cost counted in the row;
- ``fused-fp8-reference`` / ``op-fp8-reference``: the reference backend (the CPU smoke run's fp8 rows).

"fwd" is the training forward ``y, aux = layer(x)`` (graph built, then dropped); "fwd+bwd" is
``(y.float().square().mean() + aux).backward()`` followed by setting x's and the parameters' grads to None
(inside the call, so every call allocates them anew). Each timed by the one timer of the benchmarks,
:func:`fp8moe.testing.time_call`: median ms of one call (CUDA events, calls back to back, no L2 flush),
CPU ms to issue one call from an idle GPU, kernel launches and GPU kernel ms per call (one ``torch.profiler``
trace), and peak memory: max allocated during one call above what was allocated before it (parameters,
inputs and, with ``--weights cached``, the weight cache). ``--weights fresh`` (default) clears fp8moe's
weight cache at the start of every call, so each call quantizes the weights once, as one training step
does; ``cached`` keeps them (gradient accumulation over many micro-batches). Ratios: a reference row's ms
(or peak) over this row's. The issue's targets (fused fp8 fwd+bwd >= 1.3x the same-kernel bf16 layer on
every shape, >= 1.25x the torchao layer, >= 2.5x today's bf16 layer on the issue's first shape "seed", peak
<= 0.75x the same-kernel bf16 layer's, CPU <= 1 ms per fwd+bwd) are checked in a table of their own. A row that cannot
run (missing backend or package, OOM, any error) is a row with its reason, never a crash; rows still to
run after ``--budget-s`` are skipped with a note.

Writes ``bench_moe_layer.md`` and ``.json`` to ``--out`` (default ``experiments/results`` on a GPU; rewritten
after every shape, so a run cut short keeps what finished) and prints the markdown.

    python experiments/bench_moe_layer.py [--shapes seed,v3-slice,v2-lite] [--rows fused-fp8-deepgemm,...]
        [--weights fresh|cached] [--calls 30] [--budget-s 480] [--no-profile] [--out DIR]
    python experiments/bench_moe_layer.py --smoke [--out DIR]

``--smoke`` (also what runs without a CUDA device): one tiny shape on the reference backend through the
same code and timer (timings mean nothing); files only when ``--out`` is given. ``--shapes`` takes the names
above or ``T:D:F:E:k``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import fp8moe
from fp8moe.moe import MoE, route
from fp8moe.recipe import BLOCK
from fp8moe.testing import BenchSettings, Timing, failure, fmt, pair, run_environment, time_call, write_report

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # name: (T, D, F, E, k)
    "seed": (8192, 7168, 2048, 8, 4),  # the first shape: both GEMMs have M = 32768 rows
    "v3-slice": (16384, 7168, 2048, 32, 8),  # a DeepSeek-V3-sized local slice
    "v2-lite": (16384, 2048, 1408, 64, 6),  # a DeepSeek-V2-Lite-sized layer
}
SMOKE_SHAPE = {"smoke": (96, 128, 128, 4, 2)}
ROWS = {  # key: (label, fused, precision, backend)
    "fused-fp8-deepgemm": ("fused fp8 (deepgemm)", True, "fp8", "deepgemm"),
    "fused-fp8-triton": ("fused fp8 (triton)", True, "fp8", "triton"),
    "fused-fp8-reference": ("fused fp8 (reference)", True, "fp8", "reference"),
    "fused-bf16": ("fused bf16 (same kernels)", True, "bf16", "auto"),
    "op-fp8-deepgemm": ("op-by-op fp8 (deepgemm)", False, "fp8", "deepgemm"),
    "op-fp8-triton": ("op-by-op fp8 (triton)", False, "fp8", "triton"),
    "op-fp8-reference": ("op-by-op fp8 (reference)", False, "fp8", "reference"),
    "op-bf16": ("op-by-op bf16 (today)", False, "bf16", "auto"),
    "op-torchao": (
        "op-by-op, torchao row-wise FP8 GEMMs (groups padded to 16 rows here, counted)",
        False,
        "fp8",
        "torchao",
    ),
}
GPU_ROWS = ("fused-fp8-deepgemm", "fused-fp8-triton", "fused-bf16", "op-fp8-deepgemm", "op-fp8-triton", "op-bf16")
GPU_ROWS += ("op-torchao",)
SMOKE_ROWS = ("fused-fp8-reference", "fused-bf16", "op-fp8-reference", "op-bf16", "op-torchao")
SAME_KERNEL_BF16, TODAY_BF16, TORCHAO = "fused-bf16", "op-bf16", "op-torchao"
TORCHAO_PATH = "torchao.prototype.moe_training.fp8_grouped_mm"
# (what, reference row or None, threshold, the seed shape only): the fused fp8 rows are checked against them
TARGETS = (
    ("fwd+bwd speed-up vs the same-kernel bf16 layer", SAME_KERNEL_BF16, 1.3, False),
    ("fwd+bwd speed-up vs the torchao row-wise layer", TORCHAO, 1.25, False),
    ("fwd+bwd speed-up vs today's bf16 layer", TODAY_BF16, 2.5, True),
    ("peak fwd+bwd / the same-kernel bf16 layer's", SAME_KERNEL_BF16, 0.75, False),
    ("CPU ms per fwd+bwd", None, 1.0, False),
)


@dataclass
class Shape:
    name: str
    tokens: int
    d_model: int
    d_ff: int
    experts: int
    top_k: int
    note: str = ""

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return (self.tokens, self.d_model, self.d_ff, self.experts, self.top_k)

    def __str__(self) -> str:
        return f"T={self.tokens}, D={self.d_model}, F={self.d_ff}, E={self.experts}, k={self.top_k}"


@dataclass
class Row:
    key: str
    label: str
    fwd: Timing | None = None
    fwd_bwd: Timing | None = None
    note: str = ""


@dataclass
class ShapeResult:
    shape: Shape
    rows: list[Row] = field(default_factory=list)
    expert_load: dict = field(default_factory=dict)


def parse_shape(text: str) -> Shape:
    """A name of SHAPES or ``T:D:F:E:k``; F not a multiple of 128 is rounded up to one, with a note."""
    if text in SHAPES or text in SMOKE_SHAPE:
        dims = (SHAPES | SMOKE_SHAPE)[text]
    else:
        try:
            dims = tuple(int(v) for v in text.split(":"))
        except ValueError:
            dims = ()
        if len(dims) != 5 or min(dims) < 1:
            raise ValueError(f"--shapes: {text!r} is neither one of {', '.join(SHAPES)} nor T:D:F:E:k")
    shape = Shape(text, *dims)
    if shape.d_model % BLOCK:
        raise ValueError(f"--shapes: {text}: D={shape.d_model} must be a multiple of {BLOCK}")
    if shape.d_ff % BLOCK:
        rounded = -(-shape.d_ff // BLOCK) * BLOCK
        shape.note = f"F={shape.d_ff} is not a multiple of {BLOCK}, which MoE requires: measured with F={rounded}"
        shape.d_ff = rounded
    else:
        shape.note = f"F={shape.d_ff} = {shape.d_ff // BLOCK} x {BLOCK}: accepted by MoE as is"
    return shape


# ---------------------------------------------------------------------------------------------- layers


def torchao_rowwise() -> Callable | str:
    """torchao's row-wise FP8 grouped GEMM, or why it cannot be imported here."""
    try:
        from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm
    except Exception as exc:  # noqa: BLE001  any import failure of the peer is a note
        return f"torchao not available ({TORCHAO_PATH}): {failure(exc)}"
    return _to_fp8_rowwise_then_scaled_grouped_mm


TORCHAO_GROUP_ROWS = 16  # torchao's row-wise grouped GEMM without its own padding: groups of a multiple of 16 rows


def pad_groups(offsets: Tensor, num_rows: int, multiple: int = TORCHAO_GROUP_ROWS) -> tuple[Tensor, Tensor, int]:
    """The layout of expert-sorted rows with each group padded with zero rows to a multiple of ``multiple``
    (the 16-row analogue of :mod:`fp8moe.plan`'s 128-row layout), on the device, no host sync.

    ``offsets`` (E,) int32 are the groups' ends over ``num_rows`` rows. Returns ``dest`` (num_rows,) int64,
    the padded row of each row (unique), the padded groups' ends (E,) int32, and the padded row count, a
    static bound ``num_rows + (multiple - 1) * E`` rounded up to ``multiple`` (rows past the last padded end
    belong to no group)."""
    ends = offsets.to(torch.int64)
    sizes = torch.diff(ends, prepend=ends.new_zeros(1))
    padded_sizes = (sizes + multiple - 1) // multiple * multiple
    padded_ends = torch.cumsum(padded_sizes, 0)
    shift = (padded_ends - padded_sizes) - (ends - sizes)  # each group's padded start minus its start
    rows = torch.arange(num_rows, device=offsets.device)
    group = torch.searchsorted(ends, rows, right=True).clamp_(max=max(ends.numel() - 1, 0))
    bound = -(-(num_rows + (multiple - 1) * ends.numel()) // multiple) * multiple
    return rows + shift[group], padded_ends.to(torch.int32), bound


class TorchaoRowwiseMoE(MoE):
    """The op-by-op layer (``fused=False``) with torchao's row-wise FP8 grouped GEMM for both expert GEMMs:
    x (M, K) bf16 and the fp32 master weight (E, N, K), passed as B_t (E, K, N) in per-group column-major
    strides.

    torchao 0.18 cannot pad the token groups itself (``pad_token_groups_for_grouped_mm=True``, its default,
    asserts "not yet supported") and without that needs every group a multiple of 16 rows, which a router
    does not give. So the layer pads: each GEMM's rows are scattered into a zeroed layout whose groups are
    padded to multiples of 16 rows (:func:`pad_groups`, on the device, no host sync), torchao runs with
    ``pad_token_groups_for_grouped_mm=False`` and the padded ends, and the output's real rows are gathered
    back (both moves differentiable, unique indices). The padding's cost (the layout, the zero-fill, the
    scatter and gather, forward and backward) is part of the row's time and memory."""

    def __init__(self, *args, rowwise: Callable, **kwargs) -> None:
        super().__init__(*args, **(kwargs | {"fused": False}))
        self.rowwise = rowwise

    def _expert_mm(self, x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        dest, padded_offsets, padded_rows = pad_groups(offsets, x.shape[0])
        padded = x.new_zeros(padded_rows, x.shape[1]).index_copy(0, dest, x)
        out = self.rowwise(
            padded, w.transpose(-2, -1), padded_offsets, out_dtype=torch.bfloat16, pad_token_groups_for_grouped_mm=False
        )
        return out.index_select(0, dest)


def unavailable(key: str, device: str) -> str:
    """Why row ``key`` cannot run on ``device`` (empty: it can)."""
    _, _, precision, backend = ROWS[key]
    if backend == "torchao":
        found = torchao_rowwise()
        if isinstance(found, str):
            return found
        return "" if device == "cuda" else "torchao row-wise FP8 needs a CUDA device"
    if precision == "fp8":
        return fp8moe.backend_info(device)["backends"].get(backend) or ""
    return ""


def build_layer(key: str, shape: Shape, device: str) -> MoE:
    """Row ``key``'s layer with the seed-0 weights (the same in every row), fp32, on ``device``."""
    _, fused, precision, backend = ROWS[key]
    torch.manual_seed(0)
    dims = (shape.d_model, shape.d_ff, shape.experts, shape.top_k)
    with torch.device(device):
        if backend == "torchao":
            return TorchaoRowwiseMoE(*dims, precision="fp8", rowwise=torchao_rowwise())
        return MoE(*dims, precision=precision, backend=backend, fused=fused)


# ---------------------------------------------------------------------------------------------- measuring


def measure(layer: MoE, x: Tensor, settings: BenchSettings, fresh_weights: bool) -> tuple[Timing, Timing]:
    params = list(layer.parameters())

    def fwd() -> Tensor:
        if fresh_weights:
            fp8moe.clear_weight_cache()
        return layer(x)[0]

    def fwd_bwd() -> None:
        if fresh_weights:
            fp8moe.clear_weight_cache()
        y, aux = layer(x)
        (y.float().square().mean() + aux).backward()
        x.grad = None
        for p in params:
            p.grad = None

    return time_call(fwd, **settings.timer()), time_call(fwd_bwd, **settings.timer())


def expert_load(shape: Shape, x: Tensor, device: str) -> dict:
    """Assignments per expert under the seed-0 router (the same in every row): min / mean / max."""
    layer = build_layer(
        SAME_KERNEL_BF16, Shape("", shape.tokens, shape.d_model, BLOCK, shape.experts, shape.top_k), device
    )
    with torch.no_grad():
        counts = torch.diff(route(x, layer.router.weight, shape.top_k).offsets, prepend=torch.zeros(1, device=device))
    counts = counts.float().cpu()
    return {"min": int(counts.min()), "mean": float(counts.mean()), "max": int(counts.max())}


def run_shape(shape: Shape, keys: list[str], device: str, settings: BenchSettings, fresh_weights: bool) -> ShapeResult:
    torch.manual_seed(1)
    x = torch.randn(shape.tokens, shape.d_model, device=device).to(torch.bfloat16).requires_grad_()
    result = ShapeResult(shape, expert_load=expert_load(shape, x, device))
    for key in keys:
        label = ROWS[key][0]
        reason = unavailable(key, device)
        if reason:
            result.rows.append(Row(key, label, note=reason))
        elif settings.over_budget():
            result.rows.append(Row(key, label, note="skipped: --budget-s time budget spent"))
        else:
            layer = None
            try:
                layer = build_layer(key, shape, device)
                result.rows.append(Row(key, label, *measure(layer, x, settings, fresh_weights)))
            except Exception as exc:  # noqa: BLE001  a row that fails (OOM, missing kernel...) is a note
                result.rows.append(Row(key, label, note=failure(exc)))
            finally:
                x.grad = None
                del layer
                fp8moe.clear_weight_cache()
                if device == "cuda":
                    torch.cuda.empty_cache()
        print(f"[{settings.elapsed():6.1f} s] {shape.name} {label}: {result.rows[-1].note or 'done'}", file=sys.stderr)
    return result


# ---------------------------------------------------------------------------------------------- report


def ms(row: Row | None, which: str) -> float | None:
    t = getattr(row, which) if row is not None else None
    return t.median_ms if t is not None else None


def peak(row: Row | None) -> float | None:
    return row.fwd_bwd.peak_mib if row is not None and row.fwd_bwd is not None else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def shape_table(result: ShapeResult) -> list[str]:
    by_key = {r.key: r for r in result.rows}
    same, today = by_key.get(SAME_KERNEL_BF16), by_key.get(TODAY_BF16)
    out = [
        "| layer | fwd ms | fwd+bwd ms | speed-up vs same-kernel bf16 fwd / fwd+bwd | speed-up vs today's bf16 "
        "fwd / fwd+bwd | CPU ms per call fwd / fwd+bwd | launches fwd / fwd+bwd | GPU kernel ms fwd / fwd+bwd "
        "| peak MiB fwd / fwd+bwd | peak fwd+bwd / same-kernel bf16 | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:

        def attr(name: str) -> tuple[float | None, float | None]:
            return tuple(getattr(t, name) if t else None for t in (r.fwd, r.fwd_bwd))  # noqa: B023

        notes = [r.note] + [t.note for t in (r.fwd, r.fwd_bwd) if t and t.note]
        speedups = [pair(*(ratio(ms(ref, w), ms(r, w)) for w in ("fwd", "fwd_bwd")), 2) for ref in (same, today)]
        out.append(
            f"| {r.label} | {fmt(ms(r, 'fwd'))} | {fmt(ms(r, 'fwd_bwd'))} | {speedups[0]} | {speedups[1]} "
            f"| {pair(*attr('cpu_ms'))} | {pair(*attr('launches'), 0)} | {pair(*attr('gpu_kernel_ms'))} "
            f"| {pair(*attr('peak_mib'), 0)} | {fmt(ratio(peak(r), peak(same)), 2)} "
            f"| {'; '.join(n for n in notes if n)} |"
        )
    return out


def why_missing(row: Row, ref: Row | None, ref_key: str | None) -> str:
    for r, key in ((row, row.key), (ref, ref_key)):
        if key and r is None:
            return f"row {key} not run"
        if key and r.fwd_bwd is None:
            return r.note or "not measured"
    return "not measured on this device (peak memory, launches: CUDA only)"


def targets(results: list[ShapeResult]) -> tuple[list[dict], list[str]]:
    """The issue's targets for every fused fp8 row: (checks, markdown table)."""
    checks = []
    for result in results:
        by_key = {r.key: r for r in result.rows}
        for row in result.rows:
            if not row.key.startswith("fused-fp8"):
                continue
            for what, ref_key, threshold, seed_only in TARGETS:
                if seed_only and result.shape.dims != SHAPES["seed"]:
                    continue
                ref = by_key.get(ref_key) if ref_key else None
                if what.startswith("peak"):
                    value, wanted = ratio(peak(row), peak(ref)), f"<= {threshold}x"
                    met = None if value is None else value <= threshold
                elif what.startswith("CPU"):
                    value = row.fwd_bwd.cpu_ms if row.fwd_bwd else None
                    wanted, met = f"<= {threshold} ms", None if value is None else value <= threshold
                else:
                    value, wanted = ratio(ms(ref, "fwd_bwd"), ms(row, "fwd_bwd")), f">= {threshold}x"
                    met = None if value is None else value >= threshold
                why = "" if value is not None else why_missing(row, ref, ref_key)
                checks.append(dict(shape=result.shape.name, row=row.label, target=what, wanted=wanted, value=value,
                                   met=met, why=why))  # fmt: skip
    lines = ["| shape | layer | target | wanted | measured | met |", "|---|---|---|---|---|---|"]
    for c in checks:
        verdict = {True: "yes", False: "**no**", None: f"not measured ({c['why']})"}[c["met"]]
        lines.append(
            f"| {c['shape']} | {c['row']} | {c['target']} | {c['wanted']} | {fmt(c['value'], 2)} | {verdict} |"
        )
    return checks, lines


def render(report: dict, results: list[ShapeResult]) -> str:
    v, timer = report["versions"], report["timer"]
    lines = [
        f"# fp8moe MoE layer: fused vs op-by-op, fp8 vs bf16 vs torchao ({report['device']}, {report['date']})",
        "",
        f"Versions: torch {v['torch']}, triton {v['triton']}, DeepGEMM {v['deep_gemm']}, torchao {v['torchao']}; "
        f"git commit {report['commit']}.",
        "",
        "fp32 master weights (seed 0, the same in every row), x (T, D) bf16 requiring grad. fwd: `y, aux = "
        "layer(x)` (training forward, graph dropped); fwd+bwd: `(y.float().square().mean() + aux).backward()`, "
        f"grads set to None in the call. Weights: **{report['weights']}** ("
        + (
            "fp8moe's weight cache cleared at the start of every call: each call quantizes the weights once, as "
            "a training step does)"
            if report["weights"] == "fresh"
            else "quantized weights kept in fp8moe's weight cache between calls)"
        )
        + f". Median ms of one call over {timer['calls']} calls (CUDA events, calls back to back, no L2 flush; "
        "wall time without a GPU); CPU ms: host time to issue one call from an idle GPU; launches and GPU "
        f"kernel ms per call from one profiler trace of {timer['profile_calls']} calls; peak: max memory "
        "allocated during one call above what was allocated before it (parameters, x"
        + (", the weight cache" if report["weights"] == "cached" else "")
        + "). A speed-up is the reference's ms over this row's; peak ratio: this row's fwd+bwd peak over the "
        "same-kernel bf16 layer's. Definitions: `fp8moe.testing.Timing`.",
    ]
    for result in results:
        s, load = result.shape, result.expert_load
        lines += [
            "",
            f"## {s.name}: {s}",
            "",
            f"{s.note}. Assignments per expert (min / mean / max): {load['min']} / {load['mean']:.0f} / {load['max']}.",
            "",
            *shape_table(result),
        ]
    lines += ["", "## Targets (issue 12; H200)", "", *targets(results)[1]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help=f"comma-separated: {', '.join(SHAPES)} or T:D:F:E:k")
    parser.add_argument("--rows", default=None, help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--weights", choices=("fresh", "cached"), default="fresh")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per measurement (median); GPU 30")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip the rows still to run after this")
    parser.add_argument("--no-profile", action="store_true", help="no profiler trace (no launches, GPU kernel ms)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, reference backend (also without a GPU)")
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/results (GPU); none on smoke")
    args = parser.parse_args(argv)
    args.smoke = args.smoke or not torch.cuda.is_available()
    try:
        args.shapes = [
            parse_shape(s) for s in (args.shapes or ",".join(SMOKE_SHAPE if args.smoke else SHAPES)).split(",")
        ]
    except ValueError as exc:
        parser.error(str(exc))
    args.rows = args.rows.split(",") if args.rows else list(SMOKE_ROWS if args.smoke else GPU_ROWS)
    for key in args.rows:
        if key not in ROWS:
            parser.error(f"--rows: {key!r} is not one of {', '.join(ROWS)}")
    if args.calls is not None and args.calls < 1:
        parser.error(f"--calls: expected >= 1, got {args.calls}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if args.smoke:
        print("smoke run: tiny shape, reference backend (timings mean nothing)", file=sys.stderr)
        settings = BenchSettings(args.calls or 1, warmup=1, cpu_calls=1, profile_calls=0 if args.no_profile else 1,
                                 budget_s=args.budget_s)  # fmt: skip
        out = args.out
    else:
        settings = BenchSettings(args.calls or 30, warmup=3, cpu_calls=10, profile_calls=0 if args.no_profile else 3,
                                 budget_s=args.budget_s)  # fmt: skip
        out = args.out or REPO / "experiments" / "results"
    env = run_environment(("torch", "triton", "deep_gemm", "torchao"))
    report: dict = {
        **env,
        "device": env["device"] + (" (smoke run)" if args.smoke else ""),
        "weights": args.weights,
        "timer": settings.as_dict(),
        "backend_info": fp8moe.backend_info(device),
        "shapes": [],
        "targets": [],
    }
    results: list[ShapeResult] = []
    for shape in args.shapes:
        results.append(run_shape(shape, args.rows, device, settings, args.weights == "fresh"))
        report["shapes"], report["targets"] = results, targets(results)[0]
        text = render(report, results)
        write_report(out, "bench_moe_layer", text, report)
    print(text)
    if out is not None:
        print(f"wrote {out / 'bench_moe_layer.md'} and bench_moe_layer.json", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
