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

Every fp8 run's backend is checked before the first step. Writes to ``--out`` (default
``experiments/runs/<date>-<size>``): one JSON log per run, ``loss.png`` (train and held-out loss of every
run, and the held-out gap of fp8 vs bf16 in percent) and ``summary.md`` (the table printed at the end).

    python experiments/train_moe.py                      # all four runs at the size for this machine
    python -m experiments.train_moe                      # the same (what the first re-runs itself as)
    python experiments/train_moe.py --framework torch --precision fp8 --steps 300 --size cpu
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

    @property
    def name(self) -> str:
        return f"{self.framework} {self.precision}"

    @property
    def ms_per_step(self) -> float:
        """Median step time, leaving out the first 10% of steps (compilation, autotuning, warm-up)."""
        return statistics.median(self.step_ms[len(self.step_ms) // 10 :])

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
        help="sequences per step (default: the size's); JAX's bf16 ragged_dot needs a smaller one on one GPU",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batches")
    parser.add_argument("--data", type=Path, help="a text file or folder (default: the Python stdlib sources)")
    parser.add_argument("--out", type=Path, help="output folder (default: experiments/runs/<date>-<size>)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the torch model")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("steps", "batch_size", "threads", "ep"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}: expected >= 1, got {getattr(args, flag)}")
    return args


def backend_problem(backend: str, run_devices: dict[str, torch.device]) -> str | None:
    """Why the fp8 runs cannot use ``backend`` on their devices (``{framework: device}``), or None."""
    for framework, device in run_devices.items():
        try:
            select_backend(backend, device)
        except (RuntimeError, ValueError) as exc:
            return f"--backend {backend}: the fp8 {framework} runs (on {device}) cannot use it: {exc}"
    return None


def expert_gemms(precision: str, backend: str, device: torch.device, bf16_math: str) -> str:
    """What runs the expert GEMMs of a run (the fp8moe backend that "auto" resolves to on ``device``)."""
    if precision == "bf16":
        return "bf16 (fp32-emulated)" if bf16_math == "emulated" else "bf16"
    return "fp8 " + select_backend(backend, device)[0].name


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


def summary_table(logs: list[RunLog]) -> str:
    """Markdown table (final losses, held-out gap of fp8 vs bf16 of the same framework, speed) and, when
    both frameworks ran, their held-out spread at equal precision: the run-to-run noise of the gap."""
    bf16 = {log.framework: log for log in logs if log.precision == "bf16"}
    tail = max(1, logs[0].steps // 20)
    columns = ["run", "expert GEMMs", f"train loss (last {tail} steps)", "held-out loss", "held-out gap vs bf16"]
    columns += ["tokens/s", "ms/step", "speed-up vs bf16"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for log in logs:
        ref = bf16.get(log.framework)
        gap = speedup = "-"
        if ref is not None and log is not ref:
            pct = relative_pct(log.final_held_out_loss, ref.final_held_out_loss)
            gap = f"{pct:+.2f}% ({'meets' if pct <= GAP_TARGET_PCT else 'misses'} <= +{GAP_TARGET_PCT}%)"
            speedup = f"{ref.ms_per_step / log.ms_per_step:.2f}x"
        lines.append(
            f"| {log.name} | {log.expert_gemms} | {log.final_train_loss:.4f} | {log.final_held_out_loss:.4f} | {gap} | "
            f"{log.tokens_per_s:,.0f} | {log.ms_per_step:.1f} | {speedup} |"
        )
    runs = {(log.framework, log.precision): log for log in logs}
    spreads = [
        f"{p} {relative_pct(runs['jax', p].final_held_out_loss, runs['torch', p].final_held_out_loss):+.2f}%"
        for p in PRECISIONS
        if ("torch", p) in runs
        and ("jax", p) in runs
        and runs["torch", p].tokens_per_step == runs["jax", p].tokens_per_step  # else not the same batches
    ]
    if spreads:
        lines.append(
            f"\nSame weights, same batches, other framework (JAX vs torch held-out loss): {', '.join(spreads)}; "
            "gaps of that size are numerical noise of the trajectory, not an effect of the precision."
        )
    return "\n".join(lines)


def relative_pct(value: float, reference: float) -> float:
    return 100 * (value - reference) / reference


def held_out_gaps(logs: list[RunLog]) -> dict[str, tuple[list[int], list[float]]]:
    """Per framework with both precisions at the same batch: held-out loss gap of fp8 against bf16 in percent
    at each evaluation step, ``{framework: (steps, gaps)}``."""
    runs = {(log.framework, log.precision): log for log in logs}
    gaps = {}
    for framework in FRAMEWORKS:
        bf16, fp8 = runs.get((framework, "bf16")), runs.get((framework, "fp8"))
        if bf16 is None or fp8 is None:
            continue
        ref = dict(bf16.held_out)
        points = [(step, relative_pct(loss, ref[step])) for step, loss in fp8.held_out if step in ref]
        gaps[framework] = ([step for step, _ in points], [gap for _, gap in points])
    return gaps


def plot(logs: list[RunLog], title: str, path: Path) -> None:
    """Three panels: train loss (moving average over 1/30 of the run, raw in light), held-out loss of every run
    (both zoomed past the first steps' drop from ~ln(256)), and the held-out gap of fp8 against bf16 in percent
    per framework, with the target and, when both frameworks ran, their spread at equal precision (the noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval, ax_gap) = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = {"torch": "tab:blue", "jax": "tab:orange"}
    styles = {"bf16": "-", "fp8": "--"}
    zoom_train, zoom_eval = [], []
    for log in logs:
        color, style = colors[log.framework], styles[log.precision]
        steps = np.arange(1, len(log.train_loss) + 1)
        window = max(1, len(steps) // 30)
        smooth = np.convolve(log.train_loss, np.full(window, 1 / window), mode="valid")
        ax_train.plot(steps, log.train_loss, color=color, alpha=0.15, linewidth=0.8)
        ax_train.plot(
            steps[window - 1 :], smooth, color=color, linestyle=style, label=f"{log.name}: {log.expert_gemms}"
        )
        zoom_train.append((smooth.min(), smooth[min(len(smooth) - 1, len(smooth) // 6)]))
        eval_steps, eval_losses = zip(*log.held_out)
        ax_eval.plot(eval_steps, eval_losses, color=color, linestyle=style, marker="o", markersize=3, label=log.name)
        zoom_eval.append((min(eval_losses), eval_losses[min(len(eval_losses) - 1, 2)]))
    for ax, zoom in ((ax_train, zoom_train), (ax_eval, zoom_eval)):
        low, high = min(z[0] for z in zoom), max(z[1] for z in zoom)
        if np.isfinite([low, high]).all() and high > low:
            ax.set_ylim(low - 0.05 * (high - low), high)
    ax_train.set(title="train loss (moving average)", xlabel="step", ylabel="cross-entropy (nats/byte)")
    ax_eval.set(title="held-out loss", xlabel="step")

    for framework, (steps, gaps) in held_out_gaps(logs).items():
        ax_gap.plot(steps, gaps, color=colors[framework], marker="o", markersize=3, label=f"{framework}: fp8 - bf16")
    runs = {(log.framework, log.precision): log for log in logs}
    for precision in PRECISIONS:  # the noise floor: the same run in the other framework
        torch_run, jax_run = runs.get(("torch", precision)), runs.get(("jax", precision))
        if torch_run and jax_run and torch_run.tokens_per_step == jax_run.tokens_per_step:
            ref = dict(torch_run.held_out)
            points = [(step, relative_pct(loss, ref[step])) for step, loss in jax_run.held_out if step in ref]
            ax_gap.plot(
                *zip(*points), color="gray", linestyle=styles[precision], linewidth=1,
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
    emulated = [log.name for log in logs if log.bf16_math == "emulated"]
    if not emulated:
        return ""
    return (
        f"bf16 math emulated in fp32 in {', '.join(emulated)} (--bf16-math, the default on a CPU): every bf16 GEMM "
        "(dense layers; bf16 expert GEMMs) is an fp32 matmul of bf16-rounded operands with a bf16-rounded result, "
        "the values of a bf16 GEMM up to the order of the additions. The fp8 expert GEMMs are the real recipe, "
        "and bf16 and fp8 runs differ only in the expert GEMMs."
        + (
            " Under --ep the MoE layers run the fused block, whose bf16 expert GEMMs are real bf16 GEMMs."
            if any("EP=" in log.expert_gemms for log in logs)
            else ""
        )
    )


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
        print(f"torch: bf16 math {torch_bf16_math} (--bf16-math), {threads} thread{'s' * (threads > 1)} (--threads)")
    for framework, reason in skipped.items():
        print(f"skipping {framework}: {reason}")

    logs = []
    time_left = TimeLeft(len(frameworks) * len(precisions))
    for framework in frameworks:
        run_cfg = run_cfgs[framework]
        run_tokens = run_cfg.batch_size * cfg.seq_len
        run_device = run_devices[framework]
        bf16_math = torch_bf16_math if framework == "torch" else "native"
        for precision in precisions:
            if framework == "torch":
                from experiments._model_torch import TorchTrainer

                trainer = TorchTrainer(
                    cfg, run_cfg, precision, args.backend, device, args.compile, args.seed, bf16_math, ep
                )
            else:
                from experiments._model_jax import JaxTrainer
                from experiments._model_torch import initial_weights

                # On a CPU the bridge's bf16 GEMM (torch._grouped_mm) is slow without bf16 instructions:
                # XLA's ragged_dot computes the same products there, in a few ms a step.
                jax_precision = "bf16_ragged_dot" if precision == "bf16" and run_device.type == "cpu" else precision
                trainer = JaxTrainer(cfg, run_cfg, jax_precision, args.backend, initial_weights(cfg, args.seed))
            gemms = expert_gemms(precision, args.backend, run_device, bf16_math if ep is None else "native")
            if ep is not None:  # the MoE layers run the fused block (real bf16 GEMMs in bf16)
                dispatch = "fp8" if precision == "fp8" else "bf16"
                gemms += f", fused, EP={ep.ep_size} x DP={ep.world // ep.ep_size}, {dispatch} dispatch"
            if framework == "jax" and precision == "bf16":
                gemms = "bf16 (jax.lax.ragged_dot)" if run_device.type == "cpu" else "bf16 (jax_bridge.grouped_mm_bf16)"
            log = RunLog(
                framework,
                precision,
                gemms,
                str(run_device),
                bf16_math,
                run_cfg.steps,
                run_tokens,
            )
            train(trainer, log, corpus, run_cfg, cfg.seq_len, args.seed, time_left)
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
            (out / f"{framework}_{precision}.json").write_text(
                json.dumps(
                    log.to_json()
                    | {
                        "model": dataclasses.asdict(cfg),
                        "train": dataclasses.asdict(run_cfg),
                        "data": corpus.source,
                        "seed": args.seed,
                        "date": date,
                        "device_name": device_name,
                    },
                    indent=1,
                )
            )
            logs.append(log)

    token_counts = " / ".join(f"{n} tokens/step" for n in sorted({log.tokens_per_step for log in logs}, reverse=True))
    title = f"{args.size} size, {train_cfg.steps} steps, {token_counts} - {device_name} - {date}"
    table = summary_table(logs)
    if note := bf16_note(logs):
        table += f"\n\n{note}"
    plot(logs, title, out / "loss.png")
    took = f"Total time {format_seconds(time.perf_counter() - started)} (m:ss): runs, evaluations and reports."
    (out / "summary.md").write_text(f"{title}\n\n{table}\n\n{took}\n")
    print(f"\n{title}\n{table}\n\n{took}\nwrote {out}/summary.md, loss.png and one JSON log per run")
    return logs


if __name__ == "__main__":
    main()
