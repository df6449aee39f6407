"""The spec of w4a8_mm in plain PyTorch: int4_mm of the activations quantized to int8 per block of 32 k.

Per row of x and block b of 32 consecutive k (the last one shorter when K is not a multiple of 32), in fp32:
    d_b  = max_{k in b} |x_k| / 127
    xq_k = round-half-to-even(x_k / d_b), clamped to [-127, 127]      (0 where d_b is 0 or not finite)
    xhat_k = d_b * xq_k                                                (NaN for a block holding a NaN or an inf)
and out = xhat @ dequant(W) [+ bias], as int4_mm computes it (fp32 sums, the bias added in fp32, one rounding to x's
dtype). llama.cpp's Q8_0 activations, with round-half-even (its roundf rounds half away from zero) and a division
(not a multiplication by 1/d, which overflows for tiny d).

The error against int4_mm of x itself is the activations' rounding: |xhat_k - x_k| <= d_b / 2 (half a step of the
block's grid), so |out - int4_mm(x)| <= sum_b d_b / 2 * sum_{k in b} |w_kn| per output. For Gaussian activations
the rounding errors are uniform with RMS d_b / sqrt(12), d_b ~ 2.3 sigma / 127: a relative RMS error of the output of
about 0.5% (measured 0.53%, tests/test_w4a8_mm.py); more where a block holds an outlier, which coarsens its grid.
"""
from typing import Optional

import torch

from .int4_mm import int4_mm

BLOCK = 32


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (xq int8 (M, K), d fp32 (M, ceil(K / 32))), as the module docstring says."""
    M, K = x.shape
    B = (K + BLOCK - 1) // BLOCK
    x32 = x.to(torch.float32)
    padded = torch.zeros(M, B * BLOCK, dtype=torch.float32, device=x.device)
    padded[:, :K] = x32
    blocks = padded.view(M, B, BLOCK)
    d = blocks.abs().amax(-1) / 127.0  # NaN propagates through amax
    ok = (d != 0) & torch.isfinite(d)
    safe = torch.where(ok, d, torch.ones_like(d))
    xq = torch.round(blocks / safe[..., None]).clamp_(-127, 127)
    xq = torch.where(ok[..., None], xq, torch.zeros_like(xq))
    return xq.reshape(M, B * BLOCK)[:, :K].to(torch.int8), d


def dequantize_activations(xq: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """xhat (M, K) = d_b * xq in `dtype` (fp32 for the spec, float64 for the exact values tests compare against)."""
    K = xq.shape[1]
    return xq.to(dtype) * d.to(dtype).repeat_interleave(BLOCK, dim=1)[:, :K]


def w4a8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) -> (M, N) in x.dtype: int4_mm(xhat, ...) with xhat in fp32, its output rounded once to x's dtype."""
    xhat = dequantize_activations(*quantize_activations(x))
    out = int4_mm(xhat, qweight, scales, offsets, group_size, None if bias is None else bias.to(torch.float32))
    return out.to(x.dtype)
