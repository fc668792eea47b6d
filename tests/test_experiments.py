"""Smoke and unit tests of the experiments (CPU, small): data, schedule, torch/JAX model twins, train_moe, compare."""

import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fp8moe
from experiments import compare, train_moe
from experiments._config import SIZES, TrainConfig, lr_at
from experiments.data import held_out_batches, load_corpus, stdlib_path, train_batch
from fp8moe.testing import BenchSettings, sqnr_db

JAX_MISSING = train_moe.jax_unavailable_reason()


def write_corpus(root: Path, num_files: int = 120) -> dict[str, bytes]:
    contents = {}
    for i in range(num_files):
        path = root / f"pkg{i % 3}" / f"mod{i:03d}.py"
        path.parent.mkdir(exist_ok=True)
        contents[path.relative_to(root).as_posix()] = f"# file {i}\ndef f{i}(x):\n    return x * {i}\n".encode() * 5
        path.write_bytes(contents[path.relative_to(root).as_posix()])
    (root / "blob.bin").write_bytes(b"\x00binary" * 10)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skipped.py").write_bytes(b"print('not part of the corpus')\n")
    return contents


def test_corpus_splits_by_file_deterministically(tmp_path):
    contents = write_corpus(tmp_path)
    corpus = load_corpus(tmp_path, held_out_fraction=0.2)
    again = load_corpus(tmp_path, held_out_fraction=0.2)
    assert np.array_equal(corpus.train, again.train) and np.array_equal(corpus.held_out, again.held_out)
    assert corpus.num_files == len(contents)
    train, held = corpus.train.tobytes(), corpus.held_out.tobytes()
    held_files = [c for c in contents.values() if c in held]
    assert 0 < len(held_files) < len(contents) / 2
    for content in contents.values():  # every file lies whole in exactly one split
        assert (content in train) != (content in held)
    assert b"binary" not in train + held and b"not part of the corpus" not in train + held
    assert len(train) + len(held) == sum(map(len, contents.values())) + len(contents) - 2  # newline joins


def test_single_file_is_split_by_bytes(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"".join(f"line {i}\n".encode() for i in range(1000)))
    corpus = load_corpus(path, held_out_fraction=0.1)
    assert corpus.train.size == int(0.9 * path.stat().st_size)
    assert corpus.train.tobytes() + corpus.held_out.tobytes() == path.read_bytes()


def test_default_corpus_is_the_stdlib_sources():
    corpus = load_corpus()
    assert corpus.source == str(stdlib_path())
    assert corpus.num_files > 300
    assert 0.01 < corpus.held_out.size / (corpus.train.size + corpus.held_out.size) < 0.15
    assert b"def " in corpus.train[:100_000].tobytes()


def test_batches_are_fixed_windows_of_the_data():
    data = np.frombuffer(bytes(range(256)) * 50, dtype=np.uint8)
    batch = train_batch(data, 3, 4, 16, seed=1)
    assert batch.shape == (4, 17) and batch.dtype == np.int32
    assert np.array_equal(batch, train_batch(data, 3, 4, 16, seed=1))
    assert not np.array_equal(batch, train_batch(data, 4, 4, 16, seed=1))
    assert np.all(np.diff(batch, axis=1) % 256 == 1)  # contiguous windows of the byte ramp
    evals = held_out_batches(data, 3, 2, 16)
    assert len(evals) == 3 and evals[0].shape == (2, 17)
    assert evals[0][0, 0] == 0 and evals[-1][-1, -1] == data[-1]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(batch_size=1, steps=200, lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-3 / 20) and lrs[19] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[19:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.skipif(JAX_MISSING is not None, reason=str(JAX_MISSING))
@pytest.mark.parametrize(
    "precision, fused, min_logits_db",
    [("bf16", False, 30), ("fp8", False, 18), ("bf16", True, 30), ("fp8", True, 18)],
    ids=["bf16", "fp8", "bf16-fused", "fp8-fused"],
)
def test_torch_and_jax_models_compute_the_same_function(precision, fused, min_logits_db, monkeypatch, jax_on_cpu):
    """Stage by stage: the attention path agrees to bf16 rounding, each MoE layer maps the same input to the
    same output, and end to end the logits agree as far as routing and FP8 rounding flips let them (small
    input differences flip bf16/e4m3 roundings inside the MoE and compound over the layers)."""
    import jax.numpy as jnp

    from experiments import _model_jax
    from experiments._model_torch import build_model, initial_weights

    cfg = SIZES["cpu"][0]
    tokens = train_batch(np.frombuffer(b"def main():\n    return 0\n" * 200, dtype=np.uint8), 0, 2, cfg.seq_len, 0)
    model = build_model(cfg, precision, "reference", seed=3)
    weights = initial_weights(cfg, seed=3)
    assert all(np.array_equal(weights[n], p.detach().numpy()) for n, p in model.named_parameters())
    with torch.no_grad():  # a decisive router: near-uniform initial routing flips on any rounding difference
        for block in model.blocks:
            block.moe.router.weight.mul_(50)
            block.moe.fused = fused  # the fused block in both frameworks (what the JAX model runs on a GPU)
    torch_inputs = []
    for block in model.blocks:
        block.moe.register_forward_pre_hook(lambda module, args: torch_inputs.append(args[0].float()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.from_numpy(tokens[:, :-1]).long())

    jax_calls = []

    def recording_moe_layer(params, x, **kwargs):
        y, aux = moe_layer(params, x, **kwargs)
        jax_calls.append((x, y))
        return y, aux

    moe_layer = _model_jax.moe_layer
    monkeypatch.setattr(_model_jax, "moe_layer", recording_moe_layer)
    params = _model_jax.params_from_torch({n: p.detach().numpy() for n, p in model.named_parameters()}, cfg)
    logits_jax, _ = _model_jax.forward(params, jnp.asarray(tokens[:, :-1]), cfg, precision, "reference", fused)

    def to_torch(a):
        return torch.from_numpy(np.array(a.astype(jnp.float32)))

    assert sqnr_db(torch_inputs[0].reshape(-1, cfg.d_model), to_torch(jax_calls[0][0])) >= 50
    for block, (x, y) in zip(model.blocks, jax_calls, strict=True):
        with torch.no_grad():
            assert sqnr_db(block.moe(to_torch(x))[0], to_torch(y)) >= 60
    assert sqnr_db(logits.float(), to_torch(logits_jax)) >= min_logits_db
    ce = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), torch.from_numpy(tokens[:, 1:]).long().flatten()
    )
    ce_jax = _model_jax.cross_entropy(logits_jax, jnp.asarray(tokens[:, 1:]))
    assert float(ce_jax) == pytest.approx(ce.item(), rel=1e-3)


def test_train_moe_runs_learns_and_reports(tmp_path, capsys, monkeypatch):
    """All four runs at a smaller batch (JAX at its own, smaller one, as the GPU size sets it): each learns,
    logs every step, and the summary, plot and console report them."""
    from experiments import _config

    cfg, train_cfg = SIZES["cpu"]
    small = dataclasses.replace(train_cfg, batch_size=4, jax_batch_size=2, num_evals=2, eval_batches=2)
    monkeypatch.setitem(_config.SIZES, "cpu", (cfg, small))
    data = stdlib_path() / "json"
    logs = train_moe.main(["--size", "cpu", "--steps", "8", "--data", str(data), "--out", str(tmp_path)])
    runs = {(log.framework, log.precision) for log in logs}
    frameworks = ("torch",) if JAX_MISSING else ("torch", "jax")
    assert runs == {(f, p) for f in frameworks for p in ("bf16", "fp8")}
    batch = {"torch": 4, "jax": 2}
    for log in logs:
        record = json.loads((tmp_path / f"{log.framework}_{log.precision}_seed0.json").read_text())
        assert len(record["train_loss"]) == 8 and all(np.isfinite(record["train_loss"]))
        held_out = [loss for _, loss in record["held_out"]]
        assert held_out[0] > 5.0 and held_out[-1] < held_out[0] - 0.5  # from ~ln(256) down: it learns
        assert record["ms_per_step"] > 0 and record["model"]["d_model"] == cfg.d_model
        assert record["train"]["batch_size"] == batch[log.framework]
        assert log.tokens_per_step == batch[log.framework] * cfg.seq_len
    summary = (tmp_path / "summary.md").read_text()
    auto = fp8moe.backend_info("cuda" if torch.cuda.is_available() else "cpu")["auto"]  # the fp8 runs' backend
    assert f"| torch fp8 | 0 | fp8 {auto}, fused block |" in summary and "held-out gap vs bf16" in summary
    assert "| jax fp8 | 0 | fp8 " in summary and "op-by-op MoE layer in jax bf16, jax fp8" in summary
    assert "fused expert block (MoE(fused=True), --fused) in torch bf16, torch fp8" in summary
    assert "(1 seed)" in summary and "not checked: 1 seed, the target needs >= 3" in summary
    if not torch.cuda.is_available():  # the torch runs emulate bf16 on a CPU, and say so
        assert "| torch bf16 | 0 | bf16 (fp32-emulated), fused block |" in summary
        assert "bf16 math emulated in fp32" in summary
    assert "Same weights, same batches" not in summary  # the frameworks saw different batches
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    out = capsys.readouterr()
    assert summary.splitlines()[-1] in out.out and "Total time" in summary
    assert "all_runs_left=" in out.err  # the progress bar's estimate for all the runs


def test_batch_size_flag_sets_every_run_batch_and_the_size_sets_jax_own(monkeypatch):
    from experiments import _config

    cfg, train_cfg = SIZES["cpu"]
    monkeypatch.setitem(_config.SIZES, "cpu", (cfg, dataclasses.replace(train_cfg, jax_batch_size=2)))
    _, sized = train_moe.configs(train_moe.parse_args(["--size", "cpu"]))
    assert {f: c.batch_size for f, c in train_moe.run_configs(sized, ("torch", "jax")).items()} == {
        "torch": train_cfg.batch_size,
        "jax": 2,
    }
    _, flagged = train_moe.configs(train_moe.parse_args(["--size", "cpu", "--batch-size", "3", "--steps", "7"]))
    assert flagged.steps == 7
    assert {c.batch_size for c in train_moe.run_configs(flagged, ("torch", "jax")).values()} == {3}


def test_an_fp8_backend_that_cannot_run_fails_before_the_first_step(tmp_path, capsys, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unavailable = [name for name, reason in fp8moe.backend_info(device)["backends"].items() if reason]
    if not unavailable:
        pytest.skip(f"every fp8moe backend can run on {device}")
    argv = ["--size", "cpu", "--steps", "2", "--framework", "torch", "--out", str(tmp_path / "run")]
    argv += ["--data", str(stdlib_path() / "json")]
    with pytest.raises(SystemExit) as exc:
        train_moe.main([*argv, "--backend", unavailable[0]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --backend {unavailable[0]}: the fp8 torch runs (on {device}) cannot use it" in err
    assert not (tmp_path / "run").exists()  # nothing ran
    # "auto" follows FP8MOE_BACKEND, checked the same way
    monkeypatch.setenv("FP8MOE_BACKEND", unavailable[0])
    with pytest.raises(SystemExit):
        train_moe.main(argv)
    assert "error: --backend auto:" in capsys.readouterr().err

    # a bf16-only run needs no fp8 backend: it gets to its first step
    class FirstStep(Exception):
        pass

    def first_step(*args, **kwargs):
        raise FirstStep

    monkeypatch.setattr(train_moe, "train", first_step)
    with pytest.raises(FirstStep):
        train_moe.main([*argv, "--precision", "bf16", "--backend", unavailable[0]])


def make_log(framework, precision, held_out, tokens=512):
    log = train_moe.RunLog(framework, precision, precision, "cpu", "native", len(held_out), tokens)
    log.held_out = list(enumerate(held_out))
    log.train_loss, log.step_ms = [h + 0.1 for h in held_out], [1.0] * len(held_out)
    return log


def test_held_out_gaps_are_fp8_against_bf16_per_framework_in_percent():
    logs = [
        make_log("torch", "bf16", [5.0, 4.0, 2.0]),
        make_log("torch", "fp8", [5.0, 4.04, 2.01]),
        make_log("jax", "bf16", [5.0, 4.0, 2.0]),
    ]
    gaps = train_moe.held_out_gaps(logs)
    assert list(gaps) == ["torch"]  # JAX has no fp8 run to compare
    steps, pct = gaps["torch"]
    assert steps == [0, 1, 2] and pct == pytest.approx([0.0, 1.0, 0.5])


def test_loss_plot_has_the_gap_panel(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *args, **kwargs: saved.append(fig))
    logs = [
        make_log(f, p, list(np.linspace(5.5, 2.5, 11) * (1.01 if p == "fp8" else 1)))
        for f in ("torch", "jax")
        for p in ("bf16", "fp8")
    ]
    train_moe.plot(logs, "title", tmp_path / "loss.png")
    (fig,) = saved
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["train loss (moving average)", "held-out loss", "held-out loss gap (% of the reference)"]
    gap_lines = {line.get_label(): line.get_ydata() for line in fig.axes[2].get_lines()}
    assert gap_lines["torch: fp8 - bf16"] == pytest.approx([1.0] * 11)
    assert gap_lines["bf16: jax - torch (noise)"] == pytest.approx([0.0] * 11)


def test_time_left_counts_the_runs_still_to_come():
    time_left = train_moe.TimeLeft(num_runs=4)
    assert time_left.estimate(elapsed=10.0, steps_done=10, steps=100) == pytest.approx(90 + 3 * 100)
    time_left.finished += [50.0, 70.0]
    assert time_left.estimate(elapsed=30.0, steps_done=50, steps=100) == pytest.approx(30 + 1 * 60)
    assert train_moe.format_seconds(125.4) == "2:05"


def test_emulated_bf16_gemms_give_the_values_of_bf16_gemms():
    """The fp32 emulation of the CPU runs against torch's bf16 GEMMs: forward values and gradients agree to
    the rounding of a bf16 result (the order of the additions differs), far closer than to fp32 math."""
    from experiments._model_torch import emulated_bf16_grouped_mm, emulated_bf16_linear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 256, generator=gen, requires_grad=True)
    w = torch.randn(384, 256, generator=gen, requires_grad=True)
    dy = torch.randn(300, 384, generator=gen)
    y = emulated_bf16_linear(x, w)
    (y.float() * dy).sum().backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_native = torch.nn.functional.linear(x, w)
    (y_native.float() * dy).sum().backward()
    assert y.dtype == y_native.dtype == torch.bfloat16
    assert (y == y_native).float().mean() > 0.9 and sqnr_db(y_native.float(), y.float()) >= 50
    for g, g_native in zip(grads, (x.grad, w.grad)):
        assert sqnr_db(g_native, g) >= 50
        assert torch.equal(g, g.to(torch.bfloat16).float())  # rounded to bf16, as bf16 GEMMs give them
    assert sqnr_db(x.detach() @ w.detach().T, y.float()) < 55  # the bf16 rounding is there

    xs = torch.randn(300, 256, generator=gen).to(torch.bfloat16).requires_grad_()
    ws = torch.randn(3, 384, 256, generator=gen, requires_grad=True)
    offsets = torch.tensor([100, 100, 300], dtype=torch.int32)
    out = emulated_bf16_grouped_mm(xs, ws, offsets)
    (out.float() * dy).sum().backward()
    grads = xs.grad.clone(), ws.grad.clone()
    xs.grad = ws.grad = None
    out_native = torch._grouped_mm(xs, ws.to(torch.bfloat16).transpose(1, 2), offs=offsets)
    (out_native.float() * dy).sum().backward()
    assert out.dtype == torch.bfloat16 and (out == out_native).float().mean() > 0.9
    assert sqnr_db(out_native.float(), out.float()) >= 50
    for g, g_native in zip(grads, (xs.grad, ws.grad)):
        assert sqnr_db(g_native.float(), g.float()) >= 50
    assert ws.grad[1].eq(0).all()  # the empty group


def test_emulated_bf16_model_matches_the_autocast_model():
    """bf16: the emulated model computes the autocast model's logits to a few bf16 roundings. fp8: the emulated
    model's MoE layers are plain ``MoE(precision="fp8")`` layers, the same bits (the emulation touches only
    bf16 GEMMs)."""
    from experiments._model_torch import build_model
    from fp8moe.moe import MoE

    cfg = SIZES["cpu"][0]
    tokens = torch.from_numpy(train_batch(np.frombuffer(b"import os\n" * 500, np.uint8), 0, 2, cfg.seq_len, 0))
    native = build_model(cfg, "bf16", "reference", seed=1)
    emulated = build_model(cfg, "bf16", "reference", seed=1, bf16_math="emulated")
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_native, aux_native = native(tokens[:, :-1].long())
        logits, aux = emulated(tokens[:, :-1].long())
    assert logits.dtype == torch.bfloat16
    assert sqnr_db(logits_native.float(), logits.float()) >= 45
    assert aux.item() == pytest.approx(aux_native.item(), rel=1e-4)

    emulated = build_model(cfg, "fp8", "reference", seed=1, bf16_math="emulated")
    x = torch.randn(100, cfg.d_model, generator=torch.Generator().manual_seed(2))
    for block in emulated.blocks:
        plain = MoE(
            cfg.d_model,
            cfg.d_ff,
            cfg.num_experts,
            cfg.top_k,
            precision="fp8",
            backend="reference",
            fused=block.moe.fused,
        )
        plain.load_state_dict(block.moe.state_dict())
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(block.moe(x), plain(x)))


def test_compare_reports_every_implementation_against_the_float64_recipe(capsys):
    report = compare.main(["--rows", "300", "--n", "128", "--k", "256", "--experts", "4", "--routing", "tail"])
    results = report.results
    assert {"float64 recipe", "float64 exact", "torch bf16", "fp8moe reference"} <= set(results)
    y_ref, dx_ref, dw_ref = results["float64 recipe"]
    y, dx, dw = results["fp8moe reference"]
    assert sqnr_db(dw_ref, dw) >= 100  # fp32 result of the same recipe
    assert sqnr_db(y_ref, y) >= 45 and sqnr_db(dx_ref, dx) >= 45  # bf16 results of the same recipe
    assert 20 <= sqnr_db(results["float64 exact"][0], y) <= 35  # the FP8 quantization error itself
    assert sqnr_db(results["float64 exact"][2], results["torch bf16"][2]) >= 45
    assert torch.equal(results["torch bf16"][0][-60:], torch.zeros_like(y[-60:]))  # unrouted tail rows
    assert not report.mismatches
    if "jax bridge reference" in results:
        assert all(torch.equal(a, b) for a, b in zip(results["jax bridge reference"], results["fp8moe reference"]))
    out = capsys.readouterr().out
    assert "pairwise SQNR (dB) of dw" in out


@pytest.mark.parametrize("flag", ["--steps", "--batch-size"])
def test_train_moe_rejects_a_count_below_one_naming_the_flag(flag, capsys):
    with pytest.raises(SystemExit):
        train_moe.parse_args([flag, "0"])
    assert f"{flag}: expected >= 1, got 0" in capsys.readouterr().err


def test_train_moe_runs_as_a_file_from_any_folder(tmp_path):
    """`python experiments/train_moe.py` re-runs itself as the module experiments.train_moe (here from a folder
    outside the repository, the harder case); it needs no sys.path edits, and none of the training files make any."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    script = repo / "experiments" / "train_moe.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(script), "--steps", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--steps: expected >= 1, got 0" in result.stderr, result.stderr
    for name in ("train_moe", "_config", "_model_torch", "_model_jax", "data"):
        assert "sys.path" not in (repo / "experiments" / f"{name}.py").read_text()


def test_bench_moe_layer_smoke_reports_every_row_and_the_targets(tmp_path, capsys):
    """The MoE layer benchmark end to end on a tiny shape (reference backend, the same timer as on the GPU): every
    row measured or given its reason, the targets checked, the .md/.json written."""
    from experiments import bench_moe_layer

    report = bench_moe_layer.main(["--smoke", "--out", str(tmp_path)])
    (result,) = report["shapes"]
    rows = {row.key: row for row in result.rows}
    assert list(rows) == list(bench_moe_layer.SMOKE_ROWS)
    for key in ("fused-fp8-reference", "fused-bf16", "op-fp8-reference", "op-bf16"):
        assert rows[key].fwd.median_ms > 0 and rows[key].fwd_bwd.cpu_ms > 0 and not rows[key].note, key
    if rows["op-torchao"].fwd is None:  # no torchao here, or no GPU: a reason, not a crash
        assert "torchao" in rows["op-torchao"].note
    targets = {c["target"] for c in report["targets"]}
    assert len(targets) == len(bench_moe_layer.TARGETS) - 1  # the 2.5x target: the seed shape only
    text = (tmp_path / "bench_moe_layer.md").read_text()
    assert "## Targets" in text and "fused fp8 (reference)" in text and "F=128 = 1 x 128" in text
    saved = json.loads((tmp_path / "bench_moe_layer.json").read_text())
    assert saved["shapes"][0]["shape"]["tokens"] == result.shape.tokens and saved["weights"] == "fresh"
    assert text.splitlines()[-1] in capsys.readouterr().out


def test_bench_moe_layer_shapes_rows_and_failures(monkeypatch):
    from experiments import bench_moe_layer

    args = bench_moe_layer.parse_args(["--smoke", "--shapes", "seed,64:128:200:4:2", "--rows", "op-bf16"])
    seed, custom = args.shapes
    assert (seed.tokens, seed.d_model, seed.d_ff, seed.experts, seed.top_k) == (8192, 7168, 2048, 8, 4)
    assert custom.d_ff == 256 and "not a multiple of 128" in custom.note  # rounded up, and said so
    assert bench_moe_layer.parse_shape("v2-lite").d_ff == 1408  # 11 x 128: taken as is
    for bad in (["--rows", "nope"], ["--shapes", "1:2:3"], ["--calls", "0"]):
        with pytest.raises(SystemExit):
            bench_moe_layer.parse_args(["--smoke", *bad])

    def broken(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench_moe_layer, "measure", broken)
    settings = BenchSettings(1, warmup=0, cpu_calls=0, profile_calls=0, budget_s=60)
    result = bench_moe_layer.run_shape(custom, ["op-bf16", "fused-fp8-deepgemm"], "cpu", settings, True)
    assert result.rows[0].note.startswith("failed: OutOfMemoryError: CUDA out of memory")
    assert result.rows[1].fwd is None and result.rows[1].note  # DeepGEMM cannot run on a CPU: its reason


def test_bench_moe_layer_torchao_layer_passes_the_weights_as_torchao_wants_them(monkeypatch):
    """The torchao row: B_t = w.transpose(-2, -1), (E, K, N) in per-group column-major strides, the token
    groups padded by the layer to multiples of 16 rows (zero rows) with torchao's own padding off, and the
    output unpadded. With a bf16 stand-in for torchao's GEMM it must be the op-by-op bf16 layer, bit for bit,
    forward and backward."""
    from experiments import bench_moe_layer

    seen = []

    def stand_in(a, b_t, offs, out_dtype, pad_token_groups_for_grouped_mm=True):
        assert pad_token_groups_for_grouped_mm is False  # torchao 0.18 asserts on its own padding
        ends = offs.long()
        sizes = torch.diff(ends, prepend=ends.new_zeros(1))
        assert sizes.remainder(16).eq(0).all(), sizes  # what torchao needs without its padding
        assert a[int(ends[-1]) :].eq(0).all()  # rows past the last group: zeros, in no group
        seen.append((b_t.shape, b_t.stride(), offs.dtype, sizes, a.detach().clone(), ends))
        return torch._grouped_mm(a, b_t.to(torch.bfloat16), offs=offs).to(out_dtype)

    monkeypatch.setattr(bench_moe_layer, "torchao_rowwise", lambda: stand_in)
    shape = bench_moe_layer.parse_shape("61:128:128:4:2")  # T*k = 122 rows: groups of a router's sizes
    x = torch.randn(61, 128).to(torch.bfloat16)
    results = []
    for key in ("op-torchao", "op-bf16"):
        layer = bench_moe_layer.build_layer(key, shape, "cpu")
        assert layer.fused is False
        xr = x.clone().requires_grad_()
        y, aux = layer(xr)
        (y.float().square().sum() + aux).backward()
        results.append([y, xr.grad, *(p.grad for p in layer.parameters())])
    for got, want in zip(*results):
        assert torch.equal(got, want)
    assert len(seen) == 2  # both expert GEMMs of the forward went through torchao (the backward is autograd's)
    (e, k, n), strides = seen[0][0], seen[0][1]
    assert (e, k, n) == (4, 128, 256) and strides == (k * n, 1, k) and seen[0][2] == torch.int32
    sizes, padded, ends = seen[0][3], seen[0][4], seen[0][5]
    assert sizes.sum() > 122 and padded.shape[0] == 192  # padding happened; the bound: 122 + 15 * 4 -> 192
    real = torch.zeros(padded.shape[0], dtype=torch.bool)  # the zero padding rows sit at each group's end
    starts = ends - sizes
    routed = torch.diff(layer_offsets(bench_moe_layer, shape, x), prepend=torch.zeros(1, dtype=torch.long))
    for s0, r in zip(starts.tolist(), routed.tolist()):
        real[s0 : s0 + r] = True
    assert padded[~real].eq(0).all() and padded[real].abs().sum(-1).gt(0).all()


def layer_offsets(bench_moe_layer, shape, x):
    """The group ends (int64) that the seed-0 layer of ``shape`` routes x into."""
    from fp8moe.moe import route

    layer = bench_moe_layer.build_layer("op-bf16", shape, "cpu")
    return route(x, layer.router.weight, shape.top_k).offsets.long()


def test_bench_moe_layer_pad_groups_maps_rows_into_16_row_groups():
    from experiments.bench_moe_layer import pad_groups

    offsets = torch.tensor([0, 5, 5, 21, 38], dtype=torch.int32)  # an empty first and third group, one of 16
    dest, padded_ends, rows = pad_groups(offsets, 38)
    assert padded_ends.tolist() == [0, 16, 16, 32, 64] and rows == 128  # 38 + 15 * 5 rounded up to 16
    assert dest.tolist() == [*range(0, 5), *range(16, 32), *range(32, 49)]


def test_train_moe_seeds_report_the_gap_mean_and_spread_and_plot_each_seed(tmp_path, monkeypatch):
    """--seeds: every precision once per seed (a JSON log each), the summary's seed table (mean gap with its
    min/max/std, step time per precision, fp8/bf16 ratio) and target lines, per-seed and mean lines in the plot."""
    import matplotlib.figure

    from experiments import _config

    cfg, train_cfg = SIZES["cpu"]
    small = dataclasses.replace(train_cfg, batch_size=2, num_evals=2, eval_batches=1)
    monkeypatch.setitem(_config.SIZES, "cpu", (cfg, small))
    figures = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))
    )
    argv = ["--size", "cpu", "--steps", "3", "--framework", "torch", "--seeds", "0,1", "--out", str(tmp_path)]
    logs = train_moe.main([*argv, "--data", str(stdlib_path() / "json")])
    assert [(log.seed, log.precision) for log in logs] == [(0, "bf16"), (0, "fp8"), (1, "bf16"), (1, "fp8")]
    assert all(log.fused for log in logs)
    records = {
        (seed, p): json.loads((tmp_path / f"torch_{p}_seed{seed}.json").read_text()) for seed in (0, 1) for p in PREC
    }
    assert all(r["seed"] == seed and len(r["train_loss"]) == 3 for (seed, _), r in records.items())
    assert records[0, "bf16"]["held_out"][0] != records[1, "bf16"]["held_out"][0]  # other weights, other batches
    (summary,) = train_moe.seed_summaries(logs)
    bf16, fp8 = ([log for log in logs if log.precision == p] for p in PREC)
    gaps = [train_moe.relative_pct(f.final_held_out_loss, b.final_held_out_loss) for b, f in zip(bf16, fp8)]
    assert summary.gaps_pct == pytest.approx(gaps) and summary.seeds == [0, 1]
    assert summary.ms_per_step["fp8"] == pytest.approx(statistics.median(fp8[0].step_ms + fp8[1].step_ms))
    text = (tmp_path / "summary.md").read_text()
    assert "seeds 0,1" in text.splitlines()[0]
    assert f"{summary.gap_mean:+.2f}% (min {min(gaps):+.2f}%, max {max(gaps):+.2f}%, std " in text
    assert f"| {summary.speedup:.2f}x |" in text and "2 seeds)" in text
    assert "not checked: 2 seeds, the target needs >= 3" in text
    assert "not checked here: not the GPU size; not on a GPU" in text
    assert "| torch fp8 | 1 |" in text and (tmp_path / "loss.png").stat().st_size > 10_000
    labels = [line.get_label() for line in figures[0].axes[2].get_lines()]
    assert "torch: fp8 - bf16 (mean of 2 seeds)" in labels and "_torch seed 1" in labels
    assert len(figures[0].axes[1].get_lines()) == 2 * 3  # held-out: per precision two seeds and the mean


PREC = train_moe.PRECISIONS


def test_seed_summaries_and_target_checks():
    logs = []
    for seed, gap in ((0, 1.0), (1, 2.0), (2, 3.0)):
        for precision, scale, ms in (("bf16", 1.0, 12.0), ("fp8", 1 + gap / 100, 10.0)):
            log = make_log("torch", precision, [5.0, 4.0, 2.0 * scale])
            log.seed, log.fused, log.device, log.step_ms = seed, True, "cuda", [ms + seed] * 3
            logs.append(log)
    (summary,) = train_moe.seed_summaries(logs)
    assert summary.gaps_pct == pytest.approx([1.0, 2.0, 3.0]) and summary.gap_mean == pytest.approx(2.0)
    assert summary.gap_std == pytest.approx(1.0) and summary.speedup == pytest.approx(13.0 / 11.0)
    gap_line, speed_line = train_moe.target_checks([summary], "gpu")
    assert "+2.00% (min +1.00%, max +3.00%, std 1.00 pp; 3 seeds)" in gap_line and gap_line.endswith("**missed**")
    assert "1.18x (13.0 vs 11.0 ms/step): **met**" in speed_line
    summary.fused = False
    assert "not the fused block" in train_moe.target_checks([summary], "gpu")[1]
    assert train_moe.held_out_gaps(logs)["torch"][1] == pytest.approx([0.0, 0.0, 2.0])
    assert "| torch | 0,1,2 |" in train_moe.seed_table([summary])


@pytest.mark.parametrize(
    "argv, error",
    [
        (["--seeds", "0,0"], "expected distinct seeds >= 0"),
        (["--seeds", "0,x"], "expected comma-separated integers"),
        (["--seed", "1", "--seeds", "0,1"], "--seed and --seeds: give one of them"),
        (["--seed", "-1"], "--seed: expected >= 0"),
    ],
)
def test_train_moe_rejects_bad_seeds(argv, error, capsys):
    with pytest.raises(SystemExit):
        train_moe.parse_args(argv)
    assert error in capsys.readouterr().err


def test_seed_and_fused_flags():
    assert train_moe.parse_args([]).seeds == [0] and train_moe.parse_args(["--seed", "4"]).seeds == [4]
    assert train_moe.parse_args(["--seeds", "2,0,1"]).seeds == [2, 0, 1]
    assert train_moe.parse_args([]).fused and not train_moe.parse_args(["--no-fused"]).fused


def test_fused_bf16_layer_is_emulated_on_cpu():
    """The fused bf16 block's GEMMs (2 forward, 2 dgrad, 2 wgrad) run through the fp32 emulation when the model
    emulates bf16: the hook is called, the numbers differ from torch's native bf16 GEMMs by rounding order only,
    and the gradients reach every parameter."""
    from experiments._model_torch import EmulatedBf16MoE, TorchTrainer
    from fp8moe.moe import MoE

    torch.manual_seed(0)
    emulated = EmulatedBf16MoE(128, 128, 4, 2, precision="bf16", backend="reference", fused=True)
    native = MoE(128, 128, 4, 2, precision="bf16", backend="reference", fused=True)
    native.load_state_dict(emulated.state_dict())
    x = torch.randn(200, 128, requires_grad=True)
    x_native = x.detach().clone().requires_grad_()
    y, aux = emulated(x)
    (y.square().mean() + aux).backward()
    assert emulated.emulation.calls == 6
    y_native, aux_native = native(x_native)
    (y_native.square().mean() + aux_native).backward()
    assert not torch.equal(y, y_native) and sqnr_db(y_native, y) >= 60
    assert aux.item() == aux_native.item()
    for p, p_native in zip((x, *emulated.parameters()), (x_native, *native.parameters())):
        assert p.grad is not None and sqnr_db(p_native.grad, p.grad) >= 50
    with torch.no_grad():  # inference: the forward's two GEMMs, no autograd node
        assert torch.equal(emulated(x)[0], y) and emulated.emulation.calls == 8
    fp8 = EmulatedBf16MoE(128, 128, 4, 2, precision="fp8", backend="reference", fused=True)
    fp8(x)[0].sum().backward()
    assert fp8.emulation.calls == 0  # the FP8 block is the real recipe

    cfg, train_cfg = SIZES["cpu"]
    trainer = TorchTrainer(cfg, train_cfg, "bf16", "reference", torch.device("cpu"), False, 0, "emulated", True)
    batch = train_batch(np.frombuffer(b"import os\n" * 500, np.uint8), 0, 2, cfg.seq_len, 0)
    assert np.isfinite(trainer.step(batch, 1e-3))
    assert [block.moe.emulation.calls for block in trainer.model.blocks] == [6] * cfg.num_layers


def test_bench_ep_runs_ep1_through_the_ep_path(tmp_path, capsys):
    """One process: bench_ep starts a group of one (EP=1, the same code path as under torchrun) and reports
    bf16 and FP8 dispatch with fp32 and bf16 partials, and the one-device layer, bytes per direction; FP8
    dispatch moves fewer bytes, and bf16 partials 2D bytes less per row in each direction."""
    from experiments import bench_ep

    argv = ["--tokens", "32", "--d-model", "128", "--d-ff", "128", "--experts", "4", "--top-k", "2"]
    rows = bench_ep.main([*argv, "--backend", "reference", "--calls", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert not torch.distributed.is_initialized()  # the group it started is gone
    by_layer = {row["layer"]: row for row in rows}
    ep_layers = {f"EP=1, {d} dispatch, {p} partials" for d in ("bf16", "fp8") for p in ("fp32", "bf16")}
    assert set(by_layer) == ep_layers | {"one device (all experts)"}
    bf16, fp8 = by_layer["EP=1, bf16 dispatch, fp32 partials"], by_layer["EP=1, fp8 dispatch, fp32 partials"]
    assert 0 < fp8["all_to_all_mb_moved"] < bf16["all_to_all_mb_moved"] and bf16["all_to_all_mb"] == 0
    assert bf16["all_to_all_mb_fwd"] == bf16["all_to_all_mb_bwd"] == 0  # EP=1: nothing to other ranks
    half = by_layer["EP=1, bf16 dispatch, bf16 partials"]
    # 32 tokens, each once to the one rank: the partials back (fwd) and the partial dx back (bwd), 2D each
    saved = bf16["all_to_all_mb_moved"] - half["all_to_all_mb_moved"]
    assert abs(saved - 2 * 32 * 2 * 128 / 1e6) < 1e-9
    assert all(row["layer_ms"] > 0 and row["tokens_per_s"] > 0 for row in rows)
    text = (tmp_path / "bench_ep.md").read_text()
    assert "| EP=1, fp8 dispatch, fp32 partials | 0 |" in text and "MB to other ranks: fwd | bwd |" in text
    assert json.loads((tmp_path / "bench_ep.json").read_text())["rows"] == rows
    assert "bench_ep: world 1" in capsys.readouterr().out


def test_train_moe_ep_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 train_moe.py --ep 2`` (gloo, CPU): it trains, rank 0 reports, and the
    resharded model starts where the single-process one does (same initial held-out loss up to the fused
    block's rounding)."""
    from experiments import _config

    data = str(stdlib_path() / "json")
    argv = ["--size", "cpu", "--steps", "8", "--batch-size", "4", "--precision", "fp8", "--data", data]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "experiments.train_moe"]
    done = subprocess.run(
        [*cmd, *argv, "--ep", "2", "--out", str(tmp_path / "ep")], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "ep" / "torch_fp8_seed0.json").read_text())
    assert "EP=2 x DP=1, fp8 dispatch" in record["expert_gemms"]
    assert len(record["train_loss"]) == 8 and all(np.isfinite(record["train_loss"]))
    held_out = [loss for _, loss in record["held_out"]]
    assert held_out[-1] < held_out[0] - 0.3  # it learns
    assert "EP=2 x DP=1" in (tmp_path / "ep" / "summary.md").read_text()
    assert done.stdout.count("wrote ") == 1  # rank 0 only
    cfg, train_cfg = _config.SIZES["cpu"]
    single = train_moe.main(
        [*argv[:-2], "--data", data, "--steps", "1", "--framework", "torch", "--out", str(tmp_path / "one")]
    )
    assert single[0].held_out[0][1] == pytest.approx(held_out[0], abs=2e-3)
