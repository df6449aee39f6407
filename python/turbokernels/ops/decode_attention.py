"""decode_attention: attention of a few new tokens over a KV cache; kv_cache_append: write new keys/values into it.

    functional   turbokernels.decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table, ...)
                 turbokernels.kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, *, block_table)
    ops          torch.ops.turbokernels.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table,
                                                         alibi_slopes, softmax_scale, window_left, window_right,
                                                         softcap)                 schema + fake (inference only)
                 torch.ops.turbokernels.kv_cache_append(k_cache!, v_cache!, k_new, v_new, cache_seqlens,
                                                        block_table)              mutates the caches in place
    backends     reference  python/turbokernels/reference/decode_attention.py   (both ops)
                 triton     kernels/attention_decode.py                         (decode_attention)
                 cpu        csrc/cpu/decode_attention.cpp                       (decode_attention)
                 torch      ops/_torch_attention.py: torch's fused CPU kernel       (decode_attention)

The convention (FlashAttention's flash_attn_with_kvcache, after its append): the new tokens are ALREADY in the
cache. A decode step is

    cache_seqlens = turbokernels.kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens)
    out = turbokernels.decode_attention(q, k_cache, v_cache, cache_seqlens)

and new token t of sequence b sits at position cache_seqlens[b] - new_tokens + t: it attends keys 0 .. that
position (causal among the new tokens), narrowed by window_size and biased by ALiBi relative to it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _ext, backends
from .._checks import check_values
from ..reference import decode_attention as reference
from . import _torch_attention
from .attention import usual_window
from ._library import call, define, direct, direct_exact

OP = "decode_attention"
APPEND_OP = "kv_cache_append"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_Tensor, _INT32 = torch.Tensor, torch.int32
MAX_HEAD_DIM = 256


def _capacity(k_cache, block_table) -> int:
    return block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]


def _check_values(fn: str, k_cache, cache_seqlens, block_table, new_tokens: int = 0) -> None:
    """Checks of the VALUES of cache_seqlens / block_table (after the layout checks): every length >= 0, length +
    new_tokens within the capacity (pages per sequence * page_size when paged), and every page a sequence uses
    (those holding positions < length + new_tokens) inside [0, num_pages). Direct on the CPU; on CUDA and under
    torch.compile one torch._assert_async, no host sync (_checks.check_values): a bad value would otherwise read
    (decode_attention) or write (kv_cache_append) outside the cache."""
    cap = _capacity(k_cache, block_table)
    paged = " (pages per sequence * page_size)" if block_table is not None else ""
    lens = cache_seqlens
    plus = f" + {new_tokens} new tokens" if new_tokens else ""

    def worst() -> int:
        return int(lens.max())

    if (block_table is None and lens.device.type == "cpu" and lens.dim() == 1
            and not torch.compiler.is_compiling()):
        # CPU, eager, contiguous cache: the lengths read once into Python (one small op; four tensor ops and two
        # reads otherwise, each a cold dispatch between two kernel calls)
        values = lens.tolist()
        if values and min(values) < 0:
            raise ValueError(f"{fn}(cache_seqlens): negative length {min(values)}")
        if values and max(values) > cap - new_tokens:
            raise ValueError(f"{fn}(cache_seqlens): cache too small: length {max(values)}{plus} does not fit, the "
                             f"cache holds {cap} positions per sequence{paged}")
        return

    checks = [
        (lambda: (lens >= 0).all(), lambda: f"{fn}(cache_seqlens): negative length {int(lens.min())}"),
        (lambda: (lens <= min(cap - new_tokens, 2 ** 31 - 1)).all(),  # an int32 compare: clamp the bound
         lambda: f"{fn}(cache_seqlens): cache too small: length {worst()}{plus} does not fit, the cache holds {cap} "
                 f"positions per sequence{paged}"),
    ]
    if block_table is not None:
        page_size, num_pages = k_cache.shape[1], k_cache.shape[0]

        def pages_ok():
            first_pos = torch.arange(block_table.shape[1], device=block_table.device) * page_size
            used = first_pos.view(1, -1) < (lens.to(torch.int64) + new_tokens).view(-1, 1)
            return ~(used & ((block_table < 0) | (block_table >= num_pages))).any()
        checks.append((pages_ok, lambda: f"{fn}(block_table): page index out of range [0, {num_pages}) in a page in "
                                         f"use"))
    check_values(cache_seqlens.device, checks,
                 f"{fn}(cache_seqlens/block_table): a length is negative, or length{plus} is past the cache's {cap} "
                 f"positions per sequence{paged}, or a page in use is outside the cache (checked on the device)")


# ---- decode_attention --------------------------------------------------------------------------------------------
def _fake(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
          softcap):
    return q.new_empty(q.shape)


def _before(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
            softcap):
    if q.numel() == 0:
        return q.new_empty(q.shape)
    return None


decode_attention_op = define(
    OP, "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
        "Tensor? alibi_slopes, float softmax_scale, int window_left, int window_right, float softcap) -> Tensor",
    fake=_fake, before=_before)

backends.register(OP, "reference", check=backends.always)(reference.decode_attention)


def _check_triton(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
                  window_right, softcap):
    if q.dtype == torch.float64:
        return "float64 is not supported (fp16, bf16, fp32)"
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return "the caches must be contiguous in the head dim"
    return backends.check_triton(q)


@backends.register(OP, "triton", check=_check_triton)
def _triton(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
            softcap):
    from turbokernels.kernels.attention_decode import decode_attention as launch
    # window_right is implied by causality (a new token never sees later keys), so the kernel does not need it.
    return launch(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, softcap)


_check_cpu_kernel = backends.check_extension_op(OP, "cpu")
_cpu_kernel = None  # turbokernels._C.decode_attention once resolved (False: the extension lacks it)
_forced_backend, _is_compiling = backends.forced_backend, torch.compiler.is_compiling


def _resolve_cpu_kernel():
    global _cpu_kernel
    _cpu_kernel = (_ext.available() and _ext.missing_op_reason(OP, "cpu") is None
                   and getattr(_ext.C, "decode_attention", None)) or False
    return _cpu_kernel


def _check_cpu(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
               window_right, softcap):
    if q.dtype not in FLOAT_DTYPES:
        return f"dtype {q.dtype}"
    return _check_cpu_kernel(q, k_cache, v_cache)


@backends.register(OP, "cpu", check=_check_cpu)
def _cpu(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
         softcap):
    return _ext.C.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale,
                                   window_left, window_right, softcap)


backends.register(OP, "torch", check=_torch_attention.check_decode)(_torch_attention.decode_attention)
_torch_decode = _torch_attention.decode_attention


# ---- kv_cache_append ---------------------------------------------------------------------------------------------
def _append_fake(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    return cache_seqlens.new_empty(cache_seqlens.shape)


kv_cache_append_op = define(
    APPEND_OP, "(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens, "
               "Tensor? block_table) -> Tensor",
    fake=_append_fake)

# One implementation for every device: two index_put_ per call (no host sync), a Triton kernel would not be faster.
backends.register(APPEND_OP, "reference", check=backends.always)(reference.kv_cache_append)


# ---- functional entries: all argument checks happen here, once ----------------------------------------------------
def _contiguous_index_tensors(cache_seqlens, block_table):
    """The kernels read cache_seqlens as a contiguous vector and block_table rows with a unit column stride: a view
    that is not is copied (a no-op for the usual tensors)."""
    if block_table is not None and block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    return (cache_seqlens if cache_seqlens.is_contiguous() else cache_seqlens.contiguous()), block_table


def _tensor(fn: str, name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}({name}): expected a torch.Tensor, got {type(x).__name__}")
    return x


def _check_cache_layout(fn: str, q_like: torch.Tensor, q_name: str, k_cache, v_cache, cache_seqlens, block_table):
    """Checks shared by both entries; returns (batch, heads_kv, head_dim)."""
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        _tensor(fn, name, x)
    if k_cache.dim() != 4:
        raise ValueError(f"{fn}(k_cache): expected 4 dims (batch, max_seqlen, heads_kv, head_dim) or paged "
                         f"(num_pages, page_size, heads_kv, head_dim), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{fn}(v_cache): shape {tuple(v_cache.shape)} does not match k_cache's "
                         f"{tuple(k_cache.shape)}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q_like.dtype:
            raise TypeError(f"{fn}({name}): dtype {x.dtype} does not match {q_name}'s {q_like.dtype}")
        if x.device != q_like.device:
            raise ValueError(f"{fn}({name}): {name} is on {x.device} but {q_name} is on {q_like.device}")
        if x.stride(-1) != 1:
            raise ValueError(f"{fn}({name}): must be contiguous in the last (head_dim) dimension, "
                             f"got strides {x.stride()}")
    batch = q_like.shape[0]
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"{fn}(cache_seqlens): dtype must be torch.int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"{fn}(cache_seqlens): expected shape ({batch},) (one length per sequence), got "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q_like.device:
        raise ValueError(f"{fn}(cache_seqlens): cache_seqlens is on {cache_seqlens.device} but {q_name} is on "
                         f"{q_like.device}")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"{fn}(k_cache): batch {k_cache.shape[0]} does not match {q_name}'s {batch} "
                             f"(pass block_table for a paged cache)")
    else:
        _tensor(fn, "block_table", block_table)
        if block_table.dtype != torch.int32:
            raise TypeError(f"{fn}(block_table): dtype must be torch.int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"{fn}(block_table): expected shape ({batch}, max_pages_per_seq), got "
                             f"{tuple(block_table.shape)}")
        if block_table.device != q_like.device:
            raise ValueError(f"{fn}(block_table): block_table is on {block_table.device} but {q_name} is on "
                             f"{q_like.device}")
        if k_cache.shape[1] % 16 != 0:
            raise ValueError(f"{fn}(k_cache): page_size (dim 1 of a paged cache) must be a multiple of 16, got "
                             f"{k_cache.shape[1]}")
    return batch, k_cache.shape[2], k_cache.shape[3]


def _usual(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_size, softcap) -> Optional[tuple]:
    """(softmax_scale, window_left, window_right) of a call on a contiguous (not paged) cache without ALiBi (the caller
    tested that) whose every layout and argument check in decode_attention passes, found by cheaper tests that imply
    each of them; None sends the call through those checks, which raise the error the call deserves. The values of
    cache_seqlens are checked after, either way."""
    if not (isinstance(q, _Tensor) and isinstance(k_cache, _Tensor) and isinstance(v_cache, _Tensor)
            and isinstance(cache_seqlens, _Tensor)):
        return None
    dtype = q.dtype
    if (q.dim() != 4 or dtype not in FLOAT_DTYPES or k_cache.dim() != 4 or k_cache.dtype is not dtype
            or v_cache.dtype is not dtype or cache_seqlens.dtype is not _INT32):
        return None
    if not (q.is_cpu and k_cache.is_cpu and v_cache.is_cpu and cache_seqlens.is_cpu):
        return None
    qs, cs = q.shape, k_cache.shape
    batch, head_dim, heads_kv = qs[0], cs[3], cs[2]
    if (v_cache.shape != cs or k_cache.stride()[3] != 1 or v_cache.stride()[3] != 1 or cache_seqlens.shape != (batch,)
            or cs[0] != batch or qs[3] != head_dim or not 1 <= head_dim <= MAX_HEAD_DIM or heads_kv == 0
            or qs[2] % heads_kv):
        return None
    if usual_window(window_size) is None:
        return None
    window_left, window_right = window_size
    if not (type(softcap) is float and softcap >= 0.0):
        return None
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif type(softmax_scale) is not float:
        return None
    return softmax_scale, window_left, window_right


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     *, block_table: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of new tokens over a KV cache (FlashAttention's flash_attn_with_kvcache, without its append).

    q (batch, new_tokens, heads_q, head_dim); k_cache, v_cache (batch, max_seqlen, heads_kv, head_dim), or paged
    (num_pages, page_size, heads_kv, head_dim) with block_table int32 (batch, max_pages_per_seq) and page_size a
    multiple of 16; cache_seqlens int32 (batch,): the valid length of each cache, INCLUDING the new tokens (append
    them first, e.g. with kv_cache_append). New token t of sequence b sits at position
    p = cache_seqlens[b] - new_tokens + t and attends keys j with j <= p (causal), j >= p - window_size[0] when
    window_size[0] >= 0 (window_size[1] cannot widen causal attention); scores are softmax_scale * q.k (default
    1/sqrt(head_dim)), then softcap * tanh(score / softcap) when softcap > 0, minus slope * |p - j| with ALiBi
    slopes (heads_q,) or (batch, heads_q) float32. GQA/MQA: heads_q a multiple of heads_kv. A token with no key to
    attend (p < 0) gets zeros. Returns (batch, new_tokens, heads_q, head_dim) in q's dtype.
    """
    fn = "decode_attention"
    if (block_table is None and alibi_slopes is None and not _is_compiling() and type(q) is _Tensor and q.is_cpu
            and q.dim() == 4 and q.shape[3] > 0):
        # the usual CPU call, straight to the C++ kernel, which checks the tensors itself (the layout checks below,
        # the lengths' values): nothing but the Python arguments' kinds is read here. When it rejects the call the
        # checks below raise the error that names the argument.
        kernel = _cpu_kernel if _cpu_kernel is not None else _resolve_cpu_kernel()
        if (kernel and type(k_cache) is _Tensor and type(v_cache) is _Tensor and type(cache_seqlens) is _Tensor
                and usual_window(window_size) is not None and type(softcap) is float and softcap >= 0.0
                and (softmax_scale is None or type(softmax_scale) is float)
                and _forced_backend() in (None, "cpu") and direct_exact(q, k_cache, v_cache)):
            scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else softmax_scale
            try:
                return kernel(q, k_cache, v_cache, cache_seqlens, None, None, scale, window_size[0], window_size[1],
                              softcap)
            except RuntimeError:
                pass
    usual = None
    if block_table is None and alibi_slopes is None:
        usual = _usual(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_size, softcap)
    if usual is not None and direct((q, k_cache, v_cache, cache_seqlens)):
        # the op's own steps (its `before`, backends.select) without the dispatcher round trip, as _library.call
        # does, with cache_seqlens read into Python once for the value checks and the torch backend
        softmax_scale, window_left, window_right = usual
        lens = cache_seqlens.tolist()
        if lens and (min(lens) < 0 or max(lens) > k_cache.shape[1]):
            _check_values(fn, k_cache, cache_seqlens, None)  # raises, with the message
        if q.numel() == 0:
            return q.new_empty(q.shape)
        if not cache_seqlens.is_contiguous():
            cache_seqlens = cache_seqlens.contiguous()
        args = (q, k_cache, v_cache, cache_seqlens, None, None, softmax_scale, window_left, window_right, softcap)
        impl = backends.select(OP, *args, key=("cpu", q.dtype, True, True, softcap > 0))[1]  # _usual: CPU only
        if impl.fn is _torch_decode:
            return _torch_attention.decode_lens(q, k_cache, v_cache, lens, None, None, softmax_scale, window_left)
        return impl.fn(*args)
    _tensor(fn, "q", q)
    if q.dim() != 4:
        raise ValueError(f"{fn}(q): expected 4 dims (batch, new_tokens, heads_q, head_dim), got shape "
                         f"{tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}(q): dtype must be float16, bfloat16 or float32, got {q.dtype}")
    batch, heads_kv, head_dim = _check_cache_layout(fn, q, "q", k_cache, v_cache, cache_seqlens, block_table)
    heads_q = q.shape[2]
    if q.shape[3] != head_dim:
        raise ValueError(f"{fn}(q): head_dim {q.shape[3]} does not match the caches' {head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}(q): head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"{fn}(q): heads_q={heads_q} must be a multiple of the caches' heads_kv={heads_kv}")
    if alibi_slopes is not None:
        _tensor(fn, "alibi_slopes", alibi_slopes)
        if alibi_slopes.shape not in ((heads_q,), (batch, heads_q)):
            raise ValueError(f"{fn}(alibi_slopes): expected shape ({heads_q},) or ({batch}, {heads_q}), got "
                             f"{tuple(alibi_slopes.shape)}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"{fn}(alibi_slopes): dtype must be torch.float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"{fn}(alibi_slopes): alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"{fn}(window_size): expected (left, right) ints >= -1 (-1: unbounded), got {window_size!r}")
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap >= 0:
        raise ValueError(f"{fn}(softcap): expected a number >= 0 (0: off), got {softcap!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"{fn}(softmax_scale): expected a float or None, got {type(softmax_scale).__name__}")
    _check_values(fn, k_cache, cache_seqlens, block_table)
    cache_seqlens, block_table = _contiguous_index_tensors(cache_seqlens, block_table)
    # no autograd, tracer or mode to serve: straight to the backend (_library.direct), else the op; every backend's
    # check reads only what the key holds (the caches' dtype and device are q's, checked above): remembered per key
    return call("decode_attention", (q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                                     float(softmax_scale), int(window_size[0]), int(window_size[1]), float(softcap)),
                key=(q.device.type, q.dtype, k_cache.stride(-1) == 1, v_cache.stride(-1) == 1, softcap > 0))


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    cache_seqlens: torch.Tensor, *, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write k_new, v_new (batch, new_tokens, heads_kv, head_dim) into the caches IN PLACE at positions
    cache_seqlens[b] .. cache_seqlens[b] + new_tokens - 1 (through block_table for a paged cache); return the new
    lengths cache_seqlens + new_tokens (a new tensor; the argument is not modified).

    A cache that can never hold new_tokens is rejected here. Whether each sequence still has room depends on the
    values of cache_seqlens (and, paged, on block_table): checked on every call before anything is written, directly
    for CPU tensors (a ValueError, the caches untouched), with torch._assert_async for CUDA tensors (no host sync; a
    failure is a device-side assert, fatal to the CUDA context, instead of a write outside the cache).
    """
    fn = "kv_cache_append"
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        _tensor(fn, name, x)
        if x.dim() != 4:
            raise ValueError(f"{fn}({name}): expected 4 dims (batch, new_tokens, heads_kv, head_dim), got shape "
                             f"{tuple(x.shape)}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"{fn}(v_new): shape {tuple(v_new.shape)} does not match k_new's {tuple(k_new.shape)}")
    if v_new.dtype != k_new.dtype:
        raise TypeError(f"{fn}(v_new): dtype {v_new.dtype} does not match k_new's {k_new.dtype}")
    if v_new.device != k_new.device:
        raise ValueError(f"{fn}(v_new): v_new is on {v_new.device} but k_new is on {k_new.device}")
    batch, heads_kv, head_dim = _check_cache_layout(fn, k_new, "k_new", k_cache, v_cache, cache_seqlens,
                                                    block_table)
    if k_new.shape[2:] != (heads_kv, head_dim):
        raise ValueError(f"{fn}(k_new): (heads_kv, head_dim) {tuple(k_new.shape[2:])} does not match the caches' "
                         f"{(heads_kv, head_dim)}")
    if k_new.shape[1] > _capacity(k_cache, block_table):
        raise ValueError(f"{fn}(k_new): cache too small: {k_new.shape[1]} new tokens, the cache holds "
                         f"{_capacity(k_cache, block_table)} per sequence")
    if v_cache is k_cache:
        raise ValueError(f"{fn}(v_cache): must not share memory with k_cache (the same tensor was passed twice)")
    _check_values(fn, k_cache, cache_seqlens, block_table, new_tokens=k_new.shape[1])
    return kv_cache_append_op(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
