"""The backward's memory order (CPU, reference backend; the same Backend.backward runs every backend):
the wgrad before the dgrad, x's token tiles freed between them when autograd owns them and the graph is
not retained, and the same gradients whether they are freed or not (retain_graph, saved-tensor hooks)."""

from __future__ import annotations

import math

import pytest
import torch

import fp8moe
from fp8moe.backends import load_backend
from fp8moe.backends.base import Backend


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m, n, k, e = 300, 128, 256, 4
    x = torch.randn(m, k, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(e, n, k, generator=gen) / math.sqrt(k)).bfloat16().requires_grad_()
    offsets = torch.tensor([0, 100, 101, 290], dtype=torch.int32)
    dy = torch.randn(m, n, generator=gen).bfloat16()
    return x, w, offsets, dy


@pytest.fixture
def spy(monkeypatch):
    """Records, for each backward, whether the tiles were empty when the dgrad ran and the call order."""
    events: list = []
    original = Backend.backward

    def backward(self, dy, xt, sxt, wq_t, sw_t, plan, *args, **kwargs):
        inner = self.m_grouped
        k_grouped = self.k_grouped

        class Spied:
            def prepare(self, plan):
                wgrad = k_grouped.prepare(plan)

                def run(*a):
                    events.append("wgrad")
                    return wgrad(*a)

                return run

        def m_grouped(*a, **kw):
            events.append(("dgrad", None if xt is None else xt.untyped_storage().nbytes(), kw.get("low_memory")))
            return inner(*a, **kw)

        spied = Backend(self.name, self.wgrad, self.quantizer, m_grouped, Spied())
        events.append(("release", kwargs.get("release_tiles")))
        return original(spied, dy, xt, sxt, wq_t, sw_t, plan, *args, **kwargs)

    monkeypatch.setattr(Backend, "backward", backward)
    return events


def _grads(x, w, offsets, dy, **kwargs):
    x.grad = w.grad = None
    y = fp8moe.grouped_mm(x, w, offsets, backend="reference", **kwargs)
    y.backward(dy)
    return x.grad.clone(), w.grad.clone()


def test_wgrad_first_then_tiles_freed_then_dgrad(spy):
    x, w, offsets, dy = _problem()
    dx, dw = _grads(x, w, offsets, dy)
    assert spy == [("release", True), "wgrad", ("dgrad", 0, True)]
    with torch.no_grad():  # against the backend's own methods, nothing freed
        impl = load_backend("reference")
        quantized = impl.quantize_weight(w, True)
        plan = impl.plan(offsets, x.shape[0])
        _, xt, sxt = impl.forward(x, quantized[0], quantized[1], plan, torch.bfloat16, token_tiles=True)
        want = impl.backward(dy, xt, sxt, *quantized[2:], plan, True, True, torch.bfloat16, torch.bfloat16)
    assert torch.equal(dx, want[0]) and torch.equal(dw, want[1])


def test_retained_graph_keeps_the_tiles(spy):
    x, w, offsets, dy = _problem(1)
    want = _grads(x, w, offsets, dy)
    spy.clear()
    x.grad = w.grad = None
    y = fp8moe.grouped_mm(x, w, offsets, backend="reference")
    y.backward(dy, retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    y.backward(dy)  # reads the saved tiles again
    assert [e for e in spy if e[0] == "release"] == [("release", False), ("release", True)]
    for got in (first, (x.grad, w.grad)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_saved_tensor_hooks_keep_the_tiles(spy):
    x, w, offsets, dy = _problem(2)
    want = _grads(x, w, offsets, dy)
    spy.clear()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        got = _grads(x, w, offsets, dy)
    assert spy[0] == ("release", False)
    assert all(t.untyped_storage().nbytes() > 0 for t in kept)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # under activation checkpointing (saved-tensor hooks too) the same gradients
    x.grad = w.grad = None
    y = torch.utils.checkpoint.checkpoint(
        lambda a, b: fp8moe.grouped_mm(a, b, offsets, backend="reference"), x, w, use_reentrant=False
    )
    y.backward(dy)
    assert torch.equal(x.grad, want[0]) and torch.equal(w.grad, want[1])


def test_partial_gradients_free_nothing(spy):
    x, w, offsets, dy = _problem(3)
    w.requires_grad_(False)
    fp8moe.grouped_mm(x, w, offsets, backend="reference").backward(dy)
    assert spy[0] == ("release", False) and spy[-1][0] == "dgrad" and "wgrad" not in spy
