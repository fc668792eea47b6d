"""DeepGEMM backend: all three GEMMs on DeepGEMM's SM90 grouped FP8 kernels, fed by our Triton quantizers.

- forward: ``m_grouped_fp8_gemm_nt_contiguous`` on the 128-row-padded layout (per-row expert id, -1 on
  padding rows), fp32 scales, output bf16 in the padded layout, unpadded by one gather;
- dgrad: the same NT kernel with the transposed weight operand wq_t (E, K, N) (SM90 rejects FP8 operands
  that are not K-major, so the NN variant cannot be used);
- wgrad: ``k_grouped_fp8_gemm_nt_contiguous`` on the flat per-group token-tile operands, accumulating in
  place into a zeroed fp32 (E, N, K) buffer (``c`` is ``d``). It needs the padded group sizes as a host
  list: the one device-to-host read of the layer, issued at the start of the backward and waited for only
  after the quantization kernels and the dgrad GEMM are queued, so the GPU never idles on it.
  The quantizers and the order of the work are the Triton backend's (this class extends it).
  ``FP8MOE_DEEPGEMM_WGRAD=triton`` runs the Triton K-grouped GEMM of the Triton backend on the same
  operands instead (no host read, dw written once in its final dtype); ``deepgemm`` is the default.
The forward has no host synchronisation (CUDA-graph capturable).
"""

from __future__ import annotations

import os
import shutil

import deep_gemm
import torch
from torch import Tensor

from fp8moe.backends.base import cuda_capability_reason, into
from fp8moe.backends.triton import TritonBackend, WgradGemm
from fp8moe.layout import GroupLayout, gather_padded_output, padded_output
from fp8moe.validation import check_out

WGRAD_ENV_VAR = "FP8MOE_DEEPGEMM_WGRAD"
_WGRAD_KERNELS = ("deepgemm", "triton")


def _wgrad_kernel() -> str:
    """The wgrad GEMM to run: ``FP8MOE_DEEPGEMM_WGRAD`` (read at each backward), default "deepgemm"."""
    kernel = os.environ.get(WGRAD_ENV_VAR, "deepgemm")
    if kernel not in _WGRAD_KERNELS:
        raise ValueError(f"{WGRAD_ENV_VAR}: expected one of {_WGRAD_KERNELS}, got {kernel!r}")
    return kernel


def _cuda_toolkit_reason() -> str | None:
    """DeepGEMM compiles its kernels at first use with the CUDA toolkit's nvcc."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return None
    if home is None and shutil.which("nvcc"):
        return None
    return f"DeepGEMM's JIT needs the CUDA toolkit (nvcc) under CUDA_HOME, got CUDA_HOME={home!r}"


def m_grouped_gemm(
    a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, layout: GroupLayout, out_dtype: torch.dtype, out: Tensor | None
) -> Tensor:
    """a (Mp, K) e4m3 with sa (K/128, Mp), b (E, N, K) e4m3 with sb (E, N/128, K/128) -> (M, N) out_dtype
    (into ``out`` when given). DeepGEMM writes bf16; other dtypes take one conversion after the gather."""
    d = padded_output(layout, b.shape[1], torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        (a, sa.T),
        (b, sb),
        d[:-1],
        layout.row_expert,
        recipe_a=(1, 128),
        recipe_b=(128, 128),
        disable_ue8m0_cast=True,
    )
    if out_dtype != torch.bfloat16:
        return into("out", out, gather_padded_output(d, layout).to(out_dtype))
    if out is not None:
        check_out("out", out, (layout.num_rows, b.shape[1]), out_dtype, d.device)
    return gather_padded_output(d, layout, out)


def k_grouped_gemm(
    dyt: Tensor,
    sdyt: Tensor,
    xt: Tensor,
    sxt: Tensor,
    ks: list[int],
    layout: GroupLayout,
    out_dtype: torch.dtype,
    out: Tensor | None,
) -> Tensor:
    """dw (E, N, K) = per group dy_g^T x_g from the flat token-tile operands of :mod:`fp8moe.quant.triton`
    (``ks``: the padded group sizes on the host), accumulated in fp32 in place (into ``out`` itself when
    ``out_dtype`` is fp32; other dtypes take one conversion)."""
    n, k = sdyt.shape[1], sxt.shape[1]
    sum_k = sum(ks)
    blocks = sum_k // 128
    shape = (layout.num_groups, n, k)
    if out is not None and out_dtype == torch.float32:
        dw = check_out("dw_out", out, shape, out_dtype, dyt.device).zero_()
    else:
        dw = torch.zeros(shape, dtype=torch.float32, device=dyt.device)
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous(
        (dyt[: n * sum_k], sdyt[:blocks].T),
        (xt[: k * sum_k], sxt[:blocks].T),
        dw,
        ks,
        layout.padded_sizes,
        c=dw,
    )
    if out_dtype == torch.float32:
        return dw
    return into("dw_out", out, dw.to(out_dtype))


class DeepGEMMBackend(TritonBackend):
    name = "deepgemm"
    m_grouped_gemm = staticmethod(m_grouped_gemm)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        needs = "an SM90 GPU (H100/H200; the fp32-scale kernels are SM90-only)"
        return cuda_capability_reason(device, lambda major: major == 9, needs) or _cuda_toolkit_reason()

    def prepare_wgrad(self, layout: GroupLayout) -> WgradGemm:
        """Start the one host read (the padded group sizes) now; wait for it only at the wgrad launch."""
        if _wgrad_kernel() == "triton":
            return super().prepare_wgrad(layout)
        ks_host = layout.padded_sizes.to("cpu", non_blocking=True)  # into pinned memory, asynchronously
        ks_ready = torch.cuda.Event()
        ks_ready.record()

        def wgrad(dyt: Tensor, sdyt: Tensor, xt: Tensor, sxt: Tensor, dtype: torch.dtype, out: Tensor | None) -> Tensor:
            ks_ready.synchronize()
            return k_grouped_gemm(dyt, sdyt, xt, sxt, ks_host.tolist(), layout, dtype, out)

        return wgrad
