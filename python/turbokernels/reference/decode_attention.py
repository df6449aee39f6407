"""The spec of decode_attention and kv_cache_append in plain PyTorch.

Convention (the same as FlashAttention's flash_attn_with_kvcache after its append): the new tokens' keys and values
are already IN the cache. With T = new_tokens and L_b = cache_seqlens[b], new token t of sequence b sits at position

    qpos(b, t) = L_b - T + t          (so the last new token is the last valid key, L_b - 1)

and may attend key j iff  j <= qpos(b, t)              (causal among the new tokens; keys >= L_b are never seen)
                     and  j >= qpos(b, t) - window_left  when window_left >= 0
                     and  j <= qpos(b, t) + window_right when window_right >= 0 (never wider than causal).
Scores: s = scale * q.k; with softcap > 0, s = softcap * tanh(s / softcap); with ALiBi, s -= slope * |qpos - j|.
A query with no key to attend (qpos < 0, i.e. L_b < T - t) gets a zero output, as in FlashAttention.
"""
from __future__ import annotations

from typing import Optional

import torch


def gather_cache(cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """(batch, capacity, heads_kv, head_dim): the cache itself, or the paged cache gathered through block_table
    (entries past a sequence's pages may be anything: they are clamped into range, and masked later)."""
    if block_table is None:
        return cache
    num_pages, page_size = cache.shape[:2]
    pages = block_table.long().clamp(0, max(num_pages - 1, 0))
    b, p = pages.shape
    return cache[pages].reshape(b, p * page_size, *cache.shape[2:])


def decode_scores(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                  block_table: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], softmax_scale: float,
                  window_left: int, window_right: int, softcap: float, work: torch.dtype):
    """The scores of the spec in `work` precision: (qh (B, H, T, D), kh, vh (B, H, S, D) with kv heads repeated for
    their query heads, and 0 in the slots no query may attend; s (B, H, T, S) with disallowed keys at -inf,
    allowed (B, 1, T, S), ALiBi bias or None).
    Shared by decode_attention and the tests' error allowance (turbokernels.testing)."""
    B, T, Hq, D = q.shape
    k = gather_cache(k_cache, block_table)
    v = gather_cache(v_cache, block_table)
    S, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    # (B, H, T, D) and (B, H, S, D), kv heads repeated for their query heads (query head h reads kv head h // group)
    lens = cache_seqlens.to(torch.long).view(B, 1)
    qpos = lens - T + torch.arange(T, device=q.device).view(1, T)                         # (B, T)
    j = torch.arange(S, device=q.device).view(1, 1, S)
    dist = qpos.unsqueeze(-1) - j                                                          # (B, T, S)
    allowed = (dist >= 0) & (j < lens.view(B, 1, 1))
    if window_left >= 0:
        allowed &= dist <= window_left
    if window_right >= 0:
        allowed &= dist >= -window_right
    allowed = allowed.unsqueeze(1)                                                         # (B, 1, T, S)
    # slots no query may attend (at or past cache_seqlens: unwritten, possibly NaN/inf) are never read: their keys
    # and values are replaced by 0 before any product (p = 0 times a NaN value would still be NaN)
    seen = allowed.any(dim=2).unsqueeze(-1)                                                # (B, 1, S, 1)
    qh = q.to(work).transpose(1, 2)
    kh = k.to(work).transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.to(work).transpose(1, 2).repeat_interleave(group, dim=1)
    kh = torch.where(seen, kh, torch.zeros((), dtype=work, device=q.device))
    vh = torch.where(seen, vh, torch.zeros((), dtype=work, device=q.device))
    s = (qh @ kh.transpose(-1, -2)) * softmax_scale                                       # (B, H, T, S)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    bias = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(work).expand(B, Hq) if alibi_slopes.dim() == 1 else alibi_slopes.to(work)
        bias = -slopes.view(B, Hq, 1, 1) * dist.abs().to(work).unsqueeze(1)
        s = s + bias
    s = s.masked_fill(~allowed, float("-inf"))
    return qh, kh, vh, s, allowed, bias


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], softmax_scale: float,
                     window_left: int, window_right: int, softcap: float,
                     compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """q (B, T, Hq, D), caches (B, S, Hkv, D) or paged with block_table -> (B, T, Hq, D) in q.dtype.
    Computed in float32, or float64 when q is float64; tests also run it in the inputs' own dtype
    (compute_dtype) as the "torch in the same dtype" baseline of the tolerance rule."""
    work = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    _, _, vh, s, _, _ = decode_scores(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale,
                                      window_left, window_right, softcap, work)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ vh) / torch.where(denom == 0, torch.ones_like(denom), denom)                # empty rows: 0
    return out.transpose(1, 2).contiguous().to(q.dtype)


def append_positions(cache_seqlens: torch.Tensor, new_tokens: int, page_size: int,
                     block_table: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, slot index) of every new token, each (B, T): (batch, position) for a contiguous cache,
    (page, offset in page) for a paged one."""
    B = cache_seqlens.shape[0]
    pos = cache_seqlens.to(torch.long).view(B, 1) + torch.arange(new_tokens, device=cache_seqlens.device).view(1, -1)
    if block_table is None:
        return torch.arange(B, device=pos.device).view(B, 1).expand_as(pos), pos
    page = torch.gather(block_table.long(), 1, pos // page_size)
    return page, pos % page_size


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """Write k_new/v_new (B, T, Hkv, D) at positions cache_seqlens[b] + t (in place); return cache_seqlens + T."""
    T = k_new.shape[1]
    rows, slots = append_positions(cache_seqlens, T, k_cache.shape[1], block_table)
    k_cache.index_put_((rows, slots), k_new.to(k_cache.dtype))
    v_cache.index_put_((rows, slots), v_new.to(v_cache.dtype))
    return cache_seqlens + T
