"""GPTQ: int4 quantization that uses calibration inputs (Frantar et al., "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", 2023).

Round-to-nearest rounds each weight on its own. GPTQ quantizes the input columns of a layer one at a time and
moves each column's rounding error onto the columns not yet quantized, weighted by the inverse of the layer's input
Hessian H = sum over calibration tokens of x x^T, so that the layer's output on those inputs moves as little as
possible: it minimizes ||X W^T - X W_q^T|| column by column. The grid per group of `group_size` input features is
the one quantize_int4 uses (formats/int4.group_grid: asymmetric min-max with a float offset, or symmetric
absmax), found when the walk reaches the group, from the weights as the earlier errors left them. act_order walks the columns by decreasing
Hessian diagonal (the most active inputs first); the Int4Weight then records that order (`perm`) and groups are
formed in it, the same layout GPTQ's act-order checkpoints use.

    H = hessian_of(inputs)                               # or accumulate with HessianAccumulator over batches
    w = gptq_quantize(linear.weight, H, group_size=128)  # Int4Weight
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats.int4 import (FLOAT_DTYPES, Int4Weight, check_group_size, effective_group_size, exact_offsets,
                            group_grid, pack_int4)


class HessianAccumulator:
    """sum x x^T (float64 unless told) and the token count of a layer's inputs, batch by batch."""

    def __init__(self, in_features: int, device=None, dtype: torch.dtype = torch.float64):
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """The mean x x^T (the 2 / n of the paper's H changes nothing: damping is relative to its diagonal)."""
        return self.sum / max(1, self.count)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1], x.device)
    acc.add(x)
    return acc.hessian()


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  scale_dtype: Optional[torch.dtype] = None) -> Int4Weight:
    """GPTQ of an nn.Linear weight (out_features, in_features) given its inputs' Hessian (in_features, in_features):
    an Int4Weight on quantize_int4's grid. damp: added to H's diagonal as a fraction of its mean (numerical
    stability; the paper's 1%). block_size: columns per lazy batch update (speed only). Inputs that never fired
    (a zero Hessian diagonal) get weight 0, as in the reference implementation."""
    fn = "gptq_quantize"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}(weight): expected a 2-D float16/bfloat16/float32 tensor (out_features, in_features), "
                        f"got {getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    N, K = weight.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (K, K) or not hessian.is_floating_point():
        raise ValueError(f"{fn}(hessian): expected a float ({K}, {K}) tensor (in_features squared), got "
                         f"{tuple(getattr(hessian, 'shape', ())) or type(hessian).__name__}")
    if not torch.isfinite(weight).all() or not torch.isfinite(hessian).all():
        raise ValueError(f"{fn}(weight, hessian): must be finite")
    check_group_size(group_size, f"{fn}(group_size)")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0 < damp < 1:
        raise ValueError(f"{fn}(damp): expected a fraction in (0, 1), got {damp!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"{fn}(block_size): expected a positive int, got {block_size!r}")
    scale_dtype = scale_dtype or (weight.dtype if weight.dtype != torch.float32 else torch.float32)
    gs = effective_group_size(group_size, K)
    G = (K + gs - 1) // gs

    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    # the upper Cholesky factor of H^-1: row i holds what quantizing column i does to the later ones
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros(N, K, dtype=torch.float32, device=W.device)
    scales = torch.empty(G, N, dtype=torch.float32, device=W.device)
    offsets = torch.empty(G, N, dtype=torch.float32, device=W.device)
    for b0 in range(0, K, block_size):
        b1 = min(K, b0 + block_size)
        W1, E1, Hb = W[:, b0:b1].clone(), torch.zeros(N, b1 - b0, device=W.device), Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % gs == 0:  # a new group: its grid from the weights as the earlier columns' errors left them
                end = min(K, col + gs)
                current = W1[:, i:i + (end - col)]
                if end > b1:  # columns past this block: their lazy update from this block's errors so far, now
                    current = torch.cat([current, W[:, b1:end] - E1[:, :i] @ Hinv[b0:col, b1:end]], dim=1)
                scales[col // gs], offsets[col // gs] = group_grid(current.amin(dim=1), current.amax(dim=1),
                                                                   symmetric, scale_dtype)
            s, o = scales[col // gs], offsets[col // gs]
            w = W1[:, i]
            q = torch.clamp(torch.round((w - o) / s), 0, 15)
            Q[:, col] = q
            err = (w - (q * s + o)) / Hb[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hb[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, b1:] -= E1 @ Hinv[b0:b1, b1:]

    return Int4Weight(pack_int4(Q.t().to(torch.uint8)), scales.to(scale_dtype), exact_offsets(offsets, scale_dtype),
                      group_size, K, perm)
