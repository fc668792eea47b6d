"""fp8moe: FP8 blockwise-scaled (DeepSeek-V3 recipe) Mixture-of-Experts grouped GEMMs for training.

Data flow: routing -> :func:`plan_groups` (once per routing) -> quantization kernels -> GEMM providers
composed into a backend (:mod:`fp8moe.backends`) -> :func:`grouped_mm` (autograd) -> :mod:`fp8moe.moe`.
"""

from fp8moe.autograd import grouped_mm
from fp8moe.backends import BACKEND_NAMES, WGRAD_NAMES, backend_info
from fp8moe.plan import GroupLayout, padded_rows_bound, plan_groups
from fp8moe.quant import (
    dequantize_blockwise,
    dequantize_colwise,
    dequantize_rowwise,
    quantize_blockwise,
    quantize_colwise,
    quantize_rowwise,
)
from fp8moe.weight_cache import clear_weight_cache

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "WGRAD_NAMES",
    "GroupLayout",
    "backend_info",
    "clear_weight_cache",
    "dequantize_blockwise",
    "dequantize_colwise",
    "dequantize_rowwise",
    "grouped_mm",
    "padded_rows_bound",
    "plan_groups",
    "quantize_blockwise",
    "quantize_colwise",
    "quantize_rowwise",
]
