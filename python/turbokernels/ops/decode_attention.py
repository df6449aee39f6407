"""decode_attention: attention of a few new tokens over a KV cache; kv_cache_append: write new keys/values into it.

    functional   turbokernels.decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table, ...)
                 turbokernels.kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, *, block_table,
                                              cache_batch_idx, cache_leftpad, rotary_cos, rotary_sin,
                                              rotary_interleaved)
    ops          torch.ops.turbokernels.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table,
                                                         alibi_slopes, softmax_scale, window_left, window_right,
                                                         softcap, cache_batch_idx, cache_leftpad, causal,
                                                         return_lse) -> (out, lse)
                                                                           schema + fake (inference only); lse
                                                                           (B, Hq, T) fp32 when return_lse, else an
                                                                           empty (0,) fp32 tensor
                 torch.ops.turbokernels.kv_cache_append(k_cache!, v_cache!, k_new, v_new, cache_seqlens,
                                                        block_table, cache_batch_idx=None, cache_leftpad=None,
                                                        rotary_cos=None, rotary_sin=None,
                                                        rotary_interleaved=False)
                                                                           mutates the caches in place
    backends     reference  python/turbokernels/reference/decode_attention.py   (both ops)
                 triton     kernels/attention_decode.py                         (decode_attention)
                            kernels/kv_cache_append.py                          (kv_cache_append)
                 cpu        csrc/cpu/decode_attention.cpp                       (decode_attention)
                 cuda       csrc/cuda/decode_attention.cuh (torch.ops.turbokernels_C.decode_attention_mma; causal,
                            fp16/bf16, head_dim 64/128): forced only until the GPU acceptance table lists it
                 torch      ops/_torch_attention.py: torch's fused CPU kernel       (decode_attention)

The convention (FlashAttention's flash_attn_with_kvcache, after its append): the new tokens are ALREADY in the
cache. A decode step is

    cache_seqlens = turbokernels.kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens)
    out = turbokernels.decode_attention(q, k_cache, v_cache, cache_seqlens)

and new token t of sequence b sits at position cache_seqlens[b] - new_tokens + t: it attends keys 0 .. that
position (causal among the new tokens), narrowed by window_size and biased by ALiBi relative to it. FlashAttention's
serving options (causal=False, cache_batch_idx, cache_leftpad, return_lse, a tensor window_size) are served by the
reference, triton and torch backends; the cpu (C++) kernel declines them.
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
def _lse(q, return_lse: bool) -> torch.Tensor:
    """The op's second output when nothing computes it: lse (B, Hq, T) (a call without rows), or the empty (0,)
    fp32 tensor that stands for "not asked" (return_lse False)."""
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1]) if return_lse else (0,), dtype=torch.float32)


def _fake(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
          softcap, cache_batch_idx, cache_leftpad, causal, return_lse):
    return q.new_empty(q.shape), _lse(q, return_lse)


def _before(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
            softcap, cache_batch_idx, cache_leftpad, causal, return_lse):
    if q.numel() == 0:
        return q.new_empty(q.shape), _lse(q, return_lse)
    return None


decode_attention_op = define(
    OP, "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
        "Tensor? alibi_slopes, float softmax_scale, int window_left, int window_right, float softcap, "
        "Tensor? cache_batch_idx, Tensor? cache_leftpad, bool causal, bool return_lse) -> (Tensor, Tensor)",
    fake=_fake, before=_before)


@backends.register(OP, "reference", check=backends.always)
def _reference(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
               window_right, softcap, cache_batch_idx, cache_leftpad, causal, return_lse):
    out = reference.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale,
                                     window_left, window_right, softcap, cache_batch_idx, cache_leftpad, causal,
                                     return_lse)
    return out if return_lse else (out, _lse(q, False))


def _check_triton(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
                  window_right, softcap, cache_batch_idx, cache_leftpad, causal, return_lse):
    if q.dtype == torch.float64:
        return "float64 is not supported (fp16, bf16, fp32)"
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return "the caches must be contiguous in the head dim"
    return backends.check_triton(q)


@backends.register(OP, "triton", check=_check_triton)
def _triton(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
            softcap, cache_batch_idx, cache_leftpad, causal, return_lse):
    from turbokernels.kernels.attention_decode import decode_attention as launch
    # causal: window_right is implied by causality (a new token never sees later keys); the launcher ignores it.
    out = launch(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, softcap,
                 window_right=window_right, causal=causal, cache_batch_idx=cache_batch_idx,
                 cache_leftpad=cache_leftpad, return_lse=return_lse)
    return out if return_lse else (out, _lse(q, False))


_check_cpu_kernel = backends.check_extension_op(OP, "cpu")
_cpu_kernel = None  # turbokernels._C.decode_attention once resolved (False: the extension lacks it)
_forced_backend, _is_compiling = backends.forced_backend, torch.compiler.is_compiling


def _resolve_cpu_kernel():
    global _cpu_kernel
    _cpu_kernel = (_ext.available() and _ext.missing_op_reason(OP, "cpu") is None
                   and getattr(_ext.C, "decode_attention", None)) or False
    return _cpu_kernel


def _check_cpu(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
               window_right, softcap, cache_batch_idx, cache_leftpad, causal, return_lse):
    if q.dtype not in FLOAT_DTYPES:
        return f"dtype {q.dtype}"
    # csrc/cpu/decode_attention.cpp is causal-only and returns no lse: the torch or reference backend serves these
    declined = [name for name, used in (("cache_batch_idx", cache_batch_idx is not None),
                                        ("cache_leftpad", cache_leftpad is not None), ("causal=False", not causal),
                                        ("return_lse", return_lse)) if used]
    if declined:
        return f"{', '.join(declined)}: not in the C++ kernel (the torch or reference backend serves them)"
    return _check_cpu_kernel(q, k_cache, v_cache)


@backends.register(OP, "cpu", check=_check_cpu)
def _cpu(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
         softcap, cache_batch_idx, cache_leftpad, causal, return_lse):
    return _ext.C.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale,
                                   window_left, window_right, softcap), _lse(q, False)


MMA_HEAD_DIMS = (64, 128)
_cuda_ext = backends.check_extension_op("decode_attention_mma", "cuda")


def _rows_aligned(t: torch.Tensor) -> bool:
    """cp.async moves the cache in 16-byte chunks: unit stride in head_dim, the other strides multiples of 8
    elements, a 16-byte aligned start."""
    return t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def mma_decline(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
                window_right, softcap, cache_batch_idx, cache_leftpad, causal, return_lse) -> Optional[str]:
    """Why csrc/cuda/decode_attention.cuh cannot compute this call (None: it can), on any device: the cuda
    backend's check and the emulated tests share it."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}: the CUDA decode kernel takes float16 or bfloat16"
    if q.shape[-1] not in MMA_HEAD_DIMS:
        return f"head_dim {q.shape[-1]}: the CUDA decode kernel is built for {MMA_HEAD_DIMS}"
    declined = [name for name, used in (("cache_batch_idx", cache_batch_idx is not None),
                                        ("cache_leftpad", cache_leftpad is not None), ("causal=False", not causal),
                                        ("return_lse", return_lse)) if used]
    if declined:
        return f"{', '.join(declined)}: not in the CUDA decode kernel (the triton backend serves them)"
    if not (_rows_aligned(k_cache) and _rows_aligned(v_cache)):
        return "the caches' rows are not 16-byte aligned (strides multiples of 8 elements, aligned start)"
    return None


def _check_cuda(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
                window_right, softcap, cache_batch_idx, cache_leftpad, causal, return_lse):
    reason = _cuda_ext(q)
    if reason is not None:
        return reason
    reason = mma_decline(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
                         window_right, softcap, cache_batch_idx, cache_leftpad, causal, return_lse)
    if reason is not None:
        return reason
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "needs compute capability 8.0 or newer (mma.sync bf16, cp.async)"
    return None


def run_mma(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, softcap,
            splits: int = 0, sms: int = 0) -> torch.Tensor:
    """The cuda backend's call, on any device: CUDA tensors run the kernel, CPU tensors its emulation (tests).
    splits 0: split-KV chosen for `sms` SMs (0: the device's; the emulation's default: 132)."""
    return torch.ops.turbokernels_C.decode_attention_mma(q, k_cache, v_cache, cache_seqlens, block_table,
                                                         alibi_slopes, float(softmax_scale), int(window_left),
                                                         float(softcap), int(splits), int(sms))


@backends.register(OP, "cuda", check=_check_cuda, auto=backends.VERIFIED)
def _cuda(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
          softcap, cache_batch_idx, cache_leftpad, causal, return_lse):
    # causal: window_right cannot narrow it further (a new token never sees later keys)
    return run_mma(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
                   softcap), _lse(q, False)


backends.register(OP, "torch", check=_torch_attention.check_decode)(_torch_attention.decode_attention)
_torch_decode = _torch_attention.decode_attention


# ---- kv_cache_append ---------------------------------------------------------------------------------------------
def _append_fake(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx=None,
                 cache_leftpad=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    return cache_seqlens.new_empty(cache_seqlens.shape)


# The FlashAttention options have defaults, so that a call with the first six arguments stays valid; the
# dispatcher then hands the backends only the arguments given (hence their defaults too).
kv_cache_append_op = define(
    APPEND_OP, "(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens, "
               "Tensor? block_table, Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, "
               "Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=False) -> Tensor",
    fake=_append_fake)

# The reference (index_put_, rotary in torch ops) runs anywhere; the Triton kernel writes both caches, rotary
# included, in one launch (the CUDA default).
backends.register(APPEND_OP, "reference", check=backends.always)(reference.kv_cache_append)


def _check_append_triton(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx=None,
                         cache_leftpad=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    if k_cache.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {k_cache.dtype} is not supported (fp16, bf16, fp32)"
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return "the caches must be contiguous in the head dim"
    if k_cache.shape[-1] > MAX_HEAD_DIM:  # kernels/kv_cache_append.py's MAX_HEAD_DIM (one tile per head)
        return f"head_dim {k_cache.shape[-1]} is larger than {MAX_HEAD_DIM}"
    return backends.check_triton(k_cache)


@backends.register(APPEND_OP, "triton", check=_check_append_triton)
def _append_triton(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx=None,
                   cache_leftpad=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    from turbokernels.kernels.kv_cache_append import kv_cache_append as launch
    return launch(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                  rotary_cos, rotary_sin, rotary_interleaved)


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


def _check_cache_layout(fn: str, q_like: torch.Tensor, q_name: str, k_cache, v_cache, cache_seqlens, block_table,
                        rows_indexed: bool = False):
    """Checks shared by both entries; returns (batch, heads_kv, head_dim). rows_indexed: a contiguous cache whose
    rows are chosen by cache_batch_idx (kv_cache_append), any number of them."""
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
        if k_cache.shape[0] != batch and not rows_indexed:
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


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _window_ints(fn: str, window: torch.Tensor) -> tuple:
    """window_size given as a (2,) integer tensor, read into Python ints: a host sync for a CUDA tensor (the
    kernels take the window as launch arguments), refused while a CUDA graph is being captured (the read would
    break the capture) and for a meta tensor (no values)."""
    if window.dtype not in _INT_DTYPES:
        raise TypeError(f"{fn}(window_size): a tensor window must have an integer dtype, got {window.dtype}")
    if window.shape != (2,):
        raise ValueError(f"{fn}(window_size): a tensor window must have shape (2,) (left, right), got "
                         f"{tuple(window.shape)}")
    if window.device.type == "meta":
        raise ValueError(f"{fn}(window_size): a meta tensor has no values to read; pass a tuple of ints")
    if window.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{fn}(window_size): a CUDA tensor window cannot be read while a CUDA graph is being "
                           f"captured (reading it is a host sync); pass a tuple of ints, or a CPU tensor")
    left, right = window.tolist()
    return left, right


def _check_decode_options(fn: str, q, block_table, cache_batch_idx, cache_leftpad) -> None:
    """The layout of cache_batch_idx / cache_leftpad: int32 (batch,) on q's device; cache_batch_idx only with a
    contiguous cache (their values: _check_decode_option_values)."""
    batch = q.shape[0]
    for name, x in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if x is None:
            continue
        _tensor(fn, name, x)
        if name == "cache_batch_idx" and block_table is not None:
            raise ValueError(f"{fn}(cache_batch_idx): not supported with block_table (a paged cache: the block table "
                             f"already maps each sequence to its pages), as in FlashAttention")
        if x.dtype != torch.int32:
            raise TypeError(f"{fn}({name}): dtype must be torch.int32, got {x.dtype}")
        if x.shape != (batch,):
            raise ValueError(f"{fn}({name}): expected shape ({batch},) (one per sequence), got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{fn}({name}): {name} is on {x.device} but q is on {q.device}")


def _check_decode_option_values(fn: str, k_cache, cache_seqlens, cache_batch_idx, cache_leftpad) -> None:
    """The VALUES of cache_batch_idx (rows of k_cache: [0, k_cache.shape[0])) and cache_leftpad (0 <= leftpad <=
    cache_seqlens), as _check_values: directly on the CPU, one torch._assert_async on CUDA and under torch.compile
    (no host sync). A bad value would otherwise read outside the cache."""
    checks = []
    if cache_batch_idx is not None:
        idx, rows = cache_batch_idx, k_cache.shape[0]
        checks.append((lambda: ((idx >= 0) & (idx < rows)).all(),
                       lambda: f"{fn}(cache_batch_idx): row index {int(idx[(idx < 0) | (idx >= rows)][0])} out of "
                               f"range [0, {rows}) (k_cache's batch)"))
    if cache_leftpad is not None:
        pad, lens = cache_leftpad, cache_seqlens

        def past_end() -> str:
            b = int((pad > lens).nonzero()[0, 0])
            return (f"{fn}(cache_leftpad): cache_leftpad[{b}] = {int(pad[b])} is past cache_seqlens[{b}] = "
                    f"{int(lens[b])} (a sequence's cache starts at or before its end)")
        checks += [(lambda: (pad >= 0).all(), lambda: f"{fn}(cache_leftpad): negative value {int(pad.min())}"),
                   (lambda: (pad <= lens).all(), past_end)]
    check_values(cache_seqlens.device, checks,
                 f"{fn}(cache_batch_idx/cache_leftpad): a row index is outside [0, {k_cache.shape[0]}), or a leftpad "
                 f"is negative or past cache_seqlens (checked on the device)")


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
                     window_size=(-1, -1), softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                     causal: bool = True, cache_batch_idx: Optional[torch.Tensor] = None,
                     cache_leftpad: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Attention of new tokens over a KV cache (FlashAttention's flash_attn_with_kvcache, without its append).

    q (batch, new_tokens, heads_q, head_dim); k_cache, v_cache (batch, max_seqlen, heads_kv, head_dim), or paged
    (num_pages, page_size, heads_kv, head_dim) with block_table int32 (batch, max_pages_per_seq) and page_size a
    multiple of 16; cache_seqlens int32 (batch,): the valid length of each cache, INCLUDING the new tokens (append
    them first, e.g. with kv_cache_append). New token t of sequence b sits at position
    p = cache_seqlens[b] - new_tokens + t and attends keys j < cache_seqlens[b] with j <= p (causal),
    j >= p - window_size[0] when window_size[0] >= 0 (window_size[1] cannot widen causal attention); scores are
    softmax_scale * q.k (default 1/sqrt(head_dim)), then softcap * tanh(score / softcap) when softcap > 0, minus
    slope * |p - j| with ALiBi slopes (heads_q,) or (batch, heads_q) float32. GQA/MQA: heads_q a multiple of
    heads_kv. A token with no key to attend (p < 0) gets zeros. Returns (batch, new_tokens, heads_q, head_dim) in
    q's dtype.

    FlashAttention's serving options (flash_attn_with_kvcache, FA2 v2.6+), all optional:
      causal        True here by default (FlashAttention's default is False: pass causal=False when porting).
                    False: every new token attends every valid key, narrowed by window_size, which stays aligned to
                    the bottom-right: token t attends j in [p - window_size[0], p + window_size[1]] (each side
                    unbounded when -1).
      cache_batch_idx  int32 (batch,): sequence b reads cache row cache_batch_idx[b] (k_cache may have any number
                    of rows; cache_seqlens and cache_leftpad stay per sequence b). Contiguous caches only, as in
                    FlashAttention. Values in [0, k_cache.shape[0]).
      cache_leftpad int32 (batch,): the cache of sequence b starts at slot cache_leftpad[b]: keys j < leftpad are
                    never attended nor read. Positions are unchanged (FlashAttention's logical positions shift q and
                    k alike, so causality, window and ALiBi distances are the same): the result is attention over
                    k_cache[b, leftpad:cache_seqlens[b]]. 0 <= cache_leftpad <= cache_seqlens.
      return_lse    True: returns (out, lse), lse fp32 (batch, heads_q, new_tokens), the natural log of each row's
                    softmax denominator over the scaled (softcapped, ALiBi-biased) scores, FlashAttention's
                    softmax_lse; -inf for a row with no key (as turbokernels.attention's lse).
      window_size   also a (2,) integer tensor: read into Python ints, which for a CUDA tensor is a host sync (the
                    window is a launch argument); refused while a CUDA graph is being captured (pass a tuple there)
                    and under torch.compile's fullgraph (the read is a graph break).
    Values of cache_seqlens, block_table, cache_batch_idx and cache_leftpad are checked on every call: directly on
    the CPU (a ValueError), with torch._assert_async on CUDA (no host sync). The cpu (C++) backend declines the
    options: on CPU tensors the torch backend (or the reference, with softcap) serves them.
    """
    fn = "decode_attention"
    plain = cache_batch_idx is None and cache_leftpad is None and causal is True and return_lse is False
    if (plain and block_table is None and alibi_slopes is None and not _is_compiling() and type(q) is _Tensor
            and q.is_cpu and q.dim() == 4 and q.shape[3] > 0):
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
    if plain and block_table is None and alibi_slopes is None:
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
        args = (q, k_cache, v_cache, cache_seqlens, None, None, softmax_scale, window_left, window_right, softcap,
                None, None, True, False)
        impl = backends.select(OP, *args, key=("cpu", q.dtype, True, True, softcap > 0))[1]  # _usual: CPU only
        if impl.fn is _torch_decode:
            return _torch_attention.decode_lens(q, k_cache, v_cache, lens, None, None, softmax_scale, window_left)
        if impl.fn is _cpu:  # the kernel's out alone (no empty lse to make)
            return _ext.C.decode_attention(*args[:10])
        return impl.fn(*args)[0]
    _tensor(fn, "q", q)
    if q.dim() != 4:
        raise ValueError(f"{fn}(q): expected 4 dims (batch, new_tokens, heads_q, head_dim), got shape "
                         f"{tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}(q): dtype must be float16, bfloat16 or float32, got {q.dtype}")
    batch, heads_kv, head_dim = _check_cache_layout(fn, q, "q", k_cache, v_cache, cache_seqlens, block_table,
                                                    rows_indexed=cache_batch_idx is not None)
    if not plain:
        _check_decode_options(fn, q, block_table, cache_batch_idx, cache_leftpad)
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
    if isinstance(window_size, torch.Tensor):
        window_size = _window_ints(fn, window_size)
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"{fn}(window_size): expected (left, right) ints >= -1 (-1: unbounded), got {window_size!r}")
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}({name}): expected a bool, got {type(flag).__name__}")
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap >= 0:
        raise ValueError(f"{fn}(softcap): expected a number >= 0 (0: off), got {softcap!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"{fn}(softmax_scale): expected a float or None, got {type(softmax_scale).__name__}")
    _check_values(fn, k_cache, cache_seqlens, block_table)
    cache_seqlens, block_table = _contiguous_index_tensors(cache_seqlens, block_table)
    key = (q.device.type, q.dtype, k_cache.stride(-1) == 1, v_cache.stride(-1) == 1, softcap > 0)
    if not plain:
        _check_decode_option_values(fn, k_cache, cache_seqlens, cache_batch_idx, cache_leftpad)
        if cache_batch_idx is not None and not cache_batch_idx.is_contiguous():
            cache_batch_idx = cache_batch_idx.contiguous()
        if cache_leftpad is not None and not cache_leftpad.is_contiguous():
            cache_leftpad = cache_leftpad.contiguous()
        key += (cache_batch_idx is not None, cache_leftpad is not None, causal, return_lse)
    # no autograd, tracer or mode to serve: straight to the backend (_library.direct), else the op; every backend's
    # check reads only what the key holds (the caches' dtype and device are q's, checked above): remembered per key
    out, lse = call("decode_attention", (q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                                         float(softmax_scale), int(window_size[0]), int(window_size[1]),
                                         float(softcap), cache_batch_idx, cache_leftpad, causal, return_lse),
                    key=key)
    return (out, lse) if return_lse else out


def _index_vector(fn: str, name: str, x, batch: int, device: torch.device) -> torch.Tensor:
    """cache_batch_idx / cache_leftpad: an int32 tensor of shape (batch,) on k_new's device."""
    _tensor(fn, name, x)
    if x.dtype != torch.int32:
        raise TypeError(f"{fn}({name}): dtype must be torch.int32, got {x.dtype}")
    if x.shape != (batch,):
        raise ValueError(f"{fn}({name}): expected shape ({batch},) (one per sequence), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{fn}({name}): {name} is on {x.device} but k_new is on {device}")
    return x


def _check_append_options(fn: str, k_new, head_dim: int, block_table, cache_batch_idx, cache_leftpad, rotary_cos,
                          rotary_sin, rotary_interleaved) -> None:
    """The layout of FlashAttention's append options (their values: _check_append_values)."""
    batch = k_new.shape[0]
    if cache_batch_idx is not None:
        _tensor(fn, "cache_batch_idx", cache_batch_idx)
        if block_table is not None:
            raise ValueError(f"{fn}(cache_batch_idx): not supported with block_table (a paged cache: the block table "
                             f"already maps each sequence to its pages), as in FlashAttention")
        _index_vector(fn, "cache_batch_idx", cache_batch_idx, batch, k_new.device)
    if cache_leftpad is not None:
        _index_vector(fn, "cache_leftpad", cache_leftpad, batch, k_new.device)
    if (rotary_cos is None) != (rotary_sin is None):
        given, missing = ("rotary_cos", "rotary_sin") if rotary_sin is None else ("rotary_sin", "rotary_cos")
        raise ValueError(f"{fn}({missing}): {given} was given without {missing} (pass both or neither)")
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"{fn}(rotary_interleaved): expected a bool, got {type(rotary_interleaved).__name__}")
    if rotary_cos is None:
        return
    for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _tensor(fn, name, x)
        if x.dim() != 2:
            raise ValueError(f"{fn}({name}): expected 2 dims (seqlen_ro, rotary_dim / 2), got shape "
                             f"{tuple(x.shape)}")
        if x.dtype != k_new.dtype:
            raise TypeError(f"{fn}({name}): dtype {x.dtype} does not match k_new's {k_new.dtype}")
        if x.device != k_new.device:
            raise ValueError(f"{fn}({name}): {name} is on {x.device} but k_new is on {k_new.device}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"{fn}(rotary_sin): shape {tuple(rotary_sin.shape)} does not match rotary_cos's "
                         f"{tuple(rotary_cos.shape)}")
    half = rotary_cos.shape[1]
    if half == 0:
        raise ValueError(f"{fn}(rotary_cos): expected rotary_dim / 2 >= 1 columns, got shape "
                         f"{tuple(rotary_cos.shape)}")
    if 2 * half > head_dim:
        raise ValueError(f"{fn}(rotary_cos): rotary_dim = 2 * {half} columns = {2 * half} is larger than head_dim "
                         f"{head_dim}: rotary_cos holds rotary_dim / 2 columns (FlashAttention's convention; a cos "
                         f"of HF's cat(freqs, freqs) form holds rotary_dim, pass its first half)")


def _check_append_values(fn: str, k_cache, cache_seqlens, new_tokens: int, cache_batch_idx, cache_leftpad,
                         rotary_cos) -> None:
    """Checks of the VALUES of the append options, as _check_values (CPU: directly; CUDA and torch.compile: one
    torch._assert_async, no host sync): every cache_batch_idx a row of the cache and no two sequences writing the
    same slot of one row; 0 <= cache_leftpad <= cache_seqlens; every rotated token's position (cache_seqlens -
    cache_leftpad + t) a row of rotary_cos / rotary_sin."""
    checks = []
    lens = cache_seqlens
    if cache_batch_idx is not None:
        idx, rows = cache_batch_idx, k_cache.shape[0]

        def bad_idx() -> int:
            return int(idx[(idx < 0) | (idx >= rows)][0])

        def clashes():  # (B, B): sequences i != j that write the same row with overlapping slot ranges
            lens64 = lens.to(torch.int64)
            close = (lens64.view(-1, 1) - lens64.view(1, -1)).abs() < new_tokens
            other = ~torch.eye(idx.shape[0], dtype=torch.bool, device=idx.device)
            return (idx.view(-1, 1) == idx.view(1, -1)) & close & other

        def clash_message() -> str:
            i, j = (int(v) for v in clashes().nonzero()[0])
            return (f"{fn}(cache_batch_idx): sequences {i} and {j} both write cache row {int(idx[i])} at overlapping "
                    f"slots (cache_seqlens {int(lens[i])} and {int(lens[j])}, {new_tokens} new tokens): the result "
                    f"would depend on the order of the writes")
        checks += [
            (lambda: ((idx >= 0) & (idx < rows)).all(),
             lambda: f"{fn}(cache_batch_idx): row index {bad_idx()} out of range [0, {rows})"),
            (lambda: ~clashes().any(), clash_message),
        ]
    if cache_leftpad is not None:
        pad = cache_leftpad

        def past_end() -> str:
            b = int(((pad > lens).nonzero())[0, 0])
            return (f"{fn}(cache_leftpad): cache_leftpad[{b}] = {int(pad[b])} is past cache_seqlens[{b}] = "
                    f"{int(lens[b])} (the cache of a sequence starts at or before its end)")
        checks += [
            (lambda: (pad >= 0).all(), lambda: f"{fn}(cache_leftpad): negative value {int(pad.min())}"),
            (lambda: (pad <= lens).all(), past_end),
        ]
    if rotary_cos is not None and new_tokens > 0:
        seqlen_ro = rotary_cos.shape[0]

        def last_positions():  # (B,) the logical position of each sequence's last new token
            start = lens.to(torch.int64) - (0 if cache_leftpad is None else cache_leftpad.to(torch.int64))
            return start + (new_tokens - 1)
        checks.append((lambda: (last_positions() < seqlen_ro).all(),
                       lambda: f"{fn}(rotary_cos): a new token's position {int(last_positions().max())} (cache_seqlens"
                               f"{' - cache_leftpad' if cache_leftpad is not None else ''} + t) is past rotary_cos's "
                               f"{seqlen_ro} rows"))
    check_values(cache_seqlens.device, checks,
                 f"{fn}(cache_batch_idx/cache_leftpad/rotary_cos): a row index is outside the cache or two sequences "
                 f"write the same slot, or cache_leftpad is outside [0, cache_seqlens], or a position is past "
                 f"rotary_cos's rows (checked on the device)")


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    cache_seqlens: torch.Tensor, *, block_table: Optional[torch.Tensor] = None,
                    cache_batch_idx: Optional[torch.Tensor] = None, cache_leftpad: Optional[torch.Tensor] = None,
                    rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                    rotary_interleaved: bool = False) -> torch.Tensor:
    """Write k_new, v_new (batch, new_tokens, heads_kv, head_dim) into the caches IN PLACE at positions
    cache_seqlens[b] .. cache_seqlens[b] + new_tokens - 1 (through block_table for a paged cache); return the new
    lengths cache_seqlens + new_tokens (a new tensor; the argument is not modified).

    FlashAttention's append options (flash_attn_with_kvcache, FA2 v2.6+), all optional:
      cache_batch_idx  int32 (batch,): sequence b writes cache row cache_batch_idx[b] (the cache may have any
                       number of rows; cache_seqlens stays indexed by b). Contiguous caches only, as in FlashAttention.
                       Rows may repeat only where the sequences' slots do not overlap (else refused: FlashAttention
                       leaves the result of such writes unspecified).
      cache_leftpad    int32 (batch,): the cache of sequence b starts at slot cache_leftpad[b] (the slots before it are
                       padding). It changes only the rotary positions: new token t is written at slot
                       cache_seqlens[b] + t and rotated as position cache_seqlens[b] - cache_leftpad[b] + t (as
                       transformers numbers a left-padded row). FlashAttention's flash_attn_with_kvcache rotates at
                       the absolute slot even with its cache_leftpad: for its semantics pass no cache_leftpad here
                       (integrations/flash_attn.py does so). 0 <= cache_leftpad <= cache_seqlens.
      rotary_cos, rotary_sin  (seqlen_ro, rotary_dim / 2), k_new's dtype: k_new is rotated before it is written,
                       at each token's position (above), which must be < seqlen_ro; its first rotary_dim dims
                       (rotary_dim = 2 * rotary_cos.shape[1] <= head_dim), the rest copied unchanged. v_new is
                       never rotated. Computed in fp32, rounded once to the cache's dtype: FlashAttention's
                       apply_rotary_emb_torch (turbokernels.reference.decode_attention.apply_rotary is the spec).
      rotary_interleaved  False (the default here, HF Llama's and GPT-NeoX's convention): rotate the halves
                       (x[:r/2], x[r/2:r]); True (GPT-J): the pairs (x[0::2], x[1::2]). NOTE: FlashAttention's
                       flash_attn_with_kvcache defaults to rotary_interleaved=True; pass it explicitly when porting.

    A cache that can never hold new_tokens is rejected here. Whether each sequence still has room depends on the
    values of cache_seqlens (and, paged, on block_table; and of the options above): checked on every call before
    anything is written, directly for CPU tensors (a ValueError, the caches untouched), with torch._assert_async for
    CUDA tensors (no host sync; a failure is a device-side assert, fatal to the CUDA context, instead of a write
    outside the cache).
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
                                                    block_table, rows_indexed=cache_batch_idx is not None)
    if k_new.shape[2:] != (heads_kv, head_dim):
        raise ValueError(f"{fn}(k_new): (heads_kv, head_dim) {tuple(k_new.shape[2:])} does not match the caches' "
                         f"{(heads_kv, head_dim)}")
    if k_new.shape[1] > _capacity(k_cache, block_table):
        raise ValueError(f"{fn}(k_new): cache too small: {k_new.shape[1]} new tokens, the cache holds "
                         f"{_capacity(k_cache, block_table)} per sequence")
    if v_cache is k_cache:
        raise ValueError(f"{fn}(v_cache): must not share memory with k_cache (the same tensor was passed twice)")
    _check_append_options(fn, k_new, head_dim, block_table, cache_batch_idx, cache_leftpad, rotary_cos, rotary_sin,
                          rotary_interleaved)
    _check_values(fn, k_cache, cache_seqlens, block_table, new_tokens=k_new.shape[1])
    if cache_batch_idx is None and cache_leftpad is None and rotary_cos is None:
        return kv_cache_append_op(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    _check_append_values(fn, k_cache, cache_seqlens, k_new.shape[1], cache_batch_idx, cache_leftpad, rotary_cos)
    return kv_cache_append_op(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, cache_batch_idx,
                              cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved)
