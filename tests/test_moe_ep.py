"""Expert parallelism (fp8moe.moe.parallel) on CPU: 2 and 4 gloo processes against the single-process layer.

Each rank holds a shard of the tokens (rank r: rows ``[r * n, (r + 1) * n)`` of the batch) and E / ep_size
experts, sliced from the weights of a single-process layer holding all E; the single-process layer runs the
whole batch. Checked bit-exactly: y and dx of each shard, the local experts' weight gradients (against the
matching slices); to fp32 rounding: the router gradient summed over the ranks and the mean of the ranks' aux
losses (the single-process aux loss of the whole batch; the ranks' losses add ``aux / ep_size``).

All cases of one group size run in one spawn (process start-up dominates); each test reads its case.
"""

from __future__ import annotations

import math
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fp8moe.moe import MoE

D, FF, E, K, N = 128, 128, 8, 2, 24  # N tokens per rank
PRECISIONS = ("bf16", "fp8")
ROUTINGS = ("balanced", "skewed", "one_rank", "sigmoid")
CASES = [f"{p}-{r}" for p in PRECISIONS for r in ROUTINGS]


def _layer(precision, score, **kwargs):
    return MoE(D, FF, E, K, precision=precision, backend="reference", score=score, **kwargs)


def _make_reference(precision, routing):
    """The single-process layer and the whole batch (same on every rank: seeded)."""
    torch.manual_seed(0)
    ref = _layer(precision, "sigmoid" if routing == "sigmoid" else "softmax")
    return ref


def _check_case(case, group, rank, ep):
    precision, routing = case.split("-")
    ref = _make_reference(precision, routing)
    gen = torch.Generator().manual_seed(1)
    u = torch.ones(D) / math.sqrt(D)
    x_full = torch.randn(ep * N, D, generator=gen) + 2 * u * math.sqrt(D) / 4
    grad_y = torch.randn(ep * N, D, generator=gen)
    el = E // ep
    with torch.no_grad():
        if routing == "skewed":
            ref.router.weight[0] += 0.3 * u  # expert 0 (rank 0) takes most tokens
        elif routing == "one_rank":
            ref.router.weight[(ep - 1) * el :] += 2.0 * u  # every assignment goes to the last rank
        elif routing == "sigmoid":
            ref.expert_bias.copy_(torch.linspace(-0.5, 0.5, E))
    layer = _layer(precision, ref.score, ep_group=group)
    assert layer.w_gate_up.shape == (el, 2 * FF, D) and layer.num_local_experts == el
    with torch.no_grad():
        layer.router.weight.copy_(ref.router.weight)
        layer.w_gate_up.copy_(ref.w_gate_up[rank * el : (rank + 1) * el])
        layer.w_down.copy_(ref.w_down[rank * el : (rank + 1) * el])
        if ref.expert_bias is not None:
            layer.expert_bias.copy_(ref.expert_bias)

    xr = x_full.clone().requires_grad_()
    y_ref, aux_ref = ref(xr)
    ((y_ref * grad_y).sum() + aux_ref).backward()
    shard = slice(rank * N, (rank + 1) * N)
    x = x_full[shard].clone().requires_grad_()
    y, aux = layer(x)
    ((y * grad_y[shard]).sum() + aux / ep).backward()

    if routing == "one_rank":
        picked = (x_full @ ref.router.weight.T).softmax(-1).topk(K).indices
        assert bool((picked >= (ep - 1) * el).all()), "one_rank: routing is not what the case means"
    assert torch.equal(y, y_ref[shard]), "y differs"
    assert torch.equal(x.grad, xr.grad[shard]), "dx differs"
    assert torch.equal(layer.w_gate_up.grad, ref.w_gate_up.grad[rank * el : (rank + 1) * el]), "dw_gate_up differs"
    assert torch.equal(layer.w_down.grad, ref.w_down.grad[rank * el : (rank + 1) * el]), "dw_down differs"
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad, group=group)
    scale = ref.router.weight.grad.abs().max().item()  # a sum of fp32 terms in another order: cancellation
    torch.testing.assert_close(router_grad, ref.router.weight.grad, rtol=1e-5, atol=1e-5 * scale)
    mean_aux = aux.detach().clone()
    dist.all_reduce(mean_aux, group=group)
    torch.testing.assert_close(mean_aux / ep, aux_ref.detach(), rtol=1e-6, atol=1e-7)
    if routing == "sigmoid":
        assert torch.equal(layer.last_expert_counts, ref.last_expert_counts), "global counts differ"


def _check_bad_configs(group, ep):
    with pytest.raises(ValueError, match="num_experts"):
        MoE(D, FF, 4 * ep + 1, K, ep_group=group)
    with pytest.raises(ValueError, match="fused"):
        MoE(D, FF, E, K, ep_group=group, fused=True)
    with pytest.raises(TypeError, match="ep_group"):
        MoE(D, FF, E, K, ep_group="ep")


def _worker(rank, ep, store_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=ep)
    torch.set_num_threads(1)
    results = {}
    for case in [*CASES, "bad_configs"]:
        try:
            if case == "bad_configs":
                _check_bad_configs(dist.group.WORLD, ep)
            else:
                _check_case(case, dist.group.WORLD, rank, ep)
            results[case] = None
        except Exception:  # reported by the test of the case
            results[case] = traceback.format_exc()
    torch.save(results, os.path.join(store_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


_RESULTS: dict[int, list[dict]] = {}


def _results(ep):
    if ep not in _RESULTS:
        with tempfile.TemporaryDirectory() as store_dir:
            mp.spawn(_worker, args=(ep, store_dir), nprocs=ep, join=True)
            _RESULTS[ep] = [torch.load(os.path.join(store_dir, f"rank{r}.pt")) for r in range(ep)]
    return _RESULTS[ep]


@pytest.mark.parametrize("case", [*CASES, "bad_configs"])
@pytest.mark.parametrize("ep", [2, 4])
def test_ep_matches_single_process(ep, case):
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(_results(ep)) if res[case] is not None]
    assert not failures, "\n".join(failures)


def test_ep_group_needs_initialized_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialized"):
        MoE(D, FF, E, K, ep_group=object())
