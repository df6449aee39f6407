"""Hugging Face transformers: `attn_implementation="turbokernels"`.

    import turbokernels.integrations.transformers as tkt
    tkt.register()                                   # idempotent; also done by turbokernels.model.use_attention
    model.set_attn_implementation("turbokernels")    # or from_pretrained(..., attn_implementation="turbokernels")

The attention function is always registered together with its mask function (AttentionMaskInterface): without
it transformers hands the function `attention_mask=None` and padding is silently ignored (measured: a logit
difference of 1.3 on Llama). We register transformers' own sdpa_mask, which returns None exactly when the mask is
pure causal/full and can be skipped, so those calls run fused. A sliding-window model (Mistral, Qwen2, Gemma-2: the
attention module passes `sliding_window`) whose window matters gets a real mask; when that mask is exactly the causal
sliding-window pattern the kernel computes (checked element by element, on the CPU), the call runs fused with
window_size=(sliding_window - 1, 0). Any other mask (padding, packed sequences) goes to transformers' sdpa path,
never to a wrong answer.
"""
from __future__ import annotations

import warnings

import torch

from ..ops.attention import _dense_bhsd, attention

NAME = "turbokernels"
_noted: set[str] = set()


def _note_once(reason: str) -> None:
    if reason not in _noted and not torch.compiler.is_compiling():  # a traced model: no warnings.warn in the graph
        _noted.add(reason)
        warnings.warn(f"turbokernels attention: {reason}; using transformers' sdpa attention for such calls",
                      stacklevel=3)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: query (B, Hq, S, D), key/value (B, Hkv, S_k, D) -> ((B, S, Hq, D), None)."""
    # No import statement on the fused path: a function-level `from ... import` costs ~8 us a call (measured, Xeon),
    # 30 calls a decoded token on SmolLM2.
    reason, window = None, None
    if attention_mask is not None:
        window = _sliding_window(attention_mask, query, key, kwargs.get("sliding_window"))
        if window is None:
            reason = "an attention mask (padding or packed sequences) is not fused"
    if reason is None and dropout > 0.0:
        reason = "attention dropout is not fused"
    elif reason is None and kwargs.get("position_bias") is not None:
        reason = "position_bias is not fused"
    elif reason is None and kwargs.get("output_attentions"):
        reason = "output_attentions needs the attention weights"
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        _note_once(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if window is not None:  # the mask was exactly this window: bottom-right aligned, as the kernel's causal
        out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=True,
                        softmax_scale=scaling, window_size=(window, 0), softcap=kwargs.get("softcap") or 0.0)
        return out, None
    q_len = query.shape[2]
    # Same rule as transformers' sdpa path: causal only when several queries and no mask.
    causal = q_len > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if causal and key.shape[2] > q_len:
        # Prefill into an empty static cache: the keys past q_len are unwritten slots (sdpa slices them too).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    softcap = kwargs.get("softcap") or 0.0
    if not softcap and (scaling is None or type(scaling) is float) and _consistent(query, key, value):
        # transformers' layout is SDPA's, the kernel's: no transposes in, one view out (ops/attention._dense_bhsd;
        # None when another backend than torch's kernel serves the call, or autograd/a tracer must see it)
        out = _dense_bhsd(query, key, value, causal, scaling, plain=True)
        if out is not None:
            return out.transpose(1, 2), None
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                    softmax_scale=scaling, softcap=softcap)
    return out, None


def _sliding_window(mask, query, key, sliding_window):
    """window_left (sliding_window - 1) when `mask` (transformers' bool (batch or 1, 1, q_len, kv_len)) is, for every
    row, exactly the causal sliding window of transformers' sliding_window_overlay (key j visible to query i iff
    kv_len - q_len + i - sliding_window < j <= kv_len - q_len + i); else None. CPU only: comparing on a GPU would
    cost a host sync per call (and break CUDA graph capture)."""
    if (type(sliding_window) is not int or sliding_window < 1 or type(mask) is not torch.Tensor
            or mask.dtype is not torch.bool or not mask.is_cpu or mask.dim() != 4 or mask.shape[1] != 1
            or torch.compiler.is_compiling()):
        return None
    q_len, kv_len = query.shape[2], key.shape[2]
    if tuple(mask.shape[2:]) != (q_len, kv_len) or mask.shape[0] not in (1, query.shape[0]):
        return None
    i = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    if not bool((mask == ((j <= i) & (j > i - sliding_window))).all()):
        return None
    return sliding_window - 1


def _consistent(query, key, value) -> bool:
    """What _dense_bhsd leaves to its caller: plain tensors on one device (CPU: the only one it serves), one dtype,
    4-D, the same batch, one head_dim; anything else takes attention()'s checks."""
    t = torch.Tensor
    return (type(query) is t and type(key) is t and type(value) is t and query.is_cpu and key.is_cpu
            and value.is_cpu and key.dtype is query.dtype and value.dtype is query.dtype and query.dim() == 4
            and key.dim() == 4 and key.shape[0] == query.shape[0] and key.shape[3] == query.shape[3])


def register() -> str:
    """Register attention + mask functions under the name "turbokernels" (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
