"""A KV cache for Hugging Face transformers' `generate` that runs every decode step on turbokernels' decode kernel.

    from turbokernels.integrations.transformers_cache import KVCache
    model.set_attn_implementation("turbokernels")            # (turbokernels.integrations.transformers.register())
    cache = KVCache(model.config, batch_size=2, max_cache_len=512)                  # contiguous
    cache = KVCache(model.config, batch_size=2, max_cache_len=512, page_size=64)    # paged
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=200)  # (past_key_values= before 5.x)

Each layer keeps its keys and values in FlashAttention's layout, (batch, max_cache_len, heads_kv, head_dim), or
paged (num_pages, page_size, heads_kv, head_dim) with a block table (batch, pages per sequence) whose pages are
taken from a free list as the sequences grow. `update` writes the new tokens with `kv_cache_append` and hands the
new key/value states back unchanged; the attention function (integrations/transformers.py) recognizes them (by
identity, through a per-thread slot set here) and attends over the cache:
  * the prompt (the cache was empty): `attention` on the new tokens, fused, the padding mask unpadded as usual;
    a left-padded batch leaves each row's pad count as `cache_leftpad`;
  * every later step (one token, or a chunk): `decode_attention` over the cache, split over its length, with the
    layer's sliding window, softcap and `cache_leftpad`.
transformers' mask for a later step is then redundant: it is checked once per forward to be exactly causal (and
windowed) over each row's keys from its left pad on (on the CPU always; on a GPU when no CUDA graph is being
captured, one host sync per forward); a mask that is not (a custom one) runs transformers' sdpa over the gathered
cache, with a one-time note. Only attn_implementation="turbokernels" can read this cache: any other is refused at
the first update. Beam search (reorder) and cropping are refused; `reset()` empties the cache for reuse.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..ops.decode_attention import decode_attention, kv_cache_append
from ..reference.decode_attention import gather_cache
from . import transformers as _integration

_SLOT = _integration._CACHE_SLOT


class KVCacheLayer(CacheLayerMixin):
    """One decoder layer's cache. Lengths are the same for every row (pads occupy slots); `length` is kept on the
    host as well as in `lens` (int32 (batch,), the kernels' cache_seqlens), so nothing is read back."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "KVCache") -> None:
        super().__init__()
        self.owner = owner
        self.length = 0
        self.lens: Optional[torch.Tensor] = None
        self.leftpad: Optional[torch.Tensor] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        owner = self.owner
        batch, heads_kv, _, head_dim = key_states.shape
        if batch != owner.rows:
            raise ValueError(f"KVCache: the model's batch is {batch}, the cache was made for batch_size="
                             f"{owner.rows}")
        if value_states.shape[-1] != head_dim:
            raise ValueError("KVCache: keys and values of different head dims are not supported")
        self.device = key_states.device
        if owner.page_size is None:
            shape = (batch, owner.max_cache_len, heads_kv, head_dim)
        else:
            shape = (owner.num_pages, owner.page_size, heads_kv, head_dim)
        # zeros, not empty: a slot no query attends is never read by our kernels, but a fallback call may see it
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=self.device)
        self.lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        owner = self.owner
        if self.length + new > owner.max_cache_len:
            raise ValueError(f"KVCache: {self.length} + {new} tokens do not fit max_cache_len={owner.max_cache_len}")
        block_table = owner._pages_for(self.length + new, self.device)
        self.lens = kv_cache_append(self.keys, self.values, key_states.transpose(1, 2), value_states.transpose(1, 2),
                                    self.lens, block_table=block_table)
        self.length += new
        if self.length == new:
            self.leftpad = None  # a new prompt: the attention call sets it from the prompt's mask
        return key_states, value_states

    def attend(self, module, query: torch.Tensor, attention_mask, scaling, kwargs) -> Optional[torch.Tensor]:
        """(batch, new, heads_q, head_dim) over the cache, or None when the prompt's own attention call serves
        (the cache held nothing before these tokens)."""
        new = query.shape[2]
        if self.length == new:
            return None
        window = kwargs.get("sliding_window")
        window_left = window - 1 if type(window) is int and window > 0 else -1
        if attention_mask is not None and not self._mask_is_redundant(attention_mask, new, window_left):
            return self._fallback(module, query, attention_mask, scaling, kwargs)
        extra = {} if self.leftpad is None else {"cache_leftpad": self.leftpad}
        return decode_attention(query.transpose(1, 2), self.keys, self.values, self.lens,
                                block_table=self.owner._table(self.device), softmax_scale=scaling,
                                window_size=(window_left, -1), softcap=float(kwargs.get("softcap") or 0.0), **extra)

    def set_leftpad(self, plan, kv_len: int) -> None:
        """From the prompt's mask plan: each row's real keys must be one run ending at the last token (left
        padding, what generate expects of a decoder-only model); a row's pad count becomes its cache_leftpad."""
        if plan is None or plan.k_real is None:
            self.leftpad = None
            return
        k_real = plan.k_real
        pads = kv_len - k_real.sum(1)
        if not torch.equal(k_real, torch.arange(kv_len, device=k_real.device).unsqueeze(0) >= pads.unsqueeze(1)):
            raise ValueError("KVCache: a padded prompt must be left-padded (tokenizer padding_side='left'): each "
                             "row's real tokens one run ending at the last position")
        self.leftpad = pads.to(device=self.device, dtype=torch.int32)

    def _mask_is_redundant(self, mask, new: int, window_left: int) -> bool:
        """Whether transformers' mask for a step after the prompt is exactly what decode_attention computes
        (causal over the cache, from each row's left pad on, within the window). Read once per mask object."""
        if type(mask) is not torch.Tensor or mask.dtype is not torch.bool or mask.dim() != 4:
            return False
        if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
            return True  # cannot read it here; the prompt's padding (cache_leftpad) and the window are applied
        key = (self.length, new, window_left, mask._version, id(self.leftpad))
        cached = getattr(mask, "_turbokernels_cache_check", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        batch, length = self.lens.shape[0], self.length
        ok = tuple(mask.shape[2:]) == (new, length) and mask.shape[0] in (1, batch) and mask.shape[1] == 1
        if ok:
            i = torch.arange(length - new, length, device=mask.device).view(1, new, 1)
            j = torch.arange(length, device=mask.device).view(1, 1, length)
            want = j <= i
            if window_left >= 0:
                want = want & (j >= i - window_left)
            if self.leftpad is not None:
                want = want & (j >= self.leftpad.to(mask.device).view(-1, 1, 1))
            ok = torch.equal(mask[:, 0].expand(batch, new, length), want.expand(batch, new, length))
        try:
            mask._turbokernels_cache_check = (key, ok)
        except (AttributeError, RuntimeError):
            pass
        return ok

    def _fallback(self, module, query, attention_mask, scaling, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        _integration._note_once("a mask that is not causal over the KV cache from each row's left pad on")
        table = self.owner._table(self.device)
        k = gather_cache(self.keys, table)[:, :self.length].transpose(1, 2)
        v = gather_cache(self.values, table)[:, :self.length].transpose(1, 2)
        return sdpa_attention_forward(module, query, k, v, attention_mask, scaling=scaling, **kwargs)[0]

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5 passes cache_position
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.owner.max_cache_len

    def reset(self) -> None:
        self.length = 0
        self.leftpad = None
        if self.lens is not None:
            self.lens.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KVCache: cropping is not supported (assisted decoding)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("KVCache: beam search (reorder_cache) is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("KVCache: expanding the batch is not supported; make the cache for the full batch")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("KVCache: selecting rows is not supported")


class KVCache(Cache):
    """transformers Cache on turbokernels' kernels (see the module docstring).

    config: the model's config (its text config for multimodal models); its attention implementation must be
    "turbokernels" when the cache is used. batch_size, max_cache_len: the rows and tokens (prompt + new) it holds.
    page_size (a multiple of 16) makes it paged; num_pages (default: enough for every row at max_cache_len) bounds
    the pool shared by the rows, whose pages are assigned as they grow."""

    def __init__(self, config, batch_size: int, max_cache_len: int, *, page_size: Optional[int] = None,
                 num_pages: Optional[int] = None) -> None:
        for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
            if type(value) is not int or value < 1:
                raise ValueError(f"KVCache({name}): expected an int >= 1, got {value!r}")
        if page_size is not None and (type(page_size) is not int or page_size < 16 or page_size % 16):
            raise ValueError(f"KVCache(page_size): expected a multiple of 16, got {page_size!r}")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = getattr(text, "num_hidden_layers", None)
        if type(layers) is not int or layers < 1:
            raise ValueError("KVCache(config): the config has no num_hidden_layers")
        self.config = config
        self.rows, self.max_cache_len, self.page_size = batch_size, max_cache_len, page_size
        if page_size is not None:
            self.pages_per_seq = -(-max_cache_len // page_size)
            if num_pages is None:
                num_pages = batch_size * self.pages_per_seq
            if type(num_pages) is not int or num_pages < 1:
                raise ValueError(f"KVCache(num_pages): expected an int >= 1, got {num_pages!r}")
            self.num_pages = num_pages
            self._free = list(range(num_pages))
            self._host_table = torch.zeros(batch_size, self.pages_per_seq, dtype=torch.int32)
            self._pages_used = 0  # pages per row assigned so far (rows grow together)
            self._tables: dict = {}
        else:
            self.num_pages = None
        super().__init__(layers=[KVCacheLayer(self) for _ in range(layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if getattr(self.config, "_attn_implementation", None) != _integration.NAME:
            raise ValueError(f"KVCache: the model's attention implementation is "
                             f"{getattr(self.config, '_attn_implementation', None)!r}; only "
                             f"attn_implementation={_integration.NAME!r} reads this cache (call "
                             f"model.set_attn_implementation({_integration.NAME!r}))")
        layer = self.layers[layer_idx]
        out = layer.update(key_states, value_states)
        _SLOT.entry = (key_states, layer)
        return out

    def _pages_for(self, length: int, device) -> Optional[torch.Tensor]:
        """The block table on `device` with pages for `length` tokens per row (assigned from the free list)."""
        if self.page_size is None:
            return None
        need = -(-length // self.page_size)
        if need > self._pages_used:
            extra = (need - self._pages_used) * self.rows
            if extra > len(self._free):
                raise RuntimeError(f"KVCache: out of pages ({self.num_pages} of {self.page_size} tokens): "
                                   f"{length} tokens for {self.rows} rows need more")
            for p in range(self._pages_used, need):
                for b in range(self.rows):
                    self._host_table[b, p] = self._free.pop(0)
            self._pages_used = need
            self._tables.clear()
        return self._table(device)

    def _table(self, device) -> Optional[torch.Tensor]:
        if self.page_size is None:
            return None
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self._host_table.to(device)
        return table

    def reset(self) -> None:
        super().reset()
        if self.page_size is not None:
            self._free = list(range(self.num_pages))
            self._host_table.zero_()
            self._pages_used = 0
            self._tables.clear()

    @property
    def batch_size(self) -> int:
        return self.rows

    @property
    def max_batch_size(self) -> int:
        return self.rows

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len
