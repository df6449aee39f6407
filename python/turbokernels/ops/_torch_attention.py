"""The `torch` backend of the attention ops: torch's own fused CPU kernels (aten's flash-style
_scaled_dot_product_flash_attention_for_cpu and its backward), for every call they can compute EXACTLY as our spec
(reference/attention.py, reference/decode_attention.py) says.

Why a backend and not a C++ kernel of ours: on CPU tensors torch's kernel is what F.scaled_dot_product_attention
runs, so calling it is the way to be never slower than torch. Calling the aten op directly (not F.sdpa) skips
torch's backend selection and returns the logsumexp the autograd backward needs.

How the spec maps onto the kernel (B, H, S, D views of our (B, S, H, D) tensors, no copies):
  * causal: torch aligns to the top-left corner, the spec to the bottom-right (key j allowed iff
    j <= i + Sk - Sq). is_causal=True is used when the top-left edge is at or outside the spec's (the kernel then
    skips key blocks past it); the spec's edge, windows and ALiBi become an explicit additive mask (0 / -inf, and
    -slope * |j - i - (Sk - Sq)| in fp32, float64 for float64 inputs: the same products the reference computes);
  * rows without any allowed key: the kernel writes out = 0 (as the spec) but lse = 0 where the spec has -inf;
    those rows are known from the arguments and their lse is set to -inf (the backward maps it back to 0);
  * no keys at all: out = 0, lse = -inf here (the kernel divides by zero);
  * GQA: the kernel indexes kv head h // (Hq / Hkv) itself in the torch versions probed to (_native_gqa);
    otherwise k/v are expanded for it (a copy) and dK/dV summed back;
  * varlen: one call per sequence on views of the packed tensors (a block-diagonal mask would cost
    total_q * total_k);
  * decode: one call on the cache slots some new token may attend, [L - T - window_left, L), a view (paged caches:
    the pages holding them, gathered); slots outside are never read, as the spec requires (unwritten slots may hold
    NaN: a mask cannot hide a NaN key, NaN + -inf is NaN). Sequences of different lengths: one call each.
    FlashAttention's options (causal=False, cache_batch_idx, cache_leftpad, return_lse): one call per sequence on
    its slots [max(leftpad, L - T - window_left), L) of its cache row, the dense forward's causal flag, window and
    lse (decode_options; the usual call's C++ one-call path is not used for them).
One C++ call when the extension is loaded (csrc/cpu/torch_attention.cpp, turbokernels._C.torch_attention_fwd /
torch_attention_decode): the views, the kernel, the rows without keys, the NaN-row repair and the lse copy below,
the same steps on the same kernel (same bits: tests/test_attention.py, tests/test_decode_attention.py), without a
Python tensor op per step (~3 us each: as much as the kernel at decode sizes). Without the extension (or for torch
versions without native GQA) the Python steps (_bhsd, _decode_block) run.
Softcap (tanh of the scores) is not an additive mask: declined, the reference runs it.
Non-finite inputs: a NaN query row gives a NaN output row, as in the spec (restored after the kernel, which would
write 0); one known divergence remains: a row whose every allowed KEY is NaN comes out 0 instead of NaN when those
keys fall in the kernel's scalar tail (fewer than a vector's width), where std::max skips NaN.
"""
from __future__ import annotations

import collections
import functools
import threading
from typing import Optional

import torch

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
# The same aten op through torch's generated Python binding (its C++ argument parser): ~8 us less per call than the
# OpOverload's generic one on the CI-class Xeon, as much as the kernel itself costs at decode sizes. The forward
# paths call this; the OpOverload stays for the probe and the backward.
_kernel = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", _fwd)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NEG_INF = float("-inf")


@functools.lru_cache(maxsize=None)
def _native_gqa() -> bool:
    """Whether this torch's CPU kernels read kv head h // group for query head h (forward and backward), probed once
    on a tiny case against the expanded computation: older torch versions index k/v with the query's head count."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, h, 4, 8, generator=g) for h in (2, 1, 1, 2))
    try:
        o, lse = _fwd(q, k, v, 0.0, False)
        dq, dk, dv = _bwd(do, q, k, v, o, lse, 0.0, False)
    except RuntimeError:
        return False
    ke, ve = k.expand(1, 2, 4, 8), v.expand(1, 2, 4, 8)
    o2, lse2 = _fwd(q, ke, ve, 0.0, False)
    _, dk2, dv2 = _bwd(do, q, ke, ve, o2, lse2, 0.0, False)
    return (torch.allclose(o, o2) and dk.shape == k.shape and torch.allclose(dk, dk2.sum(1, keepdim=True))
            and torch.allclose(dv, dv2.sum(1, keepdim=True)))


def _common_reason(q, k, v, softcap) -> Optional[str]:
    if q.device.type != "cpu":
        return f"torch's fused attention kernel used here is the CPU one (got {q.device.type} tensors)"
    if softcap > 0:
        return "softcap (tanh of the scores) cannot be expressed as an additive mask for torch's kernel"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            return f"{name}'s head dim is not contiguous (stride {t.stride(-1)})"
    return None


def check_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left, window_right,
              softcap) -> Optional[str]:
    return _common_reason(q, k, v, softcap)


def check_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal,
              window_left, window_right, softcap, deterministic) -> Optional[str]:
    reason = _common_reason(q, k, v, softcap)
    if reason is None and q.dtype == torch.float64:
        return ("float64: the op's lse is fp32, and the kernel's P = exp(s - lse) would carry its error into "
                "float64 gradients (the reference recomputes it)")
    if reason is None and dout.shape[-1] > 1 and dout.stride(-1) != 1:
        return f"dout's head dim is not contiguous (stride {dout.stride(-1)})"
    return reason


def _edges(sq: int, sk: int, causal: bool, window_left: int, window_right: int):
    """(left, right, offset): the window relative to each row's aligned diagonal (key j allowed iff
    -left <= j - i - offset <= right), None where it excludes no key of any row."""
    off = sk - sq
    right = 0 if causal else window_right
    # rel = j - i - off lies in [-(sk - 1), sq - 1]: a bound outside that range excludes nothing
    left = window_left if 0 <= window_left < sk - 1 else None
    right = right if 0 <= right < sq - 1 else None
    return left, right, off


def _mask(sq: int, sk: int, left, right, off: int, is_causal: bool, slopes, dtype, device):
    """The additive mask of one (sq, sk) block, or None: -inf outside the window (where is_causal does not already
    exclude it), -slope * |j - i - off| with ALiBi slopes ((H,) or (B, H)): (sq, sk), (1, H, sq, sk) or
    (B, H, sq, sk)."""
    need_right = right is not None and not (is_causal and off + right == 0)
    if slopes is None and left is None and not need_right:
        return None
    if slopes is not None:
        rel = torch.arange(sk, dtype=dtype, device=device) - torch.arange(off, sq + off, dtype=dtype,
                                                                           device=device)[:, None]
        neg = -slopes.to(dtype)
        mask = (neg[..., None, None] * rel.abs_())
        if mask.dim() == 3:
            mask = mask[None]
        # the same 0/-inf window for every (batch, head): applied to the (sq, sk) plane of each
        window = _mask(sq, sk, left, right, off, is_causal, None, dtype, device)
        return mask if window is None else mask.add_(window)
    mask = torch.zeros(sq, sk, dtype=dtype, device=device)
    if need_right:  # -inf where j - i > off + right
        mask = mask.masked_fill_(torch.ones(sq, sk, dtype=torch.bool, device=device).triu_(off + right + 1), NEG_INF)
    if left is not None:  # -inf where j - i < off - left
        mask = mask.masked_fill_(torch.ones(sq, sk, dtype=torch.bool, device=device).tril_(off - left - 1), NEG_INF)
    return mask


def _empty_rows(sq: int, sk: int, left, right, off: int) -> tuple[int, int]:
    """Rows [0, a) and [b, sq) have no allowed key (a <= b)."""
    a = min(sq, max(0, -(off + right))) if right is not None else 0
    b = max(a, min(sq, sk - off + left)) if left is not None else sq
    return a, b


# Masks are the same for every call with the same (sq, sk, causal, window, ALiBi slopes, dtype): built once and kept
# in a small LRU bounded in entries and bytes (a mask over the byte budget is built per call, not kept). The kernels
# only read them. ALiBi masks are keyed by the slopes' VALUES (a few floats), so an in-place change of the slopes
# tensor, or a new tensor at the same address, can never hit a stale entry.
_MASK_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
MASK_CACHE_ENTRIES = 32
MASK_CACHE_BYTES = 64 << 20
_mask_lock = threading.Lock()
_NO_MASK = (False, None, None)
BAKE_CAUSAL_MAX_SK = 512  # keep in step with csrc/cpu/torch_attention.cpp's kBakeCausalMaxSk


def _build_call_args(sq, sk, slopes, causal, window_left, window_right, dtype, device, group):
    left, right, off = _edges(sq, sk, causal, window_left, window_right)
    # grouped rows (decode: row gi * sq + t is query head h * group + gi's token t) are not in causal order
    is_causal = right is not None and off + right <= 0 and group == 1
    # a 0/-inf mask is exact in any dtype: q's (half the bytes of fp32 for fp16/bf16); an ALiBi bias is computed
    # and added in fp32 as the reference does (float64 for float64 inputs)
    mdtype = dtype if slopes is None else (torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.inference_mode(False):  # a cached mask may serve later calls outside inference mode
        mask = _mask(sq, sk, left, right, off, is_causal, slopes, mdtype, device)
        if is_causal and mask is not None and sk <= BAKE_CAUSAL_MAX_SK:
            # torch's kernel applies is_causal element by element on top of a mask: up to this many keys that costs
            # more than the key blocks it skips, so the edge goes into the mask (measured: torch_attention.cpp)
            mask = mask.masked_fill_(torch.ones(sq, sk, dtype=torch.bool, device=device).triu_(off + right + 1),
                                     NEG_INF)
            is_causal = False
        if group > 1 and mask is not None:
            if mask.dim() == 2:  # the same (sq, sk) plane for each of the group's query heads
                mask = mask.repeat(group, 1)
            else:  # (B or 1, Hq, sq, sk) -> (B or 1, Hkv, group * sq, sk): a view (heads h * group + gi)
                mask = mask.reshape(mask.shape[0], mask.shape[1] // group, group * sq, sk)
    a, b = _empty_rows(sq, sk, left, right, off)
    return is_causal, mask, (None if (a == 0 and b == sq) else (a, b))


def _call_args(sq, sk, slopes, causal, window_left, window_right, dtype, device, group=1):
    """(is_causal, mask or None, None or (a, b): the rows with keys when some row has none) for one dense block;
    group > 1: the mask of decode's grouped rows (_decode_grouped). The plain cases (no window, no ALiBi, and
    causal with sq <= 1 or sq == sk) return at once; the others come from the mask cache (group 1 with the
    extension: the C++ steps and cache, turbokernels._C.torch_attention_call_args)."""
    if slopes is None and window_left < 0 and (causal or window_right < 0):
        if not causal or sq <= 1 <= sk:
            return _NO_MASK
        if sq == sk and group == 1:
            return (True, None, None)
    if group == 1 and (_cxx_call_args if _cxx_resolved else (_resolve_cxx() and _cxx_call_args)):
        # the same steps in C++ (csrc/cpu/torch_attention.cpp), whose cache attention's one-call entry shares
        is_causal, mask, a, b = _cxx_call_args(sq, sk, slopes, causal, window_left, window_right, dtype)
        return is_causal, mask, (None if (a == 0 and b == sq) else (a, b))
    key = (sq, sk, causal, window_left, window_right, dtype, device, group,
           None if slopes is None else (tuple(slopes.shape), tuple(slopes.reshape(-1).tolist())))
    with _mask_lock:
        hit = _MASK_CACHE.get(key)
        if hit is not None:
            _MASK_CACHE.move_to_end(key)
            return hit
    args = _build_call_args(sq, sk, slopes, causal, window_left, window_right, dtype, device, group)
    nbytes = 0 if args[1] is None else args[1].numel() * args[1].element_size()
    if nbytes <= MASK_CACHE_BYTES:
        with _mask_lock:
            _MASK_CACHE[key] = args
            total = sum(0 if m is None else m.numel() * m.element_size() for _, m, _ in _MASK_CACHE.values())
            while len(_MASK_CACHE) > MASK_CACHE_ENTRIES or total > MASK_CACHE_BYTES:
                _, (_, m, _) = _MASK_CACHE.popitem(last=False)
                total -= 0 if m is None else m.numel() * m.element_size()
    return args


def _expand_kv(t: torch.Tensor, hq: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hq, S, D) for kernels without native GQA (a copy)."""
    b, hkv, s, d = t.shape
    return t[:, :, None].expand(b, hkv, hq // hkv, s, d).reshape(b, hq, s, d)


def _fix_rows(lse, rows, sq):
    """lse of the rows outside [a, b) (no allowed key) set to -inf, as the spec has it (the kernel writes 0)."""
    a, b = rows
    if a > 0:
        lse[..., :a] = NEG_INF
    if b < sq:
        lse[..., b:] = NEG_INF


SMALL_LSE = 64  # up to this many rows, reading lse into Python beats a reduction (a dispatch: ~3-8 us)


def _some_zero(lse) -> bool:
    """not lse.all() for a 3-D lse (any strides): a reduction for a large lse, a Python scan of a small one."""
    if lse.numel() > SMALL_LSE:
        return not lse.all()
    for plane in lse.tolist():  # plain loops: a generator costs ~1 us more
        for row in plane:
            if 0.0 in row:
                return True
    return False


# turbokernels._C.torch_attention_fwd (csrc/cpu/torch_attention.cpp): _bhsd's steps in one C++ call, the views
# included; resolved on first use (None: no extension, or one built before it existed: the Python steps run)
_cxx_fwd = None
_cxx_decode = None  # turbokernels._C.torch_attention_decode: _decode_block's steps on one span of a cache
_cxx_call_args = None  # turbokernels._C.torch_attention_call_args: _call_args' steps and cache (group 1)
_cxx_resolved = False


def _resolve_cxx():
    global _cxx_fwd, _cxx_decode, _cxx_call_args, _cxx_resolved
    from .. import _ext
    if _ext.available():
        _cxx_fwd = getattr(_ext.C, "torch_attention_fwd", None)
        _cxx_decode = getattr(_ext.C, "torch_attention_decode", None)
        _cxx_call_args = getattr(_ext.C, "torch_attention_call_args", None)
    _cxx_resolved = True
    return _cxx_fwd


def _run(q, k, v, bshd: bool, slopes, scale, causal, window_left, window_right, want_lse: bool):
    """_bhsd on q/k/v in either layout: (B, S, H, D) when bshd, else (B, H, S, D); out in q's layout."""
    fn = _cxx_fwd if _cxx_resolved else _resolve_cxx()
    sq, sk = (q.shape[1], k.shape[1]) if bshd else (q.shape[2], k.shape[2])
    if fn is None or sk == 0 or (k.shape[2 if bshd else 1] != q.shape[2 if bshd else 1] and not _native_gqa()):
        if not bshd:
            return _bhsd(q, k, v, slopes, scale, causal, window_left, window_right, want_lse)
        out, lse = _bhsd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), slopes, scale, causal,
                         window_left, window_right, want_lse)
        return out.transpose(1, 2), lse
    is_causal, mask, rows = _call_args(sq, sk, slopes, causal, window_left, window_right, q.dtype, q.device)
    a, b = (0, sq) if rows is None else rows
    return fn(q, k, v, mask, scale, is_causal, bshd, a, b, want_lse)


def _bhsd(qt, kt, vt, slopes, scale, causal, window_left, window_right, want_lse: bool):
    """The dense forward in the kernel's layout: qt (B, Hq, Sq, D), kt/vt (B, Hkv, Sk, D), any strides, head dims
    contiguous -> (out (B, Hq, Sq, D): a view of a contiguous (B, Sq, Hq, D) tensor; lse fp32 (B, Hq, Sq)
    contiguous, or None when not want_lse: then the kernel's lse is only read, not copied, unless a row lacks keys).

    A NaN query row makes every score of the row NaN; the kernel's scalar max (std::max, for the keys past the
    last full vector) skips NaN, so such a row can look fully masked: out 0 and lse exactly 0, where the spec gives
    NaN. Only when some lse is exactly 0 (that, or a rare real row) is q scanned: no pass over q otherwise. Rows
    without keys get their lse -inf first (_fix_rows), so they never ask for the scan."""
    sq, sk = qt.shape[2], kt.shape[2]
    if sk == 0:
        b, h = qt.shape[0], qt.shape[1]
        out = qt.new_zeros((b, sq, h, qt.shape[3])).transpose(1, 2)
        return out, (qt.new_full((b, h, sq), NEG_INF, dtype=torch.float32) if want_lse else None)
    is_causal, mask, rows = _call_args(sq, sk, slopes, causal, window_left, window_right, qt.dtype, qt.device)
    if kt.shape[1] != qt.shape[1] and not _native_gqa():
        kt, vt = _expand_kv(kt, qt.shape[1]), _expand_kv(vt, qt.shape[1])
    if mask is None:  # one keyword less to parse
        out, lse = _kernel(qt, kt, vt, 0.0, is_causal, scale=scale)
    else:
        out, lse = _kernel(qt, kt, vt, 0.0, is_causal, attn_mask=mask, scale=scale)
    # lse: a (B, H, S) view of (B, S, H) storage, fp32 (float64 for float64 inputs); made a contiguous fp32 tensor
    # (the op's outputs are) only when it is returned or rows must be fixed: one copy of B * H * S floats
    if want_lse or rows is not None:
        lse = lse.contiguous() if lse.dtype == torch.float32 else lse.float().contiguous()
        if rows is not None:
            _fix_rows(lse, rows, sq)
    if _some_zero(lse):
        nan_rows = qt.isnan().any(-1)
        out.masked_fill_(nan_rows[..., None], float("nan"))
        lse.masked_fill_(nan_rows, float("nan"))
    return out, (lse if want_lse else None)


def _dense_fwd(q, k, v, slopes, scale, causal, window_left, window_right, want_lse=True):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (out (B, Sq, Hq, D) contiguous, lse fp32 (B, Hq, Sq) or None)."""
    out, lse = _run(q, k, v, True, slopes, scale, causal, window_left, window_right, want_lse)
    # the kernel's out is a (B, H, S, D) view of a contiguous (B, S, H, D) tensor, transposed back: no copy
    if not out.is_contiguous():
        out = out.contiguous()
    return out, lse


def dense_out(q, k, v, scale, causal, window_left, window_right):
    """attention_fwd's out alone, for a dense call without ALiBi from an entry that does not return lse (the lse is
    not copied): q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D)."""
    return _dense_fwd(q, k, v, None, scale, causal, window_left, window_right, False)[0]


def dense_out_bhsd(qt, kt, vt, scale, causal):
    """The same in the kernel's (and SDPA's) (B, H, S, D) layout, without a window: out (B, Hq, Sq, D), a view of a
    contiguous (B, Sq, Hq, D) tensor (what attention_fwd's out transposed is).

    One query row under GQA (a decode step given the whole cache: transformers' attention interface, SDPA with
    enable_gqa): the g query heads of a kv head go to the kernel as g rows of that head, as decode_attention's
    grouping does, so each key and value is read once per kv head instead of once per query head (SmolLM2's decode
    shape, 9 query / 3 kv heads over 160 keys: 40 us a call against 55 us); causal or not is the same there (the
    one row is the last: it sees every key)."""
    if qt.shape[2] == 1 and kt.shape[1] != qt.shape[1] and kt.shape[2] > 0:
        b, hq, _, d = qt.shape
        hkv = kt.shape[1]
        out = _grouped_rows(qt.reshape(b, hkv, hq // hkv, d), kt, vt, None, scale, False)
        # (B, Hkv, g, D), a view of a contiguous (B, g, Hkv, D): rows in query-head order, one copy of Hq rows
        return out.reshape(b, hq, 1, d)
    return _run(qt, kt, vt, False, None, scale, causal, -1, -1, False)[0]


def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left,
                  window_right, softcap):
    if cu_seqlens_q is None:
        return _dense_fwd(q, k, v, alibi_slopes, softmax_scale, causal, window_left, window_right)
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), NEG_INF, dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()  # CPU tensors: no device sync
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        o_b, lse_b = _dense_fwd(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], slopes, softmax_scale, causal,
                                window_left, window_right)
        out[q0:q1] = o_b[0]
        lse[:, q0:q1] = lse_b[0]
    return out, lse


def _dense_bwd(dout, q, k, v, out, lse, slopes, scale, causal, window_left, window_right):
    sq, hq, sk, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if sk == 0 or sq == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    is_causal, mask, rows = _call_args(sq, sk, slopes, causal, window_left, window_right, q.dtype, q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    expand = hkv != hq and not _native_gqa()
    if expand:
        kt, vt = _expand_kv(kt, hq), _expand_kv(vt, hq)
    # rows without keys (known from the arguments): lse -inf in the spec, 0 as the kernel wants it
    # (exp(-inf - 0) = 0: no gradient); the op's lse is not modified
    if rows is not None:
        lse = lse.clone()
        a, b = rows
        lse[..., :a] = 0.0
        lse[..., b:] = 0.0
    dq, dk, dv = _bwd(dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse, 0.0, is_causal, attn_mask=mask,
                      scale=scale)
    if expand:
        g = hq // hkv
        dk = dk.reshape(dk.shape[0], hkv, g, sk, dk.shape[-1]).sum(2)
        dv = dv.reshape(dv.shape[0], hkv, g, sk, dv.shape[-1]).sum(2)
    return (dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous())


def attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal,
                  window_left, window_right, softcap, deterministic):
    """torch's CPU backward gives each (batch, head) pair to one thread and sums in a fixed order: bitwise
    repeatable, so `deterministic` needs nothing more."""
    if cu_seqlens_q is None:
        return _dense_bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, causal, window_left, window_right)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        g = _dense_bwd(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1],
                       lse[None, :, q0:q1], slopes, softmax_scale, causal, window_left, window_right)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


# ---- decode_attention ----------------------------------------------------------------------------------------
def check_decode(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
                 window_right, softcap, cache_batch_idx=None, cache_leftpad=None, causal=True,
                 return_lse=False) -> Optional[str]:
    # FlashAttention's options (cache_batch_idx, cache_leftpad, causal=False, return_lse) are served (decode_options)
    # q's head dim is made contiguous here if needed (a few rows): only the caches' layout is checked (no slicing
    # of q: every tensor op costs a dispatch)
    if q.device.type != "cpu":
        return f"torch's fused attention kernel used here is the CPU one (got {q.device.type} tensors)"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}"
    return _common_reason(k_cache, k_cache, v_cache, softcap)


def _slots(cache, block_table, b: int, lo: int, hi: int) -> torch.Tensor:
    """(1, Hkv, hi - lo, D): cache positions lo..hi-1 of sequence b in the kernel's layout (a view; paged: its pages
    gathered)."""
    if block_table is None:
        return _span(cache[b:b + 1], lo, hi)
    ps = cache.shape[1]
    first, last = lo // ps, (hi + ps - 1) // ps
    pages = cache[block_table[b, first:last].long()].reshape(1, (last - first) * ps, *cache.shape[2:])
    return pages[:, lo - first * ps:hi - first * ps].transpose(1, 2)


def _span(cache, lo: int, hi: int) -> torch.Tensor:
    """cache[:, lo:hi].transpose(1, 2) in one view op (every tensor op is a dispatch: ~1.5-3 us at decode sizes)."""
    b, _, h, d = cache.shape
    s0, s1, s2, s3 = cache.stride()
    return cache.as_strided((b, h, hi - lo, d), (s0, s2, s1, s3), cache.storage_offset() + lo * s1)


def _grouped_rows(qg, kt, vt, mask, scale, is_causal):
    """The kernel on query rows grouped by kv head, qg (B, Hkv, rows, D), every row with at least one key -> out
    (B, Hkv, rows, D), a NaN query row NaN (the C++ call, or the kernel and the repair of _bhsd here)."""
    fn = _cxx_fwd if _cxx_resolved else _resolve_cxx()
    if fn is not None:
        return fn(qg, kt, vt, mask, scale, is_causal, False, 0, qg.shape[2], False)[0]
    out, lse = _kernel(qg, kt, vt, 0.0, is_causal, attn_mask=mask, scale=scale)
    if _some_zero(lse):  # a NaN query row may come out as a masked one (_bhsd); qg is a few rows
        out.masked_fill_(qg.isnan().any(-1)[..., None], float("nan"))
    return out


def _decode_grouped(q, kt, vt, slopes, scale, window_left):
    """Decode on the key slots [lo, L) of sequences of one length L: q (B, T, Hq, D), kt/vt (B, Hkv, L - lo, D) views
    -> out (B, T, Hq, D) contiguous. Token t sits at the slice's position L - lo - T + t (causal=True, bottom-right).

    The g = Hq / Hkv query heads that share a kv head go to the kernel as g * T query ROWS of that kv head
    (row gi * T + t: head h * g + gi, token t): the kernel then reads each key and value once per kv head, where
    with one kernel head per query head (what F.scaled_dot_product_attention(enable_gqa=True) does) it reads them
    g times. Every row is the same softmax over the same keys as before; rows are independent, so the result is
    the same attention (each score an fp32 dot product of D terms, as before)."""
    B, T, hq, D = q.shape
    hkv, sk = kt.shape[1], kt.shape[2]
    g = hq // hkv
    is_causal, mask, _ = _call_args(T, sk, slopes, True, window_left, -1, q.dtype, q.device, g)
    if T == 1:  # (B, 1, Hq, D) -> (B, Hkv, g, D): row gi of kv head h is query head h * g + gi; one view op
        qg = q.reshape(B, hkv, g, D)
    else:
        qg = q.view(B, T, hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, g * T, D)
    out = _grouped_rows(qg, kt, vt, mask, scale, is_causal)
    if T == 1:
        return out.reshape(B, 1, hq, D)  # the few output rows in head order: one copy
    # out: (B, Hkv, g * T, D) -> (B, T, Hq, D), one copy of the few output rows (reshape may return a strided view:
    # with one kv head it can)
    return out.reshape(B, hkv, g, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, hq, D).contiguous()


def _decode_block(q, kt, vt, slopes, scale, window_left):
    """q (B, T, Hq, D), kt/vt (B, Hkv, n, D): the slots' keys and values in the kernel's layout."""
    if kt.shape[2] == 0:
        return q.new_zeros(q.shape)
    if kt.shape[1] != q.shape[2] and (q.shape[1] == 1 or kt.shape[2] != q.shape[1]):
        return _decode_grouped(q, kt, vt, slopes, scale, window_left)
    # MHA, or only the new tokens' own slots: attention_fwd's dense path, without its lse
    out, _ = _run(q.transpose(1, 2), kt, vt, False, slopes, scale, True, window_left, -1, False)
    out = out.transpose(1, 2)
    return out if out.is_contiguous() else out.contiguous()


def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
                     window_right, softcap, cache_batch_idx=None, cache_leftpad=None, causal=True, return_lse=False):
    """The op: (out, lse (B, Hq, T) fp32 when return_lse, else an empty (0,) fp32 tensor)."""
    lens = cache_seqlens.tolist()  # CPU tensors: no device sync
    if cache_batch_idx is None and cache_leftpad is None and causal and not return_lse:
        return (decode_lens(q, k_cache, v_cache, lens, block_table, alibi_slopes, softmax_scale, window_left),
                q.new_empty((0,), dtype=torch.float32))
    rows = None if cache_batch_idx is None else cache_batch_idx.tolist()
    pads = None if cache_leftpad is None else cache_leftpad.tolist()
    out, lse = decode_options(q, k_cache, v_cache, lens, block_table, alibi_slopes, softmax_scale, window_left,
                              window_right, rows, pads, causal, return_lse)
    return out, (lse if return_lse else q.new_empty((0,), dtype=torch.float32))


def decode_options(q, k_cache, v_cache, lens, block_table, alibi_slopes, softmax_scale, window_left, window_right,
                   rows, pads, causal: bool, want_lse: bool):
    """decode with FlashAttention's options, one kernel call per sequence (lists: rows = cache_batch_idx, pads =
    cache_leftpad, or None): sequence b's slots [lo_b, L_b) of cache row rows[b], lo_b = max(pads[b],
    L_b - T - window_left) (slots before are never read), given to attention_fwd's dense case (_run) with `causal`
    and the window: its bottom-right alignment puts token t at the slice's position L_b - lo_b - T + t, i.e. at
    L_b - T + t in the cache, and every distance (window, ALiBi) is the same in the slice as in the cache.
    -> (out (B, T, Hq, D) contiguous, lse fp32 (B, Hq, T) or None); a sequence without slots: 0, lse -inf."""
    B, T, hq, D = q.shape
    if q.stride()[-1] != 1 and D > 1:
        q = q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, hq, T), dtype=torch.float32, device=q.device) if want_lse else None
    right = -1 if causal else window_right
    for b, n in enumerate(lens):
        lo = 0 if pads is None else pads[b]
        if window_left >= 0:
            lo = max(lo, n - T - window_left)
        if n <= lo:
            out[b] = 0.0
            if want_lse:
                lse[b] = NEG_INF
            continue
        row = b if rows is None else rows[b]  # paged (rows None): _slots reads sequence b's pages
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        o_b, lse_b = _run(q[b:b + 1].transpose(1, 2), _slots(k_cache, block_table, row, lo, n),
                          _slots(v_cache, block_table, row, lo, n), False, slopes, softmax_scale, causal,
                          window_left, right, want_lse)
        out[b] = o_b[0].transpose(0, 1)
        if want_lse:
            lse[b] = lse_b[0]
    return out, lse


def decode_lens(q, k_cache, v_cache, lens, block_table, alibi_slopes, softmax_scale, window_left):
    """decode_attention with cache_seqlens given as a list (the entry read it for its checks already).

    New token t of sequence b attends the keys the spec allows among [lo_b, L_b), lo_b = L_b - T - window_left
    (clamped at 0): attention_fwd's dense case with causal=True on that slice (its bottom-right alignment puts token
    t at position L_b - T + t), window_right implied by causality."""
    T = q.shape[1]
    if q.stride()[-1] != 1 and q.shape[-1] > 1:
        q = q.contiguous()
    if window_left >= 0:
        spans = [(max(0, n - T - window_left), n) for n in lens]
    else:
        spans = [(0, n) for n in lens]
    if block_table is None and (len(spans) == 1 or all(s == spans[0] for s in spans)):
        lo, hi = spans[0]
        fn = _cxx_decode if _cxx_resolved else (_resolve_cxx() and _cxx_decode)
        if fn is not None:  # _decode_block's steps, the cache views included, in one C++ call
            if hi == lo:
                return q.new_zeros(q.shape)
            hq, hkv, n = q.shape[2], k_cache.shape[2], hi - lo
            grouped = hkv != hq and (T == 1 or n != T)
            if grouped or hkv == hq or _native_gqa():
                is_causal, mask, rows = _call_args(T, n, alibi_slopes, True, window_left, -1, q.dtype, q.device,
                                                   hq // hkv if grouped else 1)
                a, b = (0, T * hq // hkv) if grouped else ((0, T) if rows is None else rows)
                return fn(q, k_cache, v_cache, lo, hi, mask, softmax_scale, is_causal, grouped, a, b)
        return _decode_block(q, _span(k_cache, lo, hi), _span(v_cache, lo, hi), alibi_slopes, softmax_scale,
                             window_left)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for b, (lo, hi) in enumerate(spans):
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        out[b:b + 1] = _decode_block(q[b:b + 1], _slots(k_cache, block_table, b, lo, hi),
                                     _slots(v_cache, block_table, b, lo, hi), slopes, softmax_scale, window_left)
    return out
