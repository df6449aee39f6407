"""The spec of sparse24_int4_mm in plain PyTorch: dequantize the kept values in fp32, expand them with meta to the
dense 2:4 weight, one fp32 matmul, the bias added in fp32, one cast to the activation dtype."""
from typing import Optional

import torch

from .int4_mm import dequantize_int4
from .sparse24_mm import sparse24_to_dense


def sparse24_int4_to_dense(qweight, scales, offsets, meta, group_size: int, in_features: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (N, K) weight in `dtype`; group_size counts kept values, in_features is the dense K."""
    values = dequantize_int4(qweight, scales, offsets, group_size, in_features // 2, dtype).t()  # (N, K/2)
    return sparse24_to_dense(values, meta, dtype)


def sparse24_int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                     meta: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) @ W.T [+ bias (N,)] -> (M, N) in x.dtype."""
    w = sparse24_int4_to_dense(qweight, scales, offsets, meta, group_size, x.shape[1])
    out = x.to(torch.float32) @ w.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)
