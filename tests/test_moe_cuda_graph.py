"""The whole MoE layer (``MoE(fused=True)``: routing, aux loss, the fused block) in a CUDA graph, on the GPU.

- Triton backend: forward + backward (the parameters' and x's gradients) captured once, replayed on new
  tokens and new weights (so a new routing), bit-identical to the eager layer on the same values.
- DeepGEMM backend: the forward is capturable (replays equal eager); the backward is not: the weight
  gradient's K-grouped GEMM takes the padded group sizes as a host list, the layer's one device-to-host read
  (fp8moe.backends.deepgemm), which a graph cannot hold. Capturing it raises a RuntimeError that says so
  (checked in a child process, so that the abandoned capture cannot disturb this one), and the eager
  fwd+bwd reads exactly one plan's sizes.

Skipped without a CUDA device the backend runs on (``pytest -q tests/test_moe_cuda_graph.py`` on the GPU).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fp8moe
from fp8moe.moe import MoE
from fp8moe.testing import capture_cuda_graph

T, D, F, E, K = 300, 256, 256, 8, 2  # T*k = 600 assignments: ragged groups, not a multiple of 128


def skip_unless(backend: str) -> None:
    reason = fp8moe.backend_info("cuda" if torch.cuda.is_available() else "cpu")["backends"][backend]
    if reason:
        pytest.skip(f"{backend} backend cannot run here: {reason}")


def layer_and_tokens(backend: str, seed: int = 0) -> tuple[MoE, torch.Tensor]:
    torch.manual_seed(seed)
    layer = MoE(D, F, E, K, precision="fp8", backend=backend, fused=True).cuda()
    x = torch.randn(T, D, device="cuda").to(torch.bfloat16).requires_grad_()
    return layer, x


def fwd_bwd(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One training step's layer work: (y, aux, dx, then the gradient of each of layer.parameters())."""
    y, aux = layer(x)
    loss = y.float().square().mean() + aux
    return (y, aux, *torch.autograd.grad(loss, (x, *layer.parameters())))


def new_values(layer: MoE, x: torch.Tensor, seed: int) -> None:
    """New tokens and weights in the captured tensors (in place): a new routing."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
        for p in layer.parameters():
            p.mul_(1 + 0.1 * torch.randn(p.shape, device="cuda", generator=gen))


@pytest.mark.gpu
def test_triton_layer_fwd_bwd_is_capturable_and_replays_equal_eager():
    skip_unless("triton")
    layer, x = layer_and_tokens("triton")
    graph, captured = capture_cuda_graph(lambda: fwd_bwd(layer, x))
    for seed in (1, 2):
        new_values(layer, x, seed)
        graph.replay()
        fp8moe.clear_weight_cache()
        eager = fwd_bwd(layer, x)
        for i, (got, want) in enumerate(zip(captured, eager)):
            assert torch.equal(got, want), i
        assert all(torch.isfinite(t).all() for t in captured)


@pytest.mark.gpu
def test_deepgemm_layer_forward_is_capturable():
    skip_unless("deepgemm")
    layer, x = layer_and_tokens("deepgemm")
    graph, (y, aux) = capture_cuda_graph(lambda: layer(x))
    new_values(layer, x, 3)
    graph.replay()
    fp8moe.clear_weight_cache()
    y_eager, aux_eager = layer(x)  # the captured training forward, eagerly
    assert torch.equal(y, y_eager) and torch.equal(aux, aux_eager)


@pytest.mark.gpu
def test_deepgemm_layer_backward_needs_its_one_host_read(monkeypatch):
    """Eager: the fwd+bwd reads one plan's padded group sizes to the host (and nothing else of that kind).
    Under capture: the weight gradient raises a RuntimeError naming the read and the way out."""
    skip_unless("deepgemm")
    from fp8moe.plan import GroupLayout

    read = GroupLayout.padded_sizes_on_host
    plans = set()

    def counting(plan):
        plans.add(id(plan))
        return read(plan)

    monkeypatch.setattr(GroupLayout, "padded_sizes_on_host", counting)
    layer, x = layer_and_tokens("deepgemm")
    fwd_bwd(layer, x)
    assert len(plans) == 1

    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_moe_cuda_graph as m
        from fp8moe.testing import capture_cuda_graph
        layer, x = m.layer_and_tokens("deepgemm")
        try:
            capture_cuda_graph(lambda: m.fwd_bwd(layer, x))
        except RuntimeError as exc:
            print("RAISED:", exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert "RAISED:" in out and "one device-to-host read" in out and "backend='triton'" in out, out
