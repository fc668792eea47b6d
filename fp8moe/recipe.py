"""The FP8 recipe's constants and its rule for tiny values: one small module every other one imports.

DeepSeek-V3 blockwise FP8: values are ``torch.float8_e4m3fn`` (largest finite 448), scales fp32
*dequantization multipliers*, one per tile (1x128 along a row, 128x1 along tokens, or 128x128).

For a tile ``t`` (fp32 after a lossless upcast of bf16/fp16/fp32 input):

1. **Tiny values read as zero**: ``v`` with ``|v| < MIN_NORMAL`` (2^-126, fp32's smallest normal number:
   every fp32 or bf16 subnormal) is replaced by +0 before anything else. Subnormals therefore never reach
   the arithmetic, so a flush-to-zero / denormals-are-zero floating-point mode (as XLA's CPU threads run)
   cannot change the result.
2. ``scale = amax(|t|) / 448`` in fp32 (IEEE round-to-nearest division).
3. **Zero tile**: a tile whose ``scale < MIN_NORMAL`` (every value zero after step 1, or ``amax`` below
   448 * 2^-126) has scale 0 and codes 0. Nothing is divided by a zero or subnormal scale, so a finite
   input never gives NaN.
4. Otherwise ``code = e4m3(clamp(v / scale, -448, 448))``, IEEE division, round-to-nearest-even
   conversion.

NaN or Inf in a tile makes its ``amax`` and so its scale non-finite (``NaN < x`` is false: the zero-tile
test never hides it), so the tile dequantizes to NaN and every output it feeds is NaN ("NaN in, NaN out").
The scale is never clamped upward (DeepGEMM's own tests clamp ``amax`` to 1e-4, which would erase small
gradients).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
MIN_NORMAL = 2.0**-126  # torch.finfo(torch.float32).tiny

__all__ = ["BLOCK", "FP8_DTYPE", "FP8_MAX", "MIN_NORMAL"]
