"""turbokernels.scaled_dot_product_attention: a drop-in for torch.nn.functional.scaled_dot_product_attention.

Same signature and layout (batch, heads, seqlen, head_dim). Cases the fused kernel cannot express exactly are
computed by torch itself, with a one-time note, never with a wrong answer:
  * an attn_mask (boolean or additive) or dropout_p > 0;
  * is_causal with seqlen_q != seqlen_k: torch aligns its causal mask to the top-left corner, turbokernels.attention
    (like FlashAttention >= 2.1) to the bottom-right.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

_noted: set[str] = set()


def _note_once(reason: str) -> None:
    if reason not in _noted:
        _noted.add(reason)
        warnings.warn(f"turbokernels.scaled_dot_product_attention: {reason}; computing this call with "
                      "torch.nn.functional.scaled_dot_product_attention", stacklevel=3)


def fallback_reason(query, key, attn_mask, dropout_p, is_causal) -> Optional[str]:
    if attn_mask is not None:
        return "attn_mask is not fused"
    if dropout_p > 0.0:
        return "dropout is not fused"
    if is_causal and query.shape[-2] != key.shape[-2]:
        return "is_causal with seqlen_q != seqlen_k uses torch's top-left alignment"
    if query.dim() != 4:
        return f"{query.dim()}-D inputs (the fused kernel takes (batch, heads, seqlen, head_dim))"
    return None


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    from ..ops.attention import attention
    reason = fallback_reason(query, key, attn_mask, dropout_p, is_causal)
    if reason is None and query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"scaled_dot_product_attention: query has {query.shape[1]} heads and key "
                         f"{key.shape[1]}; pass enable_gqa=True for grouped-query attention (as torch requires)")
    if reason is not None:
        _note_once(reason)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal,
                    softmax_scale=scale)
    return out.transpose(1, 2)
