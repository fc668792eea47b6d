"""The fused MoE expert block (fp8moe.moe.fused_experts) on the reference backend, on CPU: against a float64
model of the same block, against the op-by-op layer, edge cases, determinism, saved tensors, bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fp8moe.backends.reference import ReferenceQuantizer
from fp8moe.moe import MoE, fused_experts, pieces, plan_routing, route
from fp8moe.plan import plan_groups
from fp8moe.testing import fq_blocks, fq_rows, fq_token_tiles, sqnr_db

D, FF = 128, 128


def bf16(t):
    return t.to(torch.bfloat16).double()


def problem(seed, t=70, e=6, k=2, d=D, f=FF, x_dtype=torch.float32, w_dtype=torch.float32, ids=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen).to(x_dtype)
    w1 = (torch.randn(e, 2 * f, d, generator=gen) / math.sqrt(d)).to(w_dtype)
    w2 = (torch.randn(e, d, f, generator=gen) / math.sqrt(f)).to(w_dtype)
    if ids is None:
        ids = torch.rand(t, e, generator=gen).topk(k, dim=-1).indices
    c = torch.rand(ids.shape, generator=gen) + 0.1
    dy = torch.randn(t, d, generator=gen).to(x_dtype)  # the gradient of y has y's dtype
    return x, w1, w2, ids, c / c.sum(-1, keepdim=True), dy


def run(x, w1, w2, ids, c, dy, precision="fp8", backend="reference"):
    """fwd + bwd of the fused block: (y, dx, dw1, dw2, dc)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, c)]
    y = fused_experts(leaves[0], leaves[1], leaves[2], ids, leaves[3], backend=backend, precision=precision)
    y.backward(dy)
    return (y.detach(), *(t.grad for t in leaves))


def block64(x, w1, w2, ids, c, dy, fp8=True):
    """The block in float64 per expert, with the fused block's roundings: FP8 operands (the independent
    recipe of fp8moe.testing) or bf16 operands, bf16 GEMM outputs (h, out, da, dxs), everything else exact.
    Token tiles group each expert's assignments in the stable (token, slot) order the plan uses."""
    t, k = ids.shape
    e_count, f = w2.shape[0], w2.shape[2]
    x64, dy64, c64 = x.double(), dy.double(), c.double()
    if fp8:
        rows = lambda v: torch.from_numpy(fq_rows(v.numpy()))  # noqa: E731
        tiles = lambda v: torch.from_numpy(fq_token_tiles(v.numpy()))  # noqa: E731
        w1q, w2q = (torch.from_numpy(fq_blocks(w.double().numpy())) for w in (w1, w2))
    else:
        rows = tiles = bf16
        w1q, w2q = bf16(w1), bf16(w2)
    y, dx = torch.zeros(t, x.shape[1], dtype=torch.float64), torch.zeros(t, x.shape[1], dtype=torch.float64)
    dw1, dw2, dc = torch.zeros(w1.shape, dtype=torch.float64), torch.zeros(w2.shape, dtype=torch.float64), None
    dc = torch.zeros(t, k, dtype=torch.float64)
    flat = ids.reshape(-1)
    for e in range(e_count):
        assign = (flat == e).nonzero().squeeze(1)
        if assign.numel() == 0:
            continue
        tok, slot = assign // k, assign % k
        xe = x64[tok]
        h = bf16(rows(xe) @ w1q[e].T)
        g, u = h[:, :f], h[:, f:]
        a = F.silu(g) * u
        out = bf16(rows(a) @ w2q[e].T)
        y.index_add_(0, tok, c64[tok, slot, None] * out)
        dc[tok, slot] = (dy64[tok] * out).sum(-1)
        d_out = c64[tok, slot, None] * dy64[tok]
        da = bf16(rows(d_out) @ w2q[e])
        dw2[e] = tiles(d_out).T @ tiles(a)
        sig = torch.sigmoid(g)
        dh = torch.cat([da * u * sig * (1 + g * (1 - sig)), da * g * sig], dim=1)
        dx.index_add_(0, tok, bf16(rows(dh) @ w1q[e]))
        dw1[e] = tiles(dh).T @ tiles(xe)
    return y, dx, dw1, dw2, dc


NAMES = ("y", "dx", "dw_gate_up", "dw_down", "dcombine")


@pytest.mark.parametrize(
    "x_dtype, w_dtype, t, e, k",
    [
        (torch.float32, torch.float32, 70, 6, 2),
        (torch.bfloat16, torch.float32, 150, 4, 3),
        (torch.bfloat16,) * 2 + (33, 3, 1),
    ],
)
def test_fp8_block_matches_the_float64_model(x_dtype, w_dtype, t, e, k):
    """Only the accumulation order (fp32 vs float64) differs from the model: >= 40 dB everywhere."""
    x, w1, w2, ids, c, dy = problem(1, t=t, e=e, k=k, x_dtype=x_dtype, w_dtype=w_dtype)
    got = run(x, w1, w2, ids, c, dy)
    want = block64(x, w1, w2, ids, c, dy)
    assert got[0].dtype == x_dtype and got[1].dtype == x_dtype and got[2].dtype == w_dtype
    for name, g, w in zip(NAMES, got, want):
        assert sqnr_db(w, g) >= 40, name


def test_bf16_block_matches_the_float64_model():
    x, w1, w2, ids, c, dy = problem(2)
    got = run(x, w1, w2, ids, c, dy, precision="bf16")
    want = block64(x, w1, w2, ids, c, dy, fp8=False)
    for name, g, w in zip(NAMES, got, want):
        assert sqnr_db(w, g) >= 40, name


@pytest.mark.parametrize("precision, min_db", [("fp8", 25), ("bf16", 38)])
def test_fused_layer_matches_the_op_by_op_layer(precision, min_db):
    """The same math as MoE(fused=False) except where the fused layout rounds differently: the op-by-op
    layer rounds x, silu(g) and a to bf16 before quantizing them and combines in bf16; the fused block
    quantizes x from its own dtype and a from fp32, and combines in fp32. In fp8 each such bf16 rounding
    moves some values across an e4m3 rounding boundary, so the two differ at the level of FP8 noise
    (measured ~30 dB, while each is within ~52 / ~100 dB of a float64 model of its own rounding); in bf16
    they differ by bf16 noise (measured ~44 dB)."""
    torch.manual_seed(0)
    layer = MoE(D, 2 * FF, 6, 2, precision=precision, backend="reference")
    x = torch.randn(3, 50, D, generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (False, True):
        layer.fused = fused
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        y, aux = layer(xr)
        (y.float().square().sum() + aux).backward()
        results.append([y.detach(), xr.grad, *(p.grad for p in layer.parameters())])
    for i, (a, b) in enumerate(zip(*results)):
        assert sqnr_db(a.float(), b.float()) >= min_db, i


def expert_ids(t, k, e, seed=0, pattern="random"):
    gen = torch.Generator().manual_seed(seed)
    if pattern == "random":
        return torch.rand(t, e, generator=gen).topk(k, dim=-1).indices
    if pattern == "one":  # every token's first slot in expert e - 1
        return torch.stack([torch.full((t,), e - 1)] + [torch.randint(0, e - 1, (t,), generator=gen)] * (k - 1), 1)
    raise ValueError(pattern)


@pytest.mark.parametrize(
    "t, e, k, ids",
    [
        pytest.param(1, 4, 2, None, id="one token"),
        pytest.param(37, 8, 1, torch.full((37, 1), 5), id="all tokens in one expert"),
        pytest.param(37, 8, 1, None, id="top1"),
        pytest.param(19, 8, 8, None, id="top8 of 8"),
        pytest.param(11, 256, 4, None, id="256 experts, few tokens"),
        pytest.param(129, 5, 3, torch.tensor([[0, 2, 4]]).expand(129, 3), id="empty experts"),
    ],
)
def test_edge_cases_match_the_float64_model(t, e, k, ids):
    x, w1, w2, ids, c, dy = problem(4, t=t, e=e, k=k, ids=ids)
    got = run(x, w1, w2, ids, c, dy)
    want = block64(x, w1, w2, ids, c, dy)
    for name, g, w in zip(NAMES, got, want):
        assert sqnr_db(w, g) >= 40, name
    used = torch.zeros(e, dtype=torch.bool)
    used[ids.reshape(-1)] = True
    assert torch.equal(got[2].flatten(1).any(1), used) and torch.equal(got[3].flatten(1).any(1), used)


def test_zero_tokens():
    x, w1, w2, ids, c, dy = problem(5, t=0, e=4, k=2)
    y, dx, dw1, dw2, dc = run(x, w1, w2, ids, c, dy)
    assert y.shape == (0, D) and dx.shape == (0, D) and dc.shape == (0, 2)
    assert not dw1.any() and not dw2.any() and dw1.shape == w1.shape


def test_assignments_routed_nowhere_get_zero_output():
    x, w1, w2, ids, c, dy = problem(6, t=40, e=4, k=2)
    ids = ids.clone()
    ids[::3, 1] = -1  # capacity drops
    ids[5] = -1  # a token routed nowhere at all
    y, dx, dw1, dw2, dc = run(x, w1, w2, ids, c, dy)
    want = block64(x, w1, w2, ids, c, dy)
    for name, g, w in zip(NAMES, (y, dx, dw1, dw2, dc), want):
        assert sqnr_db(w, g) >= 40, name
    assert not y[5].any() and not dx[5].any() and not dc[ids < 0].any()


def test_nan_in_one_token_keeps_the_other_tokens_finite():
    x, w1, w2, ids, c, dy = problem(7, t=50, e=4, k=2)
    x[13, 7] = math.nan
    y, dx, *_ = run(x, w1, w2, ids, c, dy)
    assert y[13].isnan().all()
    others = torch.ones(50, dtype=torch.bool)
    others[13] = False
    assert torch.isfinite(y[others]).all() and torch.isfinite(dx[others]).all()


def test_no_grad_forward_saves_nothing_and_quantizes_no_token_tiles(monkeypatch):
    x, w1, w2, ids, c, _ = problem(8)
    calls = []
    original = pieces.quantize_padded
    monkeypatch.setattr(
        pieces,
        "quantize_padded",
        lambda v, layout, rows, tiles: calls.append(tiles) or original(v, layout, rows, tiles),
    )
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with torch.no_grad():
            y = fused_experts(x, w1.requires_grad_(), w2, ids, c, backend="reference")
    assert y.grad_fn is None and not packed and calls == [False, False]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = fused_experts(x, w1, w2, ids, c, backend="reference")  # only w_gate_up needs a gradient
    assert y.grad_fn is not None and calls[2:] == [True, False]  # x's token tiles, not a's


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_bitwise_deterministic(precision):
    args = problem(9, t=90, e=5, k=3)
    first, second = run(*args, precision=precision), run(*args, precision=precision)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_weight_cache_quantizes_each_weight_once(monkeypatch):
    from fp8moe.backends import load_backend

    x, w1, w2, ids, c, dy = problem(10)
    backend = load_backend("reference")
    calls = []
    original = backend.quantizer.weight
    monkeypatch.setattr(backend.quantizer, "weight", lambda w, t, o: calls.append(t) or original(w, t, o))
    w1.requires_grad_()
    for _ in range(2):
        fused_experts(x, w1, w2, ids, c, backend="reference").sum().backward()
    assert len(calls) == 2  # both weights on the first call, none on the second
    fused_experts(x, w1, w2, ids, c, backend="reference", cache_weight=False)
    assert len(calls) == 4


def test_plan_maps_assignments_to_padded_rows_stably():
    ids = expert_ids(45, 3, 7, seed=11)
    ids[4, 2] = -1
    plan = plan_routing(ids, 7)
    layout, pos = plan.layout, plan.pos
    routed = ids >= 0
    assert torch.equal(layout.row_expert[pos[routed]].long(), ids[routed])
    assert torch.all(pos[~routed] == layout.num_padded_rows)
    flat = torch.arange(ids.numel()).view(ids.shape)
    assert torch.equal(plan.row_assignment[pos[routed]], flat[routed])
    assert int((plan.row_assignment >= 0).sum()) == int(routed.sum())
    for e in range(7):  # within an expert, assignments keep their (token, slot) order
        rows = plan.row_assignment[layout.row_expert == e]
        assert torch.all(rows[1:] > rows[:-1])


def test_padded_quantization_matches_the_reference_quantizer():
    gen = torch.Generator().manual_seed(12)
    offsets = torch.tensor([0, 70, 71, 190], dtype=torch.int32)
    x = torch.randn(200, 256, generator=gen)
    layout = plan_groups(offsets, 200)
    want = ReferenceQuantizer().tokens(x, layout, True, True)
    got = pieces.quantize_padded(pieces_pad(x, layout), layout, True, True)
    for a, b in zip(want, got):
        assert torch.equal(
            a.view(torch.uint8) if a.dtype != torch.float32 else a,
            b.view(torch.uint8) if b.dtype != torch.float32 else b,
        )


def pieces_pad(x, layout):
    from fp8moe.backends.reference import pad_rows

    return pad_rows(x, layout)


def test_sigmoid_router_bias_selects_but_is_not_differentiated():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(30, D, generator=gen)
    router = (torch.randn(4, D, generator=gen) * 0.1).requires_grad_()
    bias = torch.tensor([0.0, 0.0, 10.0, 0.0], requires_grad=True)
    routing = route(x, router, 2, score="sigmoid", bias=bias)
    assert torch.all((routing.experts == 2).any(-1))  # the bias forces expert 2 into every token's top 2
    scores = torch.sigmoid(x @ router.T).gather(1, routing.experts)
    torch.testing.assert_close(routing.combine, scores / scores.sum(-1, keepdim=True))
    (routing.combine[:, 0].sum() + routing.aux_loss).backward()
    assert bias.grad is None and torch.isfinite(router.grad).all() and router.grad.abs().sum() > 0


def test_moe_layer_with_sigmoid_router_and_bias_update():
    torch.manual_seed(0)
    layer = MoE(D, 2 * FF, 4, 2, backend="reference", fused=True, score="sigmoid")
    x = torch.randn(64, D)
    y, aux = layer(x)
    (y.square().mean() + aux).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    counts = layer.last_expert_counts
    layer.update_expert_bias(0.01)
    torch.testing.assert_close(layer.expert_bias, 0.01 * torch.sign(counts.float().mean() - counts.float()))
    with pytest.raises(ValueError, match="score"):
        MoE(D, 2 * FF, 4, 2, score="relu")


def bad_call(**changes):
    x, w1, w2, ids, c, _ = problem(14, t=10, e=3, k=2)
    args = {"x": x, "w_gate_up": w1, "w_down": w2, "expert_ids": ids, "combine": c} | changes
    options = {key: args.pop(key) for key in ("backend", "precision", "plan", "cache_weight") if key in args}
    fused_experts(*args.values(), **options)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"x": np.zeros((10, D))}, TypeError, "x: expected a torch.Tensor"),
        ({"x": torch.zeros(10, D, dtype=torch.int32)}, TypeError, "x: expected dtype"),
        ({"x": torch.zeros(10, 100)}, ValueError, "x: expected a last dimension"),
        ({"x": torch.zeros(10, 1, D)}, ValueError, "x: expected a 2-D"),
        ({"w_gate_up": torch.zeros(3, 200, D)}, ValueError, "w_gate_up: expected shape"),
        ({"w_down": torch.zeros(2, D, FF)}, ValueError, "w_down: expected shape"),
        ({"expert_ids": torch.zeros(10, 2)}, TypeError, "expert_ids: expected dtype"),
        ({"expert_ids": torch.zeros(9, 2, dtype=torch.int64)}, ValueError, "expert_ids: expected shape"),
        ({"combine": torch.zeros(10, 3)}, ValueError, "combine: expected shape"),
        ({"precision": "fp16"}, ValueError, "precision: expected one of"),
        ({"backend": "cublas"}, ValueError, "backend: expected one of"),
        ({"backend": 3}, TypeError, "backend: expected a str"),
        ({"cache_weight": 1}, TypeError, "cache_weight: expected a bool"),
        ({"plan": "plan"}, TypeError, "plan: expected a RoutingPlan"),
    ],
)
def test_bad_arguments_name_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        bad_call(**changes)


@pytest.mark.parametrize(
    "precision, w_dtype, grads",
    [
        ("fp8", torch.float32, (True, True, True, True)),
        ("fp8", torch.bfloat16, (False, True, False, True)),  # no dx: no transposed w_gate_up
        ("bf16", torch.bfloat16, (True, False, True, False)),  # the bf16 weight is its own bf16 copy
        ("bf16", torch.float32, (False, False, False, False)),  # no gradient: the forward alone
    ],
)
def test_torch_compile_fullgraph_matches_eager(precision, w_dtype, grads):
    """fused_experts under torch.compile(fullgraph=True) (the custom ops of fp8moe.moe.fused_ops): the same
    output and gradients as the eager autograd function, bit for bit, whichever inputs need gradients."""
    x, w1, w2, ids, c, dy = problem(7, t=45, e=5, k=3, w_dtype=w_dtype, x_dtype=torch.bfloat16)

    def block(x, w1, w2, c):
        return fused_experts(x, w1, w2, ids, c, backend="reference", precision=precision)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (block, compiled):
        leaves = [t.detach().clone().requires_grad_(g) for t, g in zip((x, w1, w2, c), grads)]
        y = fn(*leaves)
        if any(grads):
            y.backward(dy)
        results.append([y.detach(), *(t.grad for t in leaves)])
    for name, eager, comp in zip(NAMES, *results):
        assert (eager is None) == (comp is None), name
        if eager is not None:
            assert comp.dtype == eager.dtype and torch.equal(comp, eager), name
    with torch.no_grad():
        assert torch.equal(compiled(x, w1, w2, c), block(x, w1, w2, c))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_fused_layer_takes_any_float_dtype_as_fp32(dtype):
    """The op-by-op layer takes tokens and weights of any float dtype; the fused layer too: what the block does
    not take (fp16, fp64) enters it as fp32, y and the gradients come back in the tensors' own dtypes."""
    torch.manual_seed(0)
    layer = MoE(D, FF, 4, 2, precision="fp8", backend="reference", fused=True)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype).float()
    layer.to(dtype)
    as_fp32 = MoE(D, FF, 4, 2, precision="fp8", backend="reference", fused=True)
    as_fp32.load_state_dict({name: t.float() for name, t in layer.state_dict().items()})
    results = []
    for module, inp in ((layer, x), (as_fp32, x.float())):
        inp = inp.clone().requires_grad_()
        y, _ = module(inp)
        y.float().backward(dy)
        results.append((y, inp.grad, module.w_down.grad))
    (y, dx, dw), (y_want, dx_want, dw_want) = results
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert torch.equal(y, y_want.to(dtype)) and torch.equal(dw, dw_want.to(dtype))
    # dx adds the router's gradient in x's dtype: one more rounding there
    torch.testing.assert_close(dx, dx_want.to(dtype), rtol=2e-3, atol=2e-3)
