"""The spec of int4_mm in plain PyTorch: dequantize in fp32, one fp32 matmul, cast to the activation dtype."""
import torch

from ..formats.int4 import unpack_int4


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                    in_features: int) -> torch.Tensor:
    """(K, N) fp32 weight (the transposed nn.Linear weight, rows in qweight's order)."""
    q = unpack_int4(qweight, in_features).to(torch.float32)
    group_of_k = torch.arange(in_features, device=qweight.device) // group_size
    return q * scales.to(torch.float32)[group_of_k] + offsets.to(torch.float32)[group_of_k]


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x (M, K) @ dequant(qweight) (K, N) -> (M, N) in x.dtype."""
    w = dequantize_int4(qweight, scales, offsets, group_size, x.shape[1])
    return (x.to(torch.float32) @ w).to(x.dtype)
