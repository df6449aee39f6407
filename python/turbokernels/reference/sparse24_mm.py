"""The spec of sparse24_mm in plain PyTorch: expand the 2:4 weight to dense in fp32, one fp32 matmul, the bias added
in fp32, one cast to the activation dtype. `sparse24_to_dense` is also the one expansion rule the format
(Sparse24Weight.to_dense) uses."""
from typing import Optional

import torch


def meta_indices(meta: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 meta (N, ceil(K/16)) -> (idx0, idx1), each int64 (N, groups): the positions (0..3) of the two kept
    values of every group of 4 columns. Group g of a meta element sits in bits 4*g..4*g+3 as idx0 | idx1 << 2."""
    N, ncols = meta.shape
    shifts = torch.arange(0, 16, 4, device=meta.device, dtype=torch.int32)
    nib = (meta.to(torch.int32).view(N, ncols, 1) >> shifts) & 0xF  # sign extension is masked away
    nib = nib.reshape(N, ncols * 4)[:, :groups].to(torch.int64)
    return nib & 0x3, nib >> 2


def sparse24_to_dense(values: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values (N, K/2) + meta (N, ceil(K/16)) -> the dense (N, K) weight in `dtype` (float64 for exact goldens)."""
    N, half = values.shape
    groups = half // 2
    idx0, idx1 = meta_indices(meta, groups)
    v = values.to(dtype).view(N, groups, 2)
    dense = torch.zeros(N, groups, 4, dtype=dtype, device=values.device)
    dense.scatter_(2, idx0.unsqueeze(-1), v[:, :, :1])
    dense.scatter_(2, idx1.unsqueeze(-1), v[:, :, 1:])
    return dense.view(N, groups * 4)


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) @ W.T [+ bias (N,)] -> (M, N) in x.dtype, W (N, K) given by values/meta."""
    w = sparse24_to_dense(values, meta, torch.float32)
    out = x.to(torch.float32) @ w.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)
