"""The spec of attention in plain PyTorch (FlashAttention 2.x semantics), forward and backward.

Layouts: dense q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); varlen (packed) q (total_q, Hq, D), k/v (total_k, Hkv, D)
with int32 cu_seqlens_q/cu_seqlens_k (B+1,). lse: fp32 (B, Hq, Sq), varlen (Hq, total_q).

For query row i and key j of one sequence (offset = Sk - Sq: everything aligns to the bottom-right):
    s[i, j] = q_i . k_j * scale                     ; softcap > 0: s = softcap * tanh(s / softcap)
            - slope * |i + offset - j|              ; with alibi_slopes
    key j allowed iff  i + offset - left <= j <= i + offset + right   (left/right = -1: unbounded; causal: right 0)
A row with no allowed key has out = 0 and lse = -inf.

The computation runs in `compute_dtype`: fp32 for the backend (float64 for float64 inputs, as the tests' golden);
tests also run it in the inputs' own dtype as the "torch in the same dtype" baseline of the tolerance rule.
The reference reads cu_seqlens on the host (a sync): it is the spec, not a fast path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _allowed_and_bias(sq: int, sk: int, causal: bool, window_left: int, window_right: int,
                      slopes: Optional[torch.Tensor], device, dtype):
    """(allowed (Sq, Sk) bool, bias (..., Hq, Sq, Sk) or None) for one sequence pair."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    rel = j - (i + sk - sq)  # key position relative to the query's aligned diagonal
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    right = 0 if causal else window_right
    if right >= 0:
        allowed &= rel <= right
    if window_left >= 0:
        allowed &= rel >= -window_left
    bias = None
    if slopes is not None:
        bias = -slopes.to(dtype)[..., None, None] * rel.abs().to(dtype)
    return allowed, bias


def _scores(q, k, softmax_scale, softcap):
    """q (B, Sq, Hq, D), k (B, Sk, Hq, D) -> (raw capped scores (B, Hq, Sq, Sk), tanh or None)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    if softcap > 0:
        t = torch.tanh(s / softcap)
        return softcap * t, t
    return s, None


def expand_kv(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    return x.repeat_interleave(heads_q // x.shape[2], dim=2) if x.shape[2] != heads_q else x


def dense_scores(q, k, slopes, softmax_scale, causal, window_left, window_right, softcap, compute_dtype):
    """Dense layout: (s (B, Hq, Sq, Sk) with masked keys at -inf, allowed (Sq, Sk), ALiBi bias or None, k expanded
    to the q heads). Shared by the forward, the backward and the tests' error allowance (turbokernels.testing)."""
    B, sq, hq, _ = q.shape
    sk = k.shape[1]
    ke = expand_kv(k, hq)
    s, _ = _scores(q, ke, softmax_scale, softcap)
    allowed, bias = _allowed_and_bias(sq, sk, causal, window_left, window_right, slopes, q.device, compute_dtype)
    if bias is not None:
        s = s + bias  # (Hq, Sq, Sk) or (B, Hq, Sq, Sk)
    s = s.masked_fill(~allowed, float("-inf"))
    return s, allowed, bias, ke


def _dense_forward(q, k, v, slopes, softmax_scale, causal, window_left, window_right, softcap, compute_dtype):
    """Dense layout, compute_dtype in and out; returns (out (B, Sq, Hq, D), lse (B, Hq, Sq), P (B, Hq, Sq, Sk))."""
    B, sq, hq, _ = q.shape
    sk = k.shape[1]
    s, _, _, _ = dense_scores(q, k, slopes, softmax_scale, causal, window_left, window_right, softcap, compute_dtype)
    ve = expand_kv(v, hq)
    lse = torch.logsumexp(s, dim=-1) if sk > 0 else s.new_full((B, hq, sq), float("-inf"))
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])  # masked: exp(-inf) = 0
    out = torch.einsum("bhqk,bkhd->bqhd", p, ve)
    return out, lse, p


def sequences(q, k, cu_seqlens_q, cu_seqlens_k):
    """[(b, q_start, q_end, k_start, k_end)] for varlen (host read of cu_seqlens), [(b, None...)] otherwise."""
    if cu_seqlens_q is None:
        return [(b, None, None, None, None) for b in range(q.shape[0])]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(b, cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def slopes_for(alibi_slopes, b):
    if alibi_slopes is None:
        return None
    return alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], softmax_scale: float,
                  causal: bool, window_left: int, window_right: int, softcap: float,
                  compute_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's layout and dtype, contiguous; lse fp32 (or float64 for float64 inputs))."""
    cd = compute_dtype or _compute_dtype(q.dtype)
    lse_dtype = torch.float64 if cd == torch.float64 else torch.float32
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    if cu_seqlens_q is None:
        out, lse, _ = _dense_forward(qc, kc, vc, alibi_slopes, softmax_scale, causal, window_left, window_right,
                                     softcap, cd)
        return out.to(q.dtype).contiguous(), lse.to(lse_dtype).contiguous()
    out = torch.zeros(q.shape, dtype=cd, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=cd, device=q.device)
    for b, q0, q1, k0, k1 in sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        if q1 == q0:
            continue
        o_b, lse_b, _ = _dense_forward(qc[None, q0:q1], kc[None, k0:k1], vc[None, k0:k1],
                                       slopes_for(alibi_slopes, b), softmax_scale, causal, window_left,
                                       window_right, softcap, cd)
        out[q0:q1] = o_b[0]
        lse[:, q0:q1] = lse_b[0]
    return out.to(q.dtype), lse.to(lse_dtype)


def _dense_backward(dout, q, k, v, slopes, softmax_scale, causal, window_left, window_right, softcap, cd):
    """Explicit gradients (the formulas a fused backward implements), recomputing P and O in compute dtype:
        dV = P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O));  with softcap dS *= 1 - tanh^2;
        dQ = dS K * scale;  dK = dS^T Q * scale;  GQA: dK, dV summed over the q heads sharing a kv head."""
    B, sq, hq, _ = q.shape
    hkv = k.shape[2]
    out, _, p = _dense_forward(q, k, v, slopes, softmax_scale, causal, window_left, window_right, softcap, cd)
    ke, ve = expand_kv(k, hq), expand_kv(v, hq)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, ve)
    delta = (dout * out).sum(-1).transpose(1, 2)  # (B, Hq, Sq)
    ds = p * (dp - delta[..., None])
    if softcap > 0:
        _, t = _scores(q, ke, softmax_scale, softcap)
        ds = ds * (1 - t * t)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, ke) * softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * softmax_scale
    if hkv != hq:
        g = hq // hkv  # explicit sizes: a -1 is ambiguous when there are no keys or no batch (0 elements)
        dk = dk.reshape(B, dk.shape[1], hkv, g, dk.shape[-1]).sum(3)
        dv = dv.reshape(B, dv.shape[1], hkv, g, dv.shape[-1]).sum(3)
    return dq, dk, dv


def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                  alibi_slopes: Optional[torch.Tensor], softmax_scale: float, causal: bool, window_left: int,
                  window_right: int, softcap: float, deterministic: bool,
                  compute_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes and layouts. `out` and `lse` are accepted for the kernel's signature;
    the spec recomputes both in compute dtype (exact gradients of the function, independent of forward rounding).
    Always deterministic."""
    cd = compute_dtype or _compute_dtype(q.dtype)
    qc, kc, vc, doc = q.to(cd), k.to(cd), v.to(cd), dout.to(cd)
    if cu_seqlens_q is None:
        dq, dk, dv = _dense_backward(doc, qc, kc, vc, alibi_slopes, softmax_scale, causal, window_left, window_right,
                                     softcap, cd)
    else:
        dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
        for b, q0, q1, k0, k1 in sequences(q, k, cu_seqlens_q, cu_seqlens_k):
            if q1 == q0 or k1 == k0:
                continue
            g = _dense_backward(doc[None, q0:q1], qc[None, q0:q1], kc[None, k0:k1], vc[None, k0:k1],
                                slopes_for(alibi_slopes, b), softmax_scale, causal, window_left, window_right,
                                softcap, cd)
            dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
              cu_seqlens_q=None, cu_seqlens_k=None, compute_dtype=None):
    """Convenience form for tests: the functional's keyword arguments, (out, lse)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    return attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, scale, causal, window_size[0],
                         window_size[1], softcap, compute_dtype)
