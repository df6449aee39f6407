"""The spec of int4_mm in plain PyTorch: dequantize in fp32, one fp32 matmul, the bias added in fp32, one cast to the
activation dtype (one rounding of the output, as torch's F.linear)."""
from typing import Optional

import torch

from ..formats.int4 import unpack_int4


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                    in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(K, N) weight (the transposed nn.Linear weight, rows in qweight's order), computed in `dtype`: fp32 for
    the kernels' spec, float64 for the exact value tests compare against."""
    q = unpack_int4(qweight, in_features).to(dtype)
    group_of_k = torch.arange(in_features, device=qweight.device) // group_size
    return q * scales.to(dtype)[group_of_k] + offsets.to(dtype)[group_of_k]


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
            group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) @ dequant(qweight) (K, N) [+ bias (N,)] -> (M, N) in x.dtype."""
    w = dequantize_int4(qweight, scales, offsets, group_size, x.shape[1])
    out = x.to(torch.float32) @ w
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)
