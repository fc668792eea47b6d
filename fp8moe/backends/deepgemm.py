"""DeepGEMM providers: DeepGEMM's SM90 grouped FP8 kernels (fed by the Triton quantizer).

- M-grouped (forward, dgrad): ``m_grouped_fp8_gemm_nt_contiguous`` on the 128-row-padded layout (the
  plan's ``row_expert``, -1 on padding rows), fp32 scales, output bf16 in the padded layout, unpadded by one
  gather (rows past ``offsets[-1]`` read an extra zero row), or returned padded (``padded=True``). dgrad
  runs the same NT kernel on the transposed weight operand (SM90 rejects FP8 operands that are not K-major,
  so the NN variant cannot). With ``low_memory`` (the backward's dgrad, where the padded (Mp, K) result
  beside the compact dx was the peak of fwd+bwd) the padded result is produced in ``_LOW_MEMORY_RUNS`` runs
  of rows through one scratch of a run's size, each run written to its unpadded rows by a Triton kernel
  before the next: the contiguous kernel takes any run of whole 128-row blocks with its slice of
  ``row_expert`` (its scheduler reads each block's expert from the layout it is given; DeepGEMM copies the
  run's strided slice of the scale operand into its TMA-aligned layout, a few KB).
- K-grouped (wgrad): ``k_grouped_fp8_gemm_nt_contiguous`` on the flat per-group token tiles, accumulating
  in place into an fp32 (E, N, K) buffer (``c`` is ``d``): a zeroed one, or the caller's fp32
  gradient-accumulation buffer with no zeroing. It needs the padded group sizes as a host list: the one
  device-to-host read of the layer, issued when the backward starts and waited for only at the wgrad
  launch, after the quantization and the dgrad GEMM are queued.
The forward has no host synchronisation (CUDA-graph capturable); a backward with a weight gradient under
capture raises a RuntimeError saying so (tests/test_moe_cuda_graph.py).
"""

from __future__ import annotations

import functools
import os
import shutil

import deep_gemm
import torch
from torch import Tensor

from fp8moe.backends.base import WgradGemm, cuda_capability_reason, into
from fp8moe.kernels.gemm import unpad_rows, zero_unrouted_rows
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
    low_memory: bool = False,
) -> Tensor:
    """a (Mp, K) e4m3 with sa (K/128, Mp), b (E, N, K) e4m3 with sb (E, N/128, K/128) -> (M, N) out_dtype
    (into ``out`` when given). DeepGEMM writes bf16; other dtypes take one conversion after the gather.
    ``padded=True``: DeepGEMM's own padded (Mp, N) result, no gather (rows of all-padding blocks unwritten).
    ``low_memory=True``: a padded result larger than ``_LOW_MEMORY_MIN_BYTES`` is made in runs of rows
    through one scratch (module docstring); the same values."""
    n = b.shape[1]
    runs = _LOW_MEMORY_RUNS if low_memory and not padded else 1
    if runs > 1 and plan.num_padded_rows * n * 2 > _LOW_MEMORY_MIN_BYTES:
        return _m_grouped_in_runs(a, sa, b, sb, plan, out_dtype, out, runs)
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


# The dgrad's padded bf16 result (Mp, K) is made in this many runs of rows when it is larger than
# _LOW_MEMORY_MIN_BYTES: at the seed shape (E=8, M=32768, N=2048, K=7168) one run's scratch is 154 MB instead
# of the whole 482 MB beside dx (see Backend.backward for the whole account); each run is one more DeepGEMM
# launch (~70 us of CPU), so smaller results keep one.
_LOW_MEMORY_RUNS = 3
_LOW_MEMORY_MIN_BYTES = 64 << 20


def _m_grouped_in_runs(
    a: Tensor,
    sa: Tensor,
    b: Tensor,
    sb: Tensor,
    plan: GroupLayout,
    out_dtype: torch.dtype,
    out: Tensor | None,
    runs: int,
) -> Tensor:
    """deepgemm_m_grouped's unpadded result, the padded rows made ``runs`` runs of whole 128-row blocks at a
    time in one bf16 scratch and written to their rows of y (any dtype) by a Triton kernel."""
    rows, n = plan.num_padded_rows, b.shape[1]
    shape = (plan.num_rows, n)
    y = (
        torch.empty(shape, dtype=out_dtype, device=a.device)
        if out is None
        else check_out("out", out, shape, out_dtype, a.device)
    )
    step = -(-rows // (runs * 128)) * 128
    scratch = torch.empty(min(step, rows), n, dtype=torch.bfloat16, device=a.device)
    for first in range(0, rows, step):
        last = min(rows, first + step)
        part = scratch[: last - first]
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
            (a[first:last], sa.T[first:last]),
            (b, sb),
            part,
            plan.row_expert[first:last],
            recipe_a=(1, 128),
            recipe_b=(128, 128),
            disable_ue8m0_cast=True,
        )
        unpad_rows(part, plan, first, y)
    zero_unrouted_rows(y, plan)
    return y


# A bf16 dw's fp32 accumulator is computed in this many runs of experts through one scratch: at the seed
# shape two (a 235 MB scratch) keep the wgrad's moment below the dgrad's (Backend.backward runs the wgrad
# first); each run is one more DeepGEMM launch.
_WGRAD_CHUNKS = 2


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
        """Start the host read if the forward did not; wait for it only at the wgrad launch. Not in a CUDA
        graph capture: a graph cannot hold the read, and the group sizes it gives would be frozen in it."""
        if plan.data.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "backend='deepgemm': the weight gradient (DeepGEMM's K-grouped GEMM) takes the padded group sizes "
                "as a host list, the backward's one device-to-host read, which a CUDA graph cannot hold (a graph "
                "would freeze the routing); capture the forward only, or use backend='triton' (fwd+bwd capturable)"
            )
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
