"""fp8moe.moe.MoE on CPU: against a dense per-expert loop, gradients, empty experts, aux loss, compile, JAX twin."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fp8moe.moe import MoE, route
from fp8moe.testing import fq_blocks, fq_rows, sqnr_db

D, FF, E, K = 128, 256, 6, 2


def make_layer(precision, seed=0, **kwargs):
    """The op-by-op layer (``fused=False``) unless ``fused`` is given: :func:`loop_moe` models its bf16
    roundings. The fused block, the layer's default, is tested here where the test does not depend on the
    roundings (``fused`` parametrized) and against a float64 model of its own roundings in test_moe_block.py."""
    torch.manual_seed(seed)
    return MoE(D, FF, E, K, precision=precision, backend="reference", **({"fused": False} | kwargs))


def make_tokens(seed, shape=(3, 70, D), dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bf16_round(t):
    return t.to(torch.bfloat16).double()


def exact_mm(v, w):
    return v @ w.T


def bf16_mm(v, w):
    """bf16 operands, wide accumulation, bf16 result: what torch._grouped_mm computes."""
    return bf16_round(bf16_round(v) @ bf16_round(w).T)


def fp8_mm(v, w):
    """The blockwise FP8 recipe (independent float64 implementation) with a bf16 result."""
    y = fq_rows(v.detach().numpy()) @ fq_blocks(w.detach().numpy()[None])[0].T
    return bf16_round(torch.from_numpy(y))


def loop_moe(layer, x, mm=exact_mm, rnd=lambda t: t):
    """The layer as a dense loop over experts in float64. ``mm`` computes one expert GEMM and ``rnd`` rounds
    the intermediate activations where the layer stores them in bf16 (identity for exact math).

    Experts are picked from fp32 router probabilities like the layer's (so near-ties resolve the same way);
    the combine weights are computed in float64.
    """
    tokens = x.reshape(-1, D).double()
    router = layer.router.weight.double()
    with torch.no_grad():
        experts = (x.reshape(-1, D).float() @ layer.router.weight.float().T).softmax(-1).topk(K).indices
    probs = (tokens @ router.T).softmax(-1)
    picked = probs.gather(1, experts)
    combine = rnd(picked / picked.sum(-1, keepdim=True))
    y = torch.zeros_like(tokens)
    for e in range(E):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = mm(rnd(tokens[tok]), layer.w_gate_up[e].double())
        a = rnd(rnd(F.silu(h[:, :FF])) * h[:, FF:])
        y = y.index_add(0, tok, combine[tok, slot, None] * mm(a, layer.w_down[e].double()))
    return rnd(y).reshape(x.shape)


@pytest.mark.parametrize("precision, mm, min_db", [("bf16", bf16_mm, 70), ("fp8", fp8_mm, 60)], ids=["bf16", "fp8"])
def test_forward_matches_loop_with_the_same_rounding(precision, mm, min_db):
    layer = make_layer(precision)
    x = make_tokens(1)
    with torch.no_grad():
        y, _ = layer(x)
        emulated = loop_moe(layer, x, mm, bf16_round)
        exact = loop_moe(layer, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert sqnr_db(emulated, y) >= min_db
    # The emulation is much closer than the exact math: the rounding under test is really the layer's.
    assert sqnr_db(exact, y) < min_db - 10


@pytest.mark.parametrize("fused", [False, True], ids=["op_by_op", "fused"])
@pytest.mark.parametrize("precision, min_db", [("bf16", 38), ("fp8", 20)])
def test_gradients_reach_every_parameter_and_match_exact_math(precision, min_db, fused):
    layer = make_layer(precision, fused=fused)
    x = make_tokens(2).requires_grad_()
    dy = make_tokens(3)
    y, aux = layer(x)
    ((y * dy).sum() + aux).backward()

    ref_layer = make_layer(precision)
    ref_layer.double()
    x_ref = x.detach().double().requires_grad_()
    ref_aux = route(x_ref.reshape(-1, D), ref_layer.router.weight, K).aux_loss
    ((loop_moe(ref_layer, x_ref) * dy).sum() + ref_aux).backward()

    assert sqnr_db(x_ref.grad, x.grad) >= min_db
    for (name, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
        assert sqnr_db(p_ref.grad, p.grad) >= min_db, name


def biased_layer_and_tokens(precision, dead=(0, 2, 5), fused=False):
    """Tokens share a common direction u that the router weighs strongly against the ``dead`` experts."""
    layer = make_layer(precision, fused=fused)
    x = make_tokens(4, shape=(150, D))
    u = torch.zeros(D)
    u[7] = 1.0
    x = x + 6 * u
    with torch.no_grad():
        layer.router.weight[list(dead)] -= 2 * u
    return layer, x


@pytest.mark.parametrize("fused", [False, True], ids=["op_by_op", "fused"])
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_empty_experts_get_no_tokens_and_zero_gradient(precision, fused):
    dead = (0, 2, 5)
    layer, x = biased_layer_and_tokens(precision, dead, fused)
    routing = route(x, layer.router.weight, K)
    sizes = torch.diff(routing.offsets, prepend=routing.offsets.new_zeros(1))
    assert sizes[list(dead)].eq(0).all() and int(routing.offsets[-1]) == x.shape[0] * K

    y, aux = layer(x)
    ((y * make_tokens(5, shape=y.shape)).sum() + aux).backward()
    with torch.no_grad():
        emulated = loop_moe(layer, x, bf16_mm if precision == "bf16" else fp8_mm, bf16_round)
    # the model rounds as the op-by-op layer does; the fused block rounds x, silu(g), a and the combine
    # less (test_moe_block.py models those), so it sits at bf16 / FP8 noise from the model
    assert sqnr_db(emulated, y) >= (30 if fused else 60)
    for e in range(E):
        assert layer.w_gate_up.grad[e].abs().sum().eq(0) == (e in dead)
        assert layer.w_down.grad[e].abs().sum().eq(0) == (e in dead)
    assert torch.isfinite(layer.router.weight.grad).all() and layer.router.weight.grad.abs().sum() > 0


def test_routing_sorts_assignments_stably_by_expert():
    layer, x = biased_layer_and_tokens("bf16")
    routing = route(x, layer.router.weight, K)
    flat = routing.experts.reshape(-1)
    sorted_experts = flat[routing.order]
    assert torch.all(sorted_experts[1:] >= sorted_experts[:-1])
    for e in range(E):  # stable: within an expert the assignments keep token order
        positions = routing.order[sorted_experts == e]
        assert torch.all(positions[1:] > positions[:-1])
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(routing.offsets, torch.cumsum(counts, 0).to(torch.int32))
    torch.testing.assert_close(routing.combine.sum(-1), torch.ones(x.shape[0]))


def test_aux_loss_matches_hand_computation():
    torch.manual_seed(6)
    router = torch.randn(E, D) * 0.1
    x = make_tokens(7, shape=(40, D))
    routing = route(x, router, K)
    rows = (x.double() @ router.double().T).tolist()
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in rows]
    counts = [0] * E
    for p in probs:
        for e in sorted(range(E), key=lambda e: -p[e])[:K]:
            counts[e] += 1
    expected = E * sum(counts[e] / (len(probs) * K) * sum(p[e] for p in probs) / len(probs) for e in range(E))
    assert routing.aux_loss.dtype == torch.float32
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected > 1.0  # imbalanced routing costs more than the balanced optimum of 1


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_torch_compile_fullgraph_matches_eager(precision, fused):
    """fused=True runs the block as the custom ops of fp8moe.moe.fused_ops under the compiler: the same bits."""
    layer = make_layer(precision, fused=fused)
    x = make_tokens(8, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, aux = compiled(x)
    (y.float().square().sum() + aux).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    y_eager, aux_eager = layer(x)
    (y_eager.float().square().sum() + aux_eager).backward()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(aux, aux_eager)
    for g, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_torch_compile_of_the_fused_layer_follows_the_token_count():
    """A new token count recompiles with dynamic shapes (the custom ops' shapes are symbolic): still the eager bits."""
    layer = make_layer("fp8", fused=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for tokens in (40, 57):
        x = make_tokens(tokens, shape=(tokens, D), dtype=torch.bfloat16)
        results = []
        for fn in (compiled, layer):
            layer.zero_grad()
            xr = x.clone().requires_grad_()
            y, aux = fn(xr)
            (y.float().square().sum() + aux).backward()
            results.append([y, xr.grad, *(p.grad for p in layer.parameters())])
        for got, want in zip(*results):
            assert torch.equal(got, want), tokens


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 100}, "d_model"),
        ({"d_ff": 200}, "d_ff"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": E + 1}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"precision": "fp16"}, "precision"),
        ({"backend": "cublas"}, "backend"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    args = {"d_model": D, "d_ff": FF, "num_experts": E, "top_k": K} | kwargs
    precision = args.pop("precision", "fp8")
    backend = args.pop("backend", "auto")
    with pytest.raises(ValueError, match=match):
        MoE(**args, precision=precision, backend=backend)


@pytest.mark.parametrize(
    "name, value",
    [
        ("top_k", 1.5),
        ("top_k", 2.0),
        ("d_model", "128"),
        ("d_model", 128.0),
        ("d_ff", None),
        ("num_experts", True),
        ("top_k", True),
        ("precision", 8),
        ("precision", None),
        ("backend", b"auto"),
    ],
)
def test_constructor_argument_of_the_wrong_type_is_a_type_error_naming_it(name, value):
    args = {"d_model": D, "d_ff": FF, "num_experts": E, "top_k": K, "precision": "fp8", "backend": "auto"}
    with pytest.raises(TypeError, match=f"^{name}: expected an? (int|str), got {type(value).__name__}"):
        MoE(**(args | {name: value}))


def test_integer_sizes_of_any_integral_type_are_accepted():
    layer = MoE(np.int64(D), np.int32(FF), np.int16(E), np.int8(K), backend="reference")
    assert (layer.d_model, layer.d_ff, layer.num_experts, layer.top_k) == (D, FF, E, K)
    assert all(type(v) is int for v in (layer.d_model, layer.d_ff, layer.num_experts, layer.top_k))


def test_wrong_input_width_is_rejected():
    with pytest.raises(ValueError, match="x: expected last dimension"):
        make_layer("bf16")(make_tokens(9, shape=(10, 2 * D)))
    with pytest.raises(ValueError, match="x: expected last dimension"):
        make_layer("bf16")(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_input_is_a_type_error_naming_x(dtype):
    with pytest.raises(TypeError, match=f"^x: expected a floating-point tensor .*got {dtype}"):
        make_layer("fp8")(torch.ones(4, D, dtype=dtype))
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor, got ndarray"):
        make_layer("fp8")(np.ones((4, D), np.float32))


@pytest.mark.parametrize("fused", [False, True], ids=["op_by_op", "fused"])
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_tokens_give_an_empty_output_a_zero_aux_loss_and_a_backward(precision, shape, dtype, fused):
    layer = make_layer(precision, fused=fused)
    x = torch.zeros(shape, dtype=dtype, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert aux.shape == () and aux.dtype == torch.float32 and aux.item() == 0.0
    (y.float().sum() + aux).backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():  # the weights got a (zero) gradient: the graph reached them
        assert p.grad is not None and p.grad.eq(0).all()


def test_jax_twin_takes_zero_tokens_too(jax_moe, jax_on_cpu):
    import jax
    import jax.numpy as jnp

    params = jax_moe.init_moe_params(jax.random.key(0), D, FF, E)
    for precision in ("bf16", "fp8"):
        y, aux = jax_moe.moe_layer(params, jnp.zeros((0, D)), top_k=K, precision=precision, backend="reference")
        assert y.shape == (0, D) and float(aux) == 0.0  # finite: no empty mean


@pytest.fixture(scope="module")
def jax_moe():
    pytest.importorskip("jax", reason="jax not installed")
    try:
        from jax_bridge import moe
    except ImportError as exc:
        pytest.skip(f"jax_bridge.moe not importable yet: {exc}")
    return moe


def test_jax_init_has_the_torch_parameter_shapes(jax_moe):
    import jax
    import jax.numpy as jnp

    params = jax_moe.init_moe_params(jax.random.key(0), D, FF, E, jnp.float32)
    layer = make_layer("bf16")
    assert params["router"].shape == layer.router.weight.shape
    assert params["w_gate_up"].shape == layer.w_gate_up.shape
    assert params["w_down"].shape == layer.w_down.shape


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_torch_and_jax_layers_agree_on_the_same_weights(jax_moe, precision, jax_on_cpu):
    """Both layers' defaults: the fused block (tests/test_jax_moe.py compares the op-by-op twins too)."""
    import jax.numpy as jnp

    layer = make_layer(precision, fused=None)
    x = make_tokens(10, shape=(200, D), dtype=torch.bfloat16)
    with torch.no_grad():
        y, aux = layer(x)
    params = {
        "router": jnp.asarray(layer.router.weight.detach().numpy()),
        "w_gate_up": jnp.asarray(layer.w_gate_up.detach().numpy()),
        "w_down": jnp.asarray(layer.w_down.detach().numpy()),
    }
    x_jax = jnp.asarray(x.float().numpy()).astype(jnp.bfloat16)
    y_jax, aux_jax = jax_moe.moe_layer(params, x_jax, top_k=K, precision=precision, backend="reference")
    y_jax = torch.from_numpy(np.array(y_jax.astype(jnp.float32)))
    assert y_jax.shape == y.shape
    assert sqnr_db(y.float(), y_jax) >= 60  # the twin rounds to bf16 where the torch layer does
    assert float(aux_jax) == pytest.approx(aux.item(), rel=1e-5)


def test_the_fused_block_is_the_default():
    layer = MoE(D, FF, E, K, backend="reference")
    assert layer.fused is True and "fused=True" in repr(layer)
    assert make_layer("bf16").fused is False  # this module's op-by-op layer, asked for explicitly


def test_second_order_gradients_need_the_op_by_op_bf16_layer():
    """The fused block (the default) is differentiable once and its error names the fix; the op-by-op bf16
    layer (``fused=False``) gives second-order gradients through torch._grouped_mm."""
    x = make_tokens(11, shape=(40, D)).requires_grad_()
    y, _ = make_layer("bf16", fused=None)(x)
    with pytest.raises(RuntimeError, match=r"differentiable once.*precision='bf16', fused=False"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    y, _ = make_layer("bf16", fused=False)(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), x)
    assert torch.isfinite(ggx).all() and ggx.abs().sum() > 0
