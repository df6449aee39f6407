"""FlashAttention's Python API on turbokernels' kernels, for code written against `flash_attn`:

    from turbokernels.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same arguments, defaults and semantics as flash_attn 2.6+ (flash_attn/flash_attn_interface.py), checked by a port
of FlashAttention's own tests (tests/test_flash_attn_compat.py, against FlashAttention's reference code).
`flash_attn_with_kvcache` is `kv_cache_append` (the new k/v, rotated when rotary_cos/sin are given) followed by
`decode_attention` over the cache (the query rotated here, at the positions FlashAttention uses). What FlashAttention
has and these do not is refused by name, never ignored: dropout, return_attn_probs (the attention matrix).
`num_splits` is accepted and not needed (the decode kernel sizes its split of the cache itself); FlashAttention's
paged block size (a multiple of 256) is not a restriction here (a multiple of 16).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..ops.attention import attention
from ..ops.decode_attention import decode_attention, kv_cache_append
from ..reference.decode_attention import apply_rotary


def _refuse(fn: str, dropout_p, return_attn_probs) -> None:
    if dropout_p:
        raise NotImplementedError(f"{fn}(dropout_p): dropout is not supported (inference kernels); got {dropout_p}")
    if return_attn_probs:
        raise NotImplementedError(f"{fn}(return_attn_probs): the attention matrix is never formed; use "
                                  f"return_attn_probs=False (turbokernels.attention(..., return_lse=True) gives lse)")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_func: q (batch, seqlen_q, heads, d), k/v (batch, seqlen_k, heads_kv, d)."""
    _refuse("flash_attn_func", dropout_p, return_attn_probs)
    return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=tuple(window_size),
                     softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn.flash_attn_varlen_func: packed q (total_q, heads, d), k/v (total_k, heads_kv, d)."""
    _refuse("flash_attn_varlen_func", dropout_p, return_attn_probs)
    if block_table is not None:
        raise NotImplementedError("flash_attn_varlen_func(block_table): a paged KV cache is served by "
                                  "flash_attn_with_kvcache (decode) here, not by the varlen prefill")
    return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=tuple(window_size),
                     softcap=softcap, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                     deterministic=deterministic)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash_attn.flash_attn_with_kvcache. cache_seqlens are the lengths BEFORE k/v are appended (an int, a
    (batch,) int32 tensor, or None: the whole cache). With k/v they are written into the caches in place at
    cache_seqlens (k rotated at positions cache_seqlens + t when rotary_cos/sin are given); the query is rotated at
    the same positions when causal or local, else all at cache_seqlens, as FlashAttention does. Returns out, and
    lse (batch, heads, seqlen_q) with return_softmax_lse."""
    fn = "flash_attn_with_kvcache"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{fn}(q): expected a 4-D tensor (batch, seqlen_q, heads, head_dim)")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"{fn}(num_splits): expected an int >= 0, got {num_splits!r}")
    batch = q.shape[0]
    if (k is None) != (v is None):
        raise ValueError(f"{fn}(k, v): pass both new keys and new values, or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{fn}(rotary_cos, rotary_sin): pass both, or neither")
    if rotary_cos is not None and k is None:
        raise ValueError(f"{fn}(rotary_cos): rotary embedding is applied with new k/v only (as FlashAttention)")
    if cache_seqlens is None:
        if block_table is not None:
            raise ValueError(f"{fn}(cache_seqlens): required with a block_table")
        cache_seqlens = k_cache.shape[1] if isinstance(k_cache, torch.Tensor) else 0
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    lens = cache_seqlens
    if k is not None:
        lens = kv_cache_append(k_cache, v_cache, k, v, cache_seqlens, block_table=block_table,
                               cache_batch_idx=cache_batch_idx, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                               rotary_interleaved=rotary_interleaved)
        if rotary_cos is not None:
            local = not (isinstance(window_size, (tuple, list)) and tuple(int(w) for w in window_size) == (-1, -1)) \
                if not isinstance(window_size, torch.Tensor) else bool((window_size != -1).any())
            steps = torch.arange(q.shape[1], device=q.device) if (causal or local) else \
                torch.zeros(q.shape[1], dtype=torch.long, device=q.device)
            positions = cache_seqlens.to(torch.long).view(batch, 1) + steps.view(1, -1)
            q = apply_rotary(q, rotary_cos, rotary_sin, positions, rotary_interleaved)
    return decode_attention(q, k_cache, v_cache, lens, block_table=block_table, softmax_scale=softmax_scale,
                            causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                            cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                            return_lse=return_softmax_lse)
