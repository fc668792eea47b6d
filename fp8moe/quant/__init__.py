"""FP8 quantization: the recipe in plain torch (:mod:`.reference`) and layout-writing GPU kernels."""

from fp8moe.quant.reference import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_blockwise,
    dequantize_colwise,
    dequantize_rowwise,
    quantize_blockwise,
    quantize_colwise,
    quantize_rowwise,
)

__all__ = [
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "dequantize_blockwise",
    "dequantize_colwise",
    "dequantize_rowwise",
    "quantize_blockwise",
    "quantize_colwise",
    "quantize_rowwise",
]
