"""Oracles that are not ourselves: every backend of attention, decode_attention, int4_linear and sparse24_linear
against implementations that share no code with turbokernels.reference.

    attention forward   A: torch's scaled_dot_product_attention in float64 with an explicit float attn_mask (-inf
                           where FlashAttention forbids the key, plus the ALiBi bias), built here from FlashAttention's
                           published definition (below); softcap cannot be an SDPA mask, so:
                        B: FlexAttention (torch.nn.attention.flex_attention, eager on CPU, float64) with a score_mod
                           for softcap and ALiBi and a mask_mod for causal/window; its lse (natural log: checked by
                           test_flex_lse_is_natural_log) against ours.
    attention backward  autograd of oracle A in float64. FlexAttention has no backward on CPU in torch 2.14
                        (NotImplementedError), so softcap enters SDPA as a differentiable additive term
                        softcap * tanh(s / softcap) - s with s = scale * q.k (SDPA adds it to its own scale * q.k).
    decode_attention    oracle A / B with the mask of flash_attn_with_kvcache (new token t at cache_seqlens - T + t,
                        causal among the new tokens, or not: causal=False), pages gathered here through the block
                        table; cache_leftpad as FlashAttention 2.6+ defines it: the sequence is k[b, leftpad:L].
    int4_linear         the gguf package's own dequantizer on Q4_0/Q4_1 blocks packed here from the GGUF
                        description, F.linear in float64; torch's CPU int4 kernel (_weight_int4pack_mm_for_cpu) as a
                        second opinion held to the same rule.
    sparse24_linear     the weight taken through torch's CUTLASS conversion (sparse_semi_structured_from_dense_cutlass
                        / _to_dense_cutlass) and Sparse24Weight.from_cutlass; dense F.linear in float64.

FlashAttention's definition (flash_attn_interface.flash_attn_func docstring, FA 2.1+), for query i, key j of one
sequence pair of lengths (sq, sk):
    allowed  iff  i + sk - sq - window_size[0] <= j <= i + sk - sq + window_size[1]   (-1: unbounded side;
                  causal=True sets window_size[1] = 0: the mask is aligned to the bottom-right corner)
    score    =  softmax_scale * q_i.k_j;  softcap > 0: softcap * tanh(score / softcap);
                then "a bias of (-alibi_slope * |i + seqlen_k - seqlen_q - j|) is added"
    a row with no allowed key gives out = 0. (lse: turbokernels and FlexAttention give -inf, the log of an empty sum;
    FlashAttention 2's CUDA kernel writes +inf there -- softmax.h normalize_softmax_lse, non-split path -- a value
    its backward relies on, not a different definition of the output.)
Both oracles' answers on such rows are discarded (SDPA gives NaN in older torch, 0 in 2.14; flex gives 0 / -inf):
the golden there is 0 / -inf by the definition, checked separately and exactly.

FlexAttention's lse: its math path keeps log2-based statistics and flex_attention's _finalize_outputs returns them
in natural log (torch 2.14), the base of our lse; test_flex_lse_is_natural_log pins that down.

Tolerances: turbokernels.testing.assert_close with the derived allowances (the float64 oracle is the golden; the
same oracle run in the inputs' dtype is the baseline of FlashAttention's 2x check). The allowance helpers use
turbokernels.reference's score layout to size the bound -- never as the expected value. The matmul tests run without
a bias: int4_linear / sparse24_linear add it after the op's rounding (a known WIP, caught by test_int4_mm /
test_sparse24_mm); the point here is the product against a dequantization that is not ours.
"""
import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import turbokernels as tk
from turbokernels import backends
from turbokernels.testing import (assert_close, attention_allowance, attention_bwd_allowance, decode_allowance,
                                  int4_dequant_magnitudes, matmul_allowance, operand_dtype)
from conftest import interpreting

try:
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch without FlexAttention
    flex_attention = None

try:
    import gguf
    import gguf.quants
except ImportError:
    gguf = None

needs_flex = pytest.mark.skipif(flex_attention is None, reason="torch.nn.attention.flex_attention not available")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
F64 = torch.float64


def attention_backends():
    return ["reference"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- FlashAttention's definition, written out ------------------------------------------------------------------
def fa_allowed(sq, sk, causal=False, window=(-1, -1), dev="cpu"):
    """(sq, sk) bool: i + sk - sq - left <= j <= i + sk - sq + right; causal sets right = 0."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq, device=dev)[:, None]
    j = torch.arange(sk, device=dev)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=dev)
    if left >= 0:
        ok &= j >= i + sk - sq - left
    if right >= 0:
        ok &= j <= i + sk - sq + right
    return ok


def per_batch_slopes(alibi, batch, heads):
    """ALiBi slopes as (batch, heads) float64, or None."""
    if alibi is None:
        return None
    return alibi.to(F64).expand(batch, heads) if alibi.dim() == 1 else alibi.to(F64)


def fa_mask(sq, sk, batch, heads, causal, window, alibi, dev="cpu"):
    """(float additive mask (batch or 1, heads or 1, sq, sk) float64, allowed (sq, sk)): -inf where not allowed, the
    ALiBi bias -slope * |i + sk - sq - j| elsewhere. Rows without an allowed key are left at 0 (the caller zeroes
    their output: SDPA's answer on an all -inf row is not FlashAttention's)."""
    ok = fa_allowed(sq, sk, causal, window, dev)
    i = torch.arange(sq, device=dev)[:, None]
    j = torch.arange(sk, device=dev)[None, :]
    slopes = per_batch_slopes(alibi, batch, heads)
    if slopes is None:
        bias = torch.zeros(1, 1, sq, sk, dtype=F64, device=dev)
    else:
        bias = -slopes[:, :, None, None] * (i + sk - sq - j).abs().to(F64)
    mask = bias.masked_fill(~ok, float("-inf"))
    return torch.where(ok.any(-1)[:, None], mask, torch.zeros_like(mask)), ok


# ---- oracle A: torch SDPA with an explicit mask ----------------------------------------------------------------
def sdpa_oracle(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0, alibi=None, dtype=F64):
    """FlashAttention layout in and out ((B, S, H, D)), computed by F.scaled_dot_product_attention in `dtype`;
    differentiable in q, k, v (softcap as the additive term softcap * tanh(s / softcap) - s: see the docstring)."""
    B, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qh, kh, vh = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    mask, ok = fa_mask(sq, sk, B, hq, causal, window, alibi, q.device)
    mask = mask.to(dtype)
    if softcap > 0:
        s = (qh @ kh.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2)) * scale
        mask = mask + (softcap * torch.tanh(s / softcap) - s)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
    out = out * ok.any(-1)[:, None].to(dtype)  # rows with no allowed key: 0 by definition
    return out.transpose(1, 2)


# ---- oracle B: FlexAttention -----------------------------------------------------------------------------------
def _flex_stance():
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def flex_oracle(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0, alibi=None, dtype=F64):
    """(out (B, Sq, Hq, D), lse (B, Hq, Sq)) by FlexAttention in `dtype`. flex applies `scale` to q.k and hands the
    scaled score to score_mod: softcap then ALiBi here, as in FlashAttention."""
    B, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if sk == 0:
        return q.new_zeros(q.shape, dtype=dtype), q.new_full((B, hq, sq), float("-inf"), dtype=dtype)
    qh, kh, vh = (t.to(dtype).transpose(1, 2).contiguous() for t in (q, k, v))
    slopes = per_batch_slopes(alibi, B, hq)
    slopes = None if slopes is None else slopes.to(dtype)
    off = sk - sq
    left, right = window
    if causal:
        right = 0

    def score_mod(score, b, h, i, j):
        if softcap > 0:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[b, h] * (i + off - j).abs()
        return score

    def mask_mod(b, h, i, j):
        ok = j >= 0
        if left >= 0:
            ok = ok & (j >= i + off - left)
        if right >= 0:
            ok = ok & (j <= i + off + right)
        return ok

    # force_eager: flex's unfused math path without its torch.compile(backend="eager") wrapper, which would recompile
    # (~1 s) for every new shape, dtype or softcap; the results are bitwise the same (checked on torch 2.14)
    with _flex_stance(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": the unfused path is what we want
        block_mask = create_block_mask(mask_mod, None, None, sq, sk, device=str(q.device))
        out, aux = flex_attention(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=hq != hkv, return_aux=AuxRequest(lse=True))
    ok = fa_allowed(sq, sk, causal, window, q.device).any(-1)
    out = out * ok[:, None].to(dtype)
    lse = aux.lse.masked_fill(~ok, float("-inf"))
    return out.transpose(1, 2), lse


def oracle_varlen(oracle, q, k, v, cu_q, cu_k, alibi, dtype=F64, **kw):
    """Packed (total, H, D): the oracle on each sequence pair alone, packed back -> (out, lse (H, total_q)); a
    sequence without keys stays 0 / -inf (FlashAttention's definition), without asking the oracle."""
    out = torch.zeros(q.shape, dtype=dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=dtype)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        res = oracle(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], alibi=slopes, dtype=dtype, **kw)
        res = res if isinstance(res, tuple) else (res, None)
        out[q0:q1] = res[0][0]
        if res[1] is not None:
            lse[:, q0:q1] = res[1][0]
    return out, lse


@needs_flex
def test_flex_lse_is_natural_log():
    """FlexAttention's lse is log_e(sum exp(scale * q.k)) (not log2, not unscaled), in torch 2.14 as in our lse."""
    q, k, v = (torch.randn(1, 9, 2, 16, dtype=F64) for _ in range(3))
    _, lse = flex_oracle(q, k, v, scale=0.3)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1), rtol=1e-13, atol=1e-13)


# ---- attention forward -----------------------------------------------------------------------------------------
# (batch, sq, sk, hq, hkv, head_dim, kwargs); "empty" marks cases with rows that see no key
FWD_CASES = [
    (2, 17, 33, 4, 2, 32, dict(alibi="head", causal=True)),                    # causal sq < sk, ALiBi per head, GQA
    (1, 33, 17, 2, 1, 16, dict(causal=True)),                                   # causal sq > sk, MQA: 16 empty rows
    (1, 97, 113, 2, 2, 32, dict(window_size=(16, 8))),                          # window, both sides
    (1, 113, 97, 2, 1, 16, dict(window_size=(7, -1))),                          # left only, sq > sk
    (1, 113, 97, 2, 2, 16, dict(window_size=(-1, 0), softmax_scale=0.3)),      # right only, sq > sk: empty rows
    (1, 97, 97, 2, 1, 64, dict(softcap=2.0)),                                   # softcap
    (2, 33, 17, 4, 2, 32, dict(alibi="batch", window_size=(9, 3))),            # ALiBi per (batch, head), window
    (2, 61, 70, 2, 2, 16, dict(alibi="batch", softcap=3.0, window_size=(20, 3), causal=True)),
    (1, 1, 113, 4, 2, 64, dict(softmax_scale=0.7)),                             # one query row
]


def case_id(c):
    b, sq, sk, hq, hkv, d, kw = c
    return f"b{b}-{sq}x{sk}-h{hq}:{hkv}-d{d}-" + "-".join(f"{k}={v}" for k, v in kw.items()).replace(" ", "")


def materialize(kw, batch, heads):
    kw = dict(kw)
    if kw.get("alibi") is not None:
        shape = (heads,) if kw.pop("alibi") == "head" else (batch, heads)
        kw["alibi_slopes"] = torch.rand(shape, device=device()) * 0.5 + 0.05
    kw.setdefault("softmax_scale", None)
    return kw


def oracle_kw(kw, d):
    scale = kw["softmax_scale"] if kw.get("softmax_scale") is not None else d ** -0.5
    return dict(scale=scale, causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                softcap=kw.get("softcap", 0.0), alibi=kw.get("alibi_slopes"))


def allowance_kw(kw):
    return {k: v for k, v in kw.items() if k in ("causal", "softmax_scale", "window_size", "softcap",
                                                   "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k")}


def check_empty_rows(out, lse, ok_rows, what):
    """Rows with no allowed key: out exactly 0 and lse exactly -inf (FlashAttention's output; the log of 0)."""
    empty = ~ok_rows
    if empty.any():
        assert (out[:, empty] == 0).all(), f"{what}: a row without keys is not 0"
        assert (lse[..., empty] == float("-inf")).all(), f"{what}: a row without keys has lse != -inf"


@needs_flex
@pytest.mark.parametrize("case", FWD_CASES, ids=case_id)
def test_the_two_oracles_agree(case):
    """A and B are written independently from the same definition: in float64 they agree to rounding, softcap
    included (SDPA with softcap as an additive term, the backward's oracle, against flex's score_mod)."""
    b, sq, sk, hq, hkv, d, kw = case
    kw = materialize(kw, b, hq)
    q, k, v = (torch.randn(b, n, h, d, dtype=F64) for n, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    okw = oracle_kw(kw, d)
    torch.testing.assert_close(sdpa_oracle(q, k, v, **okw), flex_oracle(q, k, v, **okw)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend_name", attention_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=case_id)
def test_attention_forward_against_sdpa_and_flex(backend_name, dtype, case):
    b, sq, sk, hq, hkv, d, kw = case
    kw = materialize(kw, b, hq)
    q = torch.randn(b, sq, hq, d, device=device()).to(dtype)
    k = torch.randn(b, sk, hkv, d, device=device()).to(dtype)
    v = torch.randn(b, sk, hkv, d, device=device()).to(dtype)
    with tk.backend(backend_name):
        out, lse = tk.attention(q, k, v, return_lse=True, **kw)
    what = f"{backend_name} {dtype} {case_id(case)}"
    ok_rows = fa_allowed(sq, sk, kw.get("causal", False), kw.get("window_size", (-1, -1))).any(-1)
    check_empty_rows(out, lse, ok_rows, what)
    a_out, a_lse = attention_allowance(q, k, v, operand_dtype=operand_dtype(backend_name, dtype),
                                       **allowance_kw(kw))
    okw = oracle_kw(kw, d)
    if not okw["softcap"]:  # oracle A: softcap is no mask
        assert_close(out, sdpa_oracle(q, k, v, **okw), sdpa_oracle(q, k, v, dtype=dtype, **okw),
                     allowance=a_out, what=f"{what} vs SDPA")
    if flex_attention is not None:  # oracle B: out (FlashAttention's 2x check only where SDPA did not), lse
        golden, golden_lse = flex_oracle(q, k, v, **okw)
        baseline = flex_oracle(q, k, v, dtype=dtype, **okw)[0] if okw["softcap"] else None
        assert_close(out, golden, baseline, allowance=a_out, what=f"{what} vs flex")
        assert_close(lse, golden_lse, allowance=a_lse, what=f"{what} lse vs flex")


@pytest.mark.parametrize("backend_name", attention_backends())
@pytest.mark.parametrize("dtype,softcap", [(torch.float16, 4.0), (torch.bfloat16, 0.0), (torch.float32, 4.0)],
                         ids=["float16-softcap4", "bfloat16", "float32-softcap4"])
def test_attention_varlen_against_oracles(backend_name, dtype, softcap):
    """Packed sequences (an empty query sequence, one without keys, sq > sk and sq < sk) with causal attention and
    per-(batch, head) ALiBi: each sequence against the oracles run on it alone."""
    seqlens_q, seqlens_k = [17, 1, 0, 40, 5, 9], [23, 5, 3, 31, 0, 9]
    hq, hkv, d = 4, 2, 32
    cu_q = torch.tensor([0] + seqlens_q).cumsum(0).to(torch.int32).to(device())
    cu_k = torch.tensor([0] + seqlens_k).cumsum(0).to(torch.int32).to(device())
    q = torch.randn(sum(seqlens_q), hq, d, device=device()).to(dtype)
    k = torch.randn(sum(seqlens_k), hkv, d, device=device()).to(dtype)
    v = torch.randn(sum(seqlens_k), hkv, d, device=device()).to(dtype)
    slopes = torch.rand(len(seqlens_q), hq, device=device()) * 0.5 + 0.05
    kw = dict(causal=True, alibi_slopes=slopes, softcap=softcap, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with tk.backend(backend_name):
        out, lse = tk.attention(q, k, v, return_lse=True, **kw)
    what = f"varlen {backend_name} {dtype} softcap={softcap}"
    a_out, a_lse = attention_allowance(q, k, v, operand_dtype=operand_dtype(backend_name, dtype),
                                       **allowance_kw(kw))
    okw = dict(scale=d ** -0.5, causal=True, softcap=softcap)
    rows = cu_q[4].item(), cu_q[5].item()  # the sequence without keys
    assert (out[rows[0]:rows[1]] == 0).all() and (lse[:, rows[0]:rows[1]] == float("-inf")).all(), what
    if not softcap:
        golden, _ = oracle_varlen(sdpa_oracle, q, k, v, cu_q, cu_k, slopes, **okw)
        baseline, _ = oracle_varlen(sdpa_oracle, q, k, v, cu_q, cu_k, slopes, dtype=dtype, **okw)
        assert_close(out, golden, baseline.to(dtype), allowance=a_out, what=f"{what} vs SDPA")
    if flex_attention is not None:
        golden, golden_lse = oracle_varlen(flex_oracle, q, k, v, cu_q, cu_k, slopes, **okw)
        baseline = oracle_varlen(flex_oracle, q, k, v, cu_q, cu_k, slopes, dtype=dtype, **okw)[0].to(dtype) \
            if softcap else None
        assert_close(out, golden, baseline, allowance=a_out, what=f"{what} vs flex")
        assert_close(lse, golden_lse, allowance=a_lse, what=f"{what} lse vs flex")


# ---- attention backward ----------------------------------------------------------------------------------------
# (batch, sq, sk, hq, hkv, head_dim, dtype, kwargs): each feature once, the three dtypes spread over them
BWD_CASES = [
    (1, 17, 33, 2, 1, 32, torch.float16, dict(causal=True)),
    (1, 33, 17, 2, 2, 16, torch.bfloat16, dict(causal=True)),                  # empty rows: zero gradients
    (1, 97, 113, 2, 2, 16, torch.float32, dict(window_size=(16, 8))),
    (1, 113, 97, 2, 1, 16, torch.float16, dict(window_size=(7, -1))),
    (1, 33, 40, 2, 2, 16, torch.bfloat16, dict(window_size=(-1, 3))),
    (1, 40, 40, 4, 2, 32, torch.float16, dict(softcap=2.0)),
    (2, 17, 33, 4, 2, 32, torch.float32, dict(alibi="head", causal=True)),
    (2, 33, 17, 2, 2, 16, torch.float16, dict(alibi="batch", softcap=3.0, window_size=(9, 3))),
    (1, 1, 97, 4, 1, 64, torch.bfloat16, dict(softmax_scale=0.7)),
]


def bwd_id(c):
    return case_id(c[:6] + (c[7],)) + f"-{str(c[6])[6:]}"


@pytest.mark.parametrize("backend_name", attention_backends())
@pytest.mark.parametrize("case", BWD_CASES, ids=bwd_id)
def test_attention_backward_against_sdpa_autograd(backend_name, case):
    b, sq, sk, hq, hkv, d, dtype, kw = case
    kw = materialize(kw, b, hq)
    q = torch.randn(b, sq, hq, d, device=device()).to(dtype)
    k = torch.randn(b, sk, hkv, d, device=device()).to(dtype)
    v = torch.randn(b, sk, hkv, d, device=device()).to(dtype)
    dout = torch.randn(b, sq, hq, d, device=device()).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with tk.backend(backend_name):
        out, lse = tk.attention(*leaves, return_lse=True, **kw)
        out.backward(dout)
    okw = oracle_kw(kw, d)
    golden, baseline = [], []
    for dt, grads in ((F64, golden), (dtype, baseline)):
        ref_leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        sdpa_oracle(*ref_leaves, dtype=dt, **okw).backward(dout.to(dt))
        grads.extend(t.grad for t in ref_leaves)
    allowances = attention_bwd_allowance(q, k, v, dout, out.detach(), lse, operand_dtype=operand_dtype(
        backend_name, dtype), **allowance_kw(kw))
    ok_rows = fa_allowed(sq, sk, kw.get("causal", False), kw.get("window_size", (-1, -1))).any(-1)
    what = f"{backend_name} {bwd_id(case)}"
    if not ok_rows.all():
        assert (leaves[0].grad[:, ~ok_rows] == 0).all(), f"{what}: dq of a row without keys is not 0"
    for name, leaf, gold, base, a in zip(("dq", "dk", "dv"), leaves, golden, baseline, allowances):
        assert leaf.grad.dtype == dtype
        assert_close(leaf.grad, gold, base, allowance=a, what=f"{what} {name}")


# ---- decode_attention ------------------------------------------------------------------------------------------
def gather_pages(cache, block_table, length):
    """(B, length, H, D) logical cache of a paged one: sequence b's position p is page block_table[b, p // ps],
    slot p % ps."""
    ps = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    return torch.stack([cache[block_table[b, pos // ps].long(), pos % ps] for b in range(block_table.shape[0])])


def decode_oracle(q, k, v, seqlens, *, scale, window=(-1, -1), softcap=0.0, alibi=None, dtype=F64, causal=True,
                  leftpad=None):
    """flash_attn_with_kvcache per sequence: the T new tokens are the last T of the seqlens[b] valid keys, i.e. the
    attention of (T, L_b) aligned to the bottom-right. q (B, T, Hq, D), k/v logical (B, S, Hkv, D). causal=True
    (decode_attention's default): flash_attn_with_kvcache sets window_size[1] = 0 (decode_attention's
    window_size[1] never widens it). leftpad (list, FA2's cache_leftpad): the sequence is k[b, leftpad_b:L_b]."""
    outs = []
    for b in range(q.shape[0]):
        L = int(seqlens[b])
        lo = 0 if leftpad is None else int(leftpad[b])
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        oracle = sdpa_oracle if not softcap else (lambda *a, **kw: flex_oracle(*a, **kw)[0])
        if L == lo:
            outs.append(torch.zeros(q[b:b + 1].shape, dtype=dtype))
            continue
        outs.append(oracle(q[b:b + 1], k[b:b + 1, lo:L], v[b:b + 1, lo:L], scale=scale, causal=causal,
                           window=window, softcap=softcap, alibi=slopes, dtype=dtype))
    return torch.cat(outs)


# (B, T, Hq, Hkv, D, S, page_size, seqlens, dtype, kwargs); seqlens below T leave the first new tokens without
# keys; the three dtypes spread over the cases
DECODE_CASES = [
    (2, 1, 4, 4, 32, 97, None, [97, 17], torch.float16, {}),
    (3, 4, 4, 2, 64, 113, None, [113, 2, 50], torch.bfloat16, dict(window_size=(9, -1))),
    (2, 4, 4, 1, 16, 80, 16, [80, 33], torch.float32, dict(alibi="head")),
    (2, 1, 6, 2, 32, 97, 32, [1, 97], torch.float16, dict(alibi="batch", window_size=(20, 0), softmax_scale=0.3)),
    (2, 4, 2, 2, 32, 64, 16, [64, 3], torch.bfloat16, dict(softcap=3.0)),
    (2, 4, 4, 2, 16, 113, None, [113, 61], torch.float16, dict(alibi="batch", softcap=10.0, window_size=(40, 5))),
    (2, 4, 4, 2, 32, 96, 32, [96, 40], torch.float32, dict(softcap=5.0, window_size=(30, -1))),
    # FlashAttention's options: non-causal (window on both sides), cache_leftpad (the sequence starts there)
    (2, 5, 4, 1, 32, 80, None, [80, 33], torch.bfloat16, dict(causal=False)),
    (2, 4, 4, 2, 32, 97, None, [97, 40], torch.float16, dict(causal=False, window_size=(20, 2), leftpad=(30, 38))),
    (2, 3, 4, 2, 16, 96, 16, [96, 20], torch.float32, dict(leftpad=(50, 0), alibi="batch")),
]


def decode_id(c):
    B, T, hq, hkv, d, S, ps, lens, dtype, kw = c
    return (f"B{B}-T{T}-h{hq}:{hkv}-d{d}-S{S}-{'paged' + str(ps) if ps else 'contig'}-L{'_'.join(map(str, lens))}-"
            f"{str(dtype)[6:]}-" + "-".join(f"{k}={v}" for k, v in kw.items()).replace(" ", ""))


def decode_backends():
    """attention's, and decode's own CPU kernel (csrc/cpu/decode_attention.cpp) when the extension has it."""
    return attention_backends() + (["cpu"] if backends.check_extension_op("decode_attention", "cpu")(
        torch.empty(1)) is None else [])


@pytest.mark.parametrize("backend_name", decode_backends())
@pytest.mark.parametrize("case", DECODE_CASES, ids=decode_id)
def test_decode_attention_against_oracles(backend_name, case):
    B, T, hq, hkv, d, S, ps, lens, dtype, kw = case
    if kw.get("softcap") and flex_attention is None:
        pytest.skip("softcap needs FlexAttention as the oracle")
    pads = kw.get("leftpad")
    causal = kw.get("causal", True)
    if backend_name == "cpu" and (pads is not None or not causal):
        pytest.skip("the cpu (C++) kernel declines FlashAttention's options (the torch backend serves them)")
    kw = materialize({k: v for k, v in kw.items() if k != "leftpad"}, B, hq)
    if pads is not None:
        kw["cache_leftpad"] = torch.tensor(pads, dtype=torch.int32, device=device())
    q = torch.randn(B, T, hq, d, device=device()).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device())
    if ps is None:
        k_cache = torch.randn(B, S, hkv, d, device=device()).to(dtype)
        v_cache = torch.randn(B, S, hkv, d, device=device()).to(dtype)
        block_table, k, v = None, k_cache, v_cache
    else:
        pages = math.ceil(S / ps)
        num_pages = B * pages + 2
        block_table = torch.randperm(num_pages, device=device())[:B * pages].view(B, pages).to(torch.int32)
        k_cache = torch.randn(num_pages, ps, hkv, d, device=device()).to(dtype)
        v_cache = torch.randn(num_pages, ps, hkv, d, device=device()).to(dtype)
        k, v = gather_pages(k_cache, block_table, S), gather_pages(v_cache, block_table, S)
    with tk.backend(backend_name):
        out = tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=block_table, **kw)
    okw = dict(oracle_kw(kw, d), causal=causal)
    what = f"{backend_name} {decode_id(case)}"
    for b, L in enumerate(lens):  # causal: new token t sits at L - T + t: no key when that is before the leftpad
        lo = 0 if pads is None else pads[b]
        empty = [t for t in range(T) if (L - T + t < lo if causal else L == lo)]
        assert (out[b, empty] == 0).all(), f"{what}: a token without keys is not 0"
    golden = decode_oracle(q, k, v, lens, leftpad=pads, **okw)
    baseline = decode_oracle(q, k, v, lens, dtype=dtype, leftpad=pads, **okw).to(dtype)
    allowance = decode_allowance(q, k_cache, v_cache, seqlens, block_table, kw.get("alibi_slopes"), okw["scale"],
                                 okw["window"][0], okw["window"][1], okw["softcap"],
                                 operand_dtype=operand_dtype(backend_name, dtype), causal=causal,
                                 cache_leftpad=kw.get("cache_leftpad"))
    assert_close(out, golden, baseline, allowance=allowance, what=what)


# ---- int4_linear against gguf's dequantizer --------------------------------------------------------------------
def int4_backends():
    names = ["reference"]
    if interpreting() or torch.cuda.is_available():
        names.append("triton")
    if backends.check_extension_op("int4_mm", "cpu")(torch.empty(1)) is None:
        names.append("cpu")
    return names


def pack_gguf_blocks(q, d, m=None):
    """GGUF (ggml-common.h block_q4_0 / block_q4_1), written from the format's description: a row of K elements is
    K/32 blocks; a block is fp16 d (little-endian) [, fp16 m], then 16 bytes qs where byte j holds element j in its
    low nibble and element j + 16 in its high nibble. Q4_0: x = (q - 8) * d; Q4_1: x = q * d + m.
    q int (N, K) in 0..15, d and m float16 numpy (N, K/32) -> uint8 (N, K/32 * block_bytes)."""
    N, K = q.shape
    qb = q.reshape(N, K // 32, 32).astype(np.uint8)
    qs = (qb[..., :16] | (qb[..., 16:] << 4)).astype(np.uint8)                 # (N, B, 16)
    parts = [d.astype("<f2").reshape(N, K // 32, 1).view(np.uint8)]
    if m is not None:
        parts.append(m.astype("<f2").reshape(N, K // 32, 1).view(np.uint8))
    return np.concatenate(parts + [qs], axis=-1).reshape(N, -1)


def gguf_weight(kind, N, K, rng, exact_in_bf16=False):
    """(raw blocks, gguf's own dequantization as float64 (N, K)). exact_in_bf16: d = a 2^-6 (a in 1..7), m = c 2^-6
    (c in -32..32), so d, m, every q * d + m and torch's zero m + 8d are exact in bf16 (<= 8 significant bits)."""
    q = rng.integers(0, 16, size=(N, K))
    if exact_in_bf16:
        d = (rng.integers(1, 8, size=(N, K // 32)) * 2.0 ** -6).astype(np.float16)
        m = (rng.integers(-32, 33, size=(N, K // 32)) * 2.0 ** -6).astype(np.float16)
    else:
        d = (rng.standard_normal((N, K // 32)) * 0.05).astype(np.float16)
        m = (rng.standard_normal((N, K // 32)) * 0.2).astype(np.float16)
    data = pack_gguf_blocks(q, d, None if kind == "Q4_0" else m)
    w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    return data, torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)).reshape(N, K)


@pytest.mark.skipif(gguf is None, reason="the gguf package is not installed")
@pytest.mark.parametrize("backend_name", int4_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,M,N,K", [("Q4_0", 1, 113, 96), ("Q4_1", 17, 17, 160), ("Q4_0", 97, 1, 32),
                                        ("Q4_1", 1, 97, 64), ("Q4_1", 97, 113, 32)])
def test_int4_linear_against_gguf_dequantize(backend_name, dtype, kind, M, N, K):
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
    data, w = gguf_weight(kind, N, K, rng)
    weight = tk.Int4Weight.from_gguf(data, kind, (N, K)).to(device())
    x = torch.randn(M, K, device=device()).to(dtype)
    with tk.backend(backend_name):
        out = tk.int4_linear(x, weight)
    golden = F.linear(x.double(), w.to(x.device))
    baseline = F.linear(x, w.to(x.device, dtype))
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close(out, golden, baseline,
                 allowance=matmul_allowance(x, w.t(), operand_dtype=operand_dtype(backend_name, dtype, "int4_mm"),
                                            dequant_magnitudes=int4_dequant_magnitudes(weight, backend_name)),
                 what=f"{backend_name} {dtype} {kind} M={M} N={N} K={K}")


def torch_int4_cpu_available():
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 32, dtype=torch.int32), 8)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 32, dtype=torch.bfloat16), packed, 32,
                                                   torch.zeros(1, 16, 2, dtype=torch.bfloat16))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(gguf is None or not torch_int4_cpu_available(),
                    reason="needs gguf and torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu)")
@pytest.mark.parametrize("M,N,K", [(1, 16, 32), (17, 48, 96), (97, 112, 160)])
def test_int4_linear_against_torch_int4_cpu_kernel(M, N, K):
    """torch's own int4 kernel on the same Q4_1 weight, as a second opinion on our backends and on the golden.
    Its scales_and_zeros are bf16 (W = (q - 8) * scale + zero): the weights here are exact in bf16 (gguf_weight's
    exact_in_bf16), so torch's kernel makes no weight rounding, and bf16 x times a bf16 weight is exact in fp32;
    what is left is its fp32 accumulation and the one bf16 rounding of the output: matmul_allowance without an
    operand term, the same rule as ours -- no looser bound is needed (it holds on this CPU; a kernel that summed in
    bf16 would fail it)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
    data, w = gguf_weight("Q4_1", N, K, rng, exact_in_bf16=True)
    weight = tk.Int4Weight.from_gguf(data, "Q4_1", (N, K))
    assert torch.equal(weight.dequantize().double(), w)
    blocks = torch.from_numpy(data.copy()).view(N, K // 32, 20)
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(N, K // 32).double()
    m = blocks[..., 2:4].contiguous().view(torch.float16).reshape(N, K // 32).double()
    q = torch.from_numpy(np.ascontiguousarray(
        np.stack([data.reshape(N, K // 32, 20)[..., 4:] & 0xF, data.reshape(N, K // 32, 20)[..., 4:] >> 4], -2)
    )).reshape(N, K).to(torch.int32)
    scales_and_zeros = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    assert torch.equal(scales_and_zeros.double(), torch.stack([d.t(), (m + 8 * d).t()], dim=-1))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
    x = torch.randn(M, K).to(torch.bfloat16)
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)
    golden = F.linear(x.double(), w)
    baseline = F.linear(x, w.to(torch.bfloat16))
    allowance = matmul_allowance(x, w.t())
    assert_close(theirs, golden, baseline, allowance=allowance, what="torch's _weight_int4pack_mm_for_cpu")
    for backend_name in int4_backends():
        with tk.backend(backend_name):
            ours = tk.int4_linear(x, weight)
        assert_close(ours, golden, theirs, allowance=matmul_allowance(
            x, w.t(), operand_dtype=operand_dtype(backend_name, torch.bfloat16)), what=f"{backend_name} vs torch int4")


# ---- sparse24_linear through torch's CUTLASS conversion -------------------------------------------------------
def sparse24_backends():
    names = ["reference"]
    if interpreting() or torch.cuda.is_available():
        names.append("triton")
    if not torch.cuda.is_available() and backends.check_extension_op("sparse24_mm", "cpu")(torch.empty(1)) is None:
        names.append("cpu")
    return names


def random_24(N, K, dtype):
    """A dense (N, K) weight with 2:4 sparsity made here: in each group of 4, 2, 1 or 0 random kept positions."""
    w = torch.randn(N, K // 4, 4)
    keep = torch.rand(N, K // 4, 4).argsort(-1)[..., :2]
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(N, K // 4, 1) > 0.1                                             # some empty groups
    mask[:, ::3, 0] = False                                                             # some single nonzeros
    return (w * mask).reshape(N, K).to(dtype)


@pytest.mark.parametrize("backend_name", sparse24_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 32, 32), (17, 96, 64), (97, 32, 96), (113, 64, 32)])
def test_sparse24_linear_through_torch_cutlass_layout(backend_name, dtype, M, N, K):
    """The weight enters through torch's CUTLASS compression (fp16/bf16; fp32 values are the fp16 ones cast: exact),
    and the golden is torch's decompression of that same pair, F.linear in float64."""
    from torch.sparse._semi_structured_conversions import (sparse_semi_structured_from_dense_cutlass,
                                                           sparse_semi_structured_to_dense_cutlass)
    cutlass_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
    dense = random_24(N, K, cutlass_dtype)
    values, meta = sparse_semi_structured_from_dense_cutlass(dense)
    w = sparse_semi_structured_to_dense_cutlass(values, meta).double()
    assert torch.equal(w, dense.double())  # torch's round trip is the identity on a 2:4 weight
    weight = tk.Sparse24Weight.from_cutlass(values, meta).to(device=device(), dtype=dtype)
    back_values, back_meta = tk.Sparse24Weight.from_cutlass(values, meta).to_cutlass()
    assert torch.equal(back_values, values) and torch.equal(back_meta, meta)
    x = torch.randn(M, K, device=device()).to(dtype)
    with tk.backend(backend_name):
        out = tk.sparse24_linear(x, weight)
    golden = F.linear(x.double(), w.to(x.device))
    baseline = F.linear(x, w.to(x.device, dtype))
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close(out, golden, baseline, allowance=matmul_allowance(x, w.t()),
                 what=f"{backend_name} {dtype} M={M} N={N} K={K}")


@pytest.mark.parametrize("K", [16, 48, 80, 112])
def test_sparse24_to_cutlass_states_the_k_constraint(K):
    """torch's CUTLASS metadata layout swizzles 2x2 blocks of int16 meta columns (16 dense columns each), so it needs
    in_features % 32 == 0: for K = 48 torch's sparse_semi_structured_from_dense_cutlass fails with 'index 96 is out
    of bounds'. Both conversions say so with a ValueError naming the constraint (they accepted K % 16 == 0)."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass
    w = random_24(32, K, torch.float16)
    with pytest.raises(RuntimeError, match="out of bounds"):
        sparse_semi_structured_from_dense_cutlass(w)  # the constraint is torch's
    with pytest.raises(ValueError, match=r"in_features % 32 == 0"):
        tk.Sparse24Weight.from_dense(w).to_cutlass()
    with pytest.raises(ValueError, match=r"in_features % 32 == 0"):
        tk.Sparse24Weight.from_cutlass(w[:, : K // 2].contiguous(), torch.zeros(32, K // 16, dtype=torch.int16))
