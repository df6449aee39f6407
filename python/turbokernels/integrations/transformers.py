"""Hugging Face transformers: `attn_implementation="turbokernels"`.

    import turbokernels.integrations.transformers as tkt
    tkt.register()                                   # idempotent; also done by turbokernels.model.use_attention
    model.set_attn_implementation("turbokernels")    # or from_pretrained(..., attn_implementation="turbokernels")

The attention function is always registered together with its mask function (AttentionMaskInterface): without
it transformers hands the function `attention_mask=None` and padding is silently ignored (measured: a logit
difference of 1.3 on Llama). We register transformers' own sdpa_mask, which returns None exactly when the mask is
pure causal/full and can be skipped, so those calls run fused. A mask that is there (padding, a sliding window that
matters) is read once per forward (the plan is kept on the mask tensor, which every layer of a forward shares):
when it is exactly what the kernel computes over the unpadded sequences -- each row's real queries attending its
real keys, causal bottom-right aligned, within `sliding_window` -- the call runs fused: dense with
window_size=(sliding_window - 1, 0) when nothing is padded, else unpadded into the varlen kernel (cu_seqlens) and
padded back with zeros in the rows that attend nothing, as FlashAttention's transformers integration does (that
costs host syncs on a GPU: an index of the real tokens, like FlashAttention's). Any other mask (packed sequences,
holes, custom patterns) goes to transformers' sdpa path, never to a wrong answer. Gemma-2's
`attn_logit_softcapping` reaches the kernel as softcap.
"""
from __future__ import annotations

import threading
import warnings

import torch

from ..ops.attention import _dense_bhsd, attention
from ..ops.decode_attention import decode_attention

NAME = "turbokernels"
# new queries per call up to which a call without a mask runs the decode kernel on a GPU (on the CPU the dense
# entry's C++ path already takes one-row calls to the decode kernel)
DECODE_MAX_QUERIES = 16
_noted: set[str] = set()
_is_compiling = torch.compiler.is_compiling
# integrations/transformers_cache.KVCache.update leaves (the key states it returned, its layer) here; the attention
# call that receives that very tensor reads the cache instead (per thread: one model per thread at a time)
_CACHE_SLOT = threading.local()
_CACHE_SLOT.entry = None


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
    cache_layer = None
    entry = getattr(_CACHE_SLOT, "entry", None)
    if entry is not None:
        _CACHE_SLOT.entry = None
        if entry[0] is key:  # the states a turbokernels KVCache just stored
            cache_layer = entry[1]
            out = cache_layer.attend(module, query, attention_mask, scaling, kwargs)
            if out is not None:
                return out, None
    reason, plan = None, None
    if attention_mask is not None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = kwargs.get("sliding_window")
        if _is_compiling() and causal and dropout == 0.0 and not kwargs.get("output_attentions") \
                and kwargs.get("position_bias") is None:
            out = _traced_causal(query, key, value, attention_mask, scaling,
                                 window - 1 if type(window) is int and window > 0 else -1,
                                 float(kwargs.get("softcap") or 0.0))
            if out is not None:
                return out, None
        plan = _mask_plan(attention_mask, query, key, bool(causal),
                          window - 1 if type(window) is int and window > 0 else -1)
        if plan is None:
            reason = "an attention mask that is not padding or a causal sliding window (e.g. packed sequences)"
    if cache_layer is not None:  # the prompt, into an empty KVCache: its padding is the cache's left pad
        cache_layer.set_leftpad(plan, key.shape[2])
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
    if plan is not None:
        return _masked(query, key, value, plan, scaling, kwargs.get("softcap") or 0.0), None
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
    if (q_len <= DECODE_MAX_QUERIES and query.is_cuda and key.shape[2] >= q_len
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))):
        # a decode step (transformers' own cache): the split-KV decode kernel, not one mostly empty prefill tile per
        # head; every key is valid (no mask), bottom-right causal among the new queries as attention's
        lens = torch.full((query.shape[0],), key.shape[2], dtype=torch.int32, device=query.device)
        out = decode_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), lens,
                               softmax_scale=scaling, softcap=float(softcap), causal=bool(causal) or q_len == 1)
        return out, None
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                    softmax_scale=scaling, softcap=softcap)
    return out, None


def _traced_causal(query, key, value, mask, scaling, window_left: int, softcap: float):
    """Under torch.compile (transformers then always builds the mask, and its values cannot be read while
    tracing): a bool mask whose every row is one causal run of keys -- from each row's first visible key (its left
    pad, or its window's start) to its query's position, bottom-right aligned to the last visible key -- is
    decode_attention with cache_seqlens = last visible key + 1 and cache_leftpad = first visible key, all computed in
    the graph (no host sync: CUDA-graph safe). That the mask IS that pattern is asserted in the graph
    (torch._assert_async: an error on the CPU, a device-side assert on a GPU), never assumed. None: not such a
    call (then the call falls back, as any unfused mask)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype is not torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if tuple(mask.shape[2:]) != (q_len, kv_len) or mask.shape[0] not in (1, batch) or q_len > kv_len:
        return None
    m = mask[:, 0].expand(batch, q_len, kv_len)
    seen = m.any(1).to(torch.int32)                                           # (batch, kv_len)
    first = seen.argmax(1)
    last = kv_len - 1 - seen.flip(1).argmax(1)
    j = torch.arange(kv_len, device=mask.device).view(1, 1, kv_len)
    pos = (last + 1 - q_len).view(batch, 1, 1) + torch.arange(q_len, device=mask.device).view(1, q_len, 1)
    want = (j >= first.view(batch, 1, 1)) & (j <= pos)
    if window_left >= 0:
        want &= j >= pos - window_left
    torch._assert_async((want == m).all(), "turbokernels attention: under torch.compile the attention mask must "
                        "be causal over each row's visible keys (left padding, a sliding window); this one is not (right padding, "
                        "packed sequences or a custom mask: run such a model uncompiled)")
    lens = (last + 1).to(torch.int32)
    return decode_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), lens,
                            softmax_scale=scaling, window_size=(window_left, -1), softcap=softcap,
                            cache_leftpad=first.to(torch.int32))


class _Plan:
    """How a masked call runs fused: causal, window_left, and for a padded batch the flat indices of the real queries
    and keys ((batch * q_len) and (batch * kv_len) numbering) with their int32 cu_seqlens; dense when nothing is
    padded (then q_idx is None)."""
    __slots__ = ("key", "causal", "window_left", "q_idx", "k_idx", "cu_q", "cu_k", "k_real")

    def __init__(self, key, causal, window_left, q_idx=None, k_idx=None, cu_q=None, cu_k=None, k_real=None):
        self.key, self.causal, self.window_left = key, causal, window_left
        self.q_idx, self.k_idx, self.cu_q, self.cu_k, self.k_real = q_idx, k_idx, cu_q, cu_k, k_real



def _mask_plan(mask, query, key, causal: bool, window_left: int):
    """A _Plan when `mask` (transformers' bool (batch or 1, 1, q_len, kv_len)) is exactly the pattern the kernel
    computes over the unpadded sequences, else None.

    Row b's real keys are those some query attends, its real queries those attending some key. Unpadded (in order)
    they make a varlen sequence in which real query r attends real key c iff c <= r + n_k - n_q (causal, bottom-right
    aligned) and c >= r + n_k - n_q - window_left (window_left >= 0). The plan is taken only when that implied mask
    equals `mask` element by element, so left or right padding, a sliding window, both, or a bidirectional padding
    mask (causal=False) run fused, and anything else (holes, packed sequences) falls back. Computed once per mask
    object: transformers builds one per forward (per layer type) and hands it to every layer."""
    if (type(mask) is not torch.Tensor or mask.dtype is not torch.bool or mask.dim() != 4 or mask.shape[1] != 1
            or torch.compiler.is_compiling()):
        return None
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if tuple(mask.shape[2:]) != (q_len, kv_len) or mask.shape[0] not in (1, batch) or key.shape[0] != batch:
        return None
    plan_key = (batch, causal, window_left, mask._version)  # _version: a mask changed in place is read again
    cached = getattr(mask, "_turbokernels_plan", None)
    if cached is not None and cached[0] == plan_key:
        return cached[1]
    plan = _build_plan(mask[:, 0].expand(batch, q_len, kv_len), plan_key, causal, window_left)
    try:
        mask._turbokernels_plan = (plan_key, plan)
    except (AttributeError, RuntimeError):  # not a plain tensor object: recomputed on each call
        pass
    return plan


def _build_plan(m, plan_key, causal: bool, window_left: int):
    if not causal and window_left >= 0:  # a bidirectional window is not what the kernel's window means here
        return None
    q_len, kv_len = m.shape[1], m.shape[2]
    i = torch.arange(kv_len - q_len, kv_len, device=m.device).unsqueeze(1)
    j = torch.arange(kv_len, device=m.device).unsqueeze(0)
    dense = j <= i if causal else torch.ones(q_len, kv_len, dtype=torch.bool, device=m.device)
    if window_left >= 0:
        dense &= j >= i - window_left
    if torch.equal(dense.expand_as(m), m):  # nothing padded (keys left of every window included): the dense call
        return _Plan(plan_key, causal, window_left)
    k_real, q_real = m.any(1), m.any(2)                                  # (batch, kv_len), (batch, q_len)
    if not _unpadded_equals(m, q_real, k_real, causal, window_left):
        # right padding: a pad query (its own key, at the same place from the end, is a pad) still attends the real
        # keys before it; it is dropped (zeros), as FlashAttention's integration drops it. Its key is never
        # attended, so no real token's output changes. A row left without queries means the alignment is not
        # this one (e.g. queries in the middle of a static cache): no plan.
        own = q_real & k_real[:, kv_len - q_len:] if q_len <= kv_len else None
        if (own is None or not torch.equal(own.any(1), q_real.any(1))
                or not _unpadded_equals(m, own, k_real, causal, window_left)):
            return None
        q_real = own
    q_idx = q_real.flatten().nonzero().flatten()
    k_idx = k_real.flatten().nonzero().flatten()
    zero = torch.zeros(1, dtype=torch.int32, device=m.device)
    cu_q = torch.cat([zero, q_real.sum(1).cumsum(0).to(torch.int32)])
    cu_k = torch.cat([zero, k_real.sum(1).cumsum(0).to(torch.int32)])
    return _Plan(plan_key, causal, window_left, q_idx, k_idx, cu_q, cu_k, k_real)


def _unpadded_equals(m, q_real, k_real, causal: bool, window_left: int) -> bool:
    """Whether `m`, in the rows q_real keeps, is what the varlen call over the unpadded rows computes."""
    n_k, n_q = k_real.sum(1, keepdim=True), q_real.sum(1, keepdim=True)
    k_rank = k_real.cumsum(1) - 1
    diag = (q_real.cumsum(1) - 1 + n_k - n_q).unsqueeze(2)               # the last key rank query r may attend
    implied = q_real.unsqueeze(2) & k_real.unsqueeze(1)
    if causal:
        implied &= k_rank.unsqueeze(1) <= diag
    if window_left >= 0:
        implied &= k_rank.unsqueeze(1) >= diag - window_left
    return torch.equal(implied, m & q_real.unsqueeze(2))


def _masked(query, key, value, plan: _Plan, scaling, softcap: float) -> torch.Tensor:
    """The fused call of a mask plan: query (B, Hq, S, D), key/value (B, Hkv, S_k, D) -> (B, S, Hq, D)."""
    window = (plan.window_left, 0 if plan.causal else -1)
    if plan.q_idx is None:
        return attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=plan.causal,
                         softmax_scale=scaling, window_size=window, softcap=softcap)
    batch, heads_q, q_len, head_dim = query.shape
    heads_kv, kv_len = key.shape[1], key.shape[2]
    q = query.transpose(1, 2).reshape(batch * q_len, heads_q, head_dim).index_select(0, plan.q_idx)
    k = key.transpose(1, 2).reshape(batch * kv_len, heads_kv, head_dim).index_select(0, plan.k_idx)
    v = value.transpose(1, 2).reshape(batch * kv_len, heads_kv, head_dim).index_select(0, plan.k_idx)
    out = attention(q, k, v, causal=plan.causal, softmax_scale=scaling, window_size=window, softcap=softcap,
                    cu_seqlens_q=plan.cu_q, cu_seqlens_k=plan.cu_k)
    # rows that attend nothing (a left-padded prompt's pads) get zeros, as in FlashAttention's integration
    full = out.new_zeros(batch * q_len, heads_q, head_dim)
    full.index_copy_(0, plan.q_idx, out)
    return full.view(batch, q_len, heads_q, head_dim)


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
