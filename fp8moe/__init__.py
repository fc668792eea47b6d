"""fp8moe: FP8 blockwise-scaled (DeepSeek-V3 recipe) Mixture-of-Experts grouped GEMMs for training."""

from fp8moe.autograd import grouped_mm
from fp8moe.backends import BACKEND_NAMES, backend_info
from fp8moe.layout import GroupLayout, padded_rows_bound, plan_groups
from fp8moe.quant import (
    dequantize_blockwise,
    dequantize_colwise,
    dequantize_rowwise,
    quantize_blockwise,
    quantize_colwise,
    quantize_rowwise,
)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "GroupLayout",
    "backend_info",
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
