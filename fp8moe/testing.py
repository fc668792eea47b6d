"""Helpers shared by the tests, the benchmarks and the experiments: error metrics, random routings and problems."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB, in float64.

    ``inf`` when the two are identical; NaN in either input gives NaN.
    """
    if reference.shape != test.shape:
        raise ValueError(f"test: expected shape {tuple(reference.shape)} (that of reference), got {tuple(test.shape)}")
    ref = reference.detach().double().cpu()
    noise = (ref - test.detach().double().cpu()).square().sum().item()
    signal = ref.square().sum().item()
    if math.isnan(noise) or math.isnan(signal):
        return math.nan
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)


def random_offsets(
    num_rows: int,
    num_groups: int,
    *,
    generator: torch.Generator | None = None,
    empty_groups: int = 0,
    tail_rows: int = 0,
    skew: float | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random cumulative end offsets (E,) int32 for a ragged routing of ``num_rows`` rows.

    ``empty_groups`` groups (chosen at random) get no rows, the last ``tail_rows`` rows belong to no group
    (``offsets[-1] == num_rows - tail_rows``), and ``skew`` (a fraction in (0, 1)) gives one random group
    that share of the routed rows (all of them when it is the only non-empty group).
    """
    if not 0 <= empty_groups < num_groups:
        raise ValueError(f"empty_groups: expected 0 <= empty_groups < num_groups = {num_groups}, got {empty_groups}")
    if not 0 <= tail_rows <= num_rows:
        raise ValueError(f"tail_rows: expected 0 <= tail_rows <= num_rows = {num_rows}, got {tail_rows}")
    routed = num_rows - tail_rows
    order = torch.randperm(num_groups, generator=generator)
    active = order[empty_groups:]
    weights = torch.rand(active.numel(), generator=generator, dtype=torch.float64) + 0.05
    sizes = torch.zeros(num_groups, dtype=torch.int64)
    if skew is not None:
        if not 0 < skew < 1:
            raise ValueError(f"skew: expected a fraction in (0, 1), got {skew}")
        heavy = int(round(skew * routed)) if active.numel() > 1 else routed
        sizes[active[0]] = heavy
        routed, active, weights = routed - heavy, active[1:], weights[1:]
    if active.numel():
        share = torch.floor(weights / weights.sum() * routed).long()
        share[0] += routed - share.sum()
        sizes[active] += share
    return torch.cumsum(sizes, 0).to(torch.int32).to(device)


def random_problem(
    seed: int,
    *,
    m: int = 2048,
    n: int = 256,
    k: int = 512,
    e: int = 8,
    routing: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fresh random ``x (M, K)``, ``w (E, N, K)`` (scaled by 1/sqrt(K)), ``offsets (E,)`` int32 and
    ``dy (M, N)`` in ``dtype`` on ``device``. ``routing``: :func:`random_offsets` options, or None for one
    row per group (the rest unrouted)."""
    gen = torch.Generator().manual_seed(seed)
    if routing is None:
        offsets = torch.arange(1, e + 1, dtype=torch.int32, device=device)
    else:
        offsets = random_offsets(m, e, generator=gen, device=device, **routing)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(e, n, k, generator=gen) / math.sqrt(k)).to(device, dtype)
    dy = torch.randn(m, n, generator=gen).to(device, dtype)
    return x, w, offsets, dy


def backend_fwd_bwd(
    backend: str,
    x: Tensor,
    quantized_weight: tuple[Tensor, Tensor, Tensor, Tensor],
    offsets: Tensor,
    dy: Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """y, dx, dw of one backend's methods (no autograd) on a given quantized weight (wq, sw, wq_t, sw_t),
    every result in ``out_dtype``."""
    from fp8moe.backends import load_backend
    from fp8moe.plan import plan_groups

    impl = load_backend(backend)
    wq, sw, wq_t, sw_t = quantized_weight
    plan = plan_groups(offsets, x.shape[0])
    y, xt, sxt = impl.forward(x, wq, sw, plan, out_dtype, token_tiles=True)
    dx, dw = impl.backward(dy, xt, sxt, wq_t, sw_t, plan, True, True, out_dtype, out_dtype)
    return y, dx, dw
