"""The spec of decode_attention and kv_cache_append in plain PyTorch.

Convention (the same as FlashAttention's flash_attn_with_kvcache after its append): the new tokens' keys and values
are already IN the cache. With T = new_tokens and L_b = cache_seqlens[b], new token t of sequence b sits at position

    qpos(b, t) = L_b - T + t          (so the last new token is the last valid key, L_b - 1)

and may attend key j iff  j < L_b                      (keys >= L_b are never seen)
                     and  j >= cache_leftpad[b]          with cache_leftpad (slots before it are never read)
                     and  j <= qpos(b, t)                when causal (the default: causal among the new tokens)
                     and  j >= qpos(b, t) - window_left  when window_left >= 0
                     and  j <= qpos(b, t) + window_right when window_right >= 0 (never wider than causal).
Non-causal (causal=False, FlashAttention's default) every new token attends every valid key, narrowed by the
window, which stays aligned to the bottom-right as in FlashAttention. Sequence b reads cache row
cache_batch_idx[b] when given (contiguous caches; cache_seqlens and cache_leftpad stay per sequence b).
cache_leftpad: FlashAttention 2.6+ takes k_cache[b, leftpad_b:L_b] as the sequence, of length L_b - leftpad_b,
with the new tokens its last T; query and key positions both shift by leftpad_b there, so every distance
qpos - j (causality, window, ALiBi) is the one computed here in cache slots: the same attention.
Scores: s = scale * q.k; with softcap > 0, s = softcap * tanh(s / softcap); with ALiBi, s -= slope * |qpos - j|.
lse (return_lse): the natural log of sum_j exp(s_j) over the allowed keys, fp32 (B, Hq, T), FlashAttention's
softmax_lse. (FlashAttention's causal ALiBi adds +slope * j instead, the same softmax but an lse shifted by a
per-row constant: ours is that of the scores above.)
A query with no key to attend (e.g. qpos < 0 when causal, i.e. L_b < T - t; or L_b == cache_leftpad[b]) gets a
zero output, as in FlashAttention, and lse = -inf, as attention's rows without keys (reference/attention.py).
"""
from __future__ import annotations

from typing import Optional

import torch


def gather_cache(cache: torch.Tensor, block_table: Optional[torch.Tensor],
                 cache_batch_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(batch, capacity, heads_kv, head_dim): the cache itself (its rows cache_batch_idx when given), or the paged
    cache gathered through block_table (entries past a sequence's pages may be anything: they are clamped into
    range, and masked later)."""
    if block_table is None:
        return cache if cache_batch_idx is None else cache[cache_batch_idx.long()]
    num_pages, page_size = cache.shape[:2]
    pages = block_table.long().clamp(0, max(num_pages - 1, 0))
    b, p = pages.shape
    return cache[pages].reshape(b, p * page_size, *cache.shape[2:])


def decode_scores(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                  block_table: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], softmax_scale: float,
                  window_left: int, window_right: int, softcap: float, work: torch.dtype,
                  cache_batch_idx: Optional[torch.Tensor] = None, cache_leftpad: Optional[torch.Tensor] = None,
                  causal: bool = True):
    """The scores of the spec in `work` precision: (qh (B, H, T, D), kh, vh (B, H, S, D) with kv heads repeated for
    their query heads, and 0 in the slots no query may attend; s (B, H, T, S) with disallowed keys at -inf,
    allowed (B, 1, T, S), ALiBi bias or None).
    Shared by decode_attention and the tests' error allowance (turbokernels.testing)."""
    B, T, Hq, D = q.shape
    k = gather_cache(k_cache, block_table, cache_batch_idx)
    v = gather_cache(v_cache, block_table, cache_batch_idx)
    S, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    # (B, H, T, D) and (B, H, S, D), kv heads repeated for their query heads (query head h reads kv head h // group)
    lens = cache_seqlens.to(torch.long).view(B, 1)
    qpos = lens - T + torch.arange(T, device=q.device).view(1, T)                         # (B, T)
    j = torch.arange(S, device=q.device).view(1, 1, S)
    dist = qpos.unsqueeze(-1) - j                                                          # (B, T, S)
    allowed = (j < lens.view(B, 1, 1)).expand(B, T, S).contiguous()                       # (B, T, S)
    if causal:
        allowed = allowed & (dist >= 0)
    if cache_leftpad is not None:
        allowed = allowed & (j >= cache_leftpad.to(torch.long).view(B, 1, 1))
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
                     cache_batch_idx: Optional[torch.Tensor] = None, cache_leftpad: Optional[torch.Tensor] = None,
                     causal: bool = True, return_lse: bool = False, compute_dtype: Optional[torch.dtype] = None):
    """q (B, T, Hq, D), caches (B, S, Hkv, D) (batch any size with cache_batch_idx) or paged with block_table ->
    out (B, T, Hq, D) in q.dtype, or (out, lse fp32 (B, Hq, T)) when return_lse (the op's schema: the op always
    returns both, lse empty unless return_lse). Computed in float32, or float64 when q is float64; tests also run
    it in the inputs' own dtype (compute_dtype) as the "torch in the same dtype" baseline of the tolerance rule."""
    work = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    _, _, vh, s, _, _ = decode_scores(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale,
                                      window_left, window_right, softcap, work, cache_batch_idx, cache_leftpad,
                                      causal)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ vh) / torch.where(denom == 0, torch.ones_like(denom), denom)                # empty rows: 0
    out = out.transpose(1, 2).contiguous().to(q.dtype)
    if not return_lse:
        return out
    lse = (m + torch.log(denom)).squeeze(-1)                       # (B, H, T); log(0) = -inf: rows without keys
    return out, lse.to(torch.float32).contiguous()


def append_positions(cache_seqlens: torch.Tensor, new_tokens: int, page_size: int,
                     block_table: Optional[torch.Tensor],
                     cache_batch_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, slot index) of every new token, each (B, T): (batch, position) for a contiguous cache -- the
    batch row is cache_batch_idx[b] when given --, (page, offset in page) for a paged one."""
    B = cache_seqlens.shape[0]
    pos = cache_seqlens.to(torch.long).view(B, 1) + torch.arange(new_tokens, device=cache_seqlens.device).view(1, -1)
    if block_table is None:
        rows = torch.arange(B, device=pos.device) if cache_batch_idx is None else cache_batch_idx.to(torch.long)
        return rows.view(B, 1).expand_as(pos), pos
    page = torch.gather(block_table.long(), 1, pos // page_size)
    return page, pos % page_size


def rotary_positions(cache_seqlens: torch.Tensor, new_tokens: int,
                     cache_leftpad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) long: the logical position of every new token, the row of rotary_cos / rotary_sin it is rotated by.
    FlashAttention's cache_leftpad: the cache of sequence b starts at slot cache_leftpad[b] (the slots before it are
    padding), so new token t, written at slot cache_seqlens[b] + t, is at position cache_seqlens[b] -
    cache_leftpad[b] + t of its sequence."""
    B = cache_seqlens.shape[0]
    pos = cache_seqlens.to(torch.long).view(B, 1) + torch.arange(new_tokens, device=cache_seqlens.device).view(1, -1)
    return pos if cache_leftpad is None else pos - cache_leftpad.to(torch.long).view(B, 1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding of x (B, T, H, D) at `positions` (B, T) long: FlashAttention's apply_rotary_emb_torch
    (flash_attn/layers/rotary.py) with the cos / sin rows of each token's position.

    cos, sin: (seqlen_ro, rotary_dim / 2); rotary_dim = 2 * cos.shape[1] <= D. The first rotary_dim dims of x are
    rotated, the rest are returned unchanged:
        out[:r] = x[:r] * cos_r + rotate_half(x[:r]) * sin_r
    interleaved=False (GPT-NeoX, HF Llama): pairs (x[i], x[i + r/2]); rotate_half(x) = cat(-x[r/2:r], x[:r/2]) and
                      cos_r = cat(cos, cos).
    interleaved=True (GPT-J): pairs (x[2i], x[2i+1]); rotate_half(x) = (-x[1], x[0], -x[3], x[2], ...) and
                      cos_r = cos repeated twice in place (cos[0], cos[0], cos[1], cos[1], ...).
    Computed in float32 (float64 for float64 x) from the inputs' exact values, each product and the sum rounded in
    that precision (no fused multiply-add), and rounded once to x's dtype: the Triton kernel
    (kernels/kv_cache_append.py) computes the same operations and gives the same bits."""
    r = 2 * cos.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, s = cos.to(work)[positions], sin.to(work)[positions]                     # (B, T, r/2)
    if interleaved:
        c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
    else:
        c, s = torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1)
    c, s = c.unsqueeze(2), s.unsqueeze(2)                                       # (B, T, 1, r): every head
    xr = x[..., :r].to(work)
    if interleaved:
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
    return torch.cat([(xr * c + rot * s).to(x.dtype), x[..., r:]], dim=-1)


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor],
                    cache_batch_idx: Optional[torch.Tensor] = None, cache_leftpad: Optional[torch.Tensor] = None,
                    rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                    rotary_interleaved: bool = False) -> torch.Tensor:
    """Write k_new/v_new (B, T, Hkv, D) at positions cache_seqlens[b] + t (in place) of cache row
    cache_batch_idx[b] (default b; or through block_table); return cache_seqlens + T. With rotary_cos/rotary_sin,
    k_new is rotated first (apply_rotary) at its logical position (rotary_positions: minus cache_leftpad[b]); v_new
    never is."""
    T = k_new.shape[1]
    rows, slots = append_positions(cache_seqlens, T, k_cache.shape[1], block_table, cache_batch_idx)
    if rotary_cos is not None:
        k_new = apply_rotary(k_new, rotary_cos, rotary_sin, rotary_positions(cache_seqlens, T, cache_leftpad),
                             rotary_interleaved)
    k_cache.index_put_((rows, slots), k_new.to(k_cache.dtype))
    v_cache.index_put_((rows, slots), v_new.to(v_cache.dtype))
    return cache_seqlens + T
