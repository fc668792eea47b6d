"""DeepGEMM backend on an SM90 GPU: against the reference backend (same recipe, SQNR >= 40 dB), against
unquantized bf16 math, ragged/skewed/empty routings, determinism, and a CUDA-graph-capturable forward."""

import math

import pytest
import torch

import fp8moe
from fp8moe.testing import capture_cuda_graph, random_problem, sqnr_db

REASON = fp8moe.backend_info("cuda" if torch.cuda.is_available() else "cpu")["backends"]["deepgemm"]
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"deepgemm backend cannot run here: {REASON}")

ROUTINGS = {
    "ragged": dict(),
    "empty_experts": dict(empty_groups=3),
    "skewed": dict(empty_groups=2, skew=0.4),
    "unrouted_tail": dict(empty_groups=1, tail_rows=200),
    "one_row_groups": None,
}


def problem(seed, **options):
    """random_problem on the GPU; routing None: one row per group."""
    return random_problem(seed, device="cuda", **options)


def fwd_bwd(backend, x, w, offsets, dy, out_dtype=torch.bfloat16, **options):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8moe.grouped_mm(xg, wg, offsets, backend=backend, out_dtype=out_dtype, validate=True, **options)
    y.backward(dy.to(out_dtype))
    return y.detach(), xg.grad, wg.grad


@pytest.mark.parametrize("wgrad", ["deepgemm", "triton"])
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
@pytest.mark.parametrize("e", [1, 8, 32])
def test_matches_reference_backend(routing, e, wgrad):
    if routing is not None and routing.get("empty_groups", 0) >= e:
        pytest.skip("more empty groups than experts")
    x, w, offsets, dy = problem(e, e=e, routing=routing)
    got = fwd_bwd("deepgemm", x, w, offsets, dy, wgrad=wgrad)
    ref = fwd_bwd("reference", x, w, offsets, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert sqnr_db(b, a) >= 40, name
    routed = int(offsets[-1])
    assert torch.equal(got[0][routed:], torch.zeros_like(got[0][routed:]))


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_against_unquantized_bf16(routing):
    x, w, offsets, dy = problem(1, routing=routing)
    y, dx, dw = fwd_bwd("deepgemm", x, w, offsets, dy)
    routed = torch.arange(x.shape[0], device="cuda").unsqueeze(1) < offsets[-1]
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    yr = torch._grouped_mm(xr, wr.transpose(1, 2), offs=offsets)
    yr.backward(torch.where(routed, dy.float(), 0))
    assert sqnr_db(torch.where(routed, yr, 0), y) >= 28
    assert sqnr_db(torch.where(routed, xr.grad, 0), dx) >= 26
    assert sqnr_db(wr.grad, dw) >= 26


def test_fp32_inputs_and_outputs():
    x, w, offsets, dy = problem(2, dtype=torch.float32, routing={})
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8moe.grouped_mm(xg, wg, offsets, backend="deepgemm", out_dtype=torch.float32)
    y.backward(dy)
    assert y.dtype == xg.grad.dtype == wg.grad.dtype == torch.float32
    ref = fwd_bwd("reference", x, w, offsets, dy, out_dtype=torch.float32)  # the same fp32 dy reaches the wgrad
    for name, got, want in zip(("y", "dx", "dw"), (y, xg.grad, wg.grad), ref):
        assert sqnr_db(want, got) >= 40, name


def test_reruns_are_bitwise_identical():
    x, w, offsets, dy = problem(3, routing=dict(empty_groups=1))
    first = fwd_bwd("deepgemm", x, w, offsets, dy)
    second = fwd_bwd("deepgemm", x, w, offsets, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_main_grad_accumulation_matches_autograd_accumulation():
    """Two micro-batches added into an fp32 buffer (DeepGEMM's c = d, no zero-fill) against autograd's sum."""
    x, w, offsets, dy = problem(7, routing=dict(empty_groups=1))
    w32 = w.float()
    main_grad = torch.randn(w.shape, device="cuda")
    start = main_grad.clone()
    wg = w32.clone().requires_grad_()
    for scale in (1.0, -0.5):
        fp8moe.grouped_mm(x, wg, offsets, backend="deepgemm", main_grad=main_grad).backward(dy * scale)
    assert wg.grad is None
    wa = w32.clone().requires_grad_()
    for scale in (1.0, -0.5):
        fp8moe.grouped_mm(x, wa, offsets, backend="deepgemm").backward(dy * scale)
    assert sqnr_db(start + wa.grad, main_grad) >= 60


def test_nan_in_x_reaches_its_rows():
    x, w, offsets, dy = problem(4, routing={})
    x[5, 7] = math.nan
    y, _, dw = fwd_bwd("deepgemm", x, w, offsets, dy)
    assert torch.isnan(y[5]).all()
    assert torch.isfinite(y[6:]).all() and torch.isfinite(y[:5]).all()
    group = int(torch.searchsorted(offsets, torch.tensor(5, device="cuda", dtype=torch.int32), right=True))
    assert torch.isnan(dw[group]).any()
    assert torch.isfinite(dw[group + 1 :]).all()


def test_forward_is_capturable_in_a_cuda_graph():
    x, w, offsets, _ = problem(5, routing=dict(empty_groups=2))
    fwd = lambda: fp8moe.grouped_mm(x, w, offsets, backend="deepgemm")  # noqa: E731
    graph, y = capture_cuda_graph(fwd)  # JIT and allocator warmed up outside the capture
    # new values (and a new routing) in the captured input buffers, then replay
    x2, w2, offsets2, _ = problem(6, routing=dict(empty_groups=1))
    x.copy_(x2), w.copy_(w2), offsets.copy_(offsets2)
    y.fill_(math.nan)
    graph.replay()
    assert torch.equal(y, fp8moe.grouped_mm(x2, w2, offsets2, backend="deepgemm"))
