"""fp8moe.testing (CPU, fast): the benchmark timer's CPU path, saved-for-backward bytes, the routing presets,
the float64 recipe model; and the command-line errors of experiments/compare.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fp8moe.testing import (
    ROUTING_PRESETS,
    fq_blocks,
    fq_rows,
    fq_token_tiles,
    grouped_mm_fwd_bwd,
    round_e4m3,
    routing_offsets,
    saved_tensor_bytes,
    time_call,
)

ROOT = Path(__file__).parent.parent
on_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the timer")


# ---------------------------------------------------------------------------------------------- timer


@on_cpu_only
def test_timer_times_one_call_by_wall_clock_on_cpu():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)
        return "out"

    t = time_call(fn, warmup=2, calls=5, cpu_calls=3)
    assert len(calls) == 2 + 5 + 3  # no profiler or memory pass without CUDA
    assert t.method == "wall" and t.calls == 5
    assert 2.0 <= t.median_ms < 100 and 2.0 <= t.cpu_ms < 100
    assert t.launches is None and t.gpu_kernel_ms is None and t.peak_mib is None and t.kernels is None


@on_cpu_only
def test_timer_waits_for_each_output_with_sync():
    synced = []

    def sync(out):
        time.sleep(0.003)  # the "device" work the call left behind
        synced.append(out)

    t = time_call(lambda: 7, sync=sync, warmup=1, calls=4, cpu_calls=2)
    assert t.method == "wall+sync" and synced == [7] * (1 + 4 + 2)
    assert t.median_ms >= 3.0  # the wait is part of the call's time ...
    assert t.cpu_ms < 3.0  # ... but not of the host time of issuing it


class _FakeEvent:
    """A CUDA event on the CPU: records perf_counter (the fake GPU runs synchronously)."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return 1e3 * (end.t - self.t)


def test_timer_cuda_path_with_a_fake_device(monkeypatch):
    """The control flow of the CUDA path (events, host time, profiler aggregation, peak memory) on the CPU."""
    from torch.autograd import DeviceType

    allocated = {"now": 100 * 2**20, "peak": 0}
    kernels = [("gemm", 0.5, "kernel"), ("quant", 0.25, "kernel"), ("Memset", 0.125, "gpu_memset")]

    def fn():
        time.sleep(0.002)
        allocated["peak"] = max(allocated["peak"], allocated["now"] + 3 * 2**20)
        return "out"

    class FakeProfile:
        def __init__(self, activities):
            self.calls = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            events = []
            for name, ms, kind in kernels * 2:  # two profiled calls
                events.append(type("E", (), {"name": name, "device_type": DeviceType.CUDA, "activity_type": kind})())
                events[-1].time_range = type("R", (), {"start": 10.0, "end": 10.0 + 1e3 * ms})()
            annotation = type("E", (), {"name": "range", "device_type": DeviceType.CUDA})()
            annotation.activity_type, annotation.time_range = "gpu_user_annotation", events[0].time_range
            cpu = type("E", (), {"name": "aten::mm", "device_type": DeviceType.CPU, "activity_type": "cpu_op"})()
            return [*events, annotation, cpu]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    t = time_call(fn, warmup=1, calls=4, cpu_calls=2, profile_calls=2)
    assert t.method == "cuda-events" and 2.0 <= t.median_ms < 100 and 2.0 <= t.cpu_ms < 100
    assert t.launches == pytest.approx(3) and t.gpu_kernel_ms == pytest.approx(0.875)
    assert list(t.kernels) == ["gemm", "quant", "Memset"] and t.kernels["gemm"] == [1, 0.5]
    assert t.peak_mib == pytest.approx(3.0) and t.note == ""
    synced = []
    t = time_call(fn, sync=synced.append, warmup=0, calls=2, cpu_calls=1, profile_calls=2)
    assert t.method == "wall+sync" and t.peak_mib is None and t.launches == pytest.approx(3)
    assert synced == ["out"] * 5  # 2 timed, 1 host-time, 2 profiled calls

    def broken_profile(activities):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(torch.profiler, "profile", broken_profile)
    t = time_call(fn, warmup=0, calls=1, cpu_calls=0)
    assert t.launches is None and t.note == "profiler failed: RuntimeError: CUPTI unavailable"
    assert t.peak_mib == pytest.approx(3.0)


def test_timer_rejects_no_calls_and_propagates_errors():
    with pytest.raises(ValueError, match="calls"):
        time_call(lambda: None, calls=0)

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        time_call(broken)


def test_saved_bytes_count_each_storage_once_and_inputs_apart():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    saved, y = saved_tensor_bytes(lambda: (x @ w).square(), inputs=(x, w))
    # mm saves x and w; square saves its input (x @ w, 64 x 16 fp32)
    assert saved.total == (64 * 32 + 32 * 16 + 64 * 16) * 4
    assert saved.inputs == (64 * 32 + 32 * 16) * 4 and saved.beyond_inputs == 64 * 16 * 4
    assert y.shape == (64, 16) and y.requires_grad
    saved, _ = saved_tensor_bytes(lambda: x * x)  # the same tensor saved twice counts once
    assert saved.total == x.nbytes and saved.inputs == 0
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x * w[:, 0].sum())[0].total == 0


# ---------------------------------------------------------------------------------------------- routings


@pytest.mark.parametrize("preset", ROUTING_PRESETS)
@pytest.mark.parametrize("rows, experts", [(1000, 8), (37, 3), (5, 1)])
def test_routing_presets_are_valid_offsets(preset, rows, experts):
    offsets = routing_offsets(preset, rows, experts, seed=3)
    assert offsets.dtype == torch.int32 and offsets.shape == (experts,)
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
    assert (sizes >= 0).all() and int(offsets[-1]) <= rows
    assert torch.equal(offsets, routing_offsets(preset, rows, experts, seed=3))  # deterministic
    if preset in ("balanced", "ragged", "skewed", "empty"):
        assert int(offsets[-1]) == rows  # every row routed


def test_routing_presets_have_their_shapes():
    def sizes(preset, **kw):
        offsets = routing_offsets(preset, 1000, 8, **kw)
        return torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()

    assert sizes("balanced") == [125] * 8
    assert routing_offsets("balanced", 10, 4).tolist() == [3, 6, 8, 10]
    skewed = sizes("skewed")
    assert max(skewed) == 400 and skewed.count(0) == 2
    assert sizes("empty").count(0) == 3
    assert int(routing_offsets("tail", 1000, 8)[-1]) == 750 and sizes("tail").count(0) >= 1
    assert sizes("one_row") == [1] * 8
    assert sizes("ragged") != sizes("ragged", seed=1)
    for preset in ROUTING_PRESETS[:-1]:
        aligned, routed = sizes(preset, align=16), (750 if preset == "tail" else 1000)
        assert all(s % 16 == 0 for s in aligned) and routed - 16 < sum(aligned) <= routed
    assert sizes("skewed", align=16).count(0) == 2
    assert routing_offsets("ragged", 64, 2, device="meta").device.type == "meta"


@pytest.mark.parametrize(
    "args, match",
    [
        (("nope", 10, 2), "balanced, ragged"),
        (("balanced", 0, 2), "rows and experts"),
        (("one_row", 3, 4), "rows >= experts"),
        (("balanced", 10, 2, {"align": 0}), "align"),
    ],
)
def test_routing_presets_reject_bad_arguments(args, match):
    *positional, options = args if isinstance(args[-1], dict) else (*args, {})
    with pytest.raises(ValueError, match=match):
        routing_offsets(*positional, **options)


# ---------------------------------------------------------------------------------------------- float64 model


def test_round_e4m3_grid_ties_saturation_and_nan():
    values = np.array([0.0, 1.0, 1.0625, 1.1875, 448.0, 500.0, -1e9, 2.0**-9, 2.0**-10, 3 * 2.0**-10, np.nan])
    want = np.array([0.0, 1.0, 1.0, 1.25, 448.0, 448.0, -448.0, 2.0**-9, 0.0, 2.0**-8, np.nan])
    np.testing.assert_array_equal(round_e4m3(values), want)  # ties to even: 1.0625 -> 1, 1.1875 -> 1.25


def test_fake_quantizers_scale_each_tile_to_448():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256))
    xq = fq_rows(x)
    for tile, qtile in zip(x.reshape(-1, 128), xq.reshape(-1, 128)):
        amax = np.abs(tile).max()
        assert np.abs(qtile).max() == pytest.approx(amax, rel=1e-6)  # the largest value is exact (448 * scale)
        assert np.abs(qtile - tile).max() <= amax / 448 * 16  # at most half an e4m3 step of 32 scales
    assert np.array_equal(fq_rows(np.zeros((2, 128))), np.zeros((2, 128)))
    tiny = np.full((1, 128), 2.0**-127)  # below fp32's smallest normal: reads as zero
    assert np.array_equal(fq_rows(tiny), np.zeros_like(tiny))
    w = rng.standard_normal((2, 256, 128))
    w[0, :128] *= 1000  # one block's scale does not affect another's
    np.testing.assert_allclose(fq_blocks(w)[0, 128:], fq_blocks(w[:, 128:].copy())[0], rtol=0)
    t = rng.standard_normal((130, 4))  # 128x1 tiles, the second one zero-padded from 2 rows
    assert fq_token_tiles(t).shape == (130, 4)
    columns = np.zeros((4, 128))  # the second tile's columns, as 1x128 rows: the same tiles
    columns[:, :2] = t[128:].T
    np.testing.assert_array_equal(fq_token_tiles(t)[128:], fq_rows(columns)[:, :2].T)


def test_float64_grouped_mm_groups_empty_groups_and_tail():
    rng = np.random.default_rng(1)
    m, n, k, e = 300, 128, 256, 3
    x, w, dy = rng.standard_normal((m, k)), rng.standard_normal((e, n, k)), rng.standard_normal((m, n))
    offsets = np.array([100, 100, 250])
    y, dx, dw = grouped_mm_fwd_bwd(x, w, offsets, dy, quantized=False)
    np.testing.assert_allclose(y[:100], x[:100] @ w[0].T)
    np.testing.assert_allclose(dx[100:250], dy[100:250] @ w[2])
    np.testing.assert_allclose(dw[2], dy[100:250].T @ x[100:250])
    assert not y[250:].any() and not dx[250:].any() and not dw[1].any()
    yq, dxq, dwq = grouped_mm_fwd_bwd(x, w, offsets, dy)
    for exact, fp8 in ((y, yq), (dx, dxq), (dw, dwq)):
        snr = 10 * np.log10(np.square(exact).sum() / np.square(exact - fp8).sum())
        assert 20 < snr < 40  # the FP8 quantization error
    np.testing.assert_array_equal(yq[:100], fq_rows(x[:100]) @ fq_blocks(w)[0].T)
    assert not yq[250:].any() and not dwq[1].any()


# ---------------------------------------------------------------------------------------------- compare.py CLI


def test_compare_rejects_a_bad_flag_in_one_line():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = ROOT / "experiments" / "compare.py"
    argv = [sys.executable, str(script), "--n", "100"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "compare.py: error: --n: expected a positive multiple of 128, got 100"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "0"], "--k: expected a positive multiple of 128, got 0"),
        (["--rows", "0"], "--rows: expected >= 1, got 0"),
        (["--experts", "-2"], "--experts: expected >= 1, got -2"),
        (["--routing", "one_row", "--rows", "3", "--experts", "4"], "--routing one_row: rows: the one_row"),
        (["--routing", "nope"], "argument --routing: invalid choice"),
    ],
)
def test_compare_argument_errors(argv, message, capsys):
    from experiments import compare

    with pytest.raises(SystemExit) as exc:
        compare.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- benchmarks


@on_cpu_only
def test_bench_grouped_mm_cpu_smoke_run(tmp_path, capsys):
    from experiments import bench_grouped_mm

    report = bench_grouped_mm.main(["--routings", "skewed", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = {row.case: row for row in report["routings"]["skewed"]["rows"]}
    bf16 = rows["bf16 torch._grouped_mm"]
    assert bf16.fwd.median_ms > 0 and bf16.fwd_bwd.cpu_ms > 0 and bf16.saved_beyond_inputs == 16  # offsets
    fp8 = [row for name, row in rows.items() if name.startswith("fp8moe reference") and row.fwd]
    assert fp8 and all(row.fwd_bwd.median_ms > 0 and row.saved_beyond_inputs > 0 for row in fp8)
    assert rows["torchao row-wise FP8 (_scaled_grouped_mm)"].note  # a row with a note, not a crash
    assert (tmp_path / "bench_grouped_mm.md").read_text().strip() == out.strip()
    saved = json.loads((tmp_path / "bench_grouped_mm.json").read_text())
    assert saved["routings"]["skewed"]["rows"][0]["fwd"]["method"] == "wall"
    assert out.startswith("# fp8moe grouped GEMM") and "| bf16 torch._grouped_mm |" in out


@on_cpu_only
def test_bench_grouped_mm_writes_nothing_on_cpu_without_out(tmp_path, monkeypatch):
    from experiments import bench_grouped_mm

    monkeypatch.setattr(bench_grouped_mm, "REPO", tmp_path)
    bench_grouped_mm.main(["--routings", "balanced"])
    assert not any(tmp_path.iterdir())


@on_cpu_only
def test_bench_jax_cpu_smoke_run_prints_only_the_table(tmp_path, capsys):
    pytest.importorskip("jax")
    from experiments import bench_jax

    report = bench_jax.main(["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("# jax_bridge vs torch-native") and "Row(" not in out
    assert out.strip() == (tmp_path / "bench_jax.md").read_text().strip()
    cases = {row.case: row for row in report["rows"] + report["block_rows"]}
    assert set(cases) == {
        "jax.lax.ragged_dot bf16",
        "torch torch._grouped_mm bf16",
        "jax_bridge.grouped_mm_bf16",
        "torch fp8moe.grouped_mm (reference)",
        "jax_bridge.grouped_mm (reference)",
        "torch fp8moe.moe.fused_experts (fp8 reference)",
        "jax_bridge.fused_experts (fp8 reference)",
        "torch fp8moe.moe.fused_experts (fp8 reference, weights quantized once)",
        "jax_bridge.fused_experts (fp8 reference, weights quantized once)",
        "torch fp8moe.moe.fused_experts (bf16)",
        "jax_bridge.fused_experts (bf16)",
    }
    assert cases["jax_bridge.grouped_mm (reference)"].note == "bit-identical y, dx, dw"
    assert cases["jax_bridge.grouped_mm_bf16"].note == "bit-identical y, dx, dw"
    for precision in ("fp8 reference", "fp8 reference, weights quantized once", "bf16"):
        assert cases[f"jax_bridge.fused_experts ({precision})"].note.startswith("bit-identical y, dx, dw_gate_up")
    assert all(row.fwd.method == "wall+sync" and row.fwd_bwd.median_ms > 0 for row in cases.values())
    # every bridge row has its overhead over the torch-native row
    assert out.count("| jax_bridge.") == 5 and all(
        "%" in line.split("|")[8] for line in out.splitlines() if line.startswith("| jax_bridge.")
    )
    assert json.loads((tmp_path / "bench_jax.json").read_text())["rows"][0]["case"] == "jax.lax.ragged_dot bf16"
