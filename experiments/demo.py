"""Demo: one FP8 blockwise grouped GEMM forward + backward beside its unquantized fp32 twin.

Prints the SQNR (dB) of y, dx and dw against the fp32 result. Runs on CPU (reference backend) or GPU.
    python experiments/demo.py [--rows 1024 --n 256 --k 512 --experts 8 --backend auto]
"""

from __future__ import annotations

import argparse

import torch

import fp8moe
from fp8moe.testing import random_offsets, sqnr_db


def unquantized(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The same grouped GEMM in the inputs' precision (torch._grouped_mm takes w as (E, K, N)).

    torch._grouped_mm leaves rows past offsets[-1] undefined; they are zeroed as fp8moe does.
    """
    routed = torch.arange(x.shape[0], device=x.device) < offsets[-1]
    y = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    return torch.where(routed.unsqueeze(1), y, torch.zeros((), dtype=y.dtype, device=y.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(args.seed)
    offsets = random_offsets(args.rows, args.experts, generator=gen, empty_groups=1, device=device)
    x = torch.randn(args.rows, args.k, generator=gen).to(device)
    w = (torch.randn(args.experts, args.n, args.k, generator=gen) / args.k**0.5).to(device)
    dy = torch.randn(args.rows, args.n, generator=gen).to(device)

    results = {}
    for name, fn in {
        "fp8": lambda a, b: fp8moe.grouped_mm(a, b, offsets, backend=args.backend, out_dtype=torch.float32),
        "fp32": lambda a, b: unquantized(a, b, offsets),
    }.items():
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xg, wg)
        y.backward(dy)
        results[name] = (y.detach(), xg.grad, wg.grad)

    info = fp8moe.backend_info(device)
    print(f"device {device}; auto backend: {info['auto']} ({info['reason']})")
    print(f"M={args.rows} N={args.n} K={args.k} E={args.experts}, offsets {offsets.tolist()}")
    print("| tensor | SQNR fp8 vs fp32 (dB) |\n|---|---|")
    for label, fp8, ref in zip(("y", "dx", "dw"), results["fp8"], results["fp32"]):
        print(f"| {label} | {sqnr_db(ref, fp8):.1f} |")


if __name__ == "__main__":
    main()
