"""Expert parallelism (fp8moe.moe.parallel) on CPU: 2 and 4 gloo processes against the single-process layer.

Each rank holds a shard of the tokens (concatenated in rank order they are the batch) and E / ep_size
experts, sliced from the weights of a single-process ``MoE(fused=True)`` holding all E; the single-process
layer runs the whole batch in bf16 (the dispatch dtype). Checked (see :mod:`fp8moe.moe.parallel`):

- bit-exactly: the local experts' weight gradients; global expert counts; y and dx of every token whose
  per-rank-then-rank-order sum associates like the single-process slot-order sum (:func:`_same_sum_tree`):
  with fp32 partials (``ep_partials="fp32"``, the default) every token at top_k <= 2, at top_k = 3 those
  whose slots 0 and 1 live on one rank or slot 2 on a later rank than both;
- the other tokens at top_k = 3 (fp32 partials): within one bf16 ulp (rtol 2^-7) plus 2^-16 of the largest
  value (the fp32 sums differ in the last bits, the one rounding to bf16 may then differ by one ulp);
- ``ep_partials="bf16"``: y of tokens whose experts all live on one rank bit-exactly, of split ones to bf16
  rounding of the partials; dx bit-exactly where no rank holds some but not all of a token's slots (a
  one-slot partial dx is a bf16 GEMM row: every token at top_k <= 2); the rest as with fp32 partials; it
  sends 2D bytes less per returned pair row, in each direction;
- to fp32 rounding: the router gradient summed over the ranks, the mean of the ranks' aux losses;
- FP8 dispatch against bf16 dispatch on the same weights: y, dx, ``w_down``'s and the router's gradients
  bit-exactly, ``w_gate_up``'s gradient (its token tiles are a second quantization) by SQNR >= 35 dB; and
  it sends about half the bytes.

All cases of one group size run in one spawn (process start-up dominates); each test reads its case.
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fp8moe.moe import MoE
from fp8moe.moe.parallel import (
    expert_data_parallel_groups,
    gather_expert_state_dict,
    record_all_to_all,
    shard_expert_state_dict,
)
from fp8moe.moe.routing import route
from fp8moe.testing import sqnr_db

D, FF, E, K, N = 128, 128, 8, 2, 24  # N tokens per rank
BF16 = torch.bfloat16
ROUTINGS = ("balanced", "skewed", "one_rank", "sigmoid", "empty_shard")
CASES = [f"bf16-{r}" for r in ROUTINGS] + [f"fp8-{r}" for r in ROUTINGS] + ["fp8-k3"]
OTHER = ("bad_configs", "group_mismatch", "state_dict", "ep_x_dp")


def _layer(precision, score="softmax", top_k=K, **kwargs):
    return MoE(D, FF, E, top_k, precision=precision, backend="reference", score=score, **kwargs)


def _setup(case, ep):
    """The single-process layer, the batch and dy, the shard sizes (same on every rank: seeded)."""
    precision, routing = case.split("-")
    top_k = 3 if routing == "k3" else K
    torch.manual_seed(0)
    ref = _layer(precision, "sigmoid" if routing == "sigmoid" else "softmax", top_k, fused=True)
    sizes = [N] * ep
    if routing == "empty_shard":
        sizes = [0] + [N + 8] * (ep - 1)  # rank 0 has no tokens (and sends none)
    gen = torch.Generator().manual_seed(1)
    u = torch.ones(D) / math.sqrt(D)
    x_full = (torch.randn(sum(sizes), D, generator=gen) + 2 * u * math.sqrt(D) / 4).to(BF16)
    grad_y = torch.randn(sum(sizes), D, generator=gen).to(BF16)
    el = E // ep
    with torch.no_grad():
        if routing == "skewed":
            ref.router.weight[0] += 0.3 * u  # expert 0 (rank 0) takes most tokens
        elif routing == "one_rank":
            ref.router.weight[(ep - 1) * el :] += 2.0 * u  # every assignment goes to the last rank
        elif routing == "sigmoid":
            ref.expert_bias.copy_(torch.linspace(-0.5, 0.5, E))
    return ref, x_full, grad_y, sizes


def _ep_layer(ref, group, rank, ep, **kwargs):
    layer = _layer(ref.precision, ref.score, ref.top_k, ep_group=group, **kwargs)
    assert layer.w_gate_up.shape == (E // ep, 2 * FF, D) and layer.num_local_experts == E // ep
    layer.load_state_dict(shard_expert_state_dict(ref.state_dict(), ep, rank))
    return layer


def _run(layer, x, grad_y, aux_weight):
    """y, aux of x; backward of <y, grad_y> + aux_weight * aux (the shard's share of the batch: the ranks'
    weighted aux losses add up to the single-process one)."""
    x = x.clone().requires_grad_()
    y, aux = layer(x)
    ((y.float() * grad_y.float()).sum() + aux_weight * aux).backward()
    return x, y, aux


def _check_case(case, group, rank, ep):
    ref, x_full, grad_y, sizes = _setup(case, ep)
    el, start = E // ep, sum(sizes[:rank])
    shard, experts = slice(start, start + sizes[rank]), slice(rank * el, (rank + 1) * el)
    xr, y_ref, aux_ref = _run(ref, x_full, grad_y, 1)
    layer = _ep_layer(ref, group, rank, ep, fp8_dispatch=False)
    assert layer.fused and not layer.fp8_dispatch
    share = sizes[rank] / sum(sizes)
    x, y, aux = _run(layer, x_full[shard], grad_y[shard], share)

    routing = case.split("-")[1]
    picked = ref.router.weight.detach().float()
    logits = x_full.float() @ picked.T
    if routing == "one_rank":
        assert bool((logits.softmax(-1).topk(K).indices >= (ep - 1) * el).all()), "one_rank: not what the case means"
    with torch.no_grad():  # the layer's own routing: its slot order
        owner = route(x_full, ref.router.weight, ref.top_k, score=ref.score, bias=ref.expert_bias).experts // el
    owner = owner[shard]
    whole = (owner == owner[:, :1]).all(1)
    exact = torch.tensor([_same_sum_tree(row) for row in owner.tolist()], dtype=torch.bool)
    if routing == "one_rank":
        assert bool(whole.all())
    elif routing in ("balanced", "skewed"):
        assert 0 < int(whole.sum()) < whole.numel(), "the case should hold whole and split tokens"
    if ref.top_k <= 2:
        assert bool(exact.all())
    else:  # top_k = 3: the case holds split tokens of both kinds
        assert 0 < int((exact & ~whole).sum()) and 0 < int((~exact).sum()), "k3: not what the case means"
    for name, got, want in (("y", y, y_ref[shard]), ("dx", x.grad, xr.grad[shard])):
        assert got.dtype == want.dtype == BF16
        assert torch.equal(got[exact], want[exact]), f"{name} differs on tokens summed in the same order"
        scale = want.float().abs().amax().item() if want.numel() else 0.0
        torch.testing.assert_close(got[~exact].float(), want[~exact].float(), rtol=2**-7, atol=2**-16 * scale)
    assert torch.equal(layer.w_gate_up.grad, ref.w_gate_up.grad[experts]), "dw_gate_up differs"
    assert torch.equal(layer.w_down.grad, ref.w_down.grad[experts]), "dw_down differs"
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad, group=group)
    scale = ref.router.weight.grad.abs().max().item()  # a sum of fp32 terms in another order: cancellation
    torch.testing.assert_close(router_grad, ref.router.weight.grad, rtol=1e-4, atol=1e-4 * scale)
    if routing != "empty_shard":  # the mean of the shard means is the batch mean for equal shards
        mean_aux = aux.detach().clone()
        dist.all_reduce(mean_aux, group=group)
        torch.testing.assert_close(mean_aux / ep, aux_ref.detach(), rtol=1e-6, atol=1e-7)
    if routing == "sigmoid":
        assert torch.equal(layer.last_expert_counts, ref.last_expert_counts), "global counts differ"

    # ep_partials="bf16": the partials (and the partial dx) rounded to bf16 before they travel back; the bytes
    # of both settings, per direction
    records, runs = {}, {}
    for partials in ("bf16", "fp32"):
        other = _ep_layer(ref, group, rank, ep, fp8_dispatch=False, ep_partials=partials)
        x_other = x_full[shard].clone().requires_grad_()
        with record_all_to_all() as fwd:
            y_other, aux_other = other(x_other)
        with record_all_to_all() as bwd:
            ((y_other.float() * grad_y[shard].float()).sum() + share * aux_other).backward()
        records[partials], runs[partials] = (fwd, bwd), (y_other, x_other.grad, other)
    y16, dx16, half = runs["bf16"]
    # a rank's partial dx of one slot is a bf16 GEMM row (its bf16 rounding is exact): dx is exact wherever
    # the sums associate alike and no rank holds some but not all of a token's slots (every token at top_k 2)
    slots = (owner[:, :, None] == torch.arange(ep)).sum(1)
    single = exact & (whole | (slots <= 1).all(1))
    for name, got, want, same in (("y", y16, y_ref[shard], whole), ("dx", dx16, xr.grad[shard], single)):
        assert torch.equal(got[same], want[same]), f"bf16 partials: {name} differs on tokens it rounds exactly"
        scale = want.float().abs().amax().item() if want.numel() else 0.0
        torch.testing.assert_close(got[~whole].float(), want[~whole].float(), rtol=2**-7, atol=2**-7 * scale)
    assert torch.equal(half.w_gate_up.grad, layer.w_gate_up.grad) and torch.equal(half.w_down.grad, layer.w_down.grad)
    assert torch.equal(runs["fp32"][0], y) and torch.equal(runs["fp32"][1], x.grad)  # the default: fp32
    (fwd16, bwd16), (fwd32, bwd32) = records["bf16"], records["fp32"]
    assert fwd32.dtypes == ["int64", "float32", "bfloat16", "float32"]  # ids, c, rows; the partials back
    assert fwd16.dtypes == ["int64", "float32", "bfloat16", "bfloat16"]
    assert sorted(bwd32.dtypes) == ["bfloat16", "float32", "float32"]  # dy; the partial dx and dc back
    assert sorted(bwd16.dtypes) == ["bfloat16", "bfloat16", "float32"]
    saved = fwd32.total_bytes - fwd16.total_bytes  # 2D bytes per pair row returned to another rank
    assert saved == bwd32.total_bytes - bwd16.total_bytes == fwd32.bytes_sent[-1] // 2

    if ref.precision == "fp8":  # FP8 dispatch against bf16 dispatch, same weights
        fp8_layer = _ep_layer(ref, group, rank, ep)
        assert fp8_layer.fp8_dispatch  # the default with precision="fp8"
        with record_all_to_all() as record:
            x8, y8, aux8 = _run(fp8_layer, x_full[shard], grad_y[shard], share)
        assert torch.equal(y8, y), "FP8 dispatch: y differs from bf16 dispatch"
        assert torch.equal(x8.grad, x.grad), "FP8 dispatch: dx differs"
        assert torch.equal(fp8_layer.w_down.grad, layer.w_down.grad), "FP8 dispatch: dw_down differs"
        assert torch.equal(fp8_layer.router.weight.grad, layer.router.weight.grad), "FP8 dispatch: router grad"
        assert aux8.item() == aux.item()
        # w_gate_up's gradient: its token tiles are quantized from x's FP8 codes (one e4m3 rounding of x
        # more: ~29 dB by itself for 3 mantissa bits), against the layer with bf16 GEMMs its fidelity drops
        # by less than 1.5 dB (~0.7 dB measured).
        bf16_ref = _layer("bf16", ref.score, ref.top_k, fused=True)
        bf16_ref.load_state_dict(ref.state_dict())
        _run(bf16_ref, x_full, grad_y, 1)
        exact = bf16_ref.w_gate_up.grad[experts].double()
        extra = sqnr_db(layer.w_gate_up.grad, fp8_layer.w_gate_up.grad)
        fidelity = (sqnr_db(exact, layer.w_gate_up.grad), sqnr_db(exact, fp8_layer.w_gate_up.grad))
        assert extra >= 24, f"FP8 dispatch: dw_gate_up at {extra:.1f} dB against bf16 dispatch"
        assert fidelity[1] >= fidelity[0] - 1.5, f"FP8 dispatch: dw_gate_up fidelity {fidelity} dB"
        assert "uint8" in record.dtypes and "float32" in record.dtypes
        with record_all_to_all() as bf16_record:
            _run(layer, x_full[shard], grad_y[shard], share)
        sent = torch.tensor([record.total_bytes, bf16_record.total_bytes])
        dist.all_reduce(sent, group=group)
        if sent[1] > 0:  # forward (x, ids, c, partials) and backward: FP8 saves on the x rows only
            assert sent[0] < sent[1], f"FP8 dispatch sent {sent.tolist()} bytes"


def _same_sum_tree(owners):
    """Whether the EP layer sums a token's k terms (slot j on rank ``owners[j]``) in an order that gives the
    single-process bits: each rank adds its slots in slot order, the source adds the ranks' partials in rank
    order, the single-process block adds the k slots in slot order; all in fp32 from +0 (adding +0 or a
    term routed elsewhere changes nothing). fp32 addition is commutative, not associative: the bits are the
    same when the two addition trees are, up to the order of each addition's operands."""

    def fold(terms):
        tree = terms[0]
        for term in terms[1:]:
            tree = frozenset((tree, term))
        return tree

    per_rank = [fold([j for j, o in enumerate(owners) if o == r]) for r in sorted(set(owners))]
    return fold(per_rank) == fold(list(range(len(owners))))


def _check_bad_configs(group, ep):
    with pytest.raises(ValueError, match="num_experts"):
        MoE(D, FF, 4 * ep + 1, K, ep_group=group)
    with pytest.raises(ValueError, match="fused"):
        MoE(D, FF, E, K, ep_group=group, fused=False)
    with pytest.raises(ValueError, match="fp8_dispatch"):
        MoE(D, FF, E, K, ep_group=group, precision="bf16", fp8_dispatch=True)
    with pytest.raises(ValueError, match="fp8_dispatch"):
        MoE(D, FF, E, K, fp8_dispatch=True)
    with pytest.raises(TypeError, match="ep_group"):
        MoE(D, FF, E, K, ep_group="ep")
    with pytest.raises(ValueError, match="ep_partials"):
        MoE(D, FF, E, K, ep_group=group, ep_partials="fp16")
    with pytest.raises(ValueError, match="ep_partials"):
        MoE(D, FF, E, K, ep_partials="bf16")
    with pytest.raises(ValueError, match="ep_rank"):
        shard_expert_state_dict(_layer("bf16").state_dict(), ep, ep)
    with pytest.raises(ValueError, match="not divisible"):
        shard_expert_state_dict({"w_down": torch.zeros(ep + 1, 1)}, ep, 0)


def _check_group_mismatch(group, rank, ep):
    """Ranks whose layers differ (FP8 dispatch, or bf16 partials, on rank 0 only) fail with a ValueError on
    every rank."""
    layer = _layer("fp8", ep_group=group, fp8_dispatch=rank == 0)
    with pytest.raises(ValueError, match="differs from this rank"):
        layer(torch.randn(4, D))
    layer = _layer("fp8", ep_group=group, ep_partials="bf16" if rank == 0 else "fp32")
    with pytest.raises(ValueError, match="differs from this rank"):
        layer(torch.randn(4, D))


def _check_state_dict(group, rank, ep):
    torch.manual_seed(0)
    ref = _layer("fp8", "sigmoid")
    layer = _layer("fp8", "sigmoid", ep_group=group)
    layer.load_state_dict(shard_expert_state_dict(ref.state_dict(), ep, rank))
    gathered = gather_expert_state_dict(layer.state_dict(), group)
    assert gathered.keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(gathered[key], value), key
    back = _layer("fp8", "sigmoid")
    back.load_state_dict(gathered)  # and into the single-process layer


def _check_ep_x_dp(rank, world):
    """4 ranks as EP 2 x DP 2: the groups, and the layer on an EP sub-group matches the single-process one."""
    ep_group, dp_group = expert_data_parallel_groups(2)
    assert dist.get_process_group_ranks(ep_group) == [rank // 2 * 2, rank // 2 * 2 + 1]
    assert dist.get_process_group_ranks(dp_group) == [rank % 2, rank % 2 + 2]
    with pytest.raises(ValueError, match="ep_size"):
        expert_data_parallel_groups(3)
    ref, x_full, grad_y, _ = _setup("bf16-balanced", 2)
    replica, ep_rank = rank // 2, dist.get_rank(ep_group)
    x_full, grad_y = x_full + replica, grad_y  # each replica its own batch
    xr, y_ref, _ = _run(ref, x_full, grad_y, 1)
    layer = _ep_layer(ref, ep_group, ep_rank, 2, fp8_dispatch=False)
    shard = slice(ep_rank * N, (ep_rank + 1) * N)
    x, y, _ = _run(layer, x_full[shard], grad_y[shard], 0.5)
    assert torch.equal(y, y_ref[shard]) and torch.equal(x.grad, xr.grad[shard])  # top_k = 2, fp32 partials
    el = E // 2
    assert torch.equal(layer.w_down.grad, ref.w_down.grad[ep_rank * el : (ep_rank + 1) * el])


def _worker(rank, ep, store_dir):
    # a timeout, so that a case failing on one rank only cannot hang the others in a collective
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=ep, timeout=timeout)
    torch.set_num_threads(1)
    group = dist.group.WORLD
    results = {}
    for case in [*CASES, *OTHER]:
        try:
            if case == "bad_configs":
                _check_bad_configs(group, ep)
            elif case == "group_mismatch":
                _check_group_mismatch(group, rank, ep)
            elif case == "state_dict":
                _check_state_dict(group, rank, ep)
            elif case == "ep_x_dp":
                if ep == 4:
                    _check_ep_x_dp(rank, ep)
            else:
                _check_case(case, group, rank, ep)
            results[case] = None
        except Exception:  # reported by the test of the case
            results[case] = traceback.format_exc()
        dist.barrier()
    torch.save(results, os.path.join(store_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


_RESULTS: dict[int, list[dict]] = {}


def _results(ep):
    if ep not in _RESULTS:
        with tempfile.TemporaryDirectory() as store_dir:
            mp.spawn(_worker, args=(ep, store_dir), nprocs=ep, join=True)
            _RESULTS[ep] = [torch.load(os.path.join(store_dir, f"rank{r}.pt")) for r in range(ep)]
    return _RESULTS[ep]


@pytest.mark.parametrize("case", [*CASES, *OTHER])
@pytest.mark.parametrize("ep", [2, 4])
def test_ep_matches_single_process(ep, case):
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(_results(ep)) if res[case] is not None]
    assert not failures, "\n".join(failures)


def test_ep_group_needs_initialized_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialized"):
        MoE(D, FF, E, K, ep_group=object())


def test_fused_experts_takes_prequantized_rows():
    """``fused_experts(x_fp8=...)`` (the FP8-dispatch hook): GEMM1's rows from the given codes give the forward
    of quantizing x itself, bit for bit; the weight gradient of w_gate_up comes from x's own token tiles."""
    from fp8moe.moe import fused_experts
    from fp8moe.quant.reference import quantize_rowwise

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, D, generator=gen).to(BF16)
    w1, w2 = torch.randn(3, 2 * FF, D, generator=gen) / 11, torch.randn(3, D, FF, generator=gen) / 11
    ids = torch.randint(-1, 3, (40, 2), generator=gen)
    c = torch.rand(40, 2, generator=gen)
    codes, scales = quantize_rowwise(x)
    outs = []
    for x_fp8 in (None, (codes, scales)):
        w = w1.clone().requires_grad_()
        xg = x.clone().requires_grad_()
        y = fused_experts(xg, w, w2, ids, c, backend="reference", x_fp8=x_fp8)
        y.float().square().sum().backward()
        outs.append((y, xg.grad, w.grad))
        with torch.no_grad():  # the inference path too
            assert torch.equal(fused_experts(x, w1, w2, ids, c, backend="reference", x_fp8=x_fp8), y)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="x_fp8"):
        fused_experts(x, w1, w2, ids, c, precision="bf16", x_fp8=(codes, scales))
    with pytest.raises(ValueError, match="x_fp8"):
        fused_experts(x, w1, w2, ids, c, backend="reference", x_fp8=(codes[1:], scales[1:]))
