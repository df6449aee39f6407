"""decode_attention and kv_cache_append: every backend runnable here against a float64 golden result, paged and
contiguous caches, GQA/MQA, window/softcap/ALiBi, split-KV on and off, NaN-poisoned buffers on every shipped
config, opcheck, torch.compile, bad input, and the static code generation of every shipped config.
FlashAttention's serving options (causal=False, cache_leftpad, cache_batch_idx, return_lse, a tensor window_size):
against the float64 spec (lse against torch.logsumexp of its float64 scores), cache_leftpad against the attention
reference over the slice k_cache[b, leftpad:L], cache_batch_idx against gathering the rows first."""
import math

import pytest
import torch

import turbokernels as tk
from turbokernels import _ext
from turbokernels.reference.decode_attention import decode_attention as reference
from turbokernels.testing import (CodegenJob, assert_close, compile_triton, decode_allowance, exp_error,
                                  operand_dtype, skip_reason_no_ptxas)
from conftest import RecordingMode, interpreting

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def runnable_backends():
    """torch's fused kernels (the `torch` backend) are its CPU ones, as is our C++ kernel (`cpu`, when the extension
    is built): held to the same tests on CPU tensors."""
    return (["reference"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])
            + (["torch"] if device() == "cpu" else [])
            + (["cpu"] if device() == "cpu" and _ext.available()
               and _ext.missing_op_reason("decode_attention", "cpu") is None else []))


def make_cache(B, S, Hkv, D, dtype, page_size=None, dev=None):
    """(k_cache, v_cache, block_table, logical k, logical v): paged caches get a shuffled block table, spare pages
    filled with garbage, and a table wider than needed whose extra entries are out of range (never read)."""
    dev = dev or device()
    k = torch.randn(B, S, Hkv, D, device=dev).to(dtype)
    v = torch.randn(B, S, Hkv, D, device=dev).to(dtype)
    if page_size is None:
        return k, v, None, k, v
    pages = math.ceil(S / page_size)
    num_pages = B * pages + 3
    perm = torch.randperm(num_pages, device=dev)[:B * pages].view(B, pages).to(torch.int32)
    k_cache = torch.randn(num_pages, page_size, Hkv, D, device=dev).to(dtype) * 100  # garbage where unused
    v_cache = torch.randn(num_pages, page_size, Hkv, D, device=dev).to(dtype) * 100
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pages * page_size - S)).view(B, pages, page_size, Hkv, D)
    vp = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pages * page_size - S)).view(B, pages, page_size, Hkv, D)
    k_cache[perm.long()] = kp
    v_cache[perm.long()] = vp
    block_table = torch.cat([perm, torch.full((B, 2), 10_000, dtype=torch.int32, device=dev)], dim=1)
    # the two extra columns point outside the cache: legal, since no length here reaches them (lengths <= S)
    return k_cache, v_cache, block_table, k, v


def golden_and_baseline(q, k_cache, v_cache, seqlens, block_table=None, alibi=None, scale=None, window=(-1, -1),
                        softcap=0.0, backend="triton"):
    """(float64 golden, torch in q's dtype, the allowance of `backend`: P rounded to q's dtype on tensor cores)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (seqlens, block_table, alibi, scale, window[0], window[1], softcap)
    golden = reference(q.double(), k_cache.double(), v_cache.double(), seqlens, block_table,
                       None if alibi is None else alibi.double(), *args[3:])
    baseline = reference(q, k_cache, v_cache, *args, compute_dtype=q.dtype)
    allowance = decode_allowance(q, k_cache, v_cache, *args, operand_dtype=operand_dtype(backend, q.dtype),
                                 exp_error=exp_error(backend, q.dtype))
    return golden, baseline, allowance


def run(backend_name, q, k_cache, v_cache, seqlens, **kw):
    with tk.backend(backend_name):
        return tk.decode_attention(q, k_cache, v_cache, seqlens, **kw)


def lens(B, S, T):
    """Lengths differing per batch: the full cache, exactly T (every new token's window starts at 0), odd."""
    choices = [S, max(T, 1), max(T, (S * 2) // 3 + 1)]
    return torch.tensor([choices[i % 3] for i in range(B)], dtype=torch.int32, device=device())


# (B, T, Hq, Hkv, D, S, page_size, dtype): GQA 1/2/4 and MQA, head dims 64/128 and odd 40/80, new tokens 1 and 4
CASES = [
    (2, 1, 4, 4, 64, 97, None, torch.float16),
    (3, 1, 4, 2, 128, 300, None, torch.bfloat16),
    (2, 4, 8, 2, 64, 130, None, torch.float16),
    (1, 1, 8, 1, 80, 203, None, torch.float32),
    (3, 4, 2, 2, 40, 64, 16, torch.float16),
    (2, 1, 8, 2, 128, 256, 32, torch.bfloat16),
    (2, 4, 4, 1, 64, 113, 32, torch.float32),
    (3, 1, 6, 3, 64, 160, 16, torch.float16),
]


def case_id(c):
    B, T, Hq, Hkv, D, S, ps, dt = c
    return f"B{B}-T{T}-h{Hq}/{Hkv}-d{D}-S{S}-{'paged' + str(ps) if ps else 'contig'}-{str(dt)[6:]}"


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_golden(backend_name, case):
    B, T, Hq, Hkv, D, S, ps, dtype = case
    k_cache, v_cache, bt, _, _ = make_cache(B, S, Hkv, D, dtype, ps)
    q = torch.randn(B, T, Hq, D, device=device()).to(dtype)
    seqlens = lens(B, S, T)
    out = run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt)
    golden, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, seqlens, bt, backend=backend_name)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, golden, baseline, allowance=allowance, what=f"{backend_name} {case_id(case)}")


FEATURES = [
    dict(window_size=(17, -1)),
    dict(window_size=(0, 0)),
    dict(softcap=3.0),
    dict(alibi="heads"),
    dict(alibi="batch", window_size=(40, 5), softcap=10.0, softmax_scale=0.3),
]


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("paged", [None, 16], ids=["contig", "paged16"])
@pytest.mark.parametrize("num_splits", [1, 4], ids=["nosplit", "split4"])
@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_window_softcap_alibi(backend_name, paged, num_splits, feature, monkeypatch):
    if backend_name != "triton" and num_splits == 4:
        pytest.skip("splits are a triton choice")
    import turbokernels.kernels.attention_decode as kernel_module
    launch = kernel_module.decode_attention
    monkeypatch.setattr(kernel_module, "decode_attention",
                        lambda *a, **kw: launch(*a, num_splits=num_splits, **kw))
    B, T, Hq, Hkv, D, S = 2, 4, 4, 2, 64, 150
    dtype = torch.float16
    k_cache, v_cache, bt, _, _ = make_cache(B, S, Hkv, D, dtype, paged)
    q = torch.randn(B, T, Hq, D, device=device()).to(dtype)
    seqlens = torch.tensor([150, 61], dtype=torch.int32, device=device())
    kw = dict(feature)
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        kw["alibi_slopes"] = torch.rand((Hq,) if alibi == "heads" else (B, Hq), device=device()) * 0.3
    if backend_name == "torch" and kw.get("softcap", 0.0) > 0:  # no additive mask expresses tanh: declined
        with pytest.raises(tk.BackendUnavailable, match="softcap"):
            run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt, **kw)
        return
    out = run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt, **kw)
    golden, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, seqlens, bt, kw.get("alibi_slopes"),
                                                      kw.get("softmax_scale"), kw.get("window_size", (-1, -1)),
                                                      kw.get("softcap", 0.0), backend=backend_name)
    assert_close(out, golden, baseline, allowance=allowance, what=f"{backend_name} {feature} splits={num_splits}")


def explicit_attention(q, k, v, causal_offset):
    """Plain masked softmax in float64 over full keys (B, S, Hkv, D): query t sees keys j <= causal_offset[b] + t."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            last = int(causal_offset[b]) + t
            for h in range(Hq):
                if last < 0:
                    continue
                keys = k[b, :last + 1, h // group].double()
                w = torch.softmax(keys @ q[b, t, h].double() / math.sqrt(D), dim=0)
                out[b, t, h] = w @ v[b, :last + 1, h // group].double()
    return out


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("paged", [None, 32], ids=["contig", "paged32"])
def test_equals_full_attention_over_concatenated_keys(backend_name, paged):
    """Decode over (old cache ++ new tokens) == ordinary causal attention of the new tokens over all keys."""
    B, T, Hq, Hkv, D, S = 2, 4, 4, 2, 64, 96
    old = torch.tensor([50, 3], dtype=torch.int32)
    k_all = torch.randn(B, S, Hkv, D, dtype=torch.float16)
    v_all = torch.randn(B, S, Hkv, D, dtype=torch.float16)
    q = torch.randn(B, T, Hq, D, dtype=torch.float16)
    expected = explicit_attention(q, k_all, v_all, old)
    k_cache, v_cache, bt, _, _ = make_cache(B, S, Hkv, D, torch.float16, paged, dev="cpu")
    # build the cache as a model does: each sequence's old keys (batch-1 views / block-table rows), then the new
    # tokens of every sequence in one append
    for b in range(B):
        n = int(old[b])
        rows = (k_cache[b:b + 1], v_cache[b:b + 1], None) if bt is None else (k_cache, v_cache, bt[b:b + 1])
        tk.kv_cache_append(rows[0], rows[1], k_all[b:b + 1, :n], v_all[b:b + 1, :n], torch.zeros(1, dtype=torch.int32),
                           block_table=rows[2])
    k_new = torch.stack([k_all[b, int(old[b]):int(old[b]) + T] for b in range(B)])
    v_new = torch.stack([v_all[b, int(old[b]):int(old[b]) + T] for b in range(B)])
    seqlens = tk.kv_cache_append(k_cache, v_cache, k_new, v_new, old, block_table=bt)
    assert seqlens.tolist() == [54, 7] and old.tolist() == [50, 3]
    q, k_cache, v_cache, seqlens = (x.to(device()) for x in (q, k_cache, v_cache, seqlens))
    bt = None if bt is None else bt.to(device())
    out = run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt)
    _, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, seqlens, bt, backend=backend_name)
    assert_close(out.cpu(), expected, baseline.cpu(), allowance=allowance.map(lambda t: t.cpu()),
                 what=f"{backend_name} vs explicit attention")


def test_kv_cache_append_contiguous_and_paged():
    B, T, Hkv, D, S = 3, 4, 2, 16, 64
    for page_size in (None, 16):
        k_cache, v_cache, bt, k, v = make_cache(B, S, Hkv, D, torch.float32, page_size, dev="cpu")
        seqlens = torch.tensor([0, 17, 60], dtype=torch.int32)
        kn, vn = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
        k_before = k_cache.clone()
        new = tk.kv_cache_append(k_cache, v_cache, kn, vn, seqlens, block_table=bt)
        assert new.tolist() == [4, 21, 64] and seqlens.tolist() == [0, 17, 60] and new.dtype == torch.int32
        for b in range(B):
            for t in range(T):
                pos = int(seqlens[b]) + t
                if bt is None:
                    row, slot = b, pos
                else:
                    row, slot = int(bt[b, pos // page_size]), pos % page_size
                assert torch.equal(k_cache[row, slot], kn[b, t]) and torch.equal(v_cache[row, slot], vn[b, t])
        changed = (k_cache != k_before).any(dim=(-1, -2)).sum().item()
        assert changed == B * T  # nothing else written


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("paged", [None, 16], ids=["contig", "paged16"])
def test_append_then_decode_is_attention_over_all_keys(backend_name, paged):
    B, T, Hq, Hkv, D, S = 2, 1, 8, 2, 64, 80
    dtype = torch.bfloat16
    k_cache, v_cache, bt, k, v = make_cache(B, S, Hkv, D, dtype, paged)
    seqlens = torch.tensor([79, 30], dtype=torch.int32, device=device())
    q = torch.randn(B, T, Hq, D, device=device()).to(dtype)
    kn, vn = torch.randn(B, T, Hkv, D, device=device()).to(dtype), torch.randn(B, T, Hkv, D, device=device()).to(dtype)
    new = tk.kv_cache_append(k_cache, v_cache, kn, vn, seqlens, block_table=bt)
    out = run(backend_name, q, k_cache, v_cache, new, block_table=bt)
    keys = [torch.cat([k[b, :int(seqlens[b])], kn[b]]) for b in range(B)]
    vals = [torch.cat([v[b, :int(seqlens[b])], vn[b]]) for b in range(B)]
    _, _, allowance = golden_and_baseline(q, k_cache, v_cache, new, bt, backend=backend_name)
    for b in range(B):
        kk = keys[b].double().repeat_interleave(Hq // Hkv, dim=1)   # (L, Hq, D)
        vv = vals[b].double().repeat_interleave(Hq // Hkv, dim=1)
        w = torch.softmax(torch.einsum("thd,lhd->thl", q[b].double(), kk) / math.sqrt(D), dim=-1)
        golden = torch.einsum("thl,lhd->thd", w, vv)
        baseline = torch.nn.functional.scaled_dot_product_attention(
            q[b].transpose(0, 1), keys[b].transpose(0, 1).repeat_interleave(Hq // Hkv, 0),
            vals[b].transpose(0, 1).repeat_interleave(Hq // Hkv, 0)).transpose(0, 1)
        assert_close(out[b], golden, baseline, allowance=allowance.map(lambda t: t[b]),
                     what=f"{backend_name} sequence {b}")


def test_every_triton_config_with_nan_poisoned_buffers(monkeypatch):
    """Each shipped config (all architectures), split and not, paged and not, T=1 and T=4 with a large GQA group
    (several row blocks): every output/partial buffer starts as NaN, so an element never written fails."""
    if "triton" not in runnable_backends():
        pytest.skip("triton cannot run here")
    import turbokernels.kernels.attention_decode as kernel_module
    from turbokernels.kernels.attention_decode import CONFIGS, decode_attention as launch
    monkeypatch.setattr(kernel_module, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    seen = []
    for cfgs in CONFIGS.values():
        seen += [c for c in cfgs if c not in seen]
    B, Hkv, D, S = 2, 1, 64, 140
    for cfg in seen:
        for paged, T, Hq, splits in ((None, 1, 2, 3), (32, 4, 32, 1), (16, 1, 4, None)):
            k_cache, v_cache, bt, _, _ = make_cache(B, S, Hkv, D, torch.float16, paged)
            q = torch.randn(B, T, Hq, D, device=device(), dtype=torch.float16)
            # 2 < T: rows with no key; 0: an empty sequence (zeros)
            seqlens = torch.tensor([S, 2 if T > 1 else 0], dtype=torch.int32, device=device())
            out = launch(q, k_cache, v_cache, seqlens, bt, None, D ** -0.5, -1, 0.0, config=cfg, num_splits=splits)
            golden, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, seqlens, bt)
            assert_close(out, golden, baseline, allowance=allowance,
                         what=f"{cfg} paged={paged} T={T} Hq={Hq} splits={splits}")


def test_mask_edges():
    """The left window edge swept across the key-block boundaries of every BLOCK_N shipped: cache lengths that put
    the first new token's window start at -2..2 keys from a block boundary, 1 and 3 new tokens, one split and three
    (split boundaries fall on blocks too), against the float64 golden."""
    if "triton" not in runnable_backends():
        pytest.skip("triton cannot run here")
    from turbokernels.kernels.attention_decode import CONFIGS, decode_attention as launch
    block_ns = sorted({cfg.BLOCK_N for cfgs in CONFIGS.values() for cfg in cfgs})
    for cfg in [next(c for cfgs in CONFIGS.values() for c in cfgs if c.BLOCK_N == n) for n in block_ns]:
        n = cfg.BLOCK_N
        for T in (1, 3):
            seqlens = [t * n + r + T for t in (1, 2) for r in range(-2, 3)]  # seqlen - T - window_left = (t-1)n + r
            S = max(seqlens)
            k_cache, v_cache, _, _, _ = make_cache(len(seqlens), S, 1, 16, torch.float16)
            q = torch.randn(len(seqlens), T, 2, 16, device=device(), dtype=torch.float16)
            lens_t = torch.tensor(seqlens, dtype=torch.int32, device=device())
            golden, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, lens_t, scale=0.25, window=(n, -1))
            for splits in (1, 3):
                out = launch(q, k_cache, v_cache, lens_t, None, None, 0.25, n, 0.0, config=cfg, num_splits=splits)
                assert_close(out, golden, baseline, allowance=allowance, what=f"{cfg} T={T} splits={splits}")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_empty_and_zero_length(backend_name):
    k_cache, v_cache, _, _, _ = make_cache(2, 32, 1, 64, torch.float16)
    q = torch.randn(2, 1, 2, 64, device=device(), dtype=torch.float16)
    out = run(backend_name, q, k_cache, v_cache, torch.tensor([0, 5], dtype=torch.int32, device=device()))
    assert torch.equal(out[0], torch.zeros_like(out[0])) and not torch.isnan(out).any()
    empty = run(backend_name, q[:, :0], k_cache, v_cache, torch.tensor([3, 5], dtype=torch.int32, device=device()))
    assert empty.shape == (2, 0, 2, 64)


# every backend, triton included (its kernel masks the loads of slots before token 0's window since 2026-12-02;
# NaN past cache_seqlens is also covered by test_every_triton_config_with_nan_poisoned_buffers)
@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("paged", [None, 16], ids=["contig", "paged16"])
def test_slots_no_query_attends_may_hold_nan(backend_name, paged):
    """The spec never reads a slot no new token may attend (unwritten, past cache_seqlens, or before every token's
    window): NaN there must not reach the output, with lengths equal across the batch (the torch backend: one
    kernel call over a slice) and different (one call per sequence)."""
    B, T, Hq, Hkv, D, S = 2, 3, 4, 2, 32, 96
    k_cache, v_cache, bt, _, _ = make_cache(B, S, Hkv, D, torch.float32, paged)
    q = torch.randn(B, T, Hq, D, device=device())
    for lengths, window in (([50, 50], (-1, -1)), ([50, 50], (7, -1)), ([50, 90], (7, -1)), ([96, 20], (-1, -1))):
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=device())
        kc, vc = k_cache.clone(), v_cache.clone()
        for b, n in enumerate(lengths):
            unread = torch.ones(S, dtype=torch.bool, device=device())
            unread[max(0, n - T - window[0]) if window[0] >= 0 else 0:n] = False
            pos = torch.arange(S, device=device())[unread]
            if paged is None:
                kc[b, pos], vc[b, pos] = float("nan"), float("nan")
            else:
                page, slot = bt[b, (pos // paged)].long(), pos % paged
                kc[page, slot], vc[page, slot] = float("nan"), float("nan")
        out = run(backend_name, q, kc, vc, seqlens, block_table=bt, window_size=window)
        golden, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, seqlens, bt, window=window,
                                                          backend=backend_name)
        assert_close(out, golden, baseline, allowance=allowance, what=f"{backend_name} {lengths} {window}")


CPU_SPLIT_CASES = [  # (B, T, Hq, Hkv, D, S, page_size, dtype, lens, window_left, softcap, alibi): spans the cpu kernel
    # cuts into chunks at any thread count (split-KV: one sequence, or past 65536 / rows keys), sequences of one chunk
    # and of several in one call, windows that start inside a chunk
    (1, 1, 4, 1, 64, 1500, None, torch.float32, (1500,), -1, 0.0, False),
    (2, 4, 8, 2, 40, 2300, 32, torch.bfloat16, (2300, 700), -1, 0.0, True),
    (1, 3, 2, 1, 128, 2600, None, torch.float16, (2600,), -1, 5.0, False),
    (2, 2, 3, 3, 17, 2100, 16, torch.float64, (1, 2100), -1, 0.0, True),
    (1, 2, 4, 2, 64, 2600, None, torch.float32, (2500,), 2100, 0.0, False),
]


@pytest.mark.skipif(device() != "cpu" or "cpu" not in runnable_backends(), reason="the CPU C++ kernel")
@pytest.mark.parametrize("isa", [None, "avx2", "scalar"], ids=["best", "avx2", "scalar"])
@pytest.mark.parametrize("case", CPU_SPLIT_CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-S{c[5]}-{str(c[7])[6:]}")
def test_cpu_kernel_split_kv_and_isas(monkeypatch, case, isa):
    """The cpu kernel's split-KV path (a long span cut into chunks, merged by their max and sum), on each ISA copy
    (TURBOKERNELS_CPU_ISA caps it per call), against the float64 golden; a NaN query row gives a NaN output row and
    nothing else, as the spec."""
    if isa:
        monkeypatch.setenv("TURBOKERNELS_CPU_ISA", isa)
    B, T, Hq, Hkv, D, S, ps, dtype, lengths, wl, softcap, alibi = case
    k_cache, v_cache, bt, _, _ = make_cache(B, S, Hkv, D, dtype, ps)
    q = torch.randn(B, T, Hq, D, device=device()).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    slopes = torch.rand(B, Hq) * 0.05 if alibi else None
    kw = dict(block_table=bt, window_size=(wl, -1), softcap=softcap, alibi_slopes=slopes)
    out = run("cpu", q, k_cache, v_cache, seqlens, **kw)
    golden, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, seqlens, bt, slopes, None, (wl, -1),
                                                      softcap, backend="cpu")
    assert_close(out, golden, baseline, allowance=allowance, what=f"cpu {case} isa={isa}")
    q[-1, -1, 0, 1] = float("nan")
    out_nan = run("cpu", q, k_cache, v_cache, seqlens, **kw)
    assert out_nan[-1, -1, 0].isnan().all()
    assert torch.equal(out_nan[:-1], out[:-1]) and torch.equal(out_nan[-1, :-1], out[-1, :-1])
    assert torch.equal(out_nan[-1, -1, 1:], out[-1, -1, 1:])


@pytest.mark.skipif(device() != "cpu" or "cpu" not in runnable_backends(), reason="the CPU C++ kernel")
def test_cpu_usual_call_goes_straight_to_the_kernel(monkeypatch):
    """The usual CPU call (contiguous cache, no ALiBi, automatic or `cpu` backend, nothing watching) reaches the C++
    kernel directly, which checks the tensors itself: the same bits as the op; a call it rejects gets the checked
    path's error naming the argument; a forced backend, a dispatch mode or a tracer still see what they should."""
    import importlib
    mod = importlib.import_module("turbokernels.ops.decode_attention")
    real = mod._resolve_cpu_kernel()
    calls = []
    monkeypatch.setattr(mod, "_cpu_kernel", lambda *a: calls.append(1) or real(*a))
    B, T, Hq, Hkv, D, S = 2, 1, 6, 2, 40, 50
    k_cache, v_cache, _, _, _ = make_cache(B, S, Hkv, D, torch.float32)
    q = torch.randn(B, T, Hq, D)
    seqlens = torch.tensor([50, 17], dtype=torch.int32)
    out = tk.decode_attention(q, k_cache, v_cache, seqlens, window_size=(9, -1))
    assert calls == [1]
    op, lse = torch.ops.turbokernels.decode_attention(q, k_cache, v_cache, seqlens, None, None, D ** -0.5, 9, -1,
                                                      0.0, None, None, True, False)
    assert lse.shape == (0,) and lse.dtype == torch.float32
    assert torch.equal(out, op)
    calls.clear()
    with pytest.raises(ValueError, match=r"decode_attention\(cache_seqlens\): cache too small"):
        tk.decode_attention(q, k_cache, v_cache, torch.tensor([51, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"decode_attention\(q\): head_dim 39 does not match"):
        tk.decode_attention(q[..., :39], k_cache, v_cache, seqlens)
    with pytest.raises(TypeError, match=r"decode_attention\(k_cache\): dtype torch.float64"):
        tk.decode_attention(q, k_cache.double(), v_cache, seqlens)
    assert calls == [1, 1, 1]  # each tried the kernel first
    calls.clear()
    with tk.backend("torch"):
        torch_out = tk.decode_attention(q, k_cache, v_cache, seqlens, window_size=(9, -1))
    assert calls == []
    golden, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, seqlens, window=(9, -1), backend="torch")
    assert_close(torch_out, golden, baseline, allowance=allowance, what="torch backend")
    with RecordingMode() as seen:
        moded = tk.decode_attention(q, k_cache, v_cache, seqlens, window_size=(9, -1))
    assert calls == [] and any("turbokernels.decode_attention" in o for o in seen.ops)
    assert torch.equal(moded, out)


DECODE_STEP_CASES = [  # (T, heads_q, heads_kv, lens, window_left, alibi): grouped (T = 1, or keys != T), MHA, only the
    # new tokens' own slots, windows, a token without keys (lens < T), ALiBi
    (1, 4, 2, (37, 37), -1, False),
    (3, 4, 1, (20, 20), 5, False),
    (2, 2, 2, (33, 33), -1, True),
    (3, 4, 2, (3, 3), -1, False),
    (4, 2, 2, (2, 2), -1, False),
    (1, 3, 3, (0, 0), -1, False),
]


@pytest.mark.parametrize("nan_row", [False, True])
@pytest.mark.parametrize("case", DECODE_STEP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_backend_cxx_decode_equals_python_steps(monkeypatch, case, nan_row):
    """decode on a contiguous cache through turbokernels._C.torch_attention_decode (cache views, grouping, kernel,
    NaN-row repair in one call) gives the bits of the Python steps (_decode_block), the path without the
    extension; both through the public function, on the torch backend."""
    import importlib
    ta = importlib.import_module("turbokernels.ops._torch_attention")
    if device() != "cpu" or not _ext.available() or getattr(_ext.C, "torch_attention_decode", None) is None:
        pytest.skip("needs the CPU extension with torch_attention_decode")
    T, hq, hkv, lens, wl, alibi = case
    torch.manual_seed(0)
    q = torch.randn(2, T, hq, 16)
    if nan_row:
        q[0, T - 1, hq - 1, 3] = float("nan")
    k_cache, v_cache = torch.randn(2, 40, hkv, 16), torch.randn(2, 40, hkv, 16)
    k_cache[:, max(lens):] = float("nan")  # slots past every length: never read
    seqlens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(window_size=(wl, -1), alibi_slopes=torch.rand(hq) * 0.5 if alibi else None)
    calls = []
    real = ta._decode_block
    monkeypatch.setattr(ta, "_decode_block", lambda *a: calls.append(1) or real(*a))
    with tk.backend("torch"):
        out_cxx = tk.decode_attention(q, k_cache, v_cache, seqlens, **kw)
        assert not calls, "the C++ call did not serve this case"
        monkeypatch.setattr(ta, "_cxx_decode", None)
        out_py = tk.decode_attention(q, k_cache, v_cache, seqlens, **kw)
        assert calls, "the Python steps did not run"
    assert out_cxx.shape == out_py.shape and out_cxx.is_contiguous() and out_py.is_contiguous()
    torch.testing.assert_close(out_cxx, out_py, rtol=0, atol=0, equal_nan=True)
    if nan_row and lens[0] >= T:
        assert out_cxx[0, T - 1, hq - 1].isnan().all()
    golden = reference(q.double(), k_cache.double(), v_cache.double(), seqlens, None, kw["alibi_slopes"], 16 ** -0.5,
                       wl, -1, 0.0)
    finite = ~golden.isnan()
    assert (out_cxx.isnan() == golden.isnan()).all()
    torch.testing.assert_close(out_cxx[finite].double(), golden[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_deterministic(backend_name):
    k_cache, v_cache, bt, _, _ = make_cache(2, 200, 2, 64, torch.float16, 16)
    q = torch.randn(2, 1, 4, 64, device=device(), dtype=torch.float16)
    seqlens = torch.tensor([200, 77], dtype=torch.int32, device=device())
    a = run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt)
    assert torch.equal(a, run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt))


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_strided_query(backend_name):
    """q as a view of a (B, Hq, T, D) tensor, and of a wider head dim: read through its strides; V with strides
    other than K's."""
    k_cache, v_cache, _, _, _ = make_cache(2, 70, 2, 64, torch.float16)
    q = torch.randn(2, 4, 3, 80, device=device(), dtype=torch.float16)[..., 8:72].transpose(1, 2)  # (2, 3, 4, 64)
    seqlens = torch.tensor([70, 33], dtype=torch.int32, device=device())
    out = run(backend_name, q, k_cache, v_cache, seqlens)
    golden, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, seqlens, backend=backend_name)
    assert_close(out, golden, baseline, allowance=allowance, what=f"{backend_name} strided q {q.stride()}")
    # a V cache with other strides than K's (a slice of a wider buffer): the launcher's copy path
    v_wide = torch.randn(2, 70, 2, 96, device=device(), dtype=torch.float16)[..., 16:80]
    out = run(backend_name, q, k_cache, v_wide, seqlens)
    golden, baseline, allowance = golden_and_baseline(q, k_cache, v_wide, seqlens, backend=backend_name)
    assert_close(out, golden, baseline, allowance=allowance, what=f"{backend_name} v strides {v_wide.stride()}")


def test_opcheck():
    k_cache, v_cache, bt, _, _ = make_cache(2, 48, 2, 32, torch.float32, 16, dev="cpu")
    q = torch.randn(2, 2, 4, 32)
    seqlens = torch.tensor([48, 9], dtype=torch.int32)
    kc, vc = torch.randn(3, 48, 2, 32), torch.randn(3, 48, 2, 32)
    idx, pad = torch.tensor([2, 0], dtype=torch.int32), torch.tensor([5, 9], dtype=torch.int32)
    none = (None, None, True, False)
    for args in ((q, k_cache, v_cache, seqlens, bt, None, 0.2, -1, -1, 0.0) + none,
                 (q.half(), k_cache.half(), v_cache.half(), seqlens, bt, torch.rand(4), 0.2, 7, 0, 2.0) + none,
                 # FlashAttention's options: lse (B, Hq, T), non-causal with a window, leftpad (paged), batch_idx
                 (q, k_cache, v_cache, seqlens, bt, None, 0.2, 7, 3, 0.0, None, pad, False, True),
                 (q, kc, vc, seqlens, None, torch.rand(4), 0.2, -1, -1, 0.0, idx, pad, True, True),
                 (q[:, :0], kc, vc, seqlens, None, None, 0.2, -1, -1, 0.0, idx, None, False, True)):
        torch.library.opcheck(torch.ops.turbokernels.decode_attention.default, args)
    kn, vn = torch.randn(2, 3, 2, 32), torch.randn(2, 3, 2, 32)
    small = torch.tensor([4, 30], dtype=torch.int32)
    torch.library.opcheck(torch.ops.turbokernels.kv_cache_append.default,
                          (k_cache, v_cache, kn, vn, small, bt))
    kc, vc = torch.zeros(2, 40, 2, 32), torch.zeros(2, 40, 2, 32)
    torch.library.opcheck(torch.ops.turbokernels.kv_cache_append.default, (kc, vc, kn, vn, small, None))


def test_torch_compile_decode_step():
    def step(q, k_new, v_new, k_cache, v_cache, seqlens, bt):
        seqlens = tk.kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, block_table=bt)
        return tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=bt), seqlens

    k_cache, v_cache, bt, _, _ = make_cache(2, 64, 2, 32, torch.float32, 16, dev="cpu")
    q, kn, vn = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    seqlens = torch.tensor([10, 40], dtype=torch.int32)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    expected, expected_lens = step(q, kn, vn, k_cache, v_cache, seqlens, bt)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, new_lens = compiled(q, kn, vn, kc2, vc2, seqlens, bt)
    torch.testing.assert_close(out, expected)
    assert torch.equal(new_lens, expected_lens) and torch.equal(kc2, k_cache) and torch.equal(vc2, v_cache)


# ---- FlashAttention's serving options: causal=False, cache_leftpad, cache_batch_idx, return_lse, a tensor window ----
def option_golden(q, k_cache, v_cache, seqlens, bt, kw, backend):
    """(golden out, baseline, allowance, golden lse, lse allowance) of a call with the options in kw: the float64
    spec, and for lse torch.logsumexp of the spec's float64 scores."""
    from turbokernels.reference.decode_attention import decode_scores
    scale = q.shape[-1] ** -0.5 if kw.get("softmax_scale") is None else kw["softmax_scale"]
    window = tuple(kw.get("window_size", (-1, -1)))
    alibi = kw.get("alibi_slopes")
    opts = dict(cache_batch_idx=kw.get("cache_batch_idx"), cache_leftpad=kw.get("cache_leftpad"),
                causal=kw.get("causal", True))
    args = (seqlens, bt, alibi, scale, window[0], window[1], kw.get("softcap", 0.0))
    golden = reference(q.double(), k_cache.double(), v_cache.double(), seqlens, bt,
                       None if alibi is None else alibi.double(), *args[3:], **opts)
    baseline = reference(q, k_cache, v_cache, *args, compute_dtype=q.dtype, **opts)
    allowance, lse_allowance = decode_allowance(q, k_cache, v_cache, *args,
                                                operand_dtype=operand_dtype(backend, q.dtype),
                                                exp_error=exp_error(backend, q.dtype), return_lse=True, **opts)
    s = decode_scores(q.double(), k_cache.double(), v_cache.double(), seqlens, bt,
                      None if alibi is None else alibi.double(), scale, window[0], window[1],
                      kw.get("softcap", 0.0), torch.float64, **opts)[3]
    return golden, baseline, allowance, torch.logsumexp(s, dim=-1), lse_allowance


def forced_splits(monkeypatch, num_splits):
    import turbokernels.kernels.attention_decode as kernel_module
    launch = kernel_module.decode_attention
    monkeypatch.setattr(kernel_module, "decode_attention", lambda *a, **kw: launch(*a, num_splits=num_splits, **kw))


# (id, new tokens, options): non-causal (T = 1, 5, 17; windows on either side, bottom-right aligned), cache_leftpad
# (causal and not; ALiBi, softcap; a leftpad equal to the length: no key, lse -inf; leftpads past whole splits),
# cache_batch_idx (contiguous caches only). Lengths (150, 70, 40) in a cache of 160 slots.
OPTION_CASES = [
    ("noncausal-T1-alibi", 1, dict(causal=False, alibi="batch")),
    ("noncausal-T5-window7,2", 5, dict(causal=False, window_size=(7, 2))),
    ("noncausal-T17-window30,3-alibi", 17, dict(causal=False, window_size=(30, 3), alibi="heads")),
    ("leftpad-T4-alibi-window", 4, dict(cache_leftpad=(130, 64, 40), alibi="batch", window_size=(90, -1))),
    ("leftpad-noncausal-T5-softcap", 5, dict(cache_leftpad=(3, 66, 39), causal=False, softcap=4.0)),
    ("batch_idx-T2", 2, dict(cache_batch_idx=(3, 0, 2))),
    ("batch_idx-leftpad-noncausal-T3", 3, dict(cache_batch_idx=(1, 1, 4), cache_leftpad=(20, 0, 7), causal=False,
                                              window_size=(12, 0))),
]


def materialize_options(kw, B, Hq):
    kw = dict(kw, return_lse=True)
    for name in ("cache_leftpad", "cache_batch_idx"):
        if name in kw:
            kw[name] = torch.tensor(kw[name], dtype=torch.int32, device=device())
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        kw["alibi_slopes"] = torch.rand((Hq,) if alibi == "heads" else (B, Hq), device=device()) * 0.2
    return kw


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("paged", [None, 16], ids=["contig", "paged16"])
@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_options_match_golden(backend_name, paged, case, monkeypatch):
    """Every option against the float64 spec (out with the file's tolerance rule; lse against torch.logsumexp of
    the float64 scores), contiguous and paged; triton split 3 ways on paged caches (the combine writes lse; leftpads
    past whole splits: those splits exit and are not read) and unsplit on contiguous ones (the split kernel writes
    lse). The cpu backend (C++ kernel) declines every option: the torch or reference backend serves them."""
    name, T, kw = case
    if paged and "cache_batch_idx" in kw:
        pytest.skip("cache_batch_idx: contiguous caches only (refused with block_table, as FlashAttention)")
    forced_splits(monkeypatch, 3 if paged else 1)
    B, Hq, Hkv, D, S = 3, 2, 1, 32, 160
    dtype = torch.float16 if paged else torch.bfloat16
    rows = 5 if "cache_batch_idx" in kw else B
    k_cache, v_cache, bt, _, _ = make_cache(rows, S, Hkv, D, dtype, paged)
    q = torch.randn(B, T, Hq, D, device=device()).to(dtype)
    seqlens = torch.tensor([150, 70, 40], dtype=torch.int32, device=device())
    kw = materialize_options(kw, B, Hq)
    if backend_name == "cpu":
        with pytest.raises(tk.BackendUnavailable, match="not in the C\\+\\+ kernel"):
            run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt, **kw)
        return
    if backend_name == "torch" and kw.get("softcap", 0.0) > 0:
        with pytest.raises(tk.BackendUnavailable, match="softcap"):
            run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt, **kw)
        return
    out, lse = run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt, **kw)
    golden, baseline, allowance, golden_lse, lse_allowance = option_golden(q, k_cache, v_cache, seqlens, bt, kw,
                                                                           backend_name)
    what = f"{backend_name} {name} paged={paged}"
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, Hq, T) and lse.dtype == torch.float32
    assert_close(out, golden, baseline, allowance=allowance, what=what)
    assert_close(lse, golden_lse, allowance=lse_allowance, what=f"{what} lse")
    if "cache_leftpad" in kw:  # a sequence whose leftpad is its length has no key: zeros and lse -inf
        empty = kw["cache_leftpad"] == seqlens
        assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()


@pytest.mark.parametrize("backend_name", [b for b in runnable_backends() if b != "cpu"])
@pytest.mark.parametrize("paged", [None, 16], ids=["contig", "paged16"])
def test_leftpad_is_attention_over_the_slice(backend_name, paged, monkeypatch):
    """FlashAttention's definition of cache_leftpad: the sequence IS k_cache[b, leftpad:L] (its positions start
    at 0 there). An independent oracle: the attention reference (dense, bottom-right aligned, float64) over that
    slice alone, per sequence -- not our decode spec -- for causal and non-causal calls with a window and ALiBi;
    the slots before the leftpad hold NaN (never read)."""
    from turbokernels.reference import attention as ref_attention
    forced_splits(monkeypatch, 2)
    B, T, Hq, Hkv, D, S = 2, 3, 4, 2, 32, 96
    k_cache, v_cache, bt, k, v = make_cache(B, S, Hkv, D, torch.float32, paged)
    seqlens = torch.tensor([90, 41], dtype=torch.int32, device=device())
    pads = [37, 40]
    for b, n in enumerate(pads):  # the padding slots: NaN
        pos = torch.arange(n, device=device())
        if bt is None:
            k_cache[b, pos], v_cache[b, pos] = float("nan"), float("nan")
        else:
            page, slot = bt[b, pos // paged].long(), pos % paged
            k_cache[page, slot], v_cache[page, slot] = float("nan"), float("nan")
    q = torch.randn(B, T, Hq, D, device=device())
    slopes = torch.rand(Hq, device=device()) * 0.2
    for causal, window in ((True, (-1, -1)), (False, (20, 1)), (True, (8, -1))):
        out, lse = run(backend_name, q, k_cache, v_cache, seqlens, block_table=bt, causal=causal,
                       window_size=window, alibi_slopes=slopes, return_lse=True,
                       cache_leftpad=torch.tensor(pads, dtype=torch.int32, device=device()))
        for b in range(B):
            lo, hi = pads[b], int(seqlens[b])
            o_ref, lse_ref = ref_attention.attention(q[b:b + 1].double(), k[b:b + 1, lo:hi].double(),
                                                     v[b:b + 1, lo:hi].double(), causal=causal, window_size=window,
                                                     alibi_slopes=slopes.double())
            what = f"{backend_name} paged={paged} causal={causal} window={window} sequence {b}"
            torch.testing.assert_close(out[b:b + 1].double(), o_ref, rtol=2e-5, atol=2e-5, msg=what)
            torch.testing.assert_close(lse[b:b + 1].double(), lse_ref.double(), rtol=2e-5, atol=2e-5, msg=what)


@pytest.mark.parametrize("backend_name", [b for b in runnable_backends() if b != "cpu"])
def test_batch_idx_is_gathering_the_rows_first(backend_name):
    """cache_batch_idx[b] picks sequence b's cache row: the same bits as the call on k_cache[cache_batch_idx]
    (rows repeated, a cache of more rows than sequences)."""
    B, T, Hq, Hkv, D, S = 3, 2, 4, 2, 32, 64
    k_cache, v_cache, _, _, _ = make_cache(5, S, Hkv, D, torch.float16)
    q = torch.randn(B, T, Hq, D, device=device(), dtype=torch.float16)
    seqlens = torch.tensor([64, 9, 33], dtype=torch.int32, device=device())
    idx = torch.tensor([4, 0, 4], dtype=torch.int32, device=device())
    for kw in (dict(), dict(causal=False, window_size=(5, 5)), dict(cache_leftpad=idx * 2)):
        out, lse = run(backend_name, q, k_cache, v_cache, seqlens, cache_batch_idx=idx, return_lse=True, **kw)
        rows = idx.long()
        expected, expected_lse = run(backend_name, q, k_cache[rows], v_cache[rows], seqlens, return_lse=True, **kw)
        assert torch.equal(out, expected) and torch.equal(lse, expected_lse), f"{backend_name} {kw}"


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_window_tensor_equals_tuple(backend_name):
    """window_size as a (2,) integer tensor (int32, int64) is read into the same ints: the same bits as the tuple;
    return_lse=False returns out alone, True (out, lse)."""
    k_cache, v_cache, _, _, _ = make_cache(2, 48, 1, 16, torch.float32)
    q = torch.randn(2, 2, 2, 16, device=device())
    seqlens = torch.tensor([48, 20], dtype=torch.int32, device=device())
    expected = run(backend_name, q, k_cache, v_cache, seqlens, window_size=(6, -1))
    assert isinstance(expected, torch.Tensor)
    for dtype in (torch.int32, torch.int64):
        window = torch.tensor([6, -1], dtype=dtype, device=device())
        assert torch.equal(run(backend_name, q, k_cache, v_cache, seqlens, window_size=window), expected)


def test_window_tensor_refused_while_capturing_a_cuda_graph(monkeypatch):
    """Reading a CUDA tensor's values is a host sync, which a CUDA graph capture cannot contain: refused with the
    argument named (checked here with a fake CUDA tensor and the capture flag raised)."""
    import importlib
    from torch._subclasses.fake_tensor import FakeTensorMode
    mod = importlib.import_module("turbokernels.ops.decode_attention")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        window = torch.empty(2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=r"decode_attention\(window_size\): a CUDA tensor window cannot be read "
                                           r"while a CUDA graph is being captured"):
        mod._window_ints("decode_attention", window)


def test_torch_compile_with_options():
    """fullgraph torch.compile of a call with every option: the fake impl's (out, lse) shapes, the option checks
    traced (torch._assert_async), the same values as eager."""
    def step(q, k_cache, v_cache, seqlens, idx, pad):
        return tk.decode_attention(q, k_cache, v_cache, seqlens, causal=False, window_size=(6, 1), cache_batch_idx=idx,
                                   cache_leftpad=pad, return_lse=True)

    k_cache, v_cache, _, _, _ = make_cache(3, 40, 2, 16, torch.float32, dev="cpu")
    args = (torch.randn(2, 3, 4, 16), k_cache, v_cache, torch.tensor([40, 12], dtype=torch.int32),
            torch.tensor([2, 0], dtype=torch.int32), torch.tensor([30, 3], dtype=torch.int32))
    expected = step(*args)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(got, expected)
    assert got[1].shape == (2, 4, 3)


def test_options_take_the_checked_path_on_cpu(monkeypatch):
    """A call with any new option never reaches the C++ kernel's fast path (which is causal-only, without lse):
    on CPU tensors the automatic choice is the torch backend (the reference with softcap); a plain call still is
    the kernel's."""
    import importlib
    mod = importlib.import_module("turbokernels.ops.decode_attention")
    if "cpu" not in runnable_backends():
        pytest.skip("the CPU C++ kernel is not built")
    real = mod._resolve_cpu_kernel()
    calls = []
    monkeypatch.setattr(mod, "_cpu_kernel", lambda *a: calls.append(1) or real(*a))
    k_cache, v_cache, _, _, _ = make_cache(2, 40, 2, 32, torch.float32, dev="cpu")
    q = torch.randn(2, 1, 4, 32)
    seqlens = torch.tensor([40, 11], dtype=torch.int32)
    tk.decode_attention(q, k_cache, v_cache, seqlens)
    assert calls == [1]
    for kw in (dict(causal=False), dict(return_lse=True), dict(cache_leftpad=torch.tensor([1, 2], dtype=torch.int32)),
               dict(cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32))):
        args = (q, k_cache, v_cache, seqlens, None, None, 0.2, -1, -1, 0.0, kw.get("cache_batch_idx"),
                kw.get("cache_leftpad"), kw.get("causal", True), kw.get("return_lse", False))
        assert tk.backends.select("decode_attention", *args)[0] == "torch"
        assert tk.backends.select("decode_attention", *args[:9], 1.0, *args[10:])[0] == "reference"
        tk.decode_attention(q, k_cache, v_cache, seqlens, **kw)
    assert calls == [1]


# ---- bad input ------------------------------------------------------------------------------------------------
def _good():
    k_cache = torch.randn(2, 32, 2, 64, dtype=torch.float16)
    return dict(q=torch.randn(2, 1, 4, 64, dtype=torch.float16), k_cache=k_cache, v_cache=k_cache.clone(),
                cache_seqlens=torch.tensor([3, 32], dtype=torch.int32))


def _paged():
    g = _good()
    g["k_cache"] = torch.randn(4, 16, 2, 64, dtype=torch.float16)
    g["v_cache"] = g["k_cache"].clone()
    g["block_table"] = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    return g


BAD = [
    ("heads", lambda g: g.update(q=torch.randn(2, 1, 3, 64, dtype=torch.float16)), ValueError, r"\(q\): heads_q=3"),
    ("head_dim", lambda g: g.update(q=torch.randn(2, 1, 4, 32, dtype=torch.float16)), ValueError,
     r"\(q\): head_dim 32"),
    ("seqlens_dtype", lambda g: g.update(cache_seqlens=torch.tensor([3, 4])), TypeError, r"\(cache_seqlens\): dtype"),
    ("seqlens_shape", lambda g: g.update(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError,
     r"\(cache_seqlens\): expected shape \(2,\)"),
    ("dtype", lambda g: g.update(k_cache=g["k_cache"].float()), TypeError, r"\(k_cache\): dtype"),
    ("v_shape", lambda g: g.update(v_cache=g["v_cache"][:, :16]), ValueError, r"\(v_cache\): shape"),
    ("device", lambda g: g.update(k_cache=torch.empty(2, 32, 2, 64, dtype=torch.float16, device="meta"),
                                  v_cache=torch.empty(2, 32, 2, 64, dtype=torch.float16, device="meta")),
     ValueError, r"\(k_cache\): k_cache is on meta"),
    ("seqlens_device", lambda g: g.update(cache_seqlens=torch.empty(2, dtype=torch.int32, device="meta")),
     ValueError, r"\(cache_seqlens\): cache_seqlens is on meta"),
    ("cache_batch", lambda g: g.update(k_cache=g["k_cache"][:1], v_cache=g["v_cache"][:1]), ValueError,
     r"\(k_cache\): batch 1"),
    ("cache_strided", lambda g: g.update(k_cache=g["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
     ValueError, r"\(k_cache\): must be contiguous"),
    ("too_long", lambda g: g.update(cache_seqlens=torch.tensor([3, 33], dtype=torch.int32)), ValueError,
     r"cache too small"),
    ("alibi_shape", lambda g: g.update(alibi_slopes=torch.rand(3)), ValueError, r"\(alibi_slopes\)"),
    ("alibi_dtype", lambda g: g.update(alibi_slopes=torch.rand(4).half()), TypeError, r"\(alibi_slopes\): dtype"),
    ("window", lambda g: g.update(window_size=(-2, 0)), ValueError, r"\(window_size\)"),
    ("softcap", lambda g: g.update(softcap=-1.0), ValueError, r"\(softcap\)"),
    ("q_dims", lambda g: g.update(q=torch.randn(2, 4, 64, dtype=torch.float16)), ValueError, r"\(q\): expected 4"),
    ("q_int", lambda g: g.update(q=torch.ones(2, 1, 4, 64, dtype=torch.int32)), TypeError, r"\(q\): dtype"),
]
BAD_PAGED = [
    ("bt_dtype", lambda g: g.update(block_table=g["block_table"].long()), TypeError, r"\(block_table\): dtype"),
    ("bt_batch", lambda g: g.update(block_table=g["block_table"][:1]), ValueError,
     r"\(block_table\): expected shape \(2, max_pages_per_seq\)"),
    ("page_size", lambda g: g.update(k_cache=torch.randn(4, 24, 2, 64, dtype=torch.float16),
                                     v_cache=torch.randn(4, 24, 2, 64, dtype=torch.float16)),
     ValueError, r"page_size .* multiple of 16"),
    ("bt_range", lambda g: g.update(block_table=torch.tensor([[0, 9], [2, 3]], dtype=torch.int32),
                                    cache_seqlens=torch.tensor([20, 3], dtype=torch.int32)),
     ValueError, r"\(block_table\): page index out of range"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD + BAD_PAGED, ids=[b[0] for b in BAD + BAD_PAGED])
def test_decode_attention_rejects_bad_input(name, mutate, exc, match):
    g = _paged() if any(name == b[0] for b in BAD_PAGED) else _good()
    mutate(g)
    q, k, v, s = g.pop("q"), g.pop("k_cache"), g.pop("v_cache"), g.pop("cache_seqlens")
    with pytest.raises(exc, match=match):
        tk.decode_attention(q, k, v, s, **g)


def test_kv_cache_append_rejects_bad_input_without_change():
    g = _good()
    k, v, s = g["k_cache"], g["v_cache"], g["cache_seqlens"]
    before = k.clone()
    kn = torch.randn(2, 1, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="cache too small"):
        tk.kv_cache_append(k, v, kn, kn, s)  # sequence 1 is full (32 of 32)
    with pytest.raises(ValueError, match="cache too small: 40 new tokens"):
        tk.kv_cache_append(k, v, torch.randn(2, 40, 2, 64, dtype=torch.float16),
                           torch.randn(2, 40, 2, 64, dtype=torch.float16), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"kv_cache_append\(k_cache\): dtype"):
        tk.kv_cache_append(k, v, kn.float(), kn.float(), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"kv_cache_append\(k_new\): \(heads_kv, head_dim\)"):
        tk.kv_cache_append(k, v, kn[:, :, :1], kn[:, :, :1], torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"kv_cache_append\(cache_seqlens\): dtype"):
        tk.kv_cache_append(k, v, kn, kn, torch.zeros(2, dtype=torch.int64))
    p = _paged()
    with pytest.raises(ValueError, match=r"kv_cache_append\(block_table\): page index out of range"):
        tk.kv_cache_append(p["k_cache"], p["v_cache"], kn, kn, torch.tensor([16, 0], dtype=torch.int32),
                           block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32))
    assert torch.equal(k, before)


# ---- GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 64], ids=["contig", "paged64"])
def test_gpu_long_cache(page_size):
    B, T, Hq, Hkv, D, S = 4, 1, 32, 8, 128, 8192
    dtype = torch.bfloat16
    k_cache, v_cache, bt, _, _ = make_cache(B, S, Hkv, D, dtype, page_size, dev="cuda")
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=dtype)
    seqlens = torch.tensor([8192, 1, 5000, 8191], dtype=torch.int32, device="cuda")
    with tk.backend("triton"):
        out = tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=bt)
    golden, baseline, allowance = golden_and_baseline(q, k_cache, v_cache, seqlens, bt)
    assert_close(out, golden, baseline, allowance=allowance, what=f"gpu B4 S8192 d128 bf16 paged={page_size}")


@pytest.mark.gpu
def test_gpu_options_long_cache_and_cuda_graph():
    """FlashAttention's options on a long cache (the GPU's own split choice): leftpads past whole splits and one
    equal to its length, non-causal with a window, cache_batch_idx, lse, against the float64 spec; then the same
    call captured in a CUDA graph (grid from capacities: the values of cache_seqlens and cache_leftpad may change
    between replays) equals the eager call on the new values."""
    dev = "cuda"
    B, T, Hq, Hkv, D, S = 4, 4, 32, 8, 128, 8192
    dtype = torch.bfloat16
    k_cache, v_cache, _, _, _ = make_cache(B + 1, S, Hkv, D, dtype, None, dev=dev)
    q = torch.randn(B, T, Hq, D, device=dev, dtype=dtype)
    seqlens = torch.tensor([8192, 5, 5000, 8191], dtype=torch.int32, device=dev)
    kw = dict(causal=False, window_size=(3000, 2), return_lse=True,
              cache_leftpad=torch.tensor([4000, 5, 17, 0], dtype=torch.int32, device=dev),
              cache_batch_idx=torch.tensor([4, 0, 2, 1], dtype=torch.int32, device=dev))
    with tk.backend("triton"):
        out, lse = tk.decode_attention(q, k_cache, v_cache, seqlens, **kw)
    golden, baseline, allowance, golden_lse, lse_allowance = option_golden(q, k_cache, v_cache, seqlens, None, kw,
                                                                           "triton")
    assert_close(out, golden, baseline, allowance=allowance, what="gpu options")
    assert_close(lse, golden_lse, allowance=lse_allowance, what="gpu options lse")
    graph = torch.cuda.CUDAGraph()
    with tk.backend("triton"), torch.cuda.graph(graph):  # tuned by the eager call above
        out_g, lse_g = tk.decode_attention(q, k_cache, v_cache, seqlens, **kw)
    seqlens.copy_(torch.tensor([7000, 3000, 64, 1], dtype=torch.int32))
    kw["cache_leftpad"].copy_(torch.tensor([6000, 2999, 0, 1], dtype=torch.int32))
    graph.replay()
    with tk.backend("triton"):
        expected, expected_lse = tk.decode_attention(q, k_cache, v_cache, seqlens, **kw)
    torch.cuda.synchronize()
    assert torch.equal(out_g, expected) and torch.equal(lse_g, expected_lse)


# ---- static code generation ----------------------------------------------------------------------------------
KERNEL = "turbokernels.kernels.attention_decode:decode_attention_split_kernel"
COMBINE = "turbokernels.kernels.attention_decode:decode_attention_combine_kernel"
SIGNATURE = {
    "q_ptr": "*{dt}", "k_ptr": "*{dt}", "v_ptr": "*{dt}", "seqlens_ptr": "*i32", "block_table_ptr": "*i32",
    "batch_idx_ptr": "*i32", "leftpad_ptr": "*i32",
    "alibi_ptr": "*fp32", "out_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "lse_ptr": "*fp32",
    "T": "i32", "Hq": "i32", "Hkv": "i32", "D": "i32", "capacity": "i32", "page_size": "i32",
    "kv_per_split": "i32", "qk_scale": "fp32", "softcap": "fp32", "window_left": "i32", "window_right": "i32",
    "stride_qb": "i32", "stride_qt": "i32", "stride_qh": "i32",
    "stride_kb": "i32", "stride_kn": "i32", "stride_kh": "i32", "stride_btb": "i32", "stride_ab": "i32", "stride_ah": "i32",
    "stride_os": "i32", "stride_ob": "i32", "stride_ot": "i32", "stride_oh": "i32",
    "stride_ms": "i32", "stride_mb": "i32", "stride_mt": "i32", "stride_lb": "i32", "stride_lh": "i32",
}
# what the JIT sees for contiguous tensors with head_dim 64/128 (multiples of 16)
ALIGNED = ("q_ptr", "k_ptr", "v_ptr", "seqlens_ptr", "block_table_ptr", "batch_idx_ptr", "leftpad_ptr", "alibi_ptr",
           "out_ptr", "m_ptr", "l_ptr", "lse_ptr",
           "D", "page_size", "kv_per_split", "stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kn",
           "stride_kh", "stride_os", "stride_ob", "stride_ot", "stride_oh",
           "stride_btb")


PLAIN = dict(CAUSAL=True, WINDOW_RIGHT=False, LEFTPAD=False, BATCH_IDX=False, RETURN_LSE=False)


def codegen_cases():
    """Every shipped config x d 64/128 x BLOCK_M 16 (MHA/small groups) and the largest (GQA groups x new tokens):
    fp16 on a contiguous cache with ALiBi + window writing split partials; bf16 paged with softcap writing the final
    output (no split), one block-table read per tile at BLOCK_M 16 and per-row reads at the largest BLOCK_M;
    d=256 fp16 contiguous. FlashAttention's options (every config, d=128, the largest BLOCK_M): non-causal with a
    window on both sides, cache_leftpad, cache_batch_idx and lse, writing the final output and lse (no split);
    the combine kernel with leftpad and lse."""
    from turbokernels.kernels.attention_decode import CONFIGS, MAX_BLOCK_M, block_n_for
    for cap, cfgs in sorted(CONFIGS.items()):
        for cfg in cfgs:
            for d in (64, 128, 256):
                for block_m in sorted({16, MAX_BLOCK_M[d]}):
                    for dt, paged in (("fp16", False), ("bf16", True)):
                        if d == 256 and dt == "bf16":
                            continue  # d=256: one case per config (fp16, contiguous), the shared-memory bound
                        block_n = block_n_for(cfg, d)
                        constexprs = dict(stride_qd=1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d, EVEN_D=True,
                                          PAGED=paged, PAGE_PER_TILE=paged and block_m == 16, SPLIT=not paged,
                                          SOFTCAP=paged, WINDOW=not paged, HAS_ALIBI=not paged, UPCAST=False,
                                          **PLAIN)
                        sig = dict(SIGNATURE, out_ptr="*fp32" if not paged else "*{dt}")
                        job = CodegenJob(KERNEL, tuple((k, v.format(dt=dt)) for k, v in sig.items()),
                                         tuple(constexprs.items()), cap, cfg.num_warps, cfg.num_stages, ALIGNED)
                        name = f"sm{cap}-n{block_n}-w{cfg.num_warps}-p{cfg.num_stages}-m{block_m}-d{d}-{dt}" \
                               + ("-paged-nosplit" + ("-pagetile" if block_m == 16 else "-pagerow") if paged else "")
                        yield name, cap, block_m, job
        for cfg in cfgs:  # FlashAttention's options
            d, block_m = 128, MAX_BLOCK_M[128]
            block_n = block_n_for(cfg, d)
            constexprs = dict(stride_qd=1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d, EVEN_D=True, PAGED=False,
                              PAGE_PER_TILE=False, SPLIT=False, SOFTCAP=False, WINDOW=True, HAS_ALIBI=False,
                              UPCAST=False, CAUSAL=False, WINDOW_RIGHT=True, LEFTPAD=True, BATCH_IDX=True,
                              RETURN_LSE=True)
            sig = dict(SIGNATURE, out_ptr="*fp16")
            job = CodegenJob(KERNEL, tuple((k, v.format(dt="fp16")) for k, v in sig.items()),
                             tuple(constexprs.items()), cap, cfg.num_warps, cfg.num_stages, ALIGNED)
            yield (f"sm{cap}-n{block_n}-w{cfg.num_warps}-p{cfg.num_stages}-m{block_m}-d{d}-fp16-noncausal-leftpad-"
                   f"batchidx-lse"), cap, block_m, job
        for d, options in ((64, False), (128, False), (128, True)):
            sig = {"part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "seqlens_ptr": "*i32",
                   "leftpad_ptr": "*i32", "out_ptr": "*fp16", "lse_ptr": "*fp32",
                   **{n: "i32" for n in ("T", "Hq", "D", "capacity", "kv_per_split", "num_splits", "stride_ps",
                                         "stride_pb", "stride_pt", "stride_ph", "stride_ms", "stride_mb",
                                         "stride_mt", "stride_ob", "stride_ot", "stride_oh", "stride_lb",
                                         "stride_lh")}}
            job = CodegenJob(COMBINE, tuple(sig.items()), (("BLOCK_S", 32), ("BLOCK_D", d), ("LEFTPAD", options),
                                                           ("RETURN_LSE", options)), cap, 1 if d <= 64 else 2, 1)
            yield f"sm{cap}-combine-d{d}" + ("-leftpad-lse" if options else ""), cap, 0, job


CODEGEN_CASES = list(codegen_cases())
needs_ptxas = pytest.mark.skipif(skip_reason_no_ptxas() is not None, reason=str(skip_reason_no_ptxas()))


@pytest.fixture(scope="module")
def codegen_reports():
    return dict(zip([c[0] for c in CODEGEN_CASES], compile_triton([c[3] for c in CODEGEN_CASES])))


@needs_ptxas
@pytest.mark.parametrize("name,cap,block_m", [c[:3] for c in CODEGEN_CASES], ids=[c[0] for c in CODEGEN_CASES])
def test_codegen(codegen_reports, name, cap, block_m):
    """Zero spills and shared memory within the part's limit for every kernel. The split kernel's two dots
    (q k^T and p v, BLOCK_M >= 16 rows) run on tensor cores: on sm_90 Triton emits wgmma (HGMMA) for 64-row tiles
    (a warpgroup's minimum M) and mma.sync (HMMA) for 16/32-row tiles, on sm_80 always mma.sync -- asserted as
    verified with triton 3.8 and 3.6. (The K/V tiles stream through cp.async 16-byte copies, LDGSTS.128.)"""
    from turbokernels.kernels.int4_mm import SHARED_MEMORY_LIMIT
    report = codegen_reports[name]
    assert report.spill_bytes == 0, f"register spills: {report.ptxas_log}"
    assert report.shared_bytes <= SHARED_MEMORY_LIMIT[cap], f"{report.shared_bytes} B shared memory"
    if not block_m:
        return  # the combine kernel: no dots
    if cap >= 90 and block_m >= 64:
        assert report.uses_wgmma and report.count(r"HGMMA", in_sass=True) > 0, "expected wgmma on sm_90"
    else:
        assert report.uses_mma and report.count(r"HMMA", in_sass=True) > 0, "expected mma.sync tensor-core ops"
        assert not report.uses_wgmma
    assert report.count(r"LDGSTS\S*\.128", in_sass=True) > 0, "expected 16-byte cp.async loads of the K/V tiles"
