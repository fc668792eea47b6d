"""Every backend writes its results into caller-provided buffers (``out_t``, ``out``, ``dx_out``,
``dw_out``: what the JAX bridge hands it) with the same bits as when it allocates them, and rejects a
buffer of the wrong shape, dtype or layout with an error naming the argument.

The reference backend runs everywhere; the Triton and DeepGEMM backends where they can run (CUDA).
"""

from __future__ import annotations

import math

import pytest
import torch

import fp8moe
from fp8moe.backends import load_backend
from fp8moe.plan import plan_groups
from fp8moe.recipe import FP8_DTYPE
from fp8moe.testing import random_offsets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INFO = fp8moe.backend_info(DEVICE)["backends"]
BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name} backend cannot run here: {reason}"))
    for name, reason in INFO.items()
]


def poisoned(shape, dtype):
    t = torch.empty(shape, dtype=dtype, device=DEVICE)
    return t.view(torch.uint8).fill_(0xFF).view(dtype) if dtype == FP8_DTYPE else t.fill_(float("nan"))


def bits(t: torch.Tensor) -> torch.Tensor:
    return (
        t.view(torch.uint8) if t.dtype == FP8_DTYPE else t.view(torch.int16 if t.element_size() == 2 else torch.int32)
    )


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_results_written_into_given_buffers_are_the_same_bits(name, dtype):
    gen = torch.Generator().manual_seed(3)
    m, n, k, e = 300, 256, 384, 4
    offsets = random_offsets(m, e, generator=gen, device=DEVICE, empty_groups=1, tail_rows=20)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(e, n, k, generator=gen) / math.sqrt(k)).to(DEVICE, dtype)
    dy = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
    backend = load_backend(name)

    wq, sw, wq_t, sw_t = backend.quantize_weight(w, True)
    out_t = (poisoned((e, k, n), FP8_DTYPE), poisoned((e, k // 128, n // 128), torch.float32))
    got = backend.quantize_weight(w, True, out_t=out_t)
    assert got[2] is out_t[0] and got[3] is out_t[1]
    assert torch.equal(bits(out_t[0]), bits(wq_t)) and torch.equal(out_t[1], sw_t)

    plan = plan_groups(offsets, m)
    y, xt, sxt = backend.forward(x, wq, sw, plan, dtype, token_tiles=True)
    y_out = poisoned((m, n), dtype)
    assert backend.forward(x, wq, sw, plan, dtype, out=y_out)[0] is y_out
    assert torch.equal(bits(y_out), bits(y))

    dx, dw = backend.backward(dy, xt, sxt, wq_t, sw_t, plan, True, True, dtype, dtype)
    dx_out, dw_out = poisoned((m, k), dtype), poisoned((e, n, k), dtype)
    got = backend.backward(dy, xt, sxt, wq_t, sw_t, plan, True, True, dtype, dtype, dx_out=dx_out, dw_out=dw_out)
    assert got[0] is dx_out and got[1] is dw_out
    assert torch.equal(bits(dx_out), bits(dx)) and torch.equal(bits(dw_out), bits(dw))
    assert not dx.isnan().any() and not dw.isnan().any()


@pytest.mark.parametrize("name", BACKENDS)
def test_a_wrong_buffer_is_rejected_by_name(name):
    m, n, k, e = 256, 128, 256, 2
    offsets = torch.tensor([100, 256], dtype=torch.int32, device=DEVICE)
    x, w = torch.randn(m, k, device=DEVICE), torch.randn(e, n, k, device=DEVICE)
    backend = load_backend(name)
    wq, sw, wq_t, sw_t = backend.quantize_weight(w, True)
    plan = plan_groups(offsets, m)
    with pytest.raises(ValueError, match=r"out: expected a contiguous tensor of shape \(256, 128\)"):
        backend.forward(x, wq, sw, plan, torch.float32, out=torch.empty(256, 256, device=DEVICE)[:, :128])
    with pytest.raises(TypeError, match="out: expected dtype torch.bfloat16"):
        backend.forward(x, wq, sw, plan, torch.bfloat16, out=torch.empty(m, n, device=DEVICE))
    with pytest.raises(ValueError, match="dx_out: expected a contiguous tensor of shape"):
        backend.backward(
            torch.randn(m, n, device=DEVICE),
            None,
            None,
            wq_t,
            sw_t,
            plan,
            True,
            False,
            torch.float32,
            torch.float32,
            dx_out=torch.empty(m, k + 128, device=DEVICE),
        )
    with pytest.raises(TypeError, match=r"out_t\[0\]: expected dtype"):
        backend.quantize_weight(w, True, out_t=(torch.empty(e, k, n, device=DEVICE), sw_t))
