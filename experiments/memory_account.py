"""Peak memory of one fp8moe.grouped_mm fwd+bwd, accounted from shapes: which tensors are alive at each
moment of the forward and the backward, before (commit 70f4582) and after the backward's reordering.

Measured as bench_grouped_mm measures it: allocations during one call above what was allocated before it
(x, w, dy, the offsets, a cached quantized weight and a ``main_grad`` buffer exist before; the caller holds
y while its backward runs). No GPU needed: ``python experiments/memory_account.py [--e 8 --m 32768 --n 2048
--k 7168]``; experiments/check_launch.py prints these predictions beside the measured peaks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class Shape:
    e: int = 8
    m: int = 32768
    n: int = 2048
    k: int = 7168

    @property
    def mp(self) -> int:  # fp8moe.plan.padded_rows_bound
        return 128 * ((self.m + 127 * self.e) // 128)


def sizes(s: Shape, dgrad_runs: int = 3, wgrad_chunks: int = 2) -> dict[str, int]:
    """Bytes of every tensor of the op at shape ``s``."""
    e, m, n, k, mp = s.e, s.m, s.n, s.k, s.mp
    run = -(-mp // (dgrad_runs * 128)) * 128
    return {
        "y (M,N) bf16": m * n * 2,
        "plan (2E+2Mp+M) i32": (2 * e + 2 * mp + m) * 4,
        "wq+sw (E,N,K) e4m3": e * n * k + e * (n // 128) * (k // 128) * 4,
        "wq_t+sw_t (E,K,N) e4m3": e * n * k + e * (n // 128) * (k // 128) * 4,
        "xq+sx rows (Mp,K) e4m3": mp * k + (k // 128) * mp * 4,
        "xt+sxt token tiles (K*Mp) e4m3": k * mp + (mp // 128) * k * 4,
        "padded y (Mp+1,N) bf16": (mp + 1) * n * 2,
        "dyq+sdy rows (Mp,N) e4m3": mp * n + (n // 128) * mp * 4,
        "dyt+sdyt token tiles (N*Mp) e4m3": n * mp + (mp // 128) * n * 4,
        "padded dx (Mp+1,K) bf16": (mp + 1) * k * 2,
        f"dgrad run scratch ({run},K) bf16": run * k * 2,
        "dx (M,K) bf16": m * k * 2,
        "dw (E,N,K) bf16": e * n * k * 2,
        "fp32 dw scratch, E/4 experts": -(-e // 4) * n * k * 4,
        f"fp32 dw scratch, E/{wgrad_chunks} experts": -(-e // wgrad_chunks) * n * k * 4,
    }


def moments(s: Shape, backend: str = "deepgemm", cached: bool = False, main_grad: bool = False) -> dict:
    """{design: {moment: [tensor names alive]}} for the old and the new backward."""
    z = sizes(s)
    names = list(z)
    y, plan, wq, wqt, xq, xt, ypad, dyq, dyt, dxpad, run, dx, dw, c4, c2 = names
    deepgemm = backend == "deepgemm"
    weights = [] if cached else [wq, wqt]  # a cached weight is allocated before the call
    saved = [xt, plan] + ([] if cached else [wqt])
    dwt = [] if main_grad else [dw]
    forward = [plan, *weights, xq, xt] + ([ypad] if deepgemm else []) + [y]
    old = {
        "forward, unpadding y": forward,
        "backward, dgrad (unpadding dx)": [y, *saved, dyq, dyt] + ([dxpad] if deepgemm else []) + [dx],
        "backward, wgrad": [y, *saved, dyt, dx, *dwt] + ([c4] if deepgemm and not main_grad else []),
    }
    new = {
        "forward, unpadding y": forward,
        "backward, wgrad (first)": [y, *saved, dyq, dyt, *dwt] + ([c2] if deepgemm and not main_grad else []),
        "backward, dgrad (x tiles freed)": [y, plan, *([] if cached else [wqt]), dyq, *dwt, dx]
        + ([run] if deepgemm else []),
    }
    return {"before (70f4582)": old, "after": new}


def peak_mib(s: Shape, backend: str = "deepgemm", cached: bool = False, main_grad: bool = False) -> dict:
    z = sizes(s)
    return {
        design: max(sum(z[t] for t in alive) for alive in phases.values()) / MIB
        for design, phases in moments(s, backend, cached, main_grad).items()
    }


def report(s: Shape) -> str:
    z = sizes(s)
    bf16 = (s.m * s.k * 2 + s.m * s.n * 2 + s.e * s.n * s.k * 2) / MIB  # for orientation: bf16 dx + y + dw
    lines = [f"# Peak memory account, E={s.e} M={s.m} N={s.n} K={s.k} (Mp={s.mp}), MiB", ""]
    lines += ["| tensor | MiB |", "|---|---|"] + [f"| {name} | {b / MIB:.1f} |" for name, b in z.items()] + [""]
    for backend in ("deepgemm", "triton"):
        for cached, main_grad in ((False, False), (True, False), (True, True)):
            label = f"{backend}, {'cached w' if cached else 'fresh w'}{' + main_grad' if main_grad else ''}"
            lines += [f"## {label}", "", "| design | moment | MiB | alive |", "|---|---|---|---|"]
            for design, phases in moments(s, backend, cached, main_grad).items():
                for moment, alive in phases.items():
                    total = sum(z[t] for t in alive) / MIB
                    lines.append(f"| {design} | {moment} | {total:.0f} | {' + '.join(alive)} |")
            peaks = peak_mib(s, backend, cached, main_grad)
            lines += ["", "peak: " + ", ".join(f"{d} {p:.0f}" for d, p in peaks.items()), ""]
    lines.append(f"(bf16 torch._grouped_mm measured 800 MiB at the seed shape; 1.5x = 1200; dx+y+dw bf16 = {bf16:.0f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("e", 8), ("m", 32768), ("n", 2048), ("k", 7168)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    print(report(Shape(args.e, args.m, args.n, args.k)))


if __name__ == "__main__":
    main()
