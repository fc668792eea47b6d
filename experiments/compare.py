"""Cross-implementation numerical comparison of one grouped GEMM forward + backward (y, dx, dw).

For one shape and routing, runs ``y[rows of e] = x[rows of e] @ w[e].T`` and its gradients through:
- ``float64 recipe``: the FP8 recipe in float64/numpy (:func:`fp8moe.testing.grouped_mm_fwd_bwd`, a model
  that shares no code with ``fp8moe.quant``): e4m3 values times their scales, multiplied in float64, per
  expert -- the reference every row is compared against;
- ``float64 exact``: the unquantized product in float64 (the same model with ``quantized=False``);
- ``torch bf16``: ``torch._grouped_mm`` on bf16 operands;
- ``fp8moe <backend>``: ``fp8moe.grouped_mm`` with every backend that can run here;
- ``jax bridge <backend>``: ``jax_bridge.grouped_mm`` with the same backends, and ``jax ragged_dot bf16``
  (when JAX and the bridge import).

Prints SQNR (dB) and max relative error (``max|test - ref| / max|ref|``) of each against the float64
recipe, the pairwise SQNR of all of them, and checks the pairs that must be bit-identical (the JAX
bridge runs the same torch backend as ``fp8moe``): a mismatch is flagged and the exit status is 1.
CPU by default, the GPU when present. Routings are the presets of :func:`fp8moe.testing.routing_offsets`.
Bad arguments end with one ``compare.py: error: ...`` line and exit status 2.

    python experiments/compare.py [--rows 2048 --n 512 --k 768 --experts 8 --routing ragged --device auto]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

import fp8moe
from fp8moe.testing import ROUTING_PRESETS, check_size_flags, grouped_mm_fwd_bwd, routing_offsets, sqnr_db

TENSORS = ("y", "dx", "dw")
REFERENCE = "float64 recipe"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

Grads = tuple[Tensor, Tensor, Tensor]  # y (M, N), dx (M, K), dw (E, N, K), float64 on the CPU


@dataclass
class Problem:
    """x (M, K), w (E, N, K), dy (M, N) on ``device``; offsets (E,) int32 cumulative group ends."""

    x: Tensor
    w: Tensor
    dy: Tensor
    offsets: Tensor

    @property
    def routed(self) -> Tensor:
        """(M, 1) bool, True for rows that belong to a group (before offsets[-1])."""
        return (torch.arange(self.x.shape[0], device=self.x.device) < self.offsets[-1]).unsqueeze(1)


@dataclass
class Report:
    results: dict[str, Grads]
    mismatches: list[str] = field(default_factory=list)


def _to64(*tensors: Tensor) -> Grads:
    return tuple(t.detach().double().cpu() for t in tensors)


def float64_grouped(p: Problem, quantized: bool) -> Grads:
    """y, dx, dw per expert in float64 (fp8moe.testing's model), through the FP8 recipe or exactly."""
    x, w, dy = (t.detach().double().cpu().numpy() for t in (p.x, p.w, p.dy))
    grads = grouped_mm_fwd_bwd(x, w, p.offsets.cpu().numpy(), dy, quantized=quantized)
    return tuple(torch.from_numpy(g) for g in grads)


def torch_autograd(fn: Callable[[Tensor, Tensor], Tensor], p: Problem, cast: torch.dtype | None = None) -> Grads:
    """y = fn(x, w) and the gradients of <y, dy>, in the inputs' dtypes (or ``cast``)."""
    x = p.x.detach().to(cast or p.x.dtype).requires_grad_()
    w = p.w.detach().to(cast or p.w.dtype).requires_grad_()
    y = fn(x, w)
    y.backward(p.dy.to(y.dtype))
    return _to64(y, x.grad, w.grad)


def masked(grads: Grads, p: Problem) -> Grads:
    """Zero y and dx on rows past offsets[-1] (left undefined by torch._grouped_mm and ragged_dot)."""
    routed = p.routed.cpu()
    y, dx, dw = grads
    return torch.where(routed, y, 0.0), torch.where(routed, dx, 0.0), dw


def jax_implementations(p: Problem, backends: list[str]) -> dict[str, Callable[[], Grads]]:
    """The JAX bridge per backend and bf16 ``jax.lax.ragged_dot``; empty when JAX or the bridge is missing."""
    try:
        import jax
        import jax.numpy as jnp

        import jax_bridge
    except ImportError as exc:
        print(f"JAX rows skipped: {exc}")
        return {}

    def to_jax(t: Tensor) -> jax.Array:
        return jnp.asarray(t.detach().float().cpu().numpy()).astype(
            jnp.bfloat16 if t.dtype == torch.bfloat16 else jnp.float32
        )

    x, w, dy, offsets = to_jax(p.x), to_jax(p.w), to_jax(p.dy), jnp.asarray(p.offsets.cpu().numpy())

    def run(fn: Callable) -> Grads:
        y, vjp = jax.vjp(fn, x, w)
        return _to64(*(torch.from_numpy(np.array(t.astype(jnp.float32))) for t in (y, *vjp(dy.astype(y.dtype)))))

    impls = {}
    if hasattr(jax_bridge, "grouped_mm"):
        for name in backends:
            impls[f"jax bridge {name}"] = lambda name=name: run(
                lambda a, b: jax_bridge.grouped_mm(a, b, offsets, backend=name)
            )
    else:
        print("JAX bridge rows skipped: jax_bridge.grouped_mm does not exist yet")
    sizes = jnp.diff(offsets, prepend=0)
    impls["jax ragged_dot bf16"] = lambda: masked(
        run(
            lambda a, b: jax.lax.ragged_dot(
                a.astype(jnp.bfloat16),
                jnp.swapaxes(b.astype(jnp.bfloat16), 1, 2),
                sizes,
                preferred_element_type=jnp.float32,
            ).astype(jnp.bfloat16)
        ),
        p,
    )
    return impls


def make_problem(args: argparse.Namespace, device: torch.device) -> Problem:
    gen = torch.Generator().manual_seed(args.seed)
    offsets = routing_offsets(args.routing, args.rows, args.experts, seed=args.seed)
    x = torch.randn(args.rows, args.k, generator=gen).to(DTYPES[args.dtype])
    w = (torch.randn(args.experts, args.n, args.k, generator=gen) / math.sqrt(args.k)).to(DTYPES[args.w_dtype])
    dy = torch.randn(args.rows, args.n, generator=gen).to(DTYPES[args.dtype])
    return Problem(x.to(device), w.to(device), dy.to(device), offsets.to(device))


def max_rel_err(ref: Tensor, test: Tensor) -> float:
    scale = ref.abs().max().item()
    return (test - ref).abs().max().item() / scale if scale else math.nan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048, help="M, routed token rows")
    parser.add_argument("--n", type=int, default=512, help="N, output features (multiple of 128)")
    parser.add_argument("--k", type=int, default=768, help="K, input features (multiple of 128)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--routing", choices=ROUTING_PRESETS, default="ragged")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="dtype of x and dy")
    parser.add_argument("--w-dtype", choices=tuple(DTYPES), default="fp32", help="dtype of w (master weights)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_size_flags(parser, args, counts=("rows", "experts"))
    if args.seed < 0:
        parser.error(f"--seed: expected >= 0, got {args.seed}")
    try:
        routing_offsets(args.routing, args.rows, args.experts, seed=args.seed)
    except ValueError as exc:
        parser.error(f"--routing {args.routing}: {exc}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return args


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    p = make_problem(args, device)
    info = fp8moe.backend_info(device)
    backends = [name for name, reason in info["backends"].items() if reason is None]

    impls: dict[str, Callable[[], Grads]] = {
        REFERENCE: lambda: float64_grouped(p, quantized=True),
        "float64 exact": lambda: float64_grouped(p, quantized=False),
        "torch bf16": lambda: masked(
            torch_autograd(
                lambda x, w: torch._grouped_mm(x, w.transpose(1, 2), offs=p.offsets), p, cast=torch.bfloat16
            ),
            p,
        ),
    }
    for name in backends:
        impls[f"fp8moe {name}"] = lambda name=name: torch_autograd(
            lambda x, w: fp8moe.grouped_mm(x, w, p.offsets, backend=name), p
        )
    impls.update(jax_implementations(p, backends))
    report = Report({name: fn() for name, fn in impls.items()})

    print(
        f"device {device}; fp8moe backends here: {', '.join(backends)} (unavailable: "
        f"{', '.join(f'{n}: {r}' for n, r in info['backends'].items() if r) or 'none'})"
    )
    print(
        f"M={args.rows} N={args.n} K={args.k} E={args.experts}, x/dy {args.dtype}, w {args.w_dtype}, "
        f"routing {args.routing}: offsets {p.offsets.tolist()}\n"
    )
    ref = report.results[REFERENCE]
    print(f"against the {REFERENCE} (SQNR dB / max relative error):")
    print("| implementation | " + " | ".join(f"{t} SQNR | {t} max rel" for t in TENSORS) + " |")
    print("|---|" + "---|---|" * len(TENSORS))
    for name, grads in report.results.items():
        cells = [f"{sqnr_db(r, g):.1f} | {max_rel_err(r, g):.2e}" for r, g in zip(ref, grads)]
        print(f"| {name} | " + " | ".join(cells) + " |")

    names = list(report.results)
    for i, tensor in enumerate(TENSORS):
        print(f"\npairwise SQNR (dB) of {tensor} (row as reference, column as test):")
        print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for a in names:
            cells = [f"{sqnr_db(report.results[a][i], report.results[b][i]):.1f}" if a != b else "-" for b in names]
            print(f"| {a} | " + " | ".join(cells) + " |")

    print("\nbit-identical pairs (the JAX bridge runs fp8moe's own backend):")
    for name in backends:
        a, b = f"fp8moe {name}", f"jax bridge {name}"
        if b not in report.results:
            continue
        for tensor, ta, tb in zip(TENSORS, report.results[a], report.results[b]):
            same = torch.equal(ta, tb)
            print(f"  {a} vs {b}: {tensor} {'identical' if same else 'DIFFERENT'}")
            if not same:
                report.mismatches.append(f"{a} vs {b}: {tensor}")
    if report.mismatches:
        print(f"MISMATCH: {len(report.mismatches)} pair(s) should be bit-identical but are not: {report.mismatches}")
    return report


if __name__ == "__main__":
    sys.exit(1 if main().mismatches else 0)
