"""FlashAttention's own test of flash_attn_with_kvcache (tests/test_flash_attn.py::test_flash_attn_kvcache, flash-attn
2.8, BSD-3-Clause, Tri Dao), ported to run on the CPU against turbokernels.integrations.flash_attn.

The oracle is FlashAttention's reference code, transcribed below without einops (attention_ref,
construct_local_mask, attn_bias_from_alibi_slopes, apply_rotary_emb_torch): not ours. The checks are FlashAttention's:
the caches after the append equal the reference's (keys within 1e-3, rotation rounding; values exactly), and the
output error is at most 3x (5x with ALiBi) the error of a PyTorch implementation in the inputs' dtype, + 1e-5. Every
feature of the original parametrization runs (new kv or not, rotary fraction 0 / 0.5 / 1 interleaved or not,
seqlen_new < seqlen_q, causal, local with a tensor window_size, ALiBi, MHA/MQA/GQA, paged, cache_batch_idx,
cache_leftpad); the shapes are smaller and the cross product is sampled (CPU time), as the `case` list says. Dropout
is refused by name. lse (return_softmax_lse) is checked against the reference's log-sum-exp.
"""
import itertools
import math
import random

import pytest
import torch

import turbokernels as tk
from turbokernels.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache


# ---- FlashAttention's reference code (tests/test_flash_attn.py, flash_attn/layers/rotary.py), without einops ----
def attn_bias_from_alibi_slopes(slopes, seqlen_q, seqlen_k, query_padding_mask=None, key_padding_mask=None,
                                causal=False, key_leftpad=None):
    batch, nheads = slopes.shape
    device = slopes.device
    slopes = slopes.view(batch, nheads, 1, 1)
    if causal:
        return torch.arange(-seqlen_k + 1, 1, device=device, dtype=torch.float32) * slopes
    row_idx = torch.arange(seqlen_q, device=device, dtype=torch.long).view(-1, 1)
    col_idx = torch.arange(seqlen_k, device=device, dtype=torch.long)
    if key_leftpad is not None:
        key_leftpad = key_leftpad.view(-1, 1, 1, 1)
        col_idx = col_idx.view(1, 1, 1, -1).expand(key_leftpad.shape[0], 1, 1, seqlen_k)
        col_idx = torch.where(col_idx >= key_leftpad, col_idx - key_leftpad, 2 ** 32)
    sk = seqlen_k if key_padding_mask is None else key_padding_mask.sum(-1).view(-1, 1, 1, 1)
    sq = seqlen_q if query_padding_mask is None else query_padding_mask.sum(-1).view(-1, 1, 1, 1)
    relative_pos = torch.abs(row_idx + sk - sq - col_idx)
    return -slopes * relative_pos.to(dtype=slopes.dtype)


def construct_local_mask(seqlen_q, seqlen_k, window_size=(-1, -1), query_padding_mask=None, key_padding_mask=None,
                         device=None, key_leftpad=None):
    row_idx = torch.arange(seqlen_q, device=device, dtype=torch.long).view(-1, 1)
    col_idx = torch.arange(seqlen_k, device=device, dtype=torch.long)
    if key_leftpad is not None:
        key_leftpad = key_leftpad.view(-1, 1, 1, 1)
        col_idx = col_idx.view(1, 1, 1, -1).expand(key_leftpad.shape[0], 1, 1, seqlen_k)
        col_idx = torch.where(col_idx >= key_leftpad, col_idx - key_leftpad, 2 ** 32)
    sk = seqlen_k if key_padding_mask is None else key_padding_mask.sum(-1).view(-1, 1, 1, 1)
    sq = seqlen_q if query_padding_mask is None else query_padding_mask.sum(-1).view(-1, 1, 1, 1)
    if window_size[0] < 0:
        return col_idx > row_idx + sk - sq + window_size[1]
    sk = torch.full_like(col_idx, seqlen_k) if key_padding_mask is None else sk
    return torch.logical_or(col_idx > torch.minimum(row_idx + sk - sq + window_size[1], sk),
                            col_idx < row_idx + sk - sq - window_size[0])


def attention_ref(q, k, v, key_padding_mask=None, attn_bias=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  upcast=True, reorder_ops=False, key_leftpad=None):
    """FlashAttention's attention_ref without the query padding / dropout arguments this test does not use;
    returns (output, lse) (lse added here: the log-sum-exp of the masked scores, upcast)."""
    if causal:
        window_size = (window_size[0], 0)
    dtype_og = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    g = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    d = q.shape[-1]
    if not reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q / math.sqrt(d), k)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q, k / math.sqrt(d))
    if softcap > 0:
        scores = (scores / softcap).tanh() * softcap
    if key_padding_mask is not None:
        scores.masked_fill_((~key_padding_mask).view(key_padding_mask.shape[0], 1, 1, -1), float("-inf"))
    local_mask = None
    if window_size[0] >= 0 or window_size[1] >= 0:
        local_mask = construct_local_mask(seqlen_q, seqlen_k, window_size, None, key_padding_mask, q.device,
                                          key_leftpad=key_leftpad)
        scores.masked_fill_(local_mask, float("-inf"))
    if attn_bias is not None:
        scores = scores + attn_bias
    lse = torch.logsumexp(scores.float(), dim=-1)
    attention = torch.softmax(scores, dim=-1).to(v.dtype)
    if local_mask is not None:
        attention = attention.masked_fill(torch.all(local_mask, dim=-1, keepdim=True), 0.0)
    output = torch.einsum("bhts,bshd->bthd", attention, v)
    return output.to(dtype=dtype_og), lse


def rotate_half(x, interleaved=False):
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_emb_torch(x, cos, sin, interleaved=False):
    """x (batch, seqlen, heads, d); cos/sin (batch, seqlen, rotary_dim / 2)."""
    ro_dim = cos.shape[-1] * 2
    if not interleaved:
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    else:
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat([x[..., :ro_dim] * cos + rotate_half(x[..., :ro_dim], interleaved) * sin, x[..., ro_dim:]],
                     dim=-1)


def apply_rotary_emb(x, cos, sin, seqlen_offsets, interleaved):
    """flash_attn's apply_rotary_emb with per-sequence seqlen_offsets, as its torch reference: row b of x rotated at
    positions seqlen_offsets[b] + t (computed in fp32, rounded once, as the Triton kernel it tests)."""
    pos = seqlen_offsets.long().view(-1, 1) + torch.arange(x.shape[1]).view(1, -1)
    return apply_rotary_emb_torch(x.float(), cos.float()[pos], sin.float()[pos], interleaved).to(x.dtype)


def _generate_block_kvcache(seqlen_k, page, batch_size, nheads_k, d, dtype):
    num_blocks = math.ceil(seqlen_k / page) * batch_size * 3
    k_paged = torch.randn(num_blocks, page, nheads_k, d, dtype=dtype)
    v_paged = torch.randn(num_blocks, page, nheads_k, d, dtype=dtype)
    block_table = torch.randperm(num_blocks, dtype=torch.int32).view(batch_size, -1)
    k_cache = k_paged[block_table.long().flatten()].reshape(batch_size, -1, nheads_k, d)[:, :seqlen_k]
    v_cache = v_paged[block_table.long().flatten()].reshape(batch_size, -1, nheads_k, d)[:, :seqlen_k]
    return k_cache, v_cache, block_table, k_paged, v_paged, num_blocks


# ---- the cases: FlashAttention's axes, sampled ----------------------------------------------------------------
SHAPES = [(1, 128), (1, 339), (3, 97), (17, 113), (5, 64), (16, 200)]
AXES = dict(d=[32, 59, 64, 80, 128], has_batch_idx=[False, True], has_leftpad=[False, True],
            paged=[None, 32], rotary_fraction=[0.0, 0.5, 1.0], rotary_interleaved=[False, True],
            seqlen_new_eq_seqlen_q=[True, False], causal=[False, True], local=[False, True], alibi=[False, True],
            new_kv=[False, True], mha_type=["mha", "mqa", "gqa"], dtype=[torch.float16, torch.bfloat16])


def cases(n: int, seed: int):
    """n sampled combinations covering every value of every axis (each value at least once per shape cycle), with
    FlashAttention's skips applied (no rotary without new kv, no batch_idx / leftpad with a paged cache)."""
    rng = random.Random(seed)
    out = []
    names = list(AXES)
    while len(out) < n:
        c = {k: rng.choice(v) for k, v in AXES.items()}
        c["shape"] = SHAPES[len(out) % len(SHAPES)]
        sq, sk = c["shape"]
        if (sq > sk and c["new_kv"]) or (not c["new_kv"] and c["rotary_fraction"] > 0.0) \
                or (c["paged"] and (c["has_batch_idx"] or c["has_leftpad"])):
            continue
        out.append(c)
    for k in names:  # every value of every axis is in the sample
        assert {repr(v) for v in AXES[k]} <= {repr(c[k]) for c in out}, k
    return out


CASES = cases(48, seed=2)


def _ids(c):
    return "-".join(f"{k}={v}" if not isinstance(v, torch.dtype) else str(v)[6:] for k, v in c.items()
                    if v not in (False, None, 0.0))


def run_case(c, backend_name=None, return_lse=False):
    (seqlen_q, seqlen_k), d, dtype = c["shape"], c["d"], c["dtype"]
    batch_size = 2
    batch_size_cache = batch_size if not c["has_batch_idx"] else batch_size * 2
    nheads = 6
    rotary_dim = math.floor(int(c["rotary_fraction"] * d) / 16) * 16
    nheads_k = nheads if c["mha_type"] == "mha" else (1 if c["mha_type"] == "mqa" else 3)
    causal, local, new_kv = c["causal"], c["local"], c["new_kv"]
    window_size = (-1, -1) if not local else torch.randint(0, seqlen_k, (2,))
    q = torch.randn(batch_size, seqlen_q, nheads, d, dtype=dtype)
    seqlen_new = seqlen_q if c["seqlen_new_eq_seqlen_q"] else torch.randint(1, seqlen_q + 1, (1,)).item()
    k = torch.randn(batch_size, seqlen_new, nheads_k, d, dtype=dtype) if new_kv else None
    v = torch.randn(batch_size, seqlen_new, nheads_k, d, dtype=dtype) if new_kv else None
    if c["paged"] is None:
        k_cache = torch.randn(batch_size_cache, seqlen_k, nheads_k, d, dtype=dtype)
        v_cache = torch.randn(batch_size_cache, seqlen_k, nheads_k, d, dtype=dtype)
        block_table = None
    else:
        k_cache, v_cache, block_table, k_paged, v_paged, num_blocks = _generate_block_kvcache(
            seqlen_k, c["paged"], batch_size, nheads_k, d, dtype)
    cache_seqlens = torch.randint(
        0 if new_kv else 1,
        (seqlen_k - (seqlen_q if (causal or local) and rotary_dim > 1 else seqlen_new) + 1) if new_kv
        else (seqlen_k + 1), (batch_size,), dtype=torch.int32)
    if c["has_leftpad"]:
        cache_leftpad = torch.cat([torch.randint(0, int(s), (1,), dtype=torch.int32) if int(s) > 0
                                   else torch.zeros(1, dtype=torch.int32) for s in cache_seqlens])
    else:
        cache_leftpad = None
    arange = torch.arange(seqlen_k).view(1, -1)
    lens_col = cache_seqlens.view(-1, 1)
    key_padding_mask = arange < lens_col + (seqlen_new if new_kv else 0)
    if c["has_leftpad"]:
        key_padding_mask = key_padding_mask & (arange >= cache_leftpad.view(-1, 1))
    cache_batch_idx = torch.randperm(batch_size_cache, dtype=torch.int32)[:batch_size] if c["has_batch_idx"] else None
    if c["alibi"]:
        alibi_slopes = torch.rand(batch_size, nheads, dtype=torch.float32) * 0.3
        attn_bias = attn_bias_from_alibi_slopes(alibi_slopes, seqlen_q, seqlen_k, None, key_padding_mask,
                                                causal=causal, key_leftpad=cache_leftpad)
    else:
        alibi_slopes, attn_bias = None, None
    if rotary_dim > 0:
        rows = seqlen_k if c["paged"] is None else num_blocks * c["paged"]
        angle = torch.rand(rows, rotary_dim // 2) * 2 * math.pi
        cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
        if causal or local:
            q_ro = apply_rotary_emb(q, cos, sin, cache_seqlens, c["rotary_interleaved"])
        else:  # every query at position cache_seqlens
            q_ro = apply_rotary_emb(q.reshape(batch_size, 1, seqlen_q * nheads, d), cos, sin, cache_seqlens,
                                    c["rotary_interleaved"]).reshape(batch_size, seqlen_q, nheads, d)
        k_ro = apply_rotary_emb(k, cos, sin, cache_seqlens, c["rotary_interleaved"])
    else:
        cos, sin = None, None
        q_ro, k_ro = q, k
    k_cache_ref = (k_cache if not c["has_batch_idx"] else k_cache[cache_batch_idx.long()]).clone()
    v_cache_ref = (v_cache if not c["has_batch_idx"] else v_cache[cache_batch_idx.long()]).clone()
    if new_kv:
        update_mask = (lens_col <= arange) & (arange < lens_col + seqlen_new)
        k_cache_ref[update_mask] = k_ro.reshape(-1, nheads_k, d)
        v_cache_ref[update_mask] = v.reshape(-1, nheads_k, d)
    call = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                cache_leftpad=cache_leftpad, block_table=block_table, causal=causal, window_size=window_size,
                rotary_interleaved=c["rotary_interleaved"], alibi_slopes=alibi_slopes, return_softmax_lse=return_lse)
    with tk.backend(backend_name):
        res = flash_attn_with_kvcache(q, k_cache if c["paged"] is None else k_paged,
                                      v_cache if c["paged"] is None else v_paged, k, v, **call)
    out, lse = res if return_lse else (res, None)
    ref_args = (q_ro, k_cache_ref, v_cache_ref, key_padding_mask, attn_bias)
    out_ref, lse_ref = attention_ref(*ref_args, causal=causal, window_size=window_size, key_leftpad=cache_leftpad)
    out_pt, _ = attention_ref(*ref_args, causal=causal, window_size=window_size, upcast=False, reorder_ops=True,
                              key_leftpad=cache_leftpad)
    if new_kv:
        if c["paged"] is None:
            k_sel = k_cache if not c["has_batch_idx"] else k_cache[cache_batch_idx.long()]
            v_sel = v_cache if not c["has_batch_idx"] else v_cache[cache_batch_idx.long()]
        else:
            k_sel = k_paged[block_table.long().flatten()].reshape(batch_size, -1, nheads_k, d)[:, :seqlen_k]
            v_sel = v_paged[block_table.long().flatten()].reshape(batch_size, -1, nheads_k, d)[:, :seqlen_k]
        assert torch.allclose(k_sel, k_cache_ref, rtol=1e-3, atol=1e-3)
        assert torch.equal(v_sel, v_cache_ref)
    mult = 3 if not c["alibi"] else 5
    err, err_pt = (out - out_ref).abs().max().item(), (out_pt - out_ref).abs().max().item()
    assert err <= mult * err_pt + 1e-5, f"error {err} vs PyTorch's {err_pt} in {c['dtype']}"
    return lse, lse_ref


@pytest.mark.parametrize("c", CASES, ids=[_ids(c) for c in CASES])
def test_flash_attn_kvcache(c):
    """FlashAttention's test, on the CPU default backends (the C++ kernel, torch's, the reference)."""
    run_case(c)


TRITON_CASES = [c for c in CASES if c["shape"][1] <= 128][:10]


@pytest.mark.parametrize("c", TRITON_CASES, ids=[_ids(c) for c in TRITON_CASES])
def test_flash_attn_kvcache_triton(c):
    """The same, with both kernels forced to Triton (under the interpreter here)."""
    run_case(c, backend_name="triton")


@pytest.mark.parametrize("c", CASES[:6], ids=[_ids(c) for c in CASES[:6]])
def test_flash_attn_kvcache_lse(c):
    """return_softmax_lse: FlashAttention's softmax_lse, the natural log-sum-exp of each row's scaled scores; a row
    with no key to attend is not compared (FlashAttention leaves +inf there)."""
    lse, lse_ref = run_case(c, return_lse=True)
    assert lse.shape == lse_ref.shape and lse.dtype == torch.float32
    seen = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[seen], lse_ref[seen], rtol=0, atol=2e-2 if c["dtype"] != torch.float32 else 1e-4)


def test_flash_attn_func_and_varlen_match_flash_attention_reference():
    q = torch.randn(2, 17, 4, 64, dtype=torch.float16)
    kv = torch.randn(2, 2, 29, 2, 64, dtype=torch.float16)
    for causal, window in itertools.product([False, True], [(-1, -1), (5, 3)]):
        out = flash_attn_func(q, kv[0], kv[1], causal=causal, window_size=window)
        ref, _ = attention_ref(q, kv[0], kv[1], causal=causal, window_size=window)
        pt, _ = attention_ref(q, kv[0], kv[1], causal=causal, window_size=window, upcast=False, reorder_ops=True)
        assert (out - ref).abs().max() <= 3 * (pt - ref).abs().max() + 1e-5
        cu_q = torch.tensor([0, 17, 34], dtype=torch.int32)
        cu_k = torch.tensor([0, 29, 58], dtype=torch.int32)
        packed = flash_attn_varlen_func(q.flatten(0, 1), kv[0].flatten(0, 1), kv[1].flatten(0, 1), cu_q, cu_k, 17,
                                        29, causal=causal, window_size=window)
        torch.testing.assert_close(packed.view_as(out), out, rtol=0, atol=1e-3)
    with pytest.raises(NotImplementedError, match=r"flash_attn_func\(dropout_p\)"):
        flash_attn_func(q, kv[0], kv[1], dropout_p=0.1)
    with pytest.raises(NotImplementedError, match=r"flash_attn_func\(return_attn_probs\)"):
        flash_attn_func(q, kv[0], kv[1], return_attn_probs=True)


def test_flash_attn_with_kvcache_refuses_what_it_cannot_do():
    q = torch.randn(1, 1, 2, 16)
    kc = torch.randn(1, 32, 2, 16)
    with pytest.raises(ValueError, match=r"flash_attn_with_kvcache\(k, v\)"):
        flash_attn_with_kvcache(q, kc, kc.clone(), k=torch.randn(1, 1, 2, 16))
    with pytest.raises(ValueError, match=r"flash_attn_with_kvcache\(rotary_cos\)"):
        flash_attn_with_kvcache(q, kc, kc.clone(), rotary_cos=torch.ones(32, 8), rotary_sin=torch.ones(32, 8))
    with pytest.raises(ValueError, match=r"flash_attn_with_kvcache\(rotary_cos, rotary_sin\)"):
        flash_attn_with_kvcache(q, kc, kc.clone(), rotary_cos=torch.ones(32, 8))
    with pytest.raises(ValueError, match=r"flash_attn_with_kvcache\(num_splits\)"):
        flash_attn_with_kvcache(q, kc, kc.clone(), num_splits=-1)
    out = flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=5)  # an int: every row's length
    torch.testing.assert_close(out, tk.decode_attention(q, kc, kc.clone(), torch.tensor([5], dtype=torch.int32),
                                                        causal=False))
