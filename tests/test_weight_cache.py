"""The quantized-weight cache: reused while the weight is unchanged, never stale, off on request, and
holding nothing once the weight is freed."""

import gc
import math

import pytest
import torch

import fp8moe
from fp8moe import weight_cache
from fp8moe.backends import Backend


@pytest.fixture
def quantizations(monkeypatch):
    """Count the weight quantizations that actually run."""
    fp8moe.clear_weight_cache()
    calls = []
    original = Backend.quantize_weight
    monkeypatch.setattr(Backend, "quantize_weight", lambda self, w, t: calls.append(t) or original(self, w, t))
    yield calls
    fp8moe.clear_weight_cache()


def problem(seed=0, e=3, m=300, n=128, k=256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = (torch.randn(e, n, k, generator=gen) / math.sqrt(k)).requires_grad_()
    offsets = torch.tensor([100, 100, m], dtype=torch.int32)
    return x, w, offsets


def fresh(x, w, offsets):
    """The result with the cache off: what a cached call must equal."""
    return fp8moe.grouped_mm(x, w, offsets, backend="reference", cache_weight=False)


def test_reused_while_unchanged_then_requantized_after_an_in_place_update(quantizations):
    x, w, offsets = problem()
    first = fp8moe.grouped_mm(x, w, offsets, backend="reference")
    second = fp8moe.grouped_mm(x, w, offsets, backend="reference")
    assert len(quantizations) == 1 and torch.equal(first, second)
    with torch.no_grad():
        w.mul_(-2)  # what an optimizer step does: in place, bumps w._version
    third = fp8moe.grouped_mm(x, w, offsets, backend="reference")
    assert len(quantizations) == 2 and torch.equal(third, fresh(x, w, offsets))


def test_an_optimizer_step_invalidates_it(quantizations):
    x, w, offsets = problem(1)
    opt = torch.optim.SGD([w], lr=0.5)
    fp8moe.grouped_mm(x, w, offsets, backend="reference").sum().backward()
    opt.step()
    after = fp8moe.grouped_mm(x, w, offsets, backend="reference")
    assert torch.equal(after, fresh(x, w, offsets))


def test_a_data_swap_is_never_served_stale(quantizations):
    x, w, offsets = problem(2)
    fp8moe.grouped_mm(x, w, offsets, backend="reference")
    w.data = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(fp8moe.grouped_mm(x, w, offsets, backend="reference"), fresh(x, w, offsets))


def test_a_new_tensor_at_a_reused_address_is_not_served(quantizations):
    x, w, offsets = problem(3)
    fp8moe.grouped_mm(x, w, offsets, backend="reference")
    storage = w.detach()
    other = torch.empty(0).set_(storage.untyped_storage(), 0, w.shape, w.stride())  # same address, new tensor
    with torch.no_grad():
        other.mul_(3.0)  # bumps only other's version counter
    assert torch.equal(fp8moe.grouped_mm(x, other, offsets, backend="reference"), fresh(x, other, offsets))


def test_dgrad_operand_added_when_later_needed(quantizations):
    x, w, offsets = problem(4)
    fp8moe.grouped_mm(x, w.detach(), offsets, backend="reference")  # no dgrad: no transposed operand
    xg = x.clone().requires_grad_()
    fp8moe.grouped_mm(xg, w, offsets, backend="reference").sum().backward()
    assert xg.grad is not None and quantizations[-1] is True


def test_switched_off(quantizations):
    x, w, offsets = problem(5)
    for _ in range(2):
        fp8moe.grouped_mm(x, w, offsets, backend="reference", cache_weight=False)
    assert len(quantizations) == 2 and weight_cache.cached_weights() == 0
    with pytest.raises(TypeError, match="cache_weight: expected a bool"):
        fp8moe.grouped_mm(x, w, offsets, cache_weight=1)


def test_holds_nothing_after_the_weight_is_freed(quantizations):
    x, w, offsets = problem(6)
    fp8moe.grouped_mm(x, w, offsets, backend="reference")
    assert weight_cache.cached_weights() == 1
    del w
    gc.collect()
    assert weight_cache.cached_weights() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (checks device memory)")
def test_gpu_memory_returns_when_the_weight_is_freed():
    fp8moe.clear_weight_cache()
    x, w, offsets = (t.cuda() for t in problem(7))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    w = w.detach().clone()
    fp8moe.grouped_mm(x, w, offsets, backend="reference")
    del w
    gc.collect()
    assert torch.cuda.memory_allocated() <= before
