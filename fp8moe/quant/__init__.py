"""FP8 quantization: the recipe in plain torch (:mod:`.reference`); the layout-writing GPU kernels are
:mod:`fp8moe.kernels.quantize`."""

from fp8moe.quant.reference import (
    dequantize_blockwise,
    dequantize_colwise,
    dequantize_rowwise,
    quantize_blockwise,
    quantize_colwise,
    quantize_rowwise,
)
from fp8moe.recipe import BLOCK, FP8_DTYPE, FP8_MAX, MIN_NORMAL

__all__ = [
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "MIN_NORMAL",
    "dequantize_blockwise",
    "dequantize_colwise",
    "dequantize_rowwise",
    "quantize_blockwise",
    "quantize_colwise",
    "quantize_rowwise",
]
