"""Triton kernels of fp8moe: quantizers that write the grouped GEMMs' operand layouts (:mod:`.quantize`); the
fused MoE block's memory passes (:mod:`.moe`, imported on use)."""

from fp8moe.kernels.quantize import quantize_tokens, quantize_weight

__all__ = ["quantize_tokens", "quantize_weight"]
