"""fp8moe.grouped_mm on the reference backend: recipe exactness, accuracy, autograd, torch.compile."""

import math

import pytest
import torch

import fp8moe
from fp8moe.backends import Backend
from fp8moe.testing import fq_token_tiles, grouped_mm_fwd_bwd, random_offsets, sqnr_db

ROUTINGS = {
    "ragged": dict(empty_groups=0, tail_rows=0),
    "empty_experts": dict(empty_groups=3, tail_rows=0),
    "unrouted_tail": dict(empty_groups=1, tail_rows=45),
    "skewed": dict(empty_groups=2, tail_rows=0, skew=0.4),
}


def make_problem(seed, m=600, n=256, k=384, e=6, dtype=torch.float32, **routing):
    gen = torch.Generator().manual_seed(seed)
    offsets = random_offsets(m, e, generator=gen, **routing)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(e, n, k, generator=gen) / math.sqrt(k)).to(dtype)
    dy = torch.randn(m, n, generator=gen).to(dtype)
    return x, w, offsets, dy


def run(x, w, offsets, dy, **kwargs):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8moe.grouped_mm(xg, wg, offsets, backend="reference", validate=True, **kwargs)
    y.backward(dy)
    return y.detach(), xg.grad, wg.grad


def unquantized(x, w, offsets, dy):
    """torch._grouped_mm leaves rows past offsets[-1] undefined; they are zeroed here as grouped_mm does."""
    routed = (torch.arange(x.shape[0]) < offsets[-1]).unsqueeze(1)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = torch._grouped_mm(xg, wg.transpose(1, 2), offs=offsets)
    y.backward(dy * routed)
    zero = torch.zeros((), dtype=x.dtype)
    return torch.where(routed, y.detach(), zero), torch.where(routed, xg.grad, zero), wg.grad


def assert_fp32_noise(got, ref):
    ref_t = torch.from_numpy(ref)
    torch.testing.assert_close(got.double(), ref_t, rtol=1e-5, atol=1e-5 * ref_t.abs().max().item())


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_reference_matches_independent_float64_recipe(routing):
    x, w, offsets, dy = make_problem(1, **routing)
    y, dx, dw = run(x, w, offsets, dy, out_dtype=torch.float32)
    y64, dx64, dw64 = grouped_mm_fwd_bwd(x.double().numpy(), w.double().numpy(), offsets.numpy(), dy.double().numpy())
    assert_fp32_noise(y, y64)
    assert_fp32_noise(dx, dx64)
    assert_fp32_noise(dw, dw64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_sqnr_against_unquantized_math(dtype, routing):
    x, w, offsets, dy = make_problem(2, dtype=dtype, **routing)
    y, dx, dw = run(x, w, offsets, dy, out_dtype=dtype)
    y_ref, dx_ref, dw_ref = unquantized(x, w, offsets, dy)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert sqnr_db(y_ref, y) >= 28
    assert sqnr_db(dx_ref, dx) >= 26
    assert sqnr_db(dw_ref, dw) >= 26


def test_rows_past_last_offset_get_zero_output_and_gradient():
    x, w, offsets, dy = make_problem(3, tail_rows=77)
    y, dx, _ = run(x, w, offsets, dy)
    assert torch.equal(y[-77:], torch.zeros_like(y[-77:]))
    assert torch.equal(dx[-77:], torch.zeros_like(dx[-77:]))
    assert y[:-77].abs().sum() > 0


def test_empty_expert_gets_zero_weight_gradient():
    x, w, offsets, dy = make_problem(4, empty_groups=2)
    _, _, dw = run(x, w, offsets, dy)
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
    for g in range(len(offsets)):
        assert (dw[g].abs().sum() == 0) == (sizes[g] == 0)


def test_nan_in_x_propagates_to_its_rows_only():
    x, w, offsets, dy = make_problem(5)
    x[10, 3] = math.nan
    y, dx, dw = run(x, w, offsets, dy)
    assert torch.isnan(y[10]).all() and torch.isfinite(y[11:]).all()
    group = int(torch.searchsorted(offsets, torch.tensor(10), right=True))
    assert torch.isnan(dw[group]).any()
    assert torch.isfinite(dx).all()  # dx does not depend on x


@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True)])
def test_needs_input_grad_skips_unneeded_gemms(needs, monkeypatch):
    x, w, offsets, dy = make_problem(6)
    calls = []
    original = Backend.backward

    def spy(self, *args, **kwargs):
        calls.append(args[6:8])  # need_dx, need_dw
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Backend, "backward", spy)
    xg, wg = x.clone().requires_grad_(needs[0]), w.clone().requires_grad_(needs[1])
    fp8moe.grouped_mm(xg, wg, offsets, backend="reference").backward(dy)
    assert calls == [needs]
    assert (xg.grad is not None) == needs[0] and (wg.grad is not None) == needs[1]


def test_no_grad_needed_runs_no_backward():
    x, w, offsets, _ = make_problem(7)
    y = fp8moe.grouped_mm(x, w, offsets, backend="reference")
    assert not y.requires_grad


def test_quantized_weight_transpose_only_made_when_dgrad_needed(monkeypatch):
    x, w, offsets, dy = make_problem(8)
    seen = []
    original = Backend.quantize_weight
    monkeypatch.setattr(Backend, "quantize_weight", lambda self, w_, t: seen.append(t) or original(self, w_, t))
    fp8moe.grouped_mm(x, w.clone().requires_grad_(), offsets, backend="reference").backward(dy)
    fp8moe.grouped_mm(x.clone().requires_grad_(), w, offsets, backend="reference").backward(dy)
    assert seen == [False, True]


def test_gradients_match_autograd_of_the_fake_quantized_problem():
    """dx and dw equal torch.autograd's gradients of a float64 model that fake-quantizes as the recipe does
    (for dw: its operands in 128x1 token tiles within the group)."""
    x, w, offsets, dy = make_problem(9, m=300, n=128, k=256, e=3, empty_groups=1)
    y, dx, dw = run(x, w, offsets, dy, out_dtype=torch.float32)
    q = fp8moe.quant
    xd = q.dequantize_rowwise(*q.quantize_rowwise(x)).double()
    wd = q.dequantize_blockwise(*q.quantize_blockwise(w)).double().requires_grad_()
    dyd = q.dequantize_rowwise(*q.quantize_rowwise(dy)).double()
    ends = offsets.tolist()
    for g, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
        if hi == lo:
            continue
        xg = xd[lo:hi].clone().requires_grad_()
        yg = xg @ wd[g].T
        (gx,) = torch.autograd.grad(yg, xg, dyd[lo:hi])
        torch.testing.assert_close(dx[lo:hi].double(), gx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[lo:hi].double(), yg.detach(), rtol=1e-5, atol=1e-5)
        xt = torch.from_numpy(fq_token_tiles(x[lo:hi].double().numpy()))
        dyt = torch.from_numpy(fq_token_tiles(dy[lo:hi].double().numpy()))
        (gw,) = torch.autograd.grad(xt @ wd[g].T, wd, dyt)
        # dw sums a group's tokens in fp32: its error scales with the largest entry
        torch.testing.assert_close(dw[g].double(), gw[g], rtol=1e-5, atol=1e-6 * float(gw[g].abs().max()))
        assert not gw[torch.arange(len(ends)) != g].any()
    empty = [g for g, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)) if hi == lo]
    assert empty and not dw[empty].any()


# inductor fuses the silu backward differently, which moves dy by an ulp before it is quantized
@pytest.mark.parametrize("compiler, tol", [("aot_eager", 1e-6), ("inductor", 1e-4)])
def test_torch_compile_fullgraph(compiler, tol):
    torch._dynamo.reset()
    x, w, offsets, dy = make_problem(10, m=300, n=128, k=256, e=3, empty_groups=1)

    def layer(x_, w_, o_):
        return torch.nn.functional.silu(fp8moe.grouped_mm(x_, w_, o_, backend="reference", out_dtype=torch.float32))

    eager = [t.clone().requires_grad_() for t in (x, w)]
    traced = [t.clone().requires_grad_() for t in (x, w)]
    y_eager = layer(*eager, offsets)
    y_eager.backward(dy)
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    y_comp = compiled(*traced, offsets)
    y_comp.backward(dy)
    torch.testing.assert_close(y_comp, y_eager, rtol=tol, atol=tol)
    torch.testing.assert_close(traced[0].grad, eager[0].grad, rtol=tol, atol=tol)
    torch.testing.assert_close(traced[1].grad, eager[1].grad, rtol=tol, atol=tol)


def test_auto_on_cpu_is_reference():
    x, w, offsets, dy = make_problem(11, m=200, n=128, k=128, e=2)
    torch.testing.assert_close(
        fp8moe.grouped_mm(x, w, offsets), fp8moe.grouped_mm(x, w, offsets, backend="reference"), rtol=0, atol=0
    )
    assert fp8moe.backend_info("cpu")["auto"] == "reference"


def test_tiny_finite_input_gives_finite_output():
    """A tile holding a zero and a value whose amax/448 rounds to 0 in fp32 used to give 0/0 = NaN."""
    x = torch.zeros(128, 128)
    x[0, 0] = 1e-44
    w = torch.randn(1, 128, 128, generator=torch.Generator().manual_seed(0)) / 10
    xg = x.clone().requires_grad_()
    y = fp8moe.grouped_mm(xg, w.requires_grad_(), torch.tensor([128], dtype=torch.int32), out_dtype=torch.float32)
    y.backward(torch.ones_like(y) * 1e-44)
    assert torch.equal(y, torch.zeros_like(y)) and torch.isfinite(xg.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_does_not_change_the_recipe(dtype):
    """Under torch.autocast the reference backend still multiplies in fp32: the same bits as without it,
    x quantized from its own dtype."""
    x, w, offsets, dy = make_problem(12, m=300, n=128, k=256, e=3, dtype=dtype, empty_groups=1)
    plain = run(x, w, offsets, dy, out_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = run(x, w, offsets, dy, out_dtype=torch.float32)
    for a, b in zip(plain, under):
        assert a.dtype == b.dtype and torch.equal(a, b)
    y64 = grouped_mm_fwd_bwd(x.double().numpy(), w.double().numpy(), offsets.numpy(), dy.double().numpy())[0]
    assert sqnr_db(torch.from_numpy(y64), under[0]) >= 100


def test_double_backward_raises_instead_of_a_silent_none():
    x, w, offsets, dy = make_problem(13, m=300, n=128, k=256, e=3)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8moe.grouped_mm(xg, wg, offsets, backend="reference", out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="grouped_mm is differentiable once"):
        torch.autograd.grad(y, xg, dy, create_graph=True)
    (dx,) = torch.autograd.grad(y, xg, dy)  # first order still works
    assert not dx.requires_grad


def test_validate_under_torch_compile_is_skipped():
    """validate=True traces under fullgraph (no data-dependent guard); the value check is eager-only."""
    torch._dynamo.reset()
    x, w, offsets, _ = make_problem(14, m=300, n=128, k=256, e=3)
    compiled = torch.compile(
        lambda x_, w_, o_: fp8moe.grouped_mm(x_, w_, o_, backend="reference", validate=True), fullgraph=True
    )
    assert torch.equal(compiled(x, w, offsets), fp8moe.grouped_mm(x, w, offsets, backend="reference"))


def test_main_grad_accumulates_like_autograd():
    """Two micro-batches added into an fp32 buffer equal autograd's accumulated gradient, added to the
    buffer's previous contents; w.grad stays None; x still gets its gradient."""
    x, w, offsets, dy = make_problem(15, m=300, n=128, k=256, e=3, empty_groups=1)
    main_grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    start = main_grad.clone()
    wg, wa = w.clone().requires_grad_(), w.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    for scale in (1.0, -0.5):
        fp8moe.grouped_mm(xg, wg, offsets, backend="reference", main_grad=main_grad).backward(dy * scale)
        fp8moe.grouped_mm(x, wa, offsets, backend="reference").backward(dy * scale)
    assert wg.grad is None and xg.grad is not None
    torch.testing.assert_close(main_grad, start + wa.grad, rtol=1e-6, atol=1e-6)


def test_main_grad_is_checked():
    x, w, offsets, _ = make_problem(16, m=300, n=128, k=256, e=3)
    with pytest.raises(TypeError, match="main_grad: expected dtype torch.float32"):
        fp8moe.grouped_mm(x, w, offsets, main_grad=torch.zeros(w.shape, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="main_grad: expected a contiguous tensor of shape"):
        fp8moe.grouped_mm(x, w, offsets, main_grad=torch.zeros(3, 128, 128))
    with pytest.raises(TypeError, match="main_grad: expected a torch.Tensor or None"):
        fp8moe.grouped_mm(x, w, offsets, main_grad=0.0)


def test_a_shared_plan_gives_the_same_bits_and_is_checked():
    x, w, offsets, dy = make_problem(17, m=300, n=128, k=256, e=3, tail_rows=20)
    plan = fp8moe.plan_groups(offsets, x.shape[0])
    with_plan = run(x, w, offsets, dy, plan=plan)
    for a, b in zip(with_plan, run(x, w, offsets, dy)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="plan: expected the plan of these offsets"):
        fp8moe.grouped_mm(x, w, offsets.clone(), plan=plan)
    with pytest.raises(TypeError, match="plan: expected a GroupLayout"):
        fp8moe.grouped_mm(x, w, offsets, plan=object())
