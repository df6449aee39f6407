"""SparseGPT for 2:4 sparsity: pruning that uses calibration inputs (Frantar & Alistarh, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", 2023).

Magnitude and Wanda pruning (prune.py) zero weights and leave the rest as they were. SparseGPT walks the input
columns of a layer left to right, as GPTQ does (gptq.py: the same Hessian H = sum of x x^T over calibration tokens,
the same upper Cholesky factor of H^-1, the same lazy blocks), and moves each pruned weight's error onto the
columns not yet walked, so that the layer's output on the calibration inputs moves as little as possible. The mask
of each group of 4 columns is chosen when the walk reaches the group, from the weights as the earlier errors left
them: keep the 2 with the largest w^2 / [H^-1]_kk^2 (the OBS cost of pruning w), ties to the lower column.

sparsegpt_24_int4 prunes and quantizes in the same walk (the paper's joint sparsification and quantization): every
kept weight is rounded to int4 on the grid of its group (formats/int4.group_grid over the group's KEPT values;
group_size counts dense columns, as Sparse24Int4Weight's), and both the pruning and the rounding errors move on. A
group's grid is found when the walk reaches the group, from the current weights under masks chosen then; those
masks are provisional for the group's later groups of 4 columns, whose masks are still chosen when the walk reaches
them, as in sparsegpt_24 (a weight kept then but not in the provisional mask may fall outside the grid: it is
clamped, and its error moves on). Measured: fixing the whole group's masks at its start gave up to 1.2x the
layer-output error at group_size 128 and per channel.

    H = hessian_of(inputs)                                   # or accumulate with HessianAccumulator over batches
    w = sparsegpt_24(linear.weight, H)                       # a dense 2:4-sparse tensor, linear.weight's dtype
    w = sparsegpt_24_int4(linear.weight, H, group_size=128)  # Sparse24Int4Weight
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats.int4 import FLOAT_DTYPES, exact_offsets, group_grid, pack_int4
from ..formats.sparse24 import _meta_cols, encode_groups, pack_meta
from ..formats.sparse24_int4 import Sparse24Int4Weight, check_dense_group_size


def _check_arguments(fn: str, weight, hessian, damp, block_size) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}(weight): expected a 2-D float16/bfloat16/float32 tensor (out_features, in_features), "
                        f"got {getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    N, K = weight.shape
    if K % 4 != 0:
        raise ValueError(f"{fn}(weight): in_features={K} must be a multiple of 4 (2:4 sparsity keeps 2 of every 4 "
                         f"consecutive input columns)")
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (K, K) or not hessian.is_floating_point():
        raise ValueError(f"{fn}(hessian): expected a float ({K}, {K}) tensor (in_features squared), got "
                         f"{tuple(getattr(hessian, 'shape', ())) or type(hessian).__name__}")
    for name, t in (("weight", weight), ("hessian", hessian)):
        if t.device.type == "meta":
            raise ValueError(f"{fn}({name}): a meta tensor has no values to prune by")
        bad = ~torch.isfinite(t)
        if bad.any():
            raise ValueError(f"{fn}({name}): must be finite, got {int(torch.isnan(t).sum())} NaN and "
                             f"{int(torch.isinf(t).sum())} Inf elements")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0 < damp < 1:
        raise ValueError(f"{fn}(damp): expected a fraction in (0, 1), got {damp!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"{fn}(block_size): expected a positive int, got {block_size!r}")


def _inverse_factor(fn: str, H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) I)^-1 (gptq.py's): row i holds what removing column i
    does to the later ones."""
    H = H.clone()
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"{fn}(hessian): not positive definite even with damping {damp} (a Hessian of inputs, "
                         f"sum x x^T, is positive semidefinite; is it one?)")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _walk(weight: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int, fn: str,
          kept_group: Optional[int] = None, symmetric: bool = False,
          scale_dtype: torch.dtype = torch.float32):
    """The SparseGPT walk over the columns of weight (N, K), in fp32. kept_group None: prune only; else quantize the
    kept values too, kept_group kept values per grid (group_size // 2, or K / 2 per channel).
    Returns (result (N, K) fp32: the walk's weight, keep (N, K) bool: exactly 2 of every 4, and when quantizing
    codes (N, K) uint8 (0..15 at kept positions), scales (G, N) and offsets (G, N), fp32 values of scale_dtype)."""
    W = weight.detach().to(torch.float32).clone()
    N, K = W.shape
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0  # inputs that never fired: their weights are 0 (gptq.py, the reference code)
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_factor(fn, H, damp)
    d2 = torch.diagonal(Hinv) ** 2

    quant = kept_group is not None
    out = torch.zeros(N, K, dtype=torch.float32, device=W.device)
    keep = torch.zeros(N, K, dtype=torch.bool, device=W.device)
    rows = torch.arange(N, device=W.device)
    if quant:
        kept_total = K // 2
        G = (kept_total + kept_group - 1) // kept_group
        codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
        scales = torch.empty(G, N, dtype=torch.float32, device=W.device)
        offsets = torch.empty(G, N, dtype=torch.float32, device=W.device)

    def mask_of(values: torch.Tensor, lo: int) -> torch.Tensor:
        """The 2:4 mask of current `values` of columns [lo, lo + width): keep the 2 largest w^2 / [H^-1]_kk^2 of
        each group of 4 (the OBS cost of pruning w), ties to the lower column (stable sort)."""
        score = values ** 2 / d2[lo:lo + values.shape[1]]
        order = score.view(N, -1, 4).argsort(dim=-1, descending=True, stable=True)
        k4 = torch.zeros(N, values.shape[1] // 4, 4, dtype=torch.bool, device=W.device)
        return k4.scatter_(2, order[:, :, :2], True).view(N, -1)

    for b0 in range(0, K, block_size):
        b1 = min(K, b0 + block_size)
        W1, E1, Hb = W[:, b0:b1].clone(), torch.zeros(N, b1 - b0, device=W.device), Hinv[b0:b1, b0:b1]

        def current(lo: int, hi: int) -> torch.Tensor:
            """Columns [lo, hi) (none walked yet) as the errors so far leave them: past this block, their lazy
            update from this block's errors (zero for the columns of the block not walked yet) now."""
            parts = [W1[:, lo - b0:min(hi, b1) - b0]] if lo < b1 else []
            if hi > b1:
                s = max(lo, b1)
                parts.append(W[:, s:hi] - E1 @ Hinv[b0:b1, s:hi])
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

        for i in range(b1 - b0):
            col = b0 + i
            if col % 4 == 0:  # a new group of 4: its mask, from the weights as the earlier errors left them
                keep[:, col:col + 4] = mask_of(current(col, col + 4), col)
                for k in ((col // 2, col // 2 + 1) if quant else ()):  # this group's kept indices
                    if k % kept_group:
                        continue  # not the first kept value of a grid
                    # a new grid: from the kept values of its groups of 4 (the later ones' masks provisional, from
                    # the current weights: each is chosen again when the walk reaches it)
                    j, last = k // kept_group, min(k + kept_group, kept_total) - 1
                    end = (last // 2 + 1) * 4  # the end of the group of 4 holding the grid's last kept value
                    cur = current(col, end)
                    kp = torch.cat([keep[:, col:col + 4], mask_of(cur[:, 4:], col + 4)], dim=1)
                    kidx = (2 * (torch.arange(col, end, device=W.device) // 4)
                            + (kp.view(N, -1, 4).cumsum(dim=-1).view(N, -1) - 1))
                    sel = kp & (kidx >= k) & (kidx <= last)
                    inf = torch.tensor(float("inf"), device=W.device)
                    scales[j], offsets[j] = group_grid(torch.where(sel, cur, inf).amin(dim=1),
                                                       torch.where(sel, cur, -inf).amax(dim=1), symmetric,
                                                       scale_dtype)
            w = W1[:, i]
            kept = keep[:, col]
            if quant:
                kidx = 2 * (col // 4) + keep[:, col - col % 4:col].sum(dim=1)  # this column's kept index, per row
                g = torch.clamp(kidx // kept_group, max=G - 1)  # (pruned positions: any grid; their value is 0)
                s, o = scales[g, rows], offsets[g, rows]
                q = torch.clamp(torch.round((w - o) / s), 0, 15)
                codes[:, col] = torch.where(kept, q, torch.zeros_like(q)).to(torch.uint8)
                v = torch.where(kept, q * s + o, torch.zeros_like(w))
            else:
                v = torch.where(kept, w, torch.zeros_like(w))
            out[:, col] = v
            err = (w - v) / Hb[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hb[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, b1:] -= E1 @ Hinv[b0:b1, b1:]

    if quant:
        return out, keep, codes, scales, offsets
    return out, keep


def sparsegpt_24(weight: torch.Tensor, hessian: torch.Tensor, *, damp: float = 0.01,
                 block_size: int = 128) -> torch.Tensor:
    """SparseGPT 2:4 pruning of an nn.Linear weight (out_features, in_features) given its inputs' Hessian
    (in_features, in_features), e.g. hessian_of(x): a 2:4-sparse copy of weight in its dtype, the kept weights
    updated to make up for the pruned ones (the input is never modified). damp: added to H's diagonal as a fraction
    of its mean (the paper's 1%). block_size: columns per lazy batch update (speed only). Inputs that never fired (a
    zero Hessian diagonal) get weight 0 (and are the ones pruned). NaN / Inf in weight or hessian are refused."""
    fn = "sparsegpt_24"
    _check_arguments(fn, weight, hessian, damp, block_size)
    N, K = weight.shape
    if N == 0 or K == 0:
        return weight.detach().clone()
    out, _ = _walk(weight, hessian, damp, block_size, fn)
    return out.to(weight.dtype)


def sparsegpt_24_int4(weight: torch.Tensor, hessian: torch.Tensor, *, group_size: int = 128,
                      symmetric: bool = False, damp: float = 0.01, block_size: int = 128) -> Sparse24Int4Weight:
    """SparseGPT 2:4 pruning and int4 quantization in one walk: a Sparse24Int4Weight whose dequantize() is exactly
    the weight the walk produced. group_size counts DENSE columns (a multiple of 2; group_size // 2 kept values per
    scale), -1 per channel; symmetric and the scales' dtype (the weight's for fp16/bf16, else fp32) as in
    quantize_int4. damp, block_size and dead inputs as in sparsegpt_24 (a dead input kept because its group of 4
    has three or four: its 0 as rounded on the grid)."""
    fn = "sparsegpt_24_int4"
    _check_arguments(fn, weight, hessian, damp, block_size)
    check_dense_group_size(group_size, f"{fn}(group_size)")
    N, K = weight.shape
    if N == 0 or K == 0:
        raise ValueError(f"{fn}(weight): must not be empty, got shape {tuple(weight.shape)}")
    scale_dtype = weight.dtype
    kept_group = K // 2 if group_size == -1 else group_size // 2
    _, keep, codes, scales, offsets = _walk(weight, hessian, damp, block_size, fn, kept_group, symmetric,
                                            scale_dtype)
    # the compressed layout straight from the walk's mask (exactly 2 kept per group of 4: no re-derivation from
    # values, which would see a kept value that rounds to 0 as pruned)
    kept_codes = codes[keep].view(N, K // 2)
    k4 = keep.view(N, K // 4, 4)
    pad = _meta_cols(K) * 4 - K // 4
    if pad:  # whole meta elements: padded groups encode all-zero groups, as Sparse24Weight.from_dense's
        k4 = torch.cat([k4, k4.new_zeros(N, pad, 4)], dim=1)
    meta = pack_meta(*encode_groups(k4))
    return Sparse24Int4Weight(pack_int4(kept_codes.t().contiguous()), scales.to(scale_dtype),
                              exact_offsets(offsets, scale_dtype), meta, group_size, K)
