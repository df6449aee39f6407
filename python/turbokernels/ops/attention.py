"""attention: fused softmax(q k^T) v in FlashAttention's layout, forward and backward.

    functional   turbokernels.attention(q, k, v, *, causal, softmax_scale, window_size, softcap, alibi_slopes,
                                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic,
                                        return_lse)                     checks arguments once
    ops          torch.ops.turbokernels.attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                     softmax_scale, causal, window_left, window_right, softcap) -> (out, lse)
                 torch.ops.turbokernels.attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                     alibi_slopes, softmax_scale, causal, window_left, window_right, softcap, deterministic)
                     -> (dq, dk, dv)
                 schema + fake; register_autograd(attention_fwd) calls attention_bwd
    backends     reference  python/turbokernels/reference/attention.py   (fp32, float64 for float64 inputs)
                 triton     kernels/attention_fwd.py, kernels/attention_bwd.py
                 cpu        csrc/cpu/decode_attention.cpp (attention_rows): one query row per sequence, dense
                 torch      ops/_torch_attention.py: torch's fused CPU kernels (every call but softcap)

Semantics (FlashAttention 2.x) are written down in the reference module. Outputs are contiguous. The ops take no
max_seqlen: the Triton kernel finds each query tile's sequence from cu_seqlens on the device, so nothing is read
back to the host (torch.compile and CUDA graphs keep working). The functional checks the values of cu_seqlens on
every call: directly for CPU tensors, with torch._assert_async (no host sync; a failure is a device-side assert,
fatal to the CUDA context) for CUDA tensors and under torch.compile (turbokernels/_checks.py).
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import _ext, backends
from .._checks import check_values
from ..reference import attention as reference
from . import _torch_attention
from ._library import define, direct, direct_exact

FWD = "attention_fwd"
BWD = "attention_bwd"
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- attention_fwd ------------------------------------------------------------------------------------------
def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def _fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left, window_right,
              softcap):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)


def _empty_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, *rest):
    """No query rows: nothing to launch."""
    if q.numel() == 0:
        return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)
    return None


attention_fwd = define(
    FWD, "(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? alibi_slopes, "
         "float softmax_scale, bool causal, int window_left, int window_right, float softcap) -> (Tensor out, Tensor lse)",
    fake=_fake_fwd, before=_empty_fwd)


@backends.register(FWD, "reference", check=backends.always)
def _reference_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left,
                   window_right, softcap):
    out, lse = reference.attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal,
                                       window_left, window_right, softcap)
    return out, lse.to(torch.float32)


def _check_triton_common(q, k, v) -> Optional[str]:
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the kernels take float16, bfloat16, float32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            return f"{name}'s head dim is not contiguous (stride {t.stride(-1)})"
    return backends.check_triton(q)


def _check_triton_fwd(q, k, v, *rest) -> Optional[str]:
    return _check_triton_common(q, k, v)


@backends.register(FWD, "triton", check=_check_triton_fwd)
def _triton_fwd(*args):
    from turbokernels.kernels.attention_fwd import attention_fwd as launch
    return launch(*args)


backends.register(FWD, "torch", check=_torch_attention.check_fwd)(_torch_attention.attention_fwd)
_torch_fwd = _torch_attention.attention_fwd

_check_decode_kernel = backends.check_extension_op("decode_attention", "cpu")
# Query rows per sequence up to which the cpu backend runs a call: measured on the Xeon (2 threads, causal, vs the
# torch backend): one row 1.2-3.4x faster (fp32), 0.94-1.95x (bf16); four rows 1.4-2.4x at 1024-2048 keys but
# 0.92-0.95x at SmolLM2's 9/3 heads over 300 keys; sixteen 0.5-0.8x in bf16. Its loops are dot products, not
# torch's blocked GEMMs: one row per sequence, the decode step, is where reading K/V once wins.
CPU_MAX_ROWS = 1
_CHOSEN, _forced_backend = backends._CHOSEN, backends.forced_backend


def _check_cpu_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left,
                   window_right, softcap) -> Optional[str]:
    if cu_seqlens_q is not None:
        return "varlen (cu_seqlens): the cpu kernel takes dense calls"
    if q.shape[1] > CPU_MAX_ROWS:
        return (f"{q.shape[1]} query rows per sequence (the cpu kernel, decode_attention's, takes up to "
                f"{CPU_MAX_ROWS}: torch's flash kernel is the faster one past that)")
    if q.dtype not in _FLOATS:
        return f"dtype {q.dtype}"
    reason = _check_decode_kernel(q)
    if reason is None and getattr(_ext.C, "attention_rows", None) is None:
        return "turbokernels._C was built without attention_rows"
    return reason


@backends.register(FWD, "cpu", check=_check_cpu_fwd)
def _cpu_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left, window_right,
             softcap):
    """A few query rows per sequence (a decode step given the whole cache, a few drafted tokens) are decode_attention's
    new tokens over all Sk keys: row i sits at Sk - Sq + i (the spec's bottom-right alignment); decode's C++ kernel
    runs them (csrc/cpu/decode_attention.cpp: K/V read once per kv head, softcap and ALiBi native), with
    window_right past each row's position when not causal."""
    return _ext.C.attention_rows(q, k, v, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap,
                                 False, True)


# ---- attention_bwd ------------------------------------------------------------------------------------------
def _fake_bwd(dout, q, k, v, out, lse, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


attention_bwd = define(
    BWD, "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
         "Tensor? cu_seqlens_k, Tensor? alibi_slopes, float softmax_scale, bool causal, int window_left, "
         "int window_right, float softcap, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)",
    fake=_fake_bwd)


@backends.register(BWD, "reference", check=backends.always)
def _reference_bwd(*args):
    return reference.attention_bwd(*args)


def _check_triton_bwd(dout, q, k, v, *rest) -> Optional[str]:
    if importlib.util.find_spec("turbokernels.kernels.attention_bwd") is None:
        return "kernels/attention_bwd.py not available"
    return _check_triton_common(q, k, v)


@backends.register(BWD, "triton", check=_check_triton_bwd)
def _triton_bwd(*args):
    """The kernel takes the op's arguments in order and returns contiguous (dq, dk, dv)."""
    from turbokernels.kernels.attention_bwd import attention_bwd as launch
    return launch(*args)


backends.register(BWD, "torch", check=_torch_attention.check_bwd)(_torch_attention.attention_bwd)


# ---- autograd -----------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left, window_right, softcap = \
        inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
    ctx.params = (softmax_scale, causal, window_left, window_right, softcap)


def _contiguous_head_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _backward(ctx, grad_out, grad_lse):
    """Gradients of out only: a gradient flowing into lse is not propagated (as in FlashAttention)."""
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = attention_bwd(_contiguous_head_dim(grad_out), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                               alibi_slopes, *ctx.params, torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd(f"turbokernels::{FWD}", _backward, setup_context=_setup_context)


class _Deterministic(torch.autograd.Function):
    """attention_fwd whose backward asks attention_bwd for bitwise-repeatable gradients (deterministic=True: the
    op's own autograd formula can only follow torch.use_deterministic_algorithms, its schema has no such flag)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left,
                window_right, softcap):
        out, lse = attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal,
                                 window_left, window_right, softcap)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
        ctx.params = (softmax_scale, causal, window_left, window_right, softcap)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = attention_bwd(_contiguous_head_dim(grad_out), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                   alibi_slopes, *ctx.params, True)
        return dq, dk, dv, None, None, None, None, None, None, None, None


# ---- functional entry: all argument checks happen here, once --------------------------------------------------
def _fail(arg: str, msg: str, exc=ValueError):
    raise exc(f"attention({arg}): {msg}")


def _check_int(arg: str, value, minimum: int) -> int:
    if type(value) is int and value >= minimum:  # the usual case, without the ABC checks (~1 us each)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(arg, f"expected an int, got {type(value).__name__}", TypeError)
    if value < minimum:
        _fail(arg, f"must be >= {minimum}, got {value}")
    return int(value)


def _check_max_seqlen(arg: str, value) -> None:
    """Accepted as a hint only (the kernels do not need it); never read on the host."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            _fail(arg, f"a tensor max_seqlen must have one element, got shape {tuple(value.shape)}")
        return
    _check_int(arg, value, 0)


def _check_cu_seqlens(arg: str, cu: torch.Tensor, device: torch.device, total: int, packed: str) -> None:
    """Layout checks, then the values: cu[0] == 0, non-decreasing, cu[-1] == the packed length (`packed`, e.g.
    q.shape[0]). Values are checked directly on the CPU, and on CUDA with torch._assert_async, without a host sync
    (_checks.check_values): a bad cu_seqlens would make the kernels read and write outside q/k/v/out."""
    if not isinstance(cu, torch.Tensor):
        _fail(arg, f"expected a torch.Tensor, got {type(cu).__name__}", TypeError)
    if cu.dtype != torch.int32:
        _fail(arg, f"dtype must be torch.int32, got {cu.dtype}", TypeError)
    if cu.dim() != 1 or cu.shape[0] < 1:
        _fail(arg, f"expected shape (batch + 1,), got {tuple(cu.shape)}")
    if cu.device != device:
        _fail(arg, f"is on {cu.device} but q is on {device}")
    check_values(cu.device, [
        (lambda: cu[0] == 0, lambda: f"attention({arg}): must start at 0, got {cu.tolist()}"),
        (lambda: (cu[1:] >= cu[:-1]).all(), lambda: f"attention({arg}): must be non-decreasing, got {cu.tolist()}"),
        (lambda: cu[-1] == total, lambda: f"attention({arg}): must end at the packed length {total} ({packed}), "
                                          f"got {int(cu[-1])}"),
    ], f"attention({arg}): must start at 0, be non-decreasing and end at the packed length {total} ({packed}) "
       f"(checked on the device)")


def _checked(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
             max_seqlen_q, max_seqlen_k) -> tuple:
    """Every argument check of attention(), in order; returns the op's arguments."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(name, f"expected a torch.Tensor, got {type(t).__name__}", TypeError)
    if q.dtype not in DTYPES + (torch.float64,):
        _fail("q", f"dtype must be float16, bfloat16 or float32, got {q.dtype}", TypeError)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(name, f"dtype {t.dtype} does not match q's {q.dtype}", TypeError)
        if t.device != q.device:
            _fail(name, f"is on {t.device} but q is on {q.device}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            _fail("cu_seqlens_q" if cu_seqlens_q is None else "cu_seqlens_k",
                  "cu_seqlens_q and cu_seqlens_k must be given together")
        layout = "(total_tokens, heads, head_dim)"
        if q.dim() != 3:
            _fail("q", f"with cu_seqlens expected {layout}, got shape {tuple(q.shape)}")
        if k.dim() != 3:
            _fail("k", f"with cu_seqlens expected {layout}, got shape {tuple(k.shape)}")
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0], "q.shape[0]")
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0], "k.shape[0]")
        if cu_seqlens_k.shape != cu_seqlens_q.shape:
            _fail("cu_seqlens_k", f"shape {tuple(cu_seqlens_k.shape)} does not match cu_seqlens_q's "
                                  f"{tuple(cu_seqlens_q.shape)}")
        # the kernels read them as contiguous vectors (a no-op for the usual tensors)
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
        batch = cu_seqlens_q.shape[0] - 1
    else:
        layout = "(batch, seqlen, heads, head_dim)"
        if q.dim() != 4:
            _fail("q", f"expected {layout}, got shape {tuple(q.shape)}")
        if k.dim() != 4:
            _fail("k", f"expected {layout}, got shape {tuple(k.shape)}")
        if k.shape[0] != q.shape[0]:
            _fail("k", f"batch {k.shape[0]} does not match q's {q.shape[0]}")
        batch = q.shape[0]
    if v.shape != k.shape:
        _fail("v", f"shape {tuple(v.shape)} must equal k's {tuple(k.shape)}")
    head_dim, heads_q, heads_kv = q.shape[-1], q.shape[-2], k.shape[-2]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        _fail("q", f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if k.shape[-1] != head_dim:
        _fail("k", f"head_dim {k.shape[-1]} does not match q's {head_dim}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        _fail("k", f"heads_q={heads_q} must be a multiple of heads_kv={heads_kv}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif type(softmax_scale) is float and math.isfinite(softmax_scale):
        pass
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) \
            or not math.isfinite(softmax_scale):
        _fail("softmax_scale", f"expected a finite float or None, got {softmax_scale!r}", TypeError)
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        _fail("window_size", f"expected (left, right), got {window_size!r}", TypeError)
    window_left = _check_int("window_size", window_size[0], -1)
    window_right = _check_int("window_size", window_size[1], -1)
    if not (type(softcap) is float and 0.0 <= softcap < math.inf) and (
            isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap >= 0
            or not math.isfinite(softcap)):
        _fail("softcap", f"must be a finite float >= 0, got {softcap!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            _fail("alibi_slopes", f"expected a torch.Tensor, got {type(alibi_slopes).__name__}", TypeError)
        if alibi_slopes.dtype != torch.float32:
            _fail("alibi_slopes", f"dtype must be torch.float32, got {alibi_slopes.dtype}", TypeError)
        if alibi_slopes.shape not in ((heads_q,), (batch, heads_q)):
            _fail("alibi_slopes", f"expected shape ({heads_q},) or ({batch}, {heads_q}), "
                                  f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            _fail("alibi_slopes", f"is on {alibi_slopes.device} but q is on {q.device}")
        if alibi_slopes.stride(-1) != 1:
            alibi_slopes = alibi_slopes.contiguous()
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    q, k, v = _contiguous_head_dim(q), _contiguous_head_dim(k), _contiguous_head_dim(v)
    return (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, float(softmax_scale), bool(causal), window_left,
            window_right, float(softcap))


_FLOATS = DTYPES + (torch.float64,)
_Tensor = torch.Tensor
_INF = math.inf


def usual_window(window_size) -> Optional[tuple]:
    """window_size when it is the usual kind (a tuple of two ints >= -1), else None: then the entry's full checks
    decide (they also take lists, and name what is wrong). Shared by attention's and decode_attention's usual call."""
    if type(window_size) is not tuple or len(window_size) != 2:
        return None
    left, right = window_size
    if type(left) is int and left >= -1 and type(right) is int and right >= -1:
        return window_size
    return None


def _usual(q, k, v, causal, softmax_scale, window_size, softcap) -> Optional[tuple]:
    """The op's arguments of a dense call without ALiBi (cu_seqlens, alibi_slopes, max_seqlen_* None: the caller
    tested that) whose every check in _checked passes, found by cheaper tests that imply each of them (~1 us instead
    of ~7); None sends the call through _checked, which raises the error the call deserves."""
    # exactly torch.Tensor (a subclass dispatches itself: the checked path serves it; attention() relies on this)
    if not (type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor):
        return None
    dtype = q.dtype
    if dtype not in _FLOATS or k.dtype is not dtype or v.dtype is not dtype or q.dim() != 4 or k.dim() != 4:
        return None
    if not (q.is_cpu and k.is_cpu and v.is_cpu) and not (k.device == q.device and v.device == q.device):
        return None
    qs, ks = q.shape, k.shape
    head_dim, heads_kv = qs[3], ks[2]
    if (v.shape != ks or ks[0] != qs[0] or not 1 <= head_dim <= MAX_HEAD_DIM or ks[3] != head_dim or heads_kv == 0
            or qs[2] % heads_kv):
        return None
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif not (type(softmax_scale) is float and -_INF < softmax_scale < _INF):
        return None
    if usual_window(window_size) is None:
        return None
    window_left, window_right = window_size
    if not (type(softcap) is float and 0.0 <= softcap < _INF):
        return None
    # head dims contiguous (else _checked makes them so): is_contiguous() is the cheap sufficient test
    if head_dim > 1 and not ((q.is_contiguous() or q.stride()[3] == 1) and (k.is_contiguous() or k.stride()[3] == 1)
                             and (v.is_contiguous() or v.stride()[3] == 1)):
        return None
    return q, k, v, None, None, None, softmax_scale, bool(causal), window_left, window_right, softcap


def _key(q, head_dim: int, softcap: float, few_rows: bool) -> tuple:
    """What every backend's check reads (q/k/v's head dims are contiguous by now; few_rows: dense with at most
    CPU_MAX_ROWS query rows per sequence, the cpu backend's calls): the choice is remembered per key
    (backends.select). q.device.type costs ~1 us; is_cpu 0.1."""
    return ("cpu" if q.is_cpu else q.device.type), q.dtype, head_dim, softcap > 0, few_rows


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: Optional[float] = None, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
              cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q=None, max_seqlen_k=None,
              deterministic: bool = False, return_lse: bool = False):
    """Fused attention in FlashAttention's layout.

    q (batch, seqlen_q, heads_q, head_dim), k/v (batch, seqlen_k, heads_kv, head_dim); or packed
    (total_tokens, heads, head_dim) with int32 cu_seqlens_q/cu_seqlens_k (batch + 1,): starting at 0,
    non-decreasing, ending at q.shape[0] / k.shape[0] (checked on every call, without a host sync on CUDA).
    Returns out (q's shape and dtype), and with return_lse=True also lse: fp32 (batch, heads_q, seqlen_q), or
    (heads_q, total_q) for varlen. See python/turbokernels/reference/attention.py for the exact semantics.
    max_seqlen_q/max_seqlen_k are accepted for FlashAttention compatibility and not needed (never read).
    """
    if (not return_lse and (alibi_slopes is None or type(alibi_slopes) is _Tensor) and cu_seqlens_q is None
            and cu_seqlens_k is None
            and max_seqlen_q is None and max_seqlen_k is None and not _is_compiling() and type(q) is _Tensor
            and type(k) is _Tensor and type(v) is _Tensor and q.is_cpu and type(softcap) is float
            and (softmax_scale is None or type(softmax_scale) is float) and usual_window(window_size) is not None
            and _forward_ad._current_level < 0 and _forced_backend() is None):
        # the usual CPU call in one C++ call (torch_attention.cpp, attention_usual): this path's checks, the backend
        # choice and the kernel there; None when it is not that call (then the path below decides and raises)
        fast = _fast if _fast is not None else _resolve_fast()
        if fast:
            out = fast(q, k, v, bool(causal), softmax_scale, window_size[0], window_size[1], softcap, _fast_flags[0],
                       _fast_flags[1], False, True, alibi_slopes)
            if out is not None:
                return out
    args = None
    if (cu_seqlens_q is None and cu_seqlens_k is None and alibi_slopes is None and max_seqlen_q is None
            and max_seqlen_k is None):
        args = _usual(q, k, v, causal, softmax_scale, window_size, softcap)
    if args is None:
        args = _checked(q, k, v, causal, softmax_scale, window_size, softcap, alibi_slopes, cu_seqlens_q,
                        cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        plain = direct(args if args[3] is not None or args[5] is not None else (args[0], args[1], args[2]))
    else:  # _usual: q/k/v are torch.Tensor exactly, on one device; direct()'s other tests, inline
        plain = (q.is_cpu or q.is_cuda) and direct_exact(q, k, v)
    q, k, v = args[0], args[1], args[2]
    if deterministic and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _Deterministic.apply(*args)
    elif plain:
        # no autograd, tracer or mode to serve: the op's own steps (its `before`, backends.dispatch) without the
        # dispatcher round trip, as _library.call does; the torch backend's out without its lse when none is asked
        if q.numel() == 0:
            out, lse = _empty_fwd(*args)
        else:
            dense = args[3] is None
            name, impl = backends.select(FWD, *args, key=_key(q, q.shape[-1], args[10],
                                                              dense and q.shape[1] <= CPU_MAX_ROWS))
            if not return_lse:  # the out alone: the lse is never computed (cpu) or copied (torch)
                if impl.fn is _cpu_fwd:
                    return _ext.C.attention_rows(q, k, v, args[5], args[6], args[7], args[8], args[9], args[10],
                                                 False, False)[0]
                if impl.fn is _torch_fwd and dense and args[5] is None:
                    return _torch_attention.dense_out(q, k, v, args[6], args[7], args[8], args[9])
            out, lse = impl.fn(*args)
    else:
        out, lse = attention_fwd(*args)
    return (out, lse) if return_lse else out


_fast = None  # turbokernels._C.attention_usual once resolved (False: no extension, or one built without it)
_fast_flags = (False, False)  # (torch's CPU kernel reads GQA natively, attention_fwd's cpu backend is built)
_is_compiling = torch.compiler.is_compiling


def _resolve_fast():
    global _fast, _fast_flags
    _fast = (_ext.available() and getattr(_ext.C, "attention_usual", None)) or False
    if _fast:
        q1 = torch.empty(1, 1, 1, 1)
        _fast_flags = (_torch_attention._native_gqa(), _check_cpu_fwd(q1, q1, q1, None, None, None, 1.0, False, -1,
                                                                       -1, 0.0) is None)
    return _fast


def _dense_bhsd(qt, kt, vt, causal, softmax_scale, plain: bool = False) -> Optional[torch.Tensor]:
    """For the entries in SDPA's layout (scaled_dot_product_attention, nn.MultiheadAttention): attention's out,
    transposed to (B, Hq, Sq, D), computed by the torch backend on qt/kt/vt (B, H, S, D) as they are (no transposes
    either way), when attention(qt.transpose(1, 2), ..., causal=causal, softmax_scale=softmax_scale) would pass its
    checks, run outside autograd and any tracer or mode, and choose the torch backend; else None (the caller then
    calls attention). The caller checked: tensors of one device, k and v of q's dtype, 4-D, the same batch, key's
    head_dim query's, softmax_scale None or a finite real; plain: also that they are torch.Tensor exactly, on the
    CPU (see _run_bhsd)."""
    qs, ks = qt.shape, kt.shape
    head_dim = qs[3]
    if (not qt.is_cpu or qt.dtype not in _FLOATS or vt.shape != ks or not 1 <= head_dim <= MAX_HEAD_DIM
            or ks[1] == 0 or qs[1] % ks[1] or 0 in qs):
        return None
    if head_dim > 1 and not (qt.stride()[3] == 1 and kt.stride()[3] == 1 and vt.stride()[3] == 1):
        return None
    return _run_bhsd(qt, kt, vt, causal, 1.0 / math.sqrt(head_dim) if softmax_scale is None
                     else float(softmax_scale), head_dim, plain)


def _run_bhsd(qt, kt, vt, causal, scale: float, head_dim: int, plain: bool = False) -> Optional[torch.Tensor]:
    """_dense_bhsd after its checks (the caller made them). plain: the caller also checked that qt/kt/vt are
    torch.Tensor exactly (no subclass) on the CPU, so of direct()'s tests only the global ones and requires_grad
    remain (~1 us less)."""
    if not (direct_exact(qt, kt, vt) if plain else direct((qt, kt, vt))):
        return None
    # backends.select with its remembered-choice lookup inline: on a miss the checks read the op's arguments, in
    # FlashAttention's layout (views, made only then)
    key = ("cpu", qt.dtype, head_dim, False, qt.shape[2] <= CPU_MAX_ROWS)
    hit = _CHOSEN.get((FWD, _forced_backend(), key))
    impl = (hit or backends.select(FWD, qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), None, None, None,
                                   scale, bool(causal), -1, -1, 0.0, key=key))[1]
    if impl.fn is _cpu_fwd:  # a few query rows (a decode step given the whole cache): decode's kernel, this layout
        return _ext.C.attention_rows(qt, kt, vt, None, scale, bool(causal), -1, -1, 0.0, True, False)[0]
    if impl.fn is not _torch_fwd:
        return None
    return _torch_attention.dense_out_bhsd(qt, kt, vt, scale, bool(causal))
