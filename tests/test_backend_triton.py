"""Triton backend (fp8moe.backends.triton): its grouped GEMMs and the whole fwd+bwd.

CPU: the two GEMM kernels under the Triton interpreter (child process, ``TRITON_INTERPRET=1``) on
operands quantized by the reference recipe and placed in the documented layouts, against the reference
backend (same recipe, only the accumulation order differs).

GPU (skipped without a CUDA device the backend can run on): against the reference backend on the same
inputs (SQNR >= 40 dB), against unquantized fp32 math (>= 28 dB forward, >= 26 dB gradients), ragged,
skewed, empty-expert, one-row-group and unrouted-tail routings for E in {1, 8, 32}, partial gradients,
dtypes, bitwise determinism, zero rows/experts written on a poisoned allocator, and the whole forward and
backward captured in a CUDA graph and replayed on new inputs and routing.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import fp8moe
from fp8moe.backends import load_backend
from fp8moe.plan import plan_groups
from fp8moe.testing import backend_fwd_bwd, capture_cuda_graph, random_problem, sqnr_db

pytest.importorskip("triton")
from triton_checks import (
    ROUTINGS,
    expected_rows_padded,
    expected_token_tiles,
    poison_allocator,
    run_configs_once,
    run_in_the_interpreter,
)

REASON = fp8moe.backend_info("cuda" if torch.cuda.is_available() else "cpu")["backends"]["triton"]
on_device = pytest.mark.skipif(REASON is not None, reason=f"triton backend cannot run here: {REASON}")


# ---- CPU: the GEMM kernels under the Triton interpreter ------------------------------------------------


def interpreter_checks() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (see test_gemm_kernels_under_the_triton_interpreter)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from fp8moe.kernels import gemm as kernels
    from fp8moe.kernels.gemm import k_grouped_gemm, m_grouped_gemm

    for tuner in (kernels._m_grouped_kernel, kernels._k_grouped_kernel):
        run_configs_once(tuner, tuner.configs[:1])

    gen = torch.Generator().manual_seed(0)
    m, n, k = 200, 128, 256
    offsets = torch.tensor([0, 70, 71, 190], dtype=torch.int32)  # empty, 70 rows, 1 row, 119 rows; 10 unrouted
    layout = plan_groups(offsets, m)
    x, dy = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
    w = torch.randn(4, n, k, generator=gen) / math.sqrt(k)
    quantized = load_backend("reference").quantize_weight(w, True)
    wq, sw, wq_t, sw_t = quantized
    y = m_grouped_gemm(*expected_rows_padded(x, layout), wq, sw, layout, torch.float32)
    dx = m_grouped_gemm(*expected_rows_padded(dy, layout), wq_t, sw_t, layout, torch.float32)
    dw = k_grouped_gemm(*expected_token_tiles(dy, layout), *expected_token_tiles(x, layout), layout, torch.bfloat16)
    y_ref, dx_ref, dw_ref = backend_fwd_bwd("reference", x, quantized, offsets, dy)
    assert sqnr_db(y_ref, y) >= 100 and sqnr_db(dx_ref, dx) >= 100, (sqnr_db(y_ref, y), sqnr_db(dx_ref, dx))
    assert dw.dtype == torch.bfloat16 and sqnr_db(dw_ref, dw.float()) >= 45
    assert not y[190:].any() and not dx[190:].any() and not dw[0].any()


def test_gemm_kernels_under_the_triton_interpreter():
    run_in_the_interpreter("test_backend_triton")


def test_unavailable_without_a_gpu_reason():
    reason = fp8moe.backend_info("cpu")["backends"]["triton"]
    assert "needs a CUDA device" in reason


# ---- GPU -----------------------------------------------------------------------------------------------


def problem(seed, **options):
    """random_problem on the GPU; routing None: one row per group."""
    return random_problem(seed, device="cuda", **options)


def fwd_bwd(backend, x, w, offsets, dy, out_dtype=torch.bfloat16, need=(True, True)):
    xg, wg = x.clone().requires_grad_(need[0]), w.clone().requires_grad_(need[1])
    y = fp8moe.grouped_mm(xg, wg, offsets, backend=backend, out_dtype=out_dtype, validate=True)
    y.backward(dy.to(out_dtype))
    return y.detach(), xg.grad, wg.grad


def unquantized(x, w, offsets, dy):
    """fp32 y, dx, dw of the same grouped GEMM without quantization (host loop over groups)."""
    x, w, dy = x.float(), w.float(), dy.float()
    y, dx, dw = torch.zeros(x.shape[0], w.shape[1], device="cuda"), torch.zeros_like(x), torch.zeros_like(w)
    ends = offsets.tolist()
    for g, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
        y[lo:hi] = x[lo:hi] @ w[g].T
        dx[lo:hi] = dy[lo:hi] @ w[g]
        dw[g] = dy[lo:hi].T @ x[lo:hi]
    return y, dx, dw


def assert_unrouted_zero(y, dx, dw, offsets):
    routed = int(offsets[-1])
    assert not y[routed:].any() and not dx[routed:].any()
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
    assert not dw[sizes == 0].any()


@on_device
@pytest.mark.gpu
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
@pytest.mark.parametrize("e", [1, 8, 32])
def test_matches_reference_backend(routing, e):
    if routing is not None and routing.get("empty_groups", 0) >= e:
        pytest.skip("more empty groups than experts")
    x, w, offsets, dy = problem(e, e=e, routing=routing)
    poison_allocator()
    got = fwd_bwd("triton", x, w, offsets, dy)
    ref = fwd_bwd("reference", x, w, offsets, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert sqnr_db(b, a) >= 40, (name, sqnr_db(b, a))
    assert_unrouted_zero(*got, offsets)


@on_device
@pytest.mark.gpu
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_against_unquantized_fp32(routing):
    x, w, offsets, dy = problem(1, routing=routing)
    got = fwd_bwd("triton", x, w, offsets, dy)
    for name, a, b, bound in zip(("y", "dx", "dw"), got, unquantized(x, w, offsets, dy), (28, 26, 26)):
        assert sqnr_db(b, a) >= bound, (name, sqnr_db(b, a))


@on_device
@pytest.mark.gpu
@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["dx_only", "dw_only"])
def test_partial_gradients(need):
    x, w, offsets, dy = problem(2, routing={"empty_groups": 1, "tail_rows": 64})
    got = fwd_bwd("triton", x, w, offsets, dy, need=need)
    ref = fwd_bwd("reference", x, w, offsets, dy, need=need)
    for a, b, needed in zip(got[1:], ref[1:], need):
        assert (a is None) == (not needed)
        if needed:
            assert sqnr_db(b, a) >= 40


@on_device
@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_fp32_inputs_and_other_output_dtypes(out_dtype):
    x, w, offsets, dy = problem(3, dtype=torch.float32, routing={})
    got = fwd_bwd("triton", x, w, offsets, dy, out_dtype=out_dtype)
    ref = fwd_bwd("reference", x, w, offsets, dy, out_dtype=out_dtype)
    assert got[0].dtype == out_dtype and got[1].dtype == got[2].dtype == torch.float32
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        bad = (~a.isfinite()).nonzero()
        assert bad.numel() == 0, f"{name}: {bad.shape[0]} non-finite values, first at {bad[:4].tolist()}"
        assert sqnr_db(b.float(), a.float()) >= 40, name


@on_device
@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_autotune_config(out_dtype):
    """Each config of both GEMMs' autotune lists, not only the one the autotuner picks, against the
    reference backend, on a poisoned allocator."""
    from fp8moe.kernels import gemm as kernels
    from fp8moe.kernels import quantize as kq

    x, w, offsets, dy = problem(9, routing=dict(empty_groups=2, tail_rows=100))
    layout = plan_groups(offsets, x.shape[0])
    quantized = kq.quantize_weight(w, True)
    wq, sw, wq_t, sw_t = quantized
    y_ref, dx_ref, dw_ref = backend_fwd_bwd("reference", x, quantized, offsets, dy)
    operands = (
        kq.quantize_tokens(x, layout, rowwise=True, token_tiles=False),
        kq.quantize_tokens(dy, layout, name="dy"),
        kq.quantize_tokens(x, layout, rowwise=False, token_tiles=True),
    )
    (xq, sx), (dyq, sdy, dyt, sdyt), (xt, sxt) = operands
    runs = {
        kernels._m_grouped_kernel: [
            ("y", y_ref, lambda: kernels.m_grouped_gemm(xq, sx, wq, sw, layout, out_dtype)),
            ("dx", dx_ref, lambda: kernels.m_grouped_gemm(dyq, sdy, wq_t, sw_t, layout, out_dtype)),
        ],
        kernels._k_grouped_kernel: [
            ("dw", dw_ref, lambda: kernels.k_grouped_gemm(dyt, sdyt, xt, sxt, layout, out_dtype))
        ],
    }
    for tuner, checks in runs.items():
        configs = tuner.configs
        try:
            for config in configs:
                tuner.configs = [config]
                tuner.cache.clear()
                for name, expected, run in checks:
                    poison_allocator()
                    got = run().float()
                    bad = (~got.isfinite()).nonzero()
                    assert bad.numel() == 0, f"{name} {config}: {bad.shape[0]} non-finite, first at {bad[:4].tolist()}"
                    assert sqnr_db(expected, got) >= 40, (name, str(config), sqnr_db(expected, got))
        finally:
            tuner.configs = configs
            tuner.cache.clear()


@on_device
@pytest.mark.gpu
def test_bitwise_deterministic():
    x, w, offsets, dy = problem(4, e=8, routing={"skew": 0.4, "empty_groups": 2})
    first = fwd_bwd("triton", x, w, offsets, dy)
    poison_allocator()
    second = fwd_bwd("triton", x, w, offsets, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@on_device
@pytest.mark.gpu
def test_nan_in_nan_out():
    x, w, offsets, dy = problem(5, routing={})
    x[int(offsets[2]) - 1, 5] = float("nan")  # last row of group 2
    y, dx, dw = fwd_bwd("triton", x, w, offsets, dy)
    row = int(offsets[2]) - 1
    assert y[row].isnan().all() and not y[:row].isnan().any() and not y[row + 1 :].isnan().any()
    assert dw[2].isnan().any() and not dw[torch.arange(8) != 2].isnan().any() and not dx.isnan().any()


@on_device
@pytest.mark.gpu
def test_whole_step_in_a_cuda_graph():
    """Capture forward + backward once; replays on new inputs and a new routing match eager bit for bit."""
    x, w, offsets, dy = problem(6, routing={})
    xs, ws, offs, dys = x.clone().requires_grad_(), w.clone().requires_grad_(), offsets.clone(), dy.clone()

    def step():
        y = fp8moe.grouped_mm(xs, ws, offs, backend="triton")
        return (y, *torch.autograd.grad(y, (xs, ws), dys))

    graph, captured = capture_cuda_graph(step)  # compiled and autotuned outside the capture
    for seed, routing in ((7, {"empty_groups": 2, "tail_rows": 100}), (8, {"skew": 0.4})):
        x2, w2, offsets2, dy2 = problem(seed, routing=routing)
        with torch.no_grad():
            xs.copy_(x2), ws.copy_(w2), offs.copy_(offsets2), dys.copy_(dy2)
        graph.replay()
        eager = fwd_bwd("triton", x2, w2, offsets2, dy2)
        for a, b in zip(captured, eager):
            assert torch.equal(a, b)
