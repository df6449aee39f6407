"""2:4 semi-structured pruning: in every group of 4 consecutive input columns of each row, keep 2 weights.

    magnitude  keep the 2 largest |W[n, k]|
    wanda      keep the 2 largest |W[n, k]| * ||X_k||_2 (Sun et al., "A Simple and Effective Pruning Approach for
               Large Language Models"): activation_norm[k] is the L2 norm of input feature k over calibration
               tokens, e.g. `x.reshape(-1, in_features).float().norm(dim=0)` accumulated over batches.
Ties keep the lower column (stable sort), so pruning is deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats.int4 import FLOAT_DTYPES

METHODS = ("magnitude", "wanda")


def _check_weight(weight, fn: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}(weight): expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}(weight): expected a 2-D (out_features, in_features) tensor, got shape "
                         f"{tuple(weight.shape)}")


def _check_no_nan(name: str, t: torch.Tensor) -> None:
    """A NaN has no magnitude to rank (+-Inf has: kept as the largest). A one-time conversion, so a host sync is
    fine here; meta tensors have no values to check."""
    if t.device.type != "meta" and bool(torch.isnan(t).any()):
        raise ValueError(f"prune_24({name}): contains NaN at {int(torch.isnan(t).sum())} elements; 2:4 pruning ranks "
                         f"weights by magnitude, which a NaN does not have")


def prune_24(weight: torch.Tensor, method: str = "magnitude",
             activation_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 2:4-sparse copy of `weight` (out_features, in_features); the input is never modified. NaN in the weight or
    activation_norm is refused (+-Inf is ranked as the largest magnitude); meta tensors give a meta result."""
    _check_weight(weight, "prune_24")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"prune_24(weight): dtype must be float16, bfloat16 or float32, got {weight.dtype}")
    N, K = weight.shape
    if K % 4 != 0:
        raise ValueError(f"prune_24(weight): in_features={K} must be a multiple of 4 (2:4 sparsity keeps 2 of "
                         f"every 4 consecutive input columns)")
    if method not in METHODS:
        raise ValueError(f"prune_24(method): expected one of {METHODS}, got {method!r}")
    _check_no_nan("weight", weight)
    w = weight.detach()
    score = w.abs().to(torch.float32)
    if method == "wanda":
        if activation_norm is None:
            raise ValueError("prune_24(activation_norm): method='wanda' needs the L2 norm of each input feature "
                             f"over calibration tokens, a ({K},) tensor")
        if not isinstance(activation_norm, torch.Tensor):
            raise TypeError(f"prune_24(activation_norm): expected a torch.Tensor, got "
                            f"{type(activation_norm).__name__}")
        if tuple(activation_norm.shape) != (K,):
            raise ValueError(f"prune_24(activation_norm): expected shape ({K},) (in_features), got "
                             f"{tuple(activation_norm.shape)}")
        if not activation_norm.is_floating_point():
            raise TypeError(f"prune_24(activation_norm): expected a float tensor, got {activation_norm.dtype}")
        if activation_norm.device != weight.device:
            raise ValueError(f"prune_24(activation_norm): activation_norm is on {activation_norm.device} but the "
                             f"weight is on {weight.device}")
        _check_no_nan("activation_norm", activation_norm)
        score = score * activation_norm.detach().to(torch.float32).abs()[None, :]
    elif activation_norm is not None:
        raise ValueError("prune_24(activation_norm): only method='wanda' uses activation_norm")
    if N == 0 or K == 0:
        return w.clone()
    order = score.reshape(N, K // 4, 4).argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros(N, K // 4, 4, dtype=torch.bool, device=w.device)
    keep.scatter_(2, order[:, :, :2], True)
    return torch.where(keep.view(N, K), w, torch.zeros((), dtype=w.dtype, device=w.device))


def is_24_sparse(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive input columns of each row holds at most 2 nonzeros (an all-zero group
    counts as sparse). False when in_features is not a multiple of 4. Syncs with the device (returns a bool)."""
    _check_weight(weight, "is_24_sparse")
    N, K = weight.shape
    if K % 4 != 0:
        return False
    return bool(((weight != 0).reshape(N, K // 4, 4).sum(dim=-1) <= 2).all())
