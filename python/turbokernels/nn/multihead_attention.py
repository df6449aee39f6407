"""MultiheadAttention: nn.MultiheadAttention with the fused attention kernel inside.

A subclass, so parameters, state_dict and repr are torch's own; `from_module(mha)` copies an existing layer. Calls
the fused kernel cannot express exactly run torch's own implementation (with a one-time note): need_weights=True
(torch's default: pass need_weights=False, as nn.TransformerEncoderLayer does), key_padding_mask, an attn_mask
that is not flagged is_causal, dropout while training, add_bias_kv / add_zero_attn.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import requested_device
from ..ops.attention import _dense_bhsd, attention

_noted: set[str] = set()


def _note_once(reason: str) -> None:
    if reason not in _noted:
        _noted.add(reason)
        warnings.warn(f"turbokernels.nn.MultiheadAttention: {reason}; using torch's implementation for such calls",
                      stacklevel=3)


def mha_config(mha: nn.MultiheadAttention) -> dict:
    """The constructor arguments of an nn.MultiheadAttention (torch's or ours) beyond its state dict, device and
    dtype: what rebuilding it as the other class takes (from_module, turbokernels.restore, checkpoints)."""
    return dict(embed_dim=mha.embed_dim, num_heads=mha.num_heads, dropout=mha.dropout,
                bias=mha.in_proj_bias is not None, add_bias_kv=mha.bias_k is not None,
                add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first)


def mha_weight(mha: nn.MultiheadAttention) -> torch.Tensor:
    """Its input projection weight (packed, or q's when k/v dims differ): where its device and dtype are read."""
    return mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight


class MultiheadAttention(nn.MultiheadAttention):
    def __init__(self, embed_dim, num_heads, *args, device=None, dtype=None, **kwargs):
        requested_device("MultiheadAttention(device)", device)
        super().__init__(embed_dim, num_heads, *args, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttention.from_module(mha): expected an nn.MultiheadAttention, got "
                            f"{type(mha).__name__}")
        p = mha_weight(mha)
        layer = cls(**mha_config(mha), device=p.device, dtype=p.dtype)
        layer.load_state_dict(mha.state_dict())
        layer.train(mha.training)
        return layer

    def _fallback_reason(self, query, key, key_padding_mask, need_weights, attn_mask, is_causal) -> Optional[str]:
        if need_weights:
            return "need_weights=True needs the attention weights"
        if key_padding_mask is not None:
            return "key_padding_mask is not fused"
        if attn_mask is not None and not is_causal:
            return "an attn_mask not flagged is_causal is not fused"
        if self.training and self.dropout > 0.0:
            return "attention dropout is not fused"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not fused"
        if query.dim() != 3:
            return "unbatched inputs"
        if is_causal and query.shape[0 if not self.batch_first else 1] != key.shape[0 if not self.batch_first else 1]:
            return "is_causal with different query and key lengths"
        return None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        reason = self._fallback_reason(query, key, key_padding_mask, need_weights, attn_mask, is_causal)
        if reason is not None:
            _note_once(reason)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        E, H = self.embed_dim, self.num_heads
        if query is key and key is value and self._qkv_same_embed_dim:
            # self-attention: one projection for q, k and v (as torch's own layer does), its (B, L, 3, H, D) result
            # seen as three (B, H, L, D) views, the kernel's layout: no per-head transposes
            x = query if self.batch_first else query.transpose(0, 1)  # (L, B, E) -> (B, L, E)
            B, L = x.shape[0], x.shape[1]
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, H, E // H)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = _dense_bhsd(q, k, v, is_causal, None)
            if out is None:  # not the torch backend, autograd, a tracer...: the functional's path
                out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal)
            else:  # (B, H, L, D), a view of a contiguous (B, L, H, D) tensor
                out = out.transpose(1, 2)
            out = F.linear(out.reshape(B, L, E), self.out_proj.weight, self.out_proj.bias)
            return (out if self.batch_first else out.transpose(0, 1)), None
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, w_q, b_q).view(B, L, H, E // H)
        k = F.linear(key, w_k, b_k).view(B, S, H, E // H)
        v = F.linear(value, w_v, b_v).view(B, S, H, E // H)
        out = attention(q, k, v, causal=is_causal).reshape(B, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None
