"""The Triton kernels of the fused MoE block's memory passes (fp8moe.kernels.moe) against their pieces
(fp8moe.moe.pieces, evaluated on the CPU), and the block through the kernels against the block through
the pieces.

Exact where the arithmetic is the pieces': dispatch, the d_out of combine_backward (c * dy), combine and
undispatch (the bits of the pieces' fp32 value after its cast), and every quantization of those values
(codes and scales). Within stated tolerances where it is not (module docstring of fp8moe.kernels.moe):

- the SwiGLU passes (silu and sigmoid a few ulp from torch's): scales within 2^-16 relative, e4m3 codes
  one step apart at most (on the GPU) in at most 1% of the elements (quotients at a rounding boundary),
  bf16 values one bf16 ulp apart at most in at most 1% of the elements (subnormals as zeros);
- d_c (a different summation order): within 2 D 2^-24 of the sum of the |products| (the error bound of
  fp32 summation in any order, for both sides; plus 1e-30).

Routings: ragged with empty experts, assignments and a whole token routed nowhere (id -1), k = 1, 2, 3;
inputs with a NaN in one token, tiny values (subnormals, a row below the zero-tile edge, a row of tiny
normal values, a tiny combine weight) and rows of very different magnitudes; NaN in the padding rows of
every GEMM result the passes read (it must not leak).

CPU (skipped where CUDA is available): the kernels under the Triton interpreter (``TRITON_INTERPRET=1``, in
a child process per check, small shapes), with triton_checks' substitution: the reference's final fp32 ->
e4m3 cast goes through the interpreter's own (inexact) conversion and values of NaN tiles are not compared
(their scales are); the interpreter's own bf16 -> fp32 conversion flushes bf16 subnormals, so no bf16 input
there holds one where it would be read (fp32 subnormals are tested; the kernels round to bf16 themselves
under the interpreter, whose fp32 -> bf16 conversion truncates). GPU (skipped without CUDA): the same
checks at larger shapes with every output poisoned first, the conversion and NaN codes compared too
(``pytest -q tests/test_moe_kernels.py`` on the GPU machine).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from triton_checks import (
    _quantize_tiles_converting_like_the_interpreter,
    assert_fp8_equal,
    assert_scales_equal,
    codes,
    poison_allocator,
    run_configs_once,
    run_in_the_interpreter,
)

from fp8moe.moe import fused, fused_experts, pieces, plan_routing
from fp8moe.quant import reference
from fp8moe.recipe import MIN_NORMAL
from fp8moe.testing import sqnr_db

km = pytest.importorskip("fp8moe.kernels.moe", reason="triton is not importable")
kq = pytest.importorskip("fp8moe.kernels.quantize", reason="triton is not importable")

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the CPU path runs under the Triton interpreter)")

# ---- problems ---------------------------------------------------------------------------------------------


def expert_ids(t: int, e: int, k: int, gen: torch.Generator, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """(t, k) top-k ids of random scores, experts ``empty`` never chosen; every 7th token's last slot and
    the whole of token 3 routed nowhere (-1)."""
    scores = torch.rand(t, e, generator=gen)
    scores[:, list(empty)] = -1.0
    ids = scores.topk(k, dim=-1).indices
    ids[::7, -1] = -1
    if t > 3:
        ids[3] = -1
    return ids


def tokens(t: int, d: int, gen: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    """Rows of different magnitudes, a NaN in token t // 2, tiny values: subnormals in row 1, a row below the
    zero-tile edge (row 2), a row of tiny normal values (row 4)."""
    x = torch.randn(t, d, generator=gen) * torch.exp2(torch.randint(-6, 6, (t, 1), generator=gen).float())
    if t > 4:
        x[1, : d // 2] = 1e-40
        x[2] = 3e-36 * torch.rand(d, generator=gen)
        x[4] = 1e-30 * torch.randn(d, generator=gen)
    x[t // 2, 5] = math.nan
    return x.to(device, dtype)


def combine_weights(ids: torch.Tensor, gen: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    c = torch.rand(ids.shape, generator=gen) + 0.1
    c = c / c.sum(-1, keepdim=True)
    c[0, 0] = 1.5e-38  # normal (in bf16 too), c * dy mostly subnormal: flushed by the recipe
    return c.to(device, dtype)


def padded(plan, cols: int, gen: torch.Generator, device, dtype=torch.bfloat16) -> torch.Tensor:
    """A GEMM result (Mp, cols): random on the plan's rows, NaN on every other row (must never be read)."""
    v = torch.randn(plan.layout.num_padded_rows, cols, generator=gen) * 2.0
    v[~pieces.valid_rows(plan)] = math.nan
    return v.to(device, dtype)


CASES = {  # name: (tokens, experts, k, experts never chosen)
    "k2_ragged": (40, 5, 2, (3,)),
    "k3_empty_experts": (30, 6, 3, (0, 4)),
    "k1": (40, 4, 1, (2,)),
}

# ---- comparisons ------------------------------------------------------------------------------------------


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits; any NaN matches any NaN."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    bad = (got.view(ints) != want.view(ints)) & ~nan
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} differ, first at {bad.nonzero()[0].tolist()}"


def assert_operands_equal(got: tuple, want: tuple, interpreter: bool) -> None:
    """FP8 (codes, scales) pairs bit for bit (triton_checks' rules under the interpreter)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w.dtype == torch.float32:
            assert_scales_equal(g.cpu(), w)
        else:
            assert_fp8_equal(g.cpu(), w, interpreter)


def assert_codes_near(got: torch.Tensor, want: torch.Tensor, interpreter: bool, fraction: float = 0.01) -> None:
    """e4m3 codes: NaN where the reference has NaN (except under the interpreter), elsewhere at most
    ``fraction`` of them differ, by one step of the same sign at most (on a GPU; the interpreter's
    conversion can move a value by a binade)."""
    g, w = codes(got.cpu()), codes(want)
    nan = want.float().isnan()
    if not interpreter:
        assert torch.equal(got.cpu().float().isnan(), nan)
    differ = (g != w) & ~nan
    assert differ.float().mean() <= fraction, f"{int(differ.sum())} of {differ.numel()} codes differ"
    if not interpreter:
        near = ((g ^ w) & 0x80 == 0) & ((g & 0x7F) - (w & 0x7F)).abs().le(1)
        assert (near | ~differ).all(), "a code differs by more than one step"


def assert_operands_near(got: tuple, want: tuple, interpreter: bool) -> None:
    """FP8 pairs of a SwiGLU pass: scales within 2^-16 relative, codes by :func:`assert_codes_near`."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w.dtype == torch.float32:
            torch.testing.assert_close(g.cpu(), w, rtol=2.0**-16, atol=0, equal_nan=True)
        else:
            assert_codes_near(g, w, interpreter)


def assert_bf16_near(got: torch.Tensor, want: torch.Tensor, fraction: float = 0.01) -> None:
    """bf16 values at most one ulp apart (as integers), in at most ``fraction`` of the elements; NaN where
    the reference has NaN (any NaN). Subnormals compare as +0 (silu's division may flush them on a GPU)."""
    got = got.cpu()
    nan = want.isnan()
    assert got.dtype == want.dtype and torch.equal(got.isnan(), nan)
    got, want = (torch.where(v.abs() < MIN_NORMAL, torch.zeros_like(v), v) for v in (got, want))
    g, w = got.view(torch.int16).int(), want.view(torch.int16).int()
    differ = (g != w) & ~nan
    assert differ.float().mean() <= fraction, f"{int(differ.sum())} of {differ.numel()} differ"
    assert ((g - w).abs().le(1) | nan).all(), "a value differs by more than one ulp"


LAYOUTS = ((True, True), (True, False), (False, True))


def _cpu_plan(ids: torch.Tensor, e: int):
    return plan_routing(ids.cpu(), e)


# ---- checks (CPU under the interpreter, and GPU) ----------------------------------------------------------


def check_dispatch(x: torch.Tensor, ids: torch.Tensor, e: int, interpreter: bool = False) -> None:
    plan, cplan = plan_routing(ids, e), _cpu_plan(ids, e)
    v = pieces.dispatch(x.cpu(), cplan)
    for rows, tiles in LAYOUTS:
        got = km.dispatch(x, plan, rowwise=rows, token_tiles=tiles)
        assert_operands_equal(got, pieces.quantize_padded(v, cplan.layout, rows, tiles), interpreter)
    assert_bits_equal(km.dispatch(x, plan, fp8=False), v.to(torch.bfloat16))


def check_combine_backward(dy: torch.Tensor, c: torch.Tensor, ids: torch.Tensor, e: int, interpreter=False) -> None:
    plan, cplan = plan_routing(ids, e), _cpu_plan(ids, e)
    gen = torch.Generator().manual_seed(5)
    out = padded(cplan, dy.shape[1], gen, dy.device)
    dy = dy.clone()
    dy[3, 0] = math.nan  # token 3 is routed nowhere: its d_c stays 0
    d_out, d_c = pieces.combine_backward(dy.cpu(), out.cpu(), c.cpu(), cplan, True, True)
    for rows, tiles in LAYOUTS:
        got = km.combine_backward(dy, c, plan, rowwise=rows, token_tiles=tiles)
        assert_operands_equal(got, pieces.quantize_padded(d_out, cplan.layout, rows, tiles), interpreter)
    assert_bits_equal(km.combine_backward(dy, c, plan, fp8=False), d_out.to(torch.bfloat16))
    got = km.combine_weight_grad(dy, out, plan).cpu()
    assert got.dtype == torch.float32 and got.shape == ids.shape
    assert not got[cplan.pos >= cplan.layout.num_padded_rows].any()  # routed nowhere: 0, also for NaN dy
    bound = (pieces.gather_assignments(out.cpu(), cplan).abs() * dy.cpu().float().abs()[:, None]).sum(-1)
    finite = d_c.isfinite()
    assert torch.equal(got.isfinite(), finite)
    tolerance = 2 * dy.shape[1] * 2.0**-24 * bound + 1e-30  # any summation order, both sides
    assert ((got - d_c).abs() <= tolerance)[finite & bound.isfinite()].all()  # bound: NaN where routed nowhere


def check_swiglu(ids: torch.Tensor, e: int, f: int, device, interpreter: bool = False) -> None:
    plan, cplan = plan_routing(ids, e), _cpu_plan(ids, e)
    gen = torch.Generator().manual_seed(6)
    h = padded(cplan, 2 * f, gen, device)
    h[cplan.pos[ids.shape[0] // 2, 0].clamp(max=h.shape[0] - 1), 3] = math.nan  # NaN in one routed row
    h[cplan.pos[1, 0].clamp(max=h.shape[0] - 1), :f] = 2e-38  # tiny gates (normal in bf16; silu(g) * u subnormal)
    a = pieces.swiglu(h.cpu(), pieces.valid_rows(cplan))
    for rows, tiles in LAYOUTS:
        got = km.swiglu(h, plan, rowwise=rows, token_tiles=tiles)
        assert_operands_near(got, pieces.quantize_padded(a, cplan.layout, rows, tiles), interpreter)
    assert_bf16_near(km.swiglu(h, plan, fp8=False), a.to(torch.bfloat16))


def check_swiglu_backward(ids: torch.Tensor, e: int, f: int, device, interpreter: bool = False) -> None:
    plan, cplan = plan_routing(ids, e), _cpu_plan(ids, e)
    gen = torch.Generator().manual_seed(7)
    h, da = padded(cplan, 2 * f, gen, device), padded(cplan, f, gen, device)
    da[cplan.pos[ids.shape[0] // 2, 0].clamp(max=da.shape[0] - 1), 2] = math.nan
    dh = pieces.swiglu_backward(h.cpu(), da.cpu(), pieces.valid_rows(cplan))
    for rows, tiles in LAYOUTS:
        got = km.swiglu_backward(h, da, plan, rowwise=rows, token_tiles=tiles)
        assert_operands_near(got, pieces.quantize_padded(dh, cplan.layout, rows, tiles), interpreter)
    assert_bf16_near(km.swiglu_backward(h, da, plan, fp8=False), dh.to(torch.bfloat16))


def check_combine_and_undispatch(ids: torch.Tensor, e: int, d: int, c: torch.Tensor) -> None:
    plan, cplan = plan_routing(ids, e), _cpu_plan(ids, e)
    gen = torch.Generator().manual_seed(8)
    out = padded(cplan, d, gen, c.device)
    y, dx = pieces.combine(out.cpu(), c.cpu(), cplan), pieces.undispatch(out.cpu(), cplan)
    for dtype in (torch.float32, torch.bfloat16):
        assert_bits_equal(km.combine(out, c, plan, dtype), y.to(dtype))
        assert_bits_equal(km.undispatch(out, plan, dtype), dx.to(dtype))
    out32 = out.float()  # an fp32 source (strided: a column slice)
    wide = torch.cat([out32, out32], dim=1)[:, d:]
    assert_bits_equal(km.combine(wide, c, plan, torch.float32), pieces.combine(out32.cpu(), c.cpu(), cplan))


def check_block(ids: torch.Tensor, e: int, x_dtype: torch.dtype, device, backend: str, min_db: float) -> None:
    """fwd + bwd of fused_experts through the kernels vs through the pieces, both precisions: within
    ``min_db`` (silu's last bits move a few FP8 codes), and the kernels' path bitwise deterministic."""
    t, k = ids.shape
    gen = torch.Generator().manual_seed(9)
    d, f = 128, 128
    x = torch.randn(t, d, generator=gen).to(device, x_dtype)
    w1 = (torch.randn(e, 2 * f, d, generator=gen) / math.sqrt(d)).to(device)
    w2 = (torch.randn(e, d, f, generator=gen) / math.sqrt(f)).to(device)
    c = combine_weights(ids, gen, torch.float32, device)
    dy = torch.randn(t, d, generator=gen).to(device, x_dtype)

    def run(passes, precision):
        saved, fused.PASSES = fused.PASSES, passes
        try:
            leaves = [v.detach().clone().requires_grad_() for v in (x, w1, w2, c)]
            y = fused_experts(*leaves[:3], ids, leaves[3], backend=backend, precision=precision)
            y.backward(dy)
            return [y.detach(), *(v.grad for v in leaves)]
        finally:
            fused.PASSES = saved

    for precision in ("fp8", "bf16"):
        want, got, again = run("pieces", precision), run("kernels", precision), run("kernels", precision)
        for i, (g, a, w) in enumerate(zip(got, again, want)):
            assert g.dtype == w.dtype and g.shape == w.shape, i
            assert torch.equal(g, a), (precision, i)
            assert sqnr_db(w.double().cpu(), g.double().cpu()) >= min_db, (precision, i, sqnr_db(w.cpu(), g.cpu()))


def _problem(name: str, device, x_dtype=torch.float32, scale: int = 1, d: int = 128):
    t, e, k, empty = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    ids = expert_ids(t * scale, e, k, gen, empty).to(device)
    return ids, e, tokens(t * scale, d, gen, x_dtype, device), combine_weights(ids, gen, torch.float32, device)


# ---- CPU: the kernels under the Triton interpreter, in a child process per check ----------------------------


def _interpreter_setup() -> None:
    """In the child: the reference's cast done the interpreter's way, and one tile shape per mode."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    reference.quantize_tiles = _quantize_tiles_converting_like_the_interpreter
    one_per_mode = [(64, 128, 4), (128, 64, 4), (128, 128, 8)]
    tok = kq._quantize_tokens_kernel
    run_configs_once(tok, [c for c in tok.configs if (*c.kwargs.values(), c.num_warps) in one_per_mode])


def interpreted_dispatch() -> None:
    for name, dtype in (("k3_empty_experts", torch.bfloat16), ("k1", torch.float32)):  # k = 2: combine_backward
        ids, e, x, _ = _problem(name, "cpu", dtype)
        check_dispatch(x, ids, e, interpreter=True)


def interpreted_combine_backward() -> None:
    for name, dtype in (("k2_ragged", torch.float32), ("k3_empty_experts", torch.bfloat16)):
        ids, e, dy, c = _problem(name, "cpu", dtype)
        check_combine_backward(dy, c, ids, e, interpreter=True)
    ids, e, dy, c = _problem("k1", "cpu")
    check_combine_backward(dy, c.bfloat16(), ids, e, interpreter=True)


def interpreted_swiglu() -> None:
    for name in ("k2_ragged", "k1"):
        ids, e, _, _ = _problem(name, "cpu")
        check_swiglu(ids, e, 128, "cpu", interpreter=True)


def interpreted_swiglu_backward() -> None:
    ids, e, _, _ = _problem("k3_empty_experts", "cpu")
    check_swiglu_backward(ids, e, 128, "cpu", interpreter=True)


def interpreted_combine_and_undispatch() -> None:
    for name in CASES:
        ids, e, _, c = _problem(name, "cpu")
        check_combine_and_undispatch(ids, e, 128, c)
    ids, e, _, c = _problem("k2_ragged", "cpu")
    check_combine_and_undispatch(ids, e, 128, c.bfloat16())


def interpreted_block() -> None:
    ids, e, _, _ = _problem("k3_empty_experts", "cpu")
    check_block(ids[:40], e, torch.bfloat16, "cpu", "reference", 35)


@pytest.mark.parametrize(
    "check",
    [
        "interpreted_dispatch",
        "interpreted_combine_backward",
        "interpreted_swiglu",
        "interpreted_swiglu_backward",
        "interpreted_combine_and_undispatch",
        "interpreted_block",
    ],
)
def test_kernels_under_the_triton_interpreter(check):
    run_in_the_interpreter(__name__, "_interpreter_setup", check)


# ---- arguments (CPU, no kernel runs) -----------------------------------------------------------------------


def _bad(call: str, **changes):
    gen = torch.Generator().manual_seed(0)
    ids = expert_ids(10, 3, 2, gen)
    plan = plan_routing(ids, 3)
    mp = plan.layout.num_padded_rows
    args = {
        "x": torch.zeros(10, 128),
        "dy": torch.zeros(10, 128),
        "h": torch.zeros(mp, 256),
        "da": torch.zeros(mp, 128),
        "out": torch.zeros(mp, 128),
        "dxs": torch.zeros(mp, 128),
        "combine_weights": torch.zeros(10, 2),
        "plan": plan,
    }
    names = {
        "dispatch": ("x", "plan"),
        "swiglu": ("h", "plan"),
        "combine_backward": ("dy", "combine_weights", "plan"),
        "swiglu_backward": ("h", "da", "plan"),
        "combine": ("out", "combine_weights", "plan"),
        "undispatch": ("dxs", "plan"),
        "combine_weight_grad": ("dy", "out", "plan"),
    }[call]
    args |= changes
    options = {key: args.pop(key) for key in ("rowwise", "token_tiles", "fp8", "dtype") if key in args}
    getattr(km, call)(*(args[n] for n in names), **options)


@pytest.mark.parametrize(
    "call, changes, error, match",
    [
        ("dispatch", {"x": "x"}, TypeError, "x: expected a torch.Tensor"),
        ("dispatch", {"x": torch.zeros(10, 128, dtype=torch.int32)}, TypeError, "x: expected dtype"),
        ("dispatch", {"x": torch.zeros(9, 128)}, ValueError, "x: expected shape"),
        ("dispatch", {"x": torch.zeros(10, 100)}, ValueError, "x: expected shape"),
        ("dispatch", {"x": torch.zeros(128, 10).T}, ValueError, "x: expected shape|x: expected unit stride"),
        ("dispatch", {"x": torch.zeros(128, 10).T[:, :]}, ValueError, "x: expected"),
        ("dispatch", {"plan": "plan"}, TypeError, "plan: expected a RoutingPlan"),
        ("dispatch", {"rowwise": 1}, TypeError, "rowwise: expected a bool"),
        ("dispatch", {"rowwise": False, "token_tiles": False}, ValueError, "rowwise, token_tiles"),
        ("swiglu", {"h": torch.zeros(5, 256)}, ValueError, "h: expected shape"),
        ("swiglu", {"h": torch.zeros(128, 128)}, ValueError, "h: expected shape"),
        ("combine_backward", {"combine_weights": torch.zeros(10, 3)}, ValueError, "combine_weights: expected"),
        ("combine_backward", {"fp8": "yes"}, TypeError, "fp8: expected a bool"),
        ("swiglu_backward", {"da": torch.zeros(128, 256)}, ValueError, "da: expected shape"),
        ("combine", {"dtype": torch.int32}, TypeError, "dtype: expected one of"),
        ("combine", {"out": torch.zeros(7, 128)}, ValueError, "out: expected shape"),
        ("undispatch", {"dxs": torch.zeros(10, 128), "dtype": torch.float32}, ValueError, "dxs: expected shape"),
        ("combine_weight_grad", {"out": torch.zeros(128, 256)}, ValueError, "out: expected shape"),
    ],
)
def test_bad_arguments_name_the_argument(call, changes, error, match):
    if call in ("combine", "undispatch") and "dtype" not in changes:
        changes = changes | {"dtype": torch.float32}
    with pytest.raises(error, match=match):
        _bad(call, **changes)


def test_passes_setting_is_checked():
    gen = torch.Generator().manual_seed(0)
    x, ids = torch.randn(4, 128, generator=gen), expert_ids(4, 2, 1, gen)
    w1, w2, c = torch.randn(2, 256, 128), torch.randn(2, 128, 128), torch.ones(4, 1)
    saved, fused.PASSES = fused.PASSES, "triton"
    try:
        with pytest.raises(ValueError, match="PASSES"):
            fused_experts(x, w1, w2, ids, c, backend="reference")
    finally:
        fused.PASSES = saved


def test_passes_are_chosen_by_device_backend_and_setting(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    class Plain:  # a GEMM object that declares neither fp8 nor key
        def operands(self, v, layout, rows, tiles):
            return v, v

    triton_fp8 = type("G", (), {"fp8": True, "key": "triton", "operands": Plain.operands})()
    reference_fp8 = type("G", (), {"fp8": True, "key": "reference", "operands": Plain.operands})()
    bf16 = fused._Bf16Gemms()
    assert isinstance(fused._passes(triton_fp8, cuda), fused._KernelPasses)
    assert isinstance(fused._passes(bf16, cuda), fused._KernelPasses) and not fused._passes(bf16, cuda).fp8
    for gemms, device in ((triton_fp8, cpu), (reference_fp8, cuda), (Plain(), cuda), (bf16, cpu)):
        assert isinstance(fused._passes(gemms, device), fused._PiecesPasses)
    monkeypatch.setattr(fused, "PASSES", "kernels")
    assert isinstance(fused._passes(reference_fp8, cpu), fused._KernelPasses)
    assert isinstance(fused._passes(Plain(), cpu), fused._PiecesPasses)
    monkeypatch.setattr(fused, "PASSES", "pieces")
    assert isinstance(fused._passes(triton_fp8, cuda), fused._PiecesPasses)


# ---- GPU: bit-exact against the pieces on the device, outputs poisoned first --------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_passes_on_the_gpu(name, dtype):
    ids, e, x, c = _problem(name, "cuda", dtype, scale=20, d=384)
    poison_allocator()
    check_dispatch(x, ids, e)
    poison_allocator()
    check_combine_backward(x, c.to(dtype), ids, e)
    poison_allocator()
    check_combine_and_undispatch(ids, e, 384, c.to(dtype))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_swiglu_passes_on_the_gpu(name):
    ids, e, _, _ = _problem(name, "cuda", scale=20)
    poison_allocator()
    check_swiglu(ids, e, 256, "cuda")
    poison_allocator()
    check_swiglu_backward(ids, e, 256, "cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "deepgemm"])
def test_block_through_the_kernels_on_the_gpu(backend):
    from fp8moe.backends import backend_info

    reason = backend_info("cuda")["backends"][backend]
    if reason:
        pytest.skip(reason)
    ids, e, _, _ = _problem("k3_empty_experts", "cuda", scale=20)
    check_block(ids, e, torch.bfloat16, "cuda", backend, 35)
