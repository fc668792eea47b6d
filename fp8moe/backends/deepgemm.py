"""DeepGEMM providers: DeepGEMM's SM90 grouped FP8 kernels (fed by the Triton quantizer).

- M-grouped (forward, dgrad): ``m_grouped_fp8_gemm_nt_contiguous`` on the 128-row-padded layout (the
  plan's ``row_expert``, -1 on padding rows), fp32 scales, output bf16 in the padded layout, unpadded by one
  gather (rows past ``offsets[-1]`` read an extra zero row), or returned padded (``padded=True``). dgrad
  runs the same NT kernel on the transposed weight operand (SM90 rejects FP8 operands that are not K-major,
  so the NN variant cannot).
- K-grouped (wgrad): ``k_grouped_fp8_gemm_nt_contiguous`` on the flat per-group token tiles, accumulating
  in place into an fp32 (E, N, K) buffer (``c`` is ``d``): a zeroed one, or the caller's fp32
  gradient-accumulation buffer with no zeroing. It needs the padded group sizes as a host list: the one
  device-to-host read of the layer, issued when the backward starts and waited for only at the wgrad
  launch, after the quantization and the dgrad GEMM are queued.
The forward has no host synchronisation (CUDA-graph capturable).
"""

from __future__ import annotations

import functools
import os
import shutil

import deep_gemm
import torch
from torch import Tensor

from fp8moe.backends.base import WgradGemm, cuda_capability_reason, into
from fp8moe.plan import GroupLayout
from fp8moe.validation import check_out


@functools.cache
def _cuda_toolkit_reason() -> str | None:
    """DeepGEMM compiles its kernels at first use with the CUDA toolkit's nvcc (probed once)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return None
    if home is None and shutil.which("nvcc"):
        return None
    return f"DeepGEMM's JIT needs the CUDA toolkit (nvcc) under CUDA_HOME, got CUDA_HOME={home!r}"


def unavailable_reason(device: torch.device) -> str | None:
    needs = "an SM90 GPU (H100/H200; the fp32-scale kernels are SM90-only)"
    return cuda_capability_reason(device, lambda major: major == 9, needs) or _cuda_toolkit_reason()


def deepgemm_m_grouped(
    a: Tensor,
    sa: Tensor,
    b: Tensor,
    sb: Tensor,
    plan: GroupLayout,
    out_dtype: torch.dtype,
    out: Tensor | None,
    padded: bool = False,
) -> Tensor:
    """a (Mp, K) e4m3 with sa (K/128, Mp), b (E, N, K) e4m3 with sb (E, N/128, K/128) -> (M, N) out_dtype
    (into ``out`` when given). DeepGEMM writes bf16; other dtypes take one conversion after the gather.
    ``padded=True``: DeepGEMM's own padded (Mp, N) result, no gather (rows of all-padding blocks unwritten)."""
    n = b.shape[1]
    if padded:
        shape = (plan.num_padded_rows, n)
        if out is not None and out_dtype == torch.bfloat16:
            d = check_out("out", out, shape, out_dtype, a.device)
        else:
            d = torch.empty(shape, dtype=torch.bfloat16, device=a.device)
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
            (a, sa.T), (b, sb), d, plan.row_expert, recipe_a=(1, 128), recipe_b=(128, 128), disable_ue8m0_cast=True
        )
        return d if d.dtype == out_dtype else into("out", out, d.to(out_dtype))
    padded = torch.empty(plan.num_padded_rows + 1, n, dtype=torch.bfloat16, device=a.device)
    padded[-1].zero_()
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        (a, sa.T),
        (b, sb),
        padded[:-1],
        plan.row_expert,
        recipe_a=(1, 128),
        recipe_b=(128, 128),
        disable_ue8m0_cast=True,
    )
    if out_dtype != torch.bfloat16:
        return into("out", out, padded.index_select(0, plan.row_to_padded).to(out_dtype))
    if out is not None:
        check_out("out", out, (plan.num_rows, n), out_dtype, a.device)
        return torch.index_select(padded, 0, plan.row_to_padded, out=out)
    return padded.index_select(0, plan.row_to_padded)


_WGRAD_CHUNKS = 4  # a bf16 dw's fp32 accumulator is computed in this many runs of experts


def _k_grouped(
    a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, d: Tensor, ks: list[int], ks_tensor: Tensor, first_token: int
) -> None:
    """d[g] += a_g @ b_g^T for the run of groups whose padded token counts are ``ks``, starting at padded
    token ``first_token`` of the flat token-tile operands (a run of groups is contiguous in them)."""
    n, k, total = sa.shape[1], sb.shape[1], sum(ks)
    if total == 0:
        return  # no tokens: nothing to add (DeepGEMM needs none of this run's operands)
    blocks = slice(first_token // 128, (first_token + total) // 128)
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous(
        (a[n * first_token : n * (first_token + total)], sa[blocks].T),
        (b[k * first_token : k * (first_token + total)], sb[blocks].T),
        d,
        ks,
        ks_tensor,
        c=d,
    )


class DeepGEMMKGrouped:
    def prefetch(self, plan: GroupLayout) -> None:
        """Called by the forward when a weight gradient will follow: start the one host read (the padded
        group sizes) there, so that it is long done when the backward needs it (not in graph capture)."""
        if not (plan.data.is_cuda and torch.cuda.is_current_stream_capturing()):
            plan.padded_sizes_on_host()

    def prepare(self, plan: GroupLayout) -> WgradGemm:
        """Start the host read if the forward did not; wait for it only at the wgrad launch."""
        ks_host, ks_ready = plan.padded_sizes_on_host()

        def wgrad(
            a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, out_dtype: torch.dtype, out: Tensor | None, accumulate: bool
        ) -> Tensor:
            n, k = sa.shape[1], sb.shape[1]
            shape = (plan.num_groups, n, k)
            if accumulate:
                if out is None:
                    raise ValueError("out: accumulate=True needs the buffer to add into")
                d = check_out("main_grad", out, shape, torch.float32, a.device)
            elif out_dtype == torch.float32:
                d = torch.empty(shape, dtype=torch.float32, device=a.device) if out is None else out
                d = check_out("dw_out", d, shape, out_dtype, a.device).zero_()
            else:  # bf16/fp16 dw: fp32 results for a few experts at a time, each chunk cast into dw
                d = torch.empty(shape, dtype=out_dtype, device=a.device) if out is None else out
                d = check_out("dw_out", d, shape, out_dtype, a.device)
            if ks_ready is not None:
                ks_ready.synchronize()
            ks = ks_host.tolist()
            if accumulate or out_dtype == torch.float32:
                _k_grouped(a, sa, b, sb, d, ks, plan.padded_sizes, 0)
                return d
            # The fp32 accumulator of a whole bf16 dw would be twice dw's bytes at the peak of the backward.
            chunk = -(-plan.num_groups // _WGRAD_CHUNKS)
            scratch = torch.empty((min(chunk, plan.num_groups), n, k), dtype=torch.float32, device=a.device)
            first_token = 0
            for g0 in range(0, plan.num_groups, chunk):
                g1 = min(plan.num_groups, g0 + chunk)
                part = scratch[: g1 - g0].zero_()
                _k_grouped(a, sa, b, sb, part, ks[g0:g1], plan.padded_sizes[g0:g1], first_token)
                d[g0:g1].copy_(part)
                first_token += sum(ks[g0:g1])
            return d

        return wgrad
