"""Does a MoE language model still train with FP8 expert GEMMs? bf16 vs fp8, in torch and in JAX.

Trains a small byte-level decoder-only transformer with MoE feed-forwards (top-k router, SwiGLU experts
on grouped GEMMs) once per (framework, precision), from the same initial weights on the same batches,
and compares the loss curves. Only the expert GEMMs differ between the precisions: bf16
(``torch._grouped_mm`` / ``jax.lax.ragged_dot``) or blockwise FP8 (``fp8moe.grouped_mm`` /
``jax_bridge.grouped_mm``); the rest of the model runs in bf16 autocast-style mixed precision in both. On a
CPU the torch runs emulate their bf16 GEMMs in fp32 (``--bf16-math``; bf16-rounded operands and results, see
``experiments/_model_torch.py``), and the summary says so.

Data: the Python standard library's source files by default (``--data PATH`` for a text file or folder),
split by file into train and held-out sets (see ``experiments/data.py``).

The torch runs use the fused expert block (``MoE(fused=True)``: dispatch -> GEMM -> SwiGLU -> GEMM ->
combine on the padded layout, the same block in both precisions; ``--no-fused``: the op-by-op layer). The JAX
runs use the bridge's fused block (``jax_bridge.fused_experts``) on a GPU, ``jax_bridge.moe``'s op-by-op layer
on a CPU (and under ``--no-fused``).

``--seeds 0,1,2`` repeats every (framework, precision) run per seed (initial weights and batches); the
summary then reports the held-out gap of fp8 vs bf16 as the mean over the seeds with its spread, and the
step time of each precision (median over all seeds' steps after warm-up) with the fp8/bf16 speed ratio.

Every fp8 run's backend is checked before the first step. Writes to ``--out`` (default
``experiments/runs/<date>-<size>``): one JSON log per run (``<framework>_<precision>_seed<seed>.json``),
``loss.png`` (train and held-out loss of every run, each seed thin and the mean over seeds thick, and the
held-out gap of fp8 vs bf16 in percent) and ``summary.md`` (the tables printed at the end).

    python experiments/train_moe.py                      # all four runs at the size for this machine
    python -m experiments.train_moe                      # the same (what the first re-runs itself as)
    python experiments/train_moe.py --framework torch --precision fp8 --steps 300 --size cpu
    python experiments/train_moe.py --framework torch --seeds 0,1,2 --steps 250   # GPU: the issue's check
    torchrun --nproc-per-node 2 experiments/train_moe.py --ep 2 --size cpu      # expert parallel (gloo on CPU)

``--ep N`` (torch only) trains under ``torchrun`` with the experts of every MoE layer spread over N ranks
(``MoE(ep_group=...)``; world = N x DP, see ``experiments/_model_torch.ExpertParallel``): the same initial
weights (the single-process model's, resharded), each rank its rows of the global batch; NCCL on GPUs, gloo
on CPUs; rank 0 reports and writes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (`python experiments/train_moe.py`): re-run as the module experiments.train_moe, with the
    # repository root on PYTHONPATH, so that it imports its siblings as experiments.* from anywhere.
    root = str(Path(__file__).resolve().parent.parent)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    os.execve(sys.executable, [sys.executable, "-m", "experiments.train_moe", *sys.argv[1:]], env)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

# torch and JAX share the GPU in one process: JAX must not grab 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fp8moe  # noqa: E402
from experiments._config import SIZES, ModelConfig, TrainConfig, lr_at  # noqa: E402
from experiments._model_torch import BF16_MATH  # noqa: E402
from experiments.data import Corpus, held_out_batches, load_corpus, train_batch  # noqa: E402
from fp8moe.backends import select_backend  # noqa: E402

FRAMEWORKS = ("torch", "jax")
PRECISIONS = ("bf16", "fp8")
GAP_TARGET_PCT = 1.5
GAP_TARGET_SEEDS = 3  # the gap target is the mean over at least this many seeds
SPEEDUP_TARGET = 1.15  # fp8 step vs the same-kernel (fused) bf16 step, torch at the GPU size on a GPU


@dataclasses.dataclass
class RunLog:
    """What one run records (written as its JSON log)."""

    framework: str
    precision: str
    expert_gemms: str
    device: str
    bf16_math: str
    steps: int
    tokens_per_step: int
    train_loss: list[float] = dataclasses.field(default_factory=list)
    held_out: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    step_ms: list[float] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    seed: int = 0
    fused: bool = False  # the fused expert block (torch), else the op-by-op layer

    @property
    def name(self) -> str:
        return f"{self.framework} {self.precision}"

    @property
    def warm_step_ms(self) -> list[float]:
        """Step times after warm-up: the first 10% of steps left out (compilation, autotuning, warm-up)."""
        return self.step_ms[len(self.step_ms) // 10 :]

    @property
    def ms_per_step(self) -> float:
        """Median step time, leaving out the first 10% of steps (compilation, autotuning, warm-up)."""
        return statistics.median(self.warm_step_ms)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / (self.ms_per_step / 1e3)

    @property
    def final_train_loss(self) -> float:
        """Mean training loss of the last 5% of steps (one step's loss is noisy)."""
        return float(np.mean(self.train_loss[-max(1, len(self.train_loss) // 20) :]))

    @property
    def final_held_out_loss(self) -> float:
        return self.held_out[-1][1]

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {
            "ms_per_step": self.ms_per_step,
            "tokens_per_s": self.tokens_per_s,
            "final_train_loss": self.final_train_loss,
            "final_held_out_loss": self.final_held_out_loss,
        }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=(*FRAMEWORKS, "both"), default="both")
    parser.add_argument("--precision", choices=(*PRECISIONS, "both"), default="both")
    parser.add_argument(
        "--backend", default="auto", choices=fp8moe.BACKEND_NAMES, help="fp8moe backend of the fp8 runs"
    )
    parser.add_argument("--size", choices=tuple(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the size's)")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="sequences per step of every run (default: the size's)",
    )
    parser.add_argument("--seed", type=int, help="seeds the initial weights and the batches (default 0)")
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        help="comma-separated seeds, e.g. 0,1,2: every run once per seed; the summary reports the mean over the "
        "seeds and their spread (the gap target is the mean over >= 3 seeds)",
    )
    parser.add_argument("--data", type=Path, help="a text file or folder (default: the Python stdlib sources)")
    parser.add_argument("--out", type=Path, help="output folder (default: experiments/runs/<date>-<size>)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the torch model")
    parser.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the torch runs' MoE layers run the fused expert block (MoE(fused=True)), the same block in both "
        "precisions (bf16: torch._grouped_mm on the padded layout; emulated like every bf16 GEMM under "
        "--bf16-math emulated); the JAX runs use the bridge's fused block on a GPU (op by op on a CPU); --no-fused: "
        "the op-by-op layers",
    )
    parser.add_argument(
        "--bf16-math",
        choices=("auto", *BF16_MATH),
        default="auto",
        help="how the torch runs compute their bf16 GEMMs: native (torch.autocast) or emulated (fp32 matmuls of "
        "bf16-rounded operands, bf16-rounded results: the same values, fast on CPUs without bf16 instructions); "
        "auto: emulated on a CPU, native on a GPU. The JAX runs always use XLA's bf16 dots",
    )
    parser.add_argument(
        "--ep",
        type=int,
        help="expert parallelism over N ranks (torch only; launch with torchrun, world = N x data parallel)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: 1 when training on a CPU, where the CPU size's small ops gain little "
        "from more and other load on the cores makes more threads several times slower; torch's own on a GPU)",
    )
    return parser


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]: distinct non-negative ints."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("steps", "batch_size", "threads", "ep"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}: expected >= 1, got {getattr(args, flag)}")
    if args.seed is not None and args.seeds is not None:
        parser.error("--seed and --seeds: give one of them")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed: expected >= 0, got {args.seed}")
    args.seeds = args.seeds or [args.seed or 0]
    return args


def backend_problem(backend: str, run_devices: dict[str, torch.device]) -> str | None:
    """Why the fp8 runs cannot use ``backend`` on their devices (``{framework: device}``), or None."""
    for framework, device in run_devices.items():
        try:
            select_backend(backend, device)
        except (RuntimeError, ValueError) as exc:
            return f"--backend {backend}: the fp8 {framework} runs (on {device}) cannot use it: {exc}"
    return None


def expert_gemms(precision: str, backend: str, device: torch.device, bf16_math: str, fused: bool = False) -> str:
    """What runs the expert GEMMs of a run (the fp8moe backend that "auto" resolves to on ``device``), and
    ", fused block" for the fused expert block."""
    if precision == "bf16":
        gemms = "bf16 (fp32-emulated)" if bf16_math == "emulated" else "bf16"
    else:
        gemms = "fp8 " + select_backend(backend, device)[0].name
    return gemms + (", fused block" if fused else "")


def jax_unavailable_reason() -> str | None:
    try:
        import jax_bridge.moe  # noqa: F401
    except ImportError as exc:
        return f"jax_bridge.moe is not importable ({exc})"
    return None


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class TimeLeft:
    """Estimates the time left for all runs: the current run's remaining steps at its average pace so far, plus
    each run still to come at the mean wall time of the finished runs (before any finished: the current run's
    projected time)."""

    def __init__(self, num_runs: int) -> None:
        self.num_runs, self.finished = num_runs, []

    def estimate(self, elapsed: float, steps_done: int, steps: int) -> float:
        this_total = elapsed / max(1, steps_done) * steps
        per_run = statistics.mean(self.finished) if self.finished else this_total
        return this_total - elapsed + per_run * (self.num_runs - len(self.finished) - 1)


def train(
    trainer,
    log: RunLog,
    corpus: Corpus,
    train_cfg: TrainConfig,
    seq_len: int,
    seed: int,
    time_left: TimeLeft | None = None,
) -> None:
    """Run ``train_cfg.steps`` optimizer steps of ``trainer``, recording losses and step times in ``log``.

    The progress bar shows the run's own remaining time and, from ``time_left``, an estimate for all runs."""
    time_left = time_left or TimeLeft(1)
    start = time.perf_counter()
    evals = held_out_batches(corpus.held_out, train_cfg.eval_batches, train_cfg.batch_size, seq_len)
    log.held_out.append((0, trainer.evaluate(evals)))
    run_index = f"{len(time_left.finished) + 1}/{time_left.num_runs}"
    bar = tqdm(
        range(train_cfg.steps), desc=f"{log.name:>10} [{run_index}]", unit="step", dynamic_ncols=True, disable=QUIET
    )
    with bar:
        for step in bar:
            batch = train_batch(corpus.train, step, train_cfg.batch_size, seq_len, seed)
            t0 = time.perf_counter()
            loss = trainer.step(batch, lr_at(step, train_cfg))
            log.step_ms.append((time.perf_counter() - t0) * 1e3)
            log.train_loss.append(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"{log.name}: training loss became {loss} at step {step}")
            if (step + 1) % train_cfg.eval_every == 0 or step + 1 == train_cfg.steps:
                log.held_out.append((step + 1, trainer.evaluate(evals)))
            left = time_left.estimate(time.perf_counter() - start, step + 1, train_cfg.steps)
            bar.set_postfix(
                loss=f"{loss:.3f}",
                held_out=f"{log.held_out[-1][1]:.3f}",
                tok_s=f"{log.tokens_per_step / log.step_ms[-1] * 1e3:,.0f}",
                all_runs_left=format_seconds(left),
                refresh=False,
            )
    log.wall_s = time.perf_counter() - start
    time_left.finished.append(log.wall_s)


def relative_pct(value: float, reference: float) -> float:
    return 100 * (value - reference) / reference


def paired_runs(logs: list[RunLog]) -> dict[str, dict[int, tuple[RunLog, RunLog]]]:
    """``{framework: {seed: (bf16 run, fp8 run)}}`` for every framework and seed with both precisions."""
    runs = {(log.framework, log.seed, log.precision): log for log in logs}
    pairs: dict[str, dict[int, tuple[RunLog, RunLog]]] = {}
    for (framework, seed, precision), log in runs.items():
        if precision == "fp8" and (framework, seed, "bf16") in runs:
            pairs.setdefault(framework, {})[seed] = (runs[framework, seed, "bf16"], log)
    return pairs


def summary_table(logs: list[RunLog]) -> str:
    """Markdown table, one row per run (final losses, held-out gap of fp8 vs bf16 of the same framework and
    seed, speed) and, when both frameworks ran, their held-out spread at equal precision: the run-to-run noise
    of the gap."""
    pairs = paired_runs(logs)
    tail = max(1, logs[0].steps // 20)
    columns = ["run", "seed", "expert GEMMs", f"train loss (last {tail} steps)", "held-out loss"]
    columns += ["held-out gap vs bf16", "tokens/s", "ms/step", "speed-up vs bf16"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for log in logs:
        gap = speedup = "-"
        if log.precision == "fp8" and log.seed in pairs.get(log.framework, {}):
            ref = pairs[log.framework][log.seed][0]
            pct = relative_pct(log.final_held_out_loss, ref.final_held_out_loss)
            gap = f"{pct:+.2f}% ({'meets' if pct <= GAP_TARGET_PCT else 'misses'} <= +{GAP_TARGET_PCT}%)"
            speedup = f"{ref.ms_per_step / log.ms_per_step:.2f}x"
        lines.append(
            f"| {log.name} | {log.seed} | {log.expert_gemms} | {log.final_train_loss:.4f} | "
            f"{log.final_held_out_loss:.4f} | {gap} | {log.tokens_per_s:,.0f} | {log.ms_per_step:.1f} | {speedup} |"
        )
    means = {
        (framework, precision): statistics.mean(log.final_held_out_loss for log in group)
        for (framework, precision), group in by_run(logs).items()
    }
    seeds = {(log.framework, log.precision): set() for log in logs}
    tokens = {(log.framework, log.precision): log.tokens_per_step for log in logs}
    for log in logs:
        seeds[log.framework, log.precision].add(log.seed)
    spreads = [
        f"{p} {relative_pct(means['jax', p], means['torch', p]):+.2f}%"
        for p in PRECISIONS
        if ("torch", p) in means
        and ("jax", p) in means
        and tokens["torch", p] == tokens["jax", p]  # else not the same batches
        and seeds["torch", p] == seeds["jax", p]
    ]
    if spreads:
        lines.append(
            f"\nSame weights, same batches, other framework (JAX vs torch held-out loss"
            f"{', mean over the seeds' if len(seeds_of(logs)) > 1 else ''}): {', '.join(spreads)}; "
            "gaps of that size are numerical noise of the trajectory, not an effect of the precision."
        )
    return "\n".join(lines)


def seeds_of(logs: list[RunLog]) -> list[int]:
    return sorted({log.seed for log in logs})


def by_run(logs: list[RunLog]) -> dict[tuple[str, str], list[RunLog]]:
    """``{(framework, precision): [its run per seed, in seed order]}``, in the order the runs came."""
    groups: dict[tuple[str, str], list[RunLog]] = {}
    for log in logs:
        groups.setdefault((log.framework, log.precision), []).append(log)
    return {key: sorted(group, key=lambda log: log.seed) for key, group in groups.items()}


def pooled_ms_per_step(runs: list[RunLog]) -> float:
    """Median step time over the steps after warm-up of all ``runs`` (the seeds of one framework and precision)."""
    return statistics.median(ms for log in runs for ms in log.warm_step_ms)


@dataclasses.dataclass
class SeedSummary:
    """One framework's fp8-vs-bf16 comparison over its seeds."""

    framework: str
    seeds: list[int]
    gaps_pct: list[float]  # final held-out gap of fp8 vs bf16 per seed
    held_out: dict[str, float]  # mean final held-out loss per precision
    ms_per_step: dict[str, float]  # median step time per precision over all seeds' steps after warm-up
    fused: bool
    device: str

    @property
    def gap_mean(self) -> float:
        return statistics.mean(self.gaps_pct)

    @property
    def gap_std(self) -> float:
        return statistics.stdev(self.gaps_pct) if len(self.gaps_pct) > 1 else 0.0

    @property
    def speedup(self) -> float:
        """fp8 step speed relative to bf16's: bf16 ms/step / fp8 ms/step."""
        return self.ms_per_step["bf16"] / self.ms_per_step["fp8"]

    def gap_text(self) -> str:
        if len(self.gaps_pct) == 1:
            return f"{self.gap_mean:+.2f}% (1 seed)"
        return (
            f"{self.gap_mean:+.2f}% (min {min(self.gaps_pct):+.2f}%, max {max(self.gaps_pct):+.2f}%, "
            f"std {self.gap_std:.2f} pp; {len(self.gaps_pct)} seeds)"
        )


def seed_summaries(logs: list[RunLog]) -> list[SeedSummary]:
    """Per framework with both precisions on the same seeds: the gap over the seeds and the step times."""
    summaries = []
    groups = by_run(logs)
    for framework, pairs in paired_runs(logs).items():
        seeds = sorted(pairs)
        bf16 = [pairs[s][0] for s in seeds]
        fp8 = [pairs[s][1] for s in seeds]
        summaries.append(
            SeedSummary(
                framework,
                seeds,
                [relative_pct(f.final_held_out_loss, b.final_held_out_loss) for b, f in zip(bf16, fp8)],
                {
                    p: statistics.mean(log.final_held_out_loss for log in runs)
                    for p, runs in zip(PRECISIONS, (bf16, fp8))
                },
                {p: pooled_ms_per_step(groups[framework, p]) for p in PRECISIONS},
                all(log.fused for log in bf16 + fp8),
                fp8[0].device,
            )
        )
    return summaries


def seed_table(summaries: list[SeedSummary]) -> str:
    """Markdown table: per framework, the mean held-out losses, the gap (mean and spread over the seeds), the
    median step time of each precision and the fp8/bf16 step speed ratio."""
    columns = ["framework", "seeds", "held-out loss bf16 (mean)", "held-out loss fp8 (mean)"]
    columns += ["held-out gap fp8 vs bf16: mean (spread)", "ms/step bf16", "ms/step fp8", "fp8 speed vs bf16"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for s in summaries:
        lines.append(
            f"| {s.framework} | {','.join(map(str, s.seeds))} | {s.held_out['bf16']:.4f} | {s.held_out['fp8']:.4f} | "
            f"{s.gap_text()} | {s.ms_per_step['bf16']:.1f} | {s.ms_per_step['fp8']:.1f} | {s.speedup:.2f}x |"
        )
    return "\n".join(lines)


def target_checks(summaries: list[SeedSummary], size: str) -> list[str]:
    """The training targets of the fused-block issue against ``summaries``, one markdown bullet each: fp8
    held-out loss within +1.5% of bf16 as the mean over >= 3 seeds (every framework), and the torch fp8 step
    >= 1.15x the same-kernel bf16 step (the fused block, at the GPU size, on a GPU; reported elsewhere)."""
    lines = []
    for s in summaries:
        verdict = "met" if s.gap_mean <= GAP_TARGET_PCT else "missed"
        if len(s.seeds) < GAP_TARGET_SEEDS:
            verdict = (
                f"not checked: {len(s.seeds)} seed{'s' * (len(s.seeds) > 1)}, the target needs >= {GAP_TARGET_SEEDS}"
            )
        lines.append(
            f"- {s.framework}: fp8 held-out loss within +{GAP_TARGET_PCT}% of bf16, mean over >= {GAP_TARGET_SEEDS} "
            f"seeds: {s.gap_text()}: **{verdict}**"
        )
        if s.framework != "torch":
            continue
        why_not = [
            reason
            for reason, applies in (
                ("not the GPU size", size != "gpu"),
                ("not on a GPU", not s.device.startswith("cuda")),
                ("not the fused block (--no-fused): bf16 and fp8 run different kernels", not s.fused),
            )
            if applies
        ]
        verdict = "met" if s.speedup >= SPEEDUP_TARGET else "missed"
        verdict = f"not checked here: {'; '.join(why_not)}" if why_not else verdict
        lines.append(
            f"- torch: fp8 step >= {SPEEDUP_TARGET}x the same-kernel bf16 step at the GPU size: "
            f"{s.speedup:.2f}x ({s.ms_per_step['bf16']:.1f} vs {s.ms_per_step['fp8']:.1f} ms/step): **{verdict}**"
        )
    return lines


def held_out_gaps_per_seed(logs: list[RunLog]) -> dict[str, dict[int, tuple[list[int], list[float]]]]:
    """Held-out loss gap of fp8 against bf16 in percent at each evaluation step, per framework and seed with
    both precisions: ``{framework: {seed: (steps, gaps)}}``."""
    gaps: dict[str, dict[int, tuple[list[int], list[float]]]] = {}
    for framework, pairs in paired_runs(logs).items():
        for seed, (bf16, fp8) in sorted(pairs.items()):
            ref = dict(bf16.held_out)
            points = [(step, relative_pct(loss, ref[step])) for step, loss in fp8.held_out if step in ref]
            gaps.setdefault(framework, {})[seed] = ([step for step, _ in points], [gap for _, gap in points])
    return gaps


def held_out_gaps(logs: list[RunLog]) -> dict[str, tuple[list[int], list[float]]]:
    """Per framework with both precisions: the held-out loss gap of fp8 against bf16 in percent at each
    evaluation step, the mean over the seeds (at the steps every seed evaluated), ``{framework: (steps, gaps)}``."""
    return {
        framework: mean_curve(list(per_seed.values())) for framework, per_seed in held_out_gaps_per_seed(logs).items()
    }


def mean_curve(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """The pointwise mean of (steps, values) curves, at the steps all of them have."""
    maps = [dict(zip(*curve)) for curve in curves]
    steps = [step for step in curves[0][0] if all(step in m for m in maps)]
    return steps, [statistics.mean(m[step] for m in maps) for step in steps]


def plot(logs: list[RunLog], title: str, path: Path) -> None:
    """Three panels: train loss (moving average over 1/30 of the run), held-out loss (both zoomed past the first
    steps' drop from ~ln(256)), and the held-out gap of fp8 against bf16 in percent per framework, with the
    target and, when both frameworks ran, their spread at equal precision (the noise). With several seeds,
    each seed is a thin line and the mean over the seeds a thick one (with one seed: the run, and its raw train
    loss in light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval, ax_gap) = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = {"torch": "tab:blue", "jax": "tab:orange"}
    styles = {"bf16": "-", "fp8": "--"}
    thin = {"linewidth": 0.7, "alpha": 0.45}
    multi = len(seeds_of(logs)) > 1
    zoom_train, zoom_eval = [], []
    run_colors = {  # per framework and precision: bf16 and fp8 tell apart with thin per-seed lines too
        ("torch", "bf16"): "tab:blue",
        ("torch", "fp8"): "tab:green",
        ("jax", "bf16"): "tab:orange",
        ("jax", "fp8"): "tab:brown",
    }
    for (framework, precision), runs in by_run(logs).items():
        color, style = run_colors[framework, precision], styles[precision]
        length = min(len(log.train_loss) for log in runs)
        steps = np.arange(1, length + 1)
        window = max(1, length // 30)
        kernel = np.full(window, 1 / window)
        label = f"{framework} {precision}: {runs[0].expert_gemms}" + (f", mean of {len(runs)} seeds" if multi else "")
        for log in runs:
            if multi:
                smooth = np.convolve(log.train_loss[:length], kernel, mode="valid")
                ax_train.plot(steps[window - 1 :], smooth, color=color, linestyle=style, **thin)
                ax_eval.plot(*zip(*log.held_out), color=color, linestyle=style, **thin)
            else:
                ax_train.plot(steps, log.train_loss, color=color, alpha=0.15, linewidth=0.8)
        mean_train = np.mean([log.train_loss[:length] for log in runs], axis=0)
        smooth = np.convolve(mean_train, kernel, mode="valid")
        ax_train.plot(steps[window - 1 :], smooth, color=color, linestyle=style, linewidth=1.8, label=label)
        zoom_train.append((smooth.min(), smooth[min(len(smooth) - 1, len(smooth) // 6)]))
        eval_steps, eval_losses = mean_curve([tuple(zip(*log.held_out)) for log in runs])
        mean_label = f"{framework} {precision}" + (" (mean)" if multi else "")
        ax_eval.plot(eval_steps, eval_losses, color=color, linestyle=style, marker="o", markersize=3, label=mean_label)
        zoom_eval.append((min(eval_losses), eval_losses[min(len(eval_losses) - 1, 2)]))
    for ax, zoom in ((ax_train, zoom_train), (ax_eval, zoom_eval)):
        low, high = min(z[0] for z in zoom), max(z[1] for z in zoom)
        if np.isfinite([low, high]).all() and high > low:
            ax.set_ylim(low - 0.05 * (high - low), high)
    ax_train.set(title="train loss (moving average)", xlabel="step", ylabel="cross-entropy (nats/byte)")
    ax_eval.set(title="held-out loss", xlabel="step")

    per_seed = held_out_gaps_per_seed(logs)
    for framework, (steps, gaps) in held_out_gaps(logs).items():
        if multi:
            for seed, (seed_steps, seed_gaps) in per_seed[framework].items():
                ax_gap.plot(seed_steps, seed_gaps, color=colors[framework], label=f"_{framework} seed {seed}", **thin)
        mean_label = f"{framework}: fp8 - bf16" + (f" (mean of {len(per_seed[framework])} seeds)" if multi else "")
        ax_gap.plot(steps, gaps, color=colors[framework], marker="o", markersize=3, linewidth=1.8, label=mean_label)
    groups = by_run(logs)
    for precision in PRECISIONS:  # the noise floor: the same runs in the other framework
        torch_runs, jax_runs = groups.get(("torch", precision)), groups.get(("jax", precision))
        if (
            torch_runs
            and jax_runs
            and torch_runs[0].tokens_per_step == jax_runs[0].tokens_per_step
            and [log.seed for log in torch_runs] == [log.seed for log in jax_runs]
        ):
            curves = []
            for torch_run, jax_run in zip(torch_runs, jax_runs):
                ref = dict(torch_run.held_out)
                curves.append(
                    tuple(
                        zip(*[(step, relative_pct(loss, ref[step])) for step, loss in jax_run.held_out if step in ref])
                    )
                )
            ax_gap.plot(
                *mean_curve(curves), color="gray", linestyle=styles[precision], linewidth=1,
                label=f"{precision}: jax - torch (noise)",
            )  # fmt: skip
    ax_gap.axhline(0, color="black", linewidth=0.8)
    ax_gap.axhline(GAP_TARGET_PCT, color="tab:red", linestyle=":", label=f"target <= +{GAP_TARGET_PCT}%")
    ax_gap.set(title="held-out loss gap (% of the reference)", xlabel="step", ylabel="%")
    for ax in (ax_train, ax_eval, ax_gap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_note(logs: list[RunLog]) -> str:
    """A line saying which runs computed their bf16 GEMMs in emulation (empty when none did)."""
    emulated = list(dict.fromkeys(log.name for log in logs if log.bf16_math == "emulated"))
    if not emulated:
        return ""
    return (
        f"bf16 math emulated in fp32 in {', '.join(emulated)} (--bf16-math, the default on a CPU): every bf16 GEMM "
        "(dense layers; bf16 expert GEMMs, those of the fused block included) is an fp32 matmul of bf16-rounded "
        "operands with a bf16-rounded result, "
        "the values of a bf16 GEMM up to the order of the additions. The fp8 expert GEMMs are the real recipe, "
        "and bf16 and fp8 runs differ only in the expert GEMMs."
        + (
            " Under --ep the MoE layers run the fused block, whose bf16 expert GEMMs are real bf16 GEMMs."
            if any("EP=" in log.expert_gemms for log in logs)
            else ""
        )
    )


def layer_note(logs: list[RunLog]) -> str:
    """A line saying which MoE layer the runs used: the fused block (``--fused``) or op by op."""
    fused = list(dict.fromkeys(log.name for log in logs if log.fused and log.framework == "torch"))
    jax_fused = list(dict.fromkeys(log.name for log in logs if log.fused and log.framework == "jax"))
    op_by_op = list(dict.fromkeys(log.name for log in logs if not log.fused))
    parts = []
    if fused:
        parts.append(
            f"fused expert block (MoE(fused=True), --fused) in {', '.join(fused)}: dispatch, GEMMs, SwiGLU and "
            "combine on the padded layout, the same block in both precisions (bf16: torch._grouped_mm)"
        )
    if jax_fused:
        parts.append(f"the bridge's fused expert block (jax_bridge.fused_experts) in {', '.join(jax_fused)}")
    if op_by_op:
        parts.append(f"op-by-op MoE layer in {', '.join(op_by_op)}")
    return "MoE layers: " + "; ".join(parts) + "."


def configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configuration of ``args.size`` with the flags that override it applied."""
    cfg, train_cfg = SIZES[args.size]
    if args.steps is not None:
        train_cfg = dataclasses.replace(train_cfg, steps=args.steps)
    if args.batch_size is not None:  # --batch-size sets the batch of every run
        train_cfg = dataclasses.replace(train_cfg, batch_size=args.batch_size, jax_batch_size=None)
    return cfg, train_cfg


def run_configs(train_cfg: TrainConfig, frameworks: tuple[str, ...]) -> dict[str, TrainConfig]:
    """Each framework's training configuration: the JAX runs take ``jax_batch_size`` where it is set."""
    return {
        framework: dataclasses.replace(train_cfg, batch_size=train_cfg.jax_batch_size)
        if framework == "jax" and train_cfg.jax_batch_size is not None
        else train_cfg
        for framework in frameworks
    }


QUIET = False  # ranks other than 0 of an --ep run: no progress bar


@contextlib.contextmanager
def expert_parallel(args: argparse.Namespace):
    """``--ep N``: join the torchrun group (or, for N = 1 without torchrun, start a group of one) and yield
    the :class:`~experiments._model_torch.ExpertParallel` groups; without ``--ep``: None."""
    global QUIET
    if args.ep is None:
        yield None
        return
    import torch.distributed as dist

    from experiments._model_torch import ExpertParallel

    if args.framework == "jax":
        build_parser().error("--ep: expert parallelism runs the torch model only")
    args.framework = "torch"
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    elif args.ep == 1:
        dist.init_process_group(backend, init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1)
    else:
        build_parser().error(f"--ep {args.ep}: launch with torchrun --nproc-per-node {args.ep} (or a multiple)")
    quiet, out = QUIET, args.out
    try:
        world = dist.get_world_size()
        if world % args.ep:
            build_parser().error(f"--ep {args.ep}: the world size {world} is not a multiple")
        ep = ExpertParallel(args.ep)
        if ep.rank:  # only rank 0 reports and writes
            QUIET, args.out = True, Path(tempfile.mkdtemp())
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                yield ep
        else:
            yield ep
    finally:
        QUIET, args.out = quiet, out
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> list[RunLog]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads or not torch.cuda.is_available():
            torch.set_num_threads(args.threads or 1)
        with expert_parallel(args) as ep:
            return run(args, ep)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, ep=None) -> list[RunLog]:
    """All the runs ``args`` asks for; writes their logs, ``summary.md`` and ``loss.png``."""
    started = time.perf_counter()
    cfg, train_cfg = configs(args)
    frameworks = FRAMEWORKS if args.framework == "both" else (args.framework,)
    precisions = PRECISIONS if args.precision == "both" else (args.precision,)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    skipped = {}
    if "jax" in frameworks and (reason := jax_unavailable_reason()):
        if args.framework == "jax":
            sys.exit(f"--framework jax: {reason}")
        skipped["jax"] = reason
        frameworks = tuple(f for f in frameworks if f != "jax")
    run_devices = {"torch": device}
    if "jax" in frameworks:
        import jax

        run_devices["jax"] = torch.device("cpu" if jax.default_backend() == "cpu" else "cuda")
    run_devices = {framework: run_devices[framework] for framework in frameworks}
    # Every fp8 run's backend is checked before the first step, not when its turn comes.
    if "fp8" in precisions and (problem := backend_problem(args.backend, run_devices)):
        build_parser().error(problem)
    torch_bf16_math = args.bf16_math if args.bf16_math != "auto" else "emulated" if device.type == "cpu" else "native"
    if ep is not None:
        for framework, run_cfg in run_configs(train_cfg, frameworks).items():
            if run_cfg.batch_size % ep.world:
                build_parser().error(f"--ep: the batch {run_cfg.batch_size} is not divisible by the world {ep.world}")

    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = args.out or Path(__file__).parent / "runs" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{args.size}"
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.data)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()}, {os.cpu_count()} cores)"
    )
    run_cfgs = run_configs(train_cfg, frameworks)
    tokens = train_cfg.batch_size * cfg.seq_len
    print(f"{date} on {device_name}; fp8moe backend auto: {fp8moe.backend_info(device)['auto']}")
    print(f"data: {corpus.source} ({corpus.num_files} files, {corpus.train.size:,} train bytes, ", end="")
    print(f"{corpus.held_out.size:,} held-out bytes)")
    print(f"model ({args.size}): {cfg}\ntraining: {train_cfg}, {tokens} tokens/step")
    if "jax" in run_cfgs and run_cfgs["jax"] is not train_cfg:
        print(f"JAX runs: batch {run_cfgs['jax'].batch_size} ({run_cfgs['jax'].batch_size * cfg.seq_len} tokens/step)")
    if "torch" in frameworks:
        threads = torch.get_num_threads()
        print(
            f"torch: bf16 math {torch_bf16_math} (--bf16-math), {threads} thread{'s' * (threads > 1)} (--threads), "
            f"{'fused expert block' if args.fused else 'op-by-op MoE layer'} (--fused)"
        )
    print(f"seeds: {', '.join(map(str, args.seeds))}")
    for framework, reason in skipped.items():
        print(f"skipping {framework}: {reason}")

    logs = []
    time_left = TimeLeft(len(frameworks) * len(args.seeds) * len(precisions))
    for framework, seed, precision in itertools.product(frameworks, args.seeds, precisions):
        run_cfg = run_cfgs[framework]
        run_tokens = run_cfg.batch_size * cfg.seq_len
        run_device = run_devices[framework]
        bf16_math = torch_bf16_math if framework == "torch" else "native"
        # torch: the fused block on every device; JAX: the bridge's fused block on a GPU, op by op on a CPU
        fused = args.fused and (framework == "torch" or run_device.type == "cuda")
        if framework == "torch":
            from experiments._model_torch import TorchTrainer

            trainer = TorchTrainer(
                cfg, run_cfg, precision, args.backend, device, args.compile, seed, bf16_math, fused, ep
            )
        else:
            from experiments._model_jax import JaxTrainer
            from experiments._model_torch import initial_weights

            # On a GPU both precisions run the bridge's fused expert block (jax_bridge.fused_experts; --fused). On
            # a CPU the layer runs op by op, and the bf16 GEMM is XLA's ragged_dot: torch._grouped_mm is slow
            # without bf16 instructions, ragged_dot computes the same products in a few ms a step.
            jax_precision = "bf16_ragged_dot" if precision == "bf16" and not fused else precision
            trainer = JaxTrainer(cfg, run_cfg, jax_precision, args.backend, initial_weights(cfg, seed), fused=fused)
        gemms = expert_gemms(precision, args.backend, run_device, bf16_math, fused and framework == "torch")
        if ep is not None:  # torch only: the MoE layers run the fused block (MoE(ep_group=...) needs it)
            dispatch = "fp8" if precision == "fp8" else "bf16"
            gemms += f", EP={ep.ep_size} x DP={ep.world // ep.ep_size}, {dispatch} dispatch"
        if framework == "jax":
            if precision == "bf16":
                gemms = "bf16 (jax_bridge.fused_experts)" if fused else "bf16 (jax.lax.ragged_dot)"
            elif fused:
                gemms += " (jax_bridge.fused_experts)"
        log = RunLog(
            framework,
            precision,
            gemms,
            str(run_device),
            bf16_math,
            run_cfg.steps,
            run_tokens,
            seed=seed,
            fused=fused,
        )
        train(trainer, log, corpus, run_cfg, cfg.seq_len, seed, time_left)
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (out / f"{framework}_{precision}_seed{seed}.json").write_text(
            json.dumps(
                log.to_json()
                | {
                    "model": dataclasses.asdict(cfg),
                    "train": dataclasses.asdict(run_cfg),
                    "data": corpus.source,
                    "date": date,
                    "device_name": device_name,
                },
                indent=1,
            )
        )
        logs.append(log)

    token_counts = " / ".join(f"{n} tokens/step" for n in sorted({log.tokens_per_step for log in logs}, reverse=True))
    seeds = f"seed{'s' * (len(args.seeds) > 1)} {','.join(map(str, args.seeds))}"
    title = f"{args.size} size, {train_cfg.steps} steps, {token_counts}, {seeds} - {device_name} - {date}"
    table = summary_table(logs)
    if summaries := seed_summaries(logs):
        table = (
            f"fp8 vs bf16 over the seeds (gap: the fp8 run's final held-out loss against the bf16 run's of the same "
            f"seed, mean and spread over the seeds; ms/step: median over every seed's steps after the first 10%):\n\n"
            f"{seed_table(summaries)}\n\nTargets:\n\n" + "\n".join(target_checks(summaries, args.size))
            + f"\n\nEvery run:\n\n{table}"
        )  # fmt: skip
    table += f"\n\n{layer_note(logs)}"
    if note := bf16_note(logs):
        table += f"\n\n{note}"
    plot(logs, title, out / "loss.png")
    took = f"Total time {format_seconds(time.perf_counter() - started)} (m:ss): runs, evaluations and reports."
    (out / "summary.md").write_text(f"{title}\n\n{table}\n\n{took}\n")
    print(f"\n{title}\n{table}\n\n{took}\nwrote {out}/summary.md, loss.png and one JSON log per run")
    return logs


if __name__ == "__main__":
    main()
