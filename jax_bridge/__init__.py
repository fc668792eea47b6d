"""JAX adapter for fp8moe: the blockwise-FP8 grouped GEMM as a differentiable JAX function, zero copy.

- :func:`grouped_mm`: ``jax.custom_vjp`` whose forward and backward run fp8moe's torch backends inside
  ``jax.experimental.buffer_callback`` (reference on CPU, Triton or DeepGEMM on GPU).
- :func:`grouped_mm_bf16`: ``torch._grouped_mm`` in bf16 through the same bridge (the bf16 baseline).
- :func:`fused_experts`: the whole routed SwiGLU expert block (dispatch, both GEMMs, SwiGLU, combine) as one
  ``jax.custom_vjp`` with one callback forward and one backward, FP8 or bf16 (:mod:`jax_bridge._fused`);
  :func:`quantize_weight` quantizes a weight once for several of its calls (``quantized_weights=``);
  :func:`quantize_rows` quantizes token rows 1x128 (its ``x_fp8=``: FP8 dispatch), :func:`dequantize_rows`
  decodes them.
- :func:`init_moe_params`, :func:`moe_layer`, :func:`route`: a top-k MoE SwiGLU layer built on it
  (:mod:`jax_bridge.moe`).

On a GPU set ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (or ``XLA_PYTHON_CLIENT_MEM_FRACTION``) before
importing jax, so that torch's allocator finds memory beside XLA's.
"""

from jax_bridge._fused import QuantizedWeight, dequantize_rows, fused_experts, quantize_rows, quantize_weight
from jax_bridge._grouped_mm import INPUT_DTYPES, OUTPUT_DTYPES, grouped_mm, grouped_mm_bf16
from jax_bridge.moe import PRECISIONS, Routing, init_moe_params, moe_layer, route

__all__ = [
    "INPUT_DTYPES",
    "OUTPUT_DTYPES",
    "PRECISIONS",
    "QuantizedWeight",
    "Routing",
    "dequantize_rows",
    "fused_experts",
    "grouped_mm",
    "grouped_mm_bf16",
    "init_moe_params",
    "moe_layer",
    "quantize_rows",
    "quantize_weight",
    "route",
]
