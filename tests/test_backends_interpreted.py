"""The Triton and DeepGEMM backends' own code (quantizer calls, group plan, GEMM calls, out= buffers, the
DeepGEMM wgrad's host read) run on the CPU: the Triton kernels under the Triton interpreter, DeepGEMM's
two kernels replaced by a float64 model of their documented contract (so this checks our side of the
calls: operand and scale views, padded layouts, the host list of group sizes; DeepGEMM itself is tested
on the GPU by test_backend_deepgemm). Both against the reference backend, in a child process with
``TRITON_INTERPRET=1`` (see triton_checks.run_in_the_interpreter).
"""

from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch

pytest.importorskip("triton")
from triton_checks import _quantize_tiles_converting_like_the_interpreter, run_configs_once, run_in_the_interpreter

from fp8moe.quant import reference
from fp8moe.recipe import BLOCK


def _dequant_rows(a: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
    """(R, C) e4m3 with (R, C/128) scales -> float64."""
    return a.double() * sa.double().repeat_interleave(BLOCK, 1)


def _dequant_blocks(b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(E, N, K) e4m3 with (E, N/128, K/128) scales -> float64."""
    return b.double() * sb.double().repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)


def fake_deep_gemm() -> types.ModuleType:
    """deep_gemm's two SM90 grouped kernels as float64 torch, following their contract as the backend uses
    it: m-grouped NT on (Mp, K) rows with MN-major (Mp, K/128) scales and a per-row expert id (-1: row
    skipped), writing bf16 d; k-grouped NT on flat per-group (C, k_g) blocks with (C, sum_k/128) scales,
    accumulating into fp32 d (c is d)."""
    module = types.ModuleType("deep_gemm")

    def m_grouped_fp8_gemm_nt_contiguous(a_pair, b_pair, d, m_indices, recipe_a, recipe_b, disable_ue8m0_cast):
        (a, sa), (b, sb) = a_pair, b_pair
        assert recipe_a == (1, 128) and recipe_b == (128, 128) and disable_ue8m0_cast
        assert a.shape[0] == sa.shape[0] == d.shape[0] == m_indices.shape[0] and sa.stride(0) == 1  # MN-major
        assert d.dtype == torch.bfloat16 and m_indices.dtype == torch.int32
        a64, b64 = _dequant_rows(a, sa), _dequant_blocks(b, sb)
        for row, expert in enumerate(m_indices.tolist()):
            if expert >= 0:
                d[row] = (a64[row] @ b64[expert].T).to(d.dtype)

    def k_grouped_fp8_gemm_nt_contiguous(a_pair, b_pair, d, ks, ks_tensor, c):
        (a, sa), (b, sb) = a_pair, b_pair
        assert c is d and d.dtype == torch.float32 and isinstance(ks, list)
        assert ks == ks_tensor.tolist() and all(k % BLOCK == 0 for k in ks)
        n, k = d.shape[1], d.shape[2]
        start = 0
        for g, length in enumerate(ks):
            cols = slice(start // BLOCK, (start + length) // BLOCK)
            a_g = a[n * start : n * (start + length)].view(n, length)
            b_g = b[k * start : k * (start + length)].view(k, length)
            d[g] += (_dequant_rows(a_g, sa[:, cols]) @ _dequant_rows(b_g, sb[:, cols]).T).float()
            start += length

    module.m_grouped_fp8_gemm_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
    module.k_grouped_fp8_gemm_nt_contiguous = k_grouped_fp8_gemm_nt_contiguous
    return module


class _NoEvent:  # torch.cuda.Event on a machine without CUDA: the host copy it orders is synchronous there
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def interpreter_checks() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (see test_backends_under_the_triton_interpreter)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    # The reference recipe's fp32 -> e4m3 cast done the interpreter's (inexact) way (see triton_checks).
    reference.quantize_tiles = _quantize_tiles_converting_like_the_interpreter
    sys.modules["deep_gemm"] = fake_deep_gemm()
    torch.cuda.Event = _NoEvent
    from test_kernels_quantize import _interpreter_setup

    from fp8moe.backends import load_backend
    from fp8moe.kernels import gemm as kernels
    from fp8moe.plan import plan_groups
    from fp8moe.testing import backend_fwd_bwd, sqnr_db

    _interpreter_setup()  # one tile shape per output mode of the quantizers
    for tuner in (kernels._m_grouped_kernel, kernels._k_grouped_kernel):
        run_configs_once(tuner, tuner.configs[:1])

    gen = torch.Generator().manual_seed(0)
    m, n, k = 200, 128, 256
    offsets = torch.tensor([0, 70, 71, 190], dtype=torch.int32)  # empty, 70 rows, 1 row, 119 rows; 10 unrouted
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = (torch.randn(4, n, k, generator=gen) / math.sqrt(k)).bfloat16()
    dy = torch.randn(m, n, generator=gen).bfloat16()
    plan = plan_groups(offsets, m)
    y_ref, dx_ref, dw_ref = backend_fwd_bwd(
        "reference", x, load_backend("reference").quantize_weight(w, True), offsets, dy
    )
    for key in ("triton", "deepgemm", "deepgemm/wgrad=triton", "triton/wgrad=deepgemm"):
        backend = load_backend(key)
        quantized = backend.quantize_weight(w, True)
        wq, sw, wq_t, sw_t = quantized
        y, dx, dw = backend_fwd_bwd(key, x, quantized, offsets, dy)
        for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
            db = sqnr_db(want, got)
            assert db >= 40, f"{key} {name}: {db:.1f} dB against the reference backend"
        assert not y[190:].any() and not dx[190:].any() and not dw[0].any()
        # padded=True: the same rows, left in the padded layout (what the fused MoE block reads)
        xq, sx = backend.quantizer.tokens(x, plan, True, False)
        routed = plan.row_to_padded[:190].long()
        for dtype in (torch.float32, torch.bfloat16):
            yp = backend.m_grouped(xq, sx, wq, sw, plan, dtype, None, padded=True)
            assert yp.shape == (plan.num_padded_rows, n) and yp.dtype == dtype
            # against the same kernel's unpadded output (the interpreter's fp32 -> bf16 cast is not torch's)
            assert torch.equal(yp[routed], backend.m_grouped(xq, sx, wq, sw, plan, dtype, None)[:190]), key
            yp_out = torch.full_like(yp, math.nan)
            assert backend.m_grouped(xq, sx, wq, sw, plan, dtype, yp_out, padded=True) is yp_out
            assert torch.equal(yp_out[routed], yp[routed])
        # the same bits into caller buffers (fp32 and bf16 y), a backward without dgrad, fp32 accumulation
        y_out, dw_out = torch.full_like(y, math.nan), torch.full_like(dw, math.nan).bfloat16()
        got, xt, sxt = backend.forward(x, wq, sw, plan, torch.float32, token_tiles=True, out=y_out)
        assert got is y_out and torch.equal(y_out, y)
        bufs = (torch.empty_like(xt), torch.empty_like(sxt))  # token tiles into given buffers (the JAX bridge)
        _, xt2, sxt2 = backend.forward(x, wq, sw, plan, torch.float32, token_tiles=True, tiles_out=bufs)
        assert xt2 is bufs[0] and sxt2 is bufs[1]
        assert torch.equal(xt2.view(torch.uint8), xt.view(torch.uint8)) and torch.equal(sxt2, sxt)
        y16 = backend.forward(x, wq, sw, plan, torch.bfloat16)[0]
        y16_out = torch.full_like(y_out, math.nan).bfloat16()
        assert backend.forward(x, wq, sw, plan, torch.bfloat16, out=y16_out)[0] is y16_out
        assert torch.equal(y16_out, y16) and sqnr_db(y, y16.float()) >= 40
        none, dw16 = backend.backward(
            dy, xt, sxt, wq_t, sw_t, plan, False, True, torch.float32, torch.bfloat16, dw_out=dw_out
        )
        assert none is None and dw16 is dw_out and sqnr_db(dw, dw_out.float()) >= 45
        main_grad = torch.randn(dw.shape, generator=gen)
        before = main_grad.clone()
        _, added = backend.backward(
            dy, xt, sxt, wq_t, sw_t, plan, False, True, torch.float32, torch.float32, main_grad=main_grad
        )
        assert added is main_grad and sqnr_db(before + dw, main_grad) >= 40
        # the dgrad of the backward (low_memory): DeepGEMM in runs of rows through one scratch, each run
        # written to its rows by the Triton unpadding kernel; the same bits as one run and the gather
        dyq, sdy = backend.quantizer.tokens(dy, plan, True, False)
        if key.startswith("deepgemm"):
            from fp8moe.backends import deepgemm

            deepgemm._LOW_MEMORY_MIN_BYTES = 0  # 640 padded rows: runs of 256, 256, 128
        for dtype in (torch.bfloat16, torch.float32):
            whole = backend.m_grouped(dyq, sdy, wq_t, sw_t, plan, dtype, None)
            runs = backend.m_grouped(dyq, sdy, wq_t, sw_t, plan, dtype, None, low_memory=True)
            assert torch.equal(runs, whole), key
            into = torch.full_like(whole, math.nan)
            assert backend.m_grouped(dyq, sdy, wq_t, sw_t, plan, dtype, into, low_memory=True) is into
            assert torch.equal(into, whole) and not into[190:].any()
        # the backward frees x's tiles between the wgrad and the dgrad when told to, with the same results
        tiles = (xt.clone(), sxt.clone())
        got = backend.backward(
            dy, *tiles, wq_t, sw_t, plan, True, True, torch.float32, torch.float32, release_tiles=True
        )
        assert all(t.untyped_storage().nbytes() == 0 for t in tiles)
        ref = backend.backward(dy, xt, sxt, wq_t, sw_t, plan, True, True, torch.float32, torch.float32)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        if key.startswith("deepgemm"):
            deepgemm._LOW_MEMORY_MIN_BYTES = 64 << 20


def test_backends_under_the_triton_interpreter():
    run_in_the_interpreter("test_backends_interpreted")
