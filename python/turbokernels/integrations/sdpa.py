"""turbokernels.scaled_dot_product_attention: a drop-in for torch.nn.functional.scaled_dot_product_attention.

Same signature and layout (batch, heads, seqlen, head_dim). Cases the fused kernel cannot express exactly are
computed by torch itself, with a one-time note, never with a wrong answer:
  * an attn_mask (boolean or additive) or dropout_p > 0;
  * is_causal with seqlen_q != seqlen_k: torch aligns its causal mask to the top-left corner, turbokernels.attention
    (like FlashAttention >= 2.1) to the bottom-right;
  * inputs that are not 4-D, a value head_dim other than query's, batch sizes torch would broadcast.
Arguments are checked first, on every path: errors name this function's arguments (query, key, value, ...).
"""
from __future__ import annotations

import importlib
import math
import numbers
import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

from ..backends import forced_backend as _forced_backend
from ..ops.attention import MAX_HEAD_DIM, _dense_bhsd, _run_bhsd, attention

ops_attention = importlib.import_module("turbokernels.ops.attention")  # the module (its name is the function's too)
_is_compiling = torch.compiler.is_compiling

_noted: set[str] = set()


def _note_once(reason: str) -> None:
    if reason not in _noted:
        _noted.add(reason)
        warnings.warn(f"turbokernels.scaled_dot_product_attention: {reason}; computing this call with "
                      "torch.nn.functional.scaled_dot_product_attention", stacklevel=3)


FN = "scaled_dot_product_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(query, key, value, attn_mask, dropout_p, scale, enable_gqa) -> None:
    """The argument checks, before choosing between the fused kernel and torch's fallback, so that an error names
    this function's arguments whichever path the call would take."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{FN}({name}): expected a torch.Tensor, got {type(t).__name__}")
    if query.dtype not in DTYPES:
        raise TypeError(f"{FN}(query): dtype must be float16, bfloat16, float32 or float64, got {query.dtype}")
    if query.dim() < 2:
        raise ValueError(f"{FN}(query): expected (..., seqlen, head_dim), got shape {tuple(query.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{FN}({name}): dtype {t.dtype} does not match query's {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{FN}({name}): is on {t.device} but query is on {query.device}")
        if t.dim() != query.dim():
            raise ValueError(f"{FN}({name}): expected {query.dim()} dims like query, got shape {tuple(t.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"{FN}(key): head_dim {key.shape[-1]} does not match query's {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"{FN}(value): seqlen {value.shape[-2]} does not match key's {key.shape[-2]}")
    if query.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        if not enable_gqa:
            raise ValueError(f"{FN}(key): query has {query.shape[-3]} heads and key {key.shape[-3]}; pass "
                             f"enable_gqa=True for grouped-query attention (as torch requires)")
        if key.shape[-3] == 0 or query.shape[-3] % key.shape[-3]:
            raise ValueError(f"{FN}(key): query's {query.shape[-3]} heads must be a multiple of key's "
                             f"{key.shape[-3]}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{FN}(attn_mask): expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != query.device:
            raise ValueError(f"{FN}(attn_mask): is on {attn_mask.device} but query is on {query.device}")
    # the usual float first, without the numbers ABCs (~1 us each)
    if not (type(dropout_p) is float and 0.0 <= dropout_p <= 1.0) and (
            isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0):
        raise ValueError(f"{FN}(dropout_p): must be in [0, 1], got {dropout_p!r}")
    if scale is not None and not (type(scale) is float and math.isfinite(scale)) and (
            isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)):
        raise ValueError(f"{FN}(scale): expected a finite float or None, got {scale!r}")


def fallback_reason(query, key, attn_mask, dropout_p, is_causal, value=None) -> Optional[str]:
    if attn_mask is not None:
        return "attn_mask is not fused"
    if dropout_p > 0.0:
        return "dropout is not fused"
    if is_causal and query.shape[-2] != key.shape[-2]:
        return "is_causal with seqlen_q != seqlen_k uses torch's top-left alignment"
    if query.dim() != 4:
        return f"{query.dim()}-D inputs (the fused kernel takes (batch, heads, seqlen, head_dim))"
    if value is not None and value.shape[-1] != query.shape[-1]:
        return "a value head_dim different from query's"
    if query.shape[0] != key.shape[0]:
        return "batch sizes that differ between query and key (torch broadcasts them)"
    return None


_FUSED_DTYPES = DTYPES
_Tensor = torch.Tensor
_INF = math.inf


def _usual(query, key, value, is_causal, scale, enable_gqa) -> Optional[torch.Tensor]:
    """The usual call (CPU tensors, no mask, no dropout: the caller tested the last two), run on torch's kernel when
    cheap tests that imply every check of _check, no fallback_reason and every check of turbokernels.attention pass
    and the torch backend is chosen (ops/attention._run_bhsd); else None: the checked path, which raises the error a
    bad call deserves."""
    # exactly torch.Tensor (a subclass dispatches itself: the checked path serves it)
    if not (type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor):
        return None
    dtype = query.dtype
    if (dtype not in _FUSED_DTYPES or key.dtype is not dtype or value.dtype is not dtype or query.dim() != 4
            or key.dim() != 4 or value.dim() != 4 or not (query.is_cpu and key.is_cpu and value.is_cpu)):
        return None
    qs, ks = query.shape, key.shape
    head_dim, heads = qs[3], ks[1]
    if (value.shape != ks or ks[0] != qs[0] or ks[3] != head_dim or not 1 <= head_dim <= MAX_HEAD_DIM
            or heads == 0 or (qs[1] != heads and (not enable_gqa or qs[1] % heads)) or (is_causal and qs[2] != ks[2])
            or 0 in qs):
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not (type(scale) is float and -_INF < scale < _INF):
        return None
    if head_dim > 1 and not (query.stride()[3] == 1 and key.stride()[3] == 1 and value.stride()[3] == 1):
        return None
    return _run_bhsd(query, key, value, is_causal, scale, head_dim, plain=True)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    if attn_mask is None and type(dropout_p) is float and dropout_p == 0.0:
        if (not _is_compiling() and type(query) is _Tensor and type(key) is _Tensor and type(value) is _Tensor
                and query.is_cpu and (scale is None or type(scale) is float) and type(is_causal) is bool
                and type(enable_gqa) is bool and _forward_ad._current_level < 0 and _forced_backend() is None):
            # the usual CPU call in one C++ call (attention's, in this layout: ops/attention.py); None: not that call
            fast = ops_attention._fast if ops_attention._fast is not None else ops_attention._resolve_fast()
            if fast:
                flags = ops_attention._fast_flags
                out = fast(query, key, value, is_causal, scale, -1, -1, 0.0, flags[0], flags[1], True, enable_gqa)
                if out is not None:
                    return out
        out = _usual(query, key, value, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    _check(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    reason = fallback_reason(query, key, attn_mask, dropout_p, is_causal, value)
    if reason is not None:
        _note_once(reason)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    # SDPA's layout is the kernel's: the torch backend runs on these tensors as they are (no transposes)
    out = _dense_bhsd(query, key, value, is_causal, scale)
    if out is not None:
        return out
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal,
                    softmax_scale=scale)
    return out.transpose(1, 2)
