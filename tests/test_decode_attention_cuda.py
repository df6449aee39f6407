"""decode_attention's CUDA C++ kernel (csrc/cuda/decode_attention.cuh), proven without a GPU: the same source run
lane by lane on the CPU emulator (csrc/emu/decode_attention.cpp: torch.ops.turbokernels_C.decode_attention_mma on
CPU tensors, with every global and shared access bounds-checked, shared memory and the outputs poisoned with NaN)
against the float64 spec, within the tolerance rule's allowance for a tensor-core kernel (P rounded to q's dtype:
operand_dtype "cuda"). Odd lengths (1, 17, 97, 113), a batch of different lengths, paged caches (pages of 16 and 64,
shuffled block tables with out-of-range spare entries), GQA groups 1/4/8 and 1-9 new tokens (1, 2 and 4 m16 tiles
per CTA, and several row blocks), both dtypes, head dims 64/128, window/softcap/ALiBi, split-KV forced to several
values, NaN in the slots no query attends. Then the cuda backend's declines, and on a GPU the real kernel."""
import math
import zlib

import pytest
import torch

import turbokernels as tk
from turbokernels import _ext, backends
from turbokernels.ops.decode_attention import mma_decline, run_mma
from turbokernels.reference.decode_attention import decode_attention as reference
from turbokernels.testing import assert_close, decode_allowance, operand_dtype


def _emulator_reason():
    if not _ext.available():
        return "turbokernels._C is not available"
    return _ext.missing_op_reason("decode_attention_mma", "cpu")


emulated = pytest.mark.skipif(_emulator_reason() is not None, reason=str(_emulator_reason()))


def make_cache(B, S, Hkv, D, dtype, page_size=None, dev="cpu", gen=None):
    """(k_cache, v_cache, block_table): paged caches get a shuffled block table, spare pages of large garbage, and
    two extra table columns pointing outside the cache (legal: no length reaches them)."""
    k = torch.randn(B, S, Hkv, D, generator=gen).to(dev, dtype)
    v = torch.randn(B, S, Hkv, D, generator=gen).to(dev, dtype)
    if page_size is None:
        return k, v, None
    pages = math.ceil(S / page_size)
    num_pages = B * pages + 3
    perm = torch.randperm(num_pages, generator=gen)[:B * pages].view(B, pages).to(dev, torch.int32)
    k_cache = (torch.randn(num_pages, page_size, Hkv, D, generator=gen) * 100).to(dev, dtype)
    v_cache = (torch.randn(num_pages, page_size, Hkv, D, generator=gen) * 100).to(dev, dtype)
    pad = (0, 0, 0, 0, 0, pages * page_size - S)
    k_cache[perm.long()] = torch.nn.functional.pad(k, pad).view(B, pages, page_size, Hkv, D)
    v_cache[perm.long()] = torch.nn.functional.pad(v, pad).view(B, pages, page_size, Hkv, D)
    block_table = torch.cat([perm, torch.full((B, 2), 10_000, dtype=torch.int32, device=dev)], dim=1)
    return k_cache, v_cache, block_table


def check(out, q, k_cache, v_cache, seqlens, bt=None, alibi=None, scale=None, window_left=-1, softcap=0.0,
          what=""):
    """out against the float64 spec, with the allowance of a kernel whose P V dot takes P rounded to q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (seqlens, bt, alibi, scale, window_left, -1, softcap)
    golden = reference(q.double(), k_cache.double(), v_cache.double(), seqlens, bt,
                       None if alibi is None else alibi.double(), *args[3:])
    baseline = reference(q, k_cache, v_cache, *args, compute_dtype=q.dtype)
    allowance = decode_allowance(q, k_cache, v_cache, *args, operand_dtype=operand_dtype("cuda", q.dtype))
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, golden, baseline, allowance=allowance, what=what)


def emulate(q, k_cache, v_cache, seqlens, bt=None, alibi=None, scale=None, window_left=-1, softcap=0.0, splits=0):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return run_mma(q, k_cache, v_cache, seqlens, bt, alibi, scale, window_left, softcap, splits=splits)


# (B, T, Hq, Hkv, D, lengths, capacity, page_size, dtype, splits): rows per CTA = (Hq / Hkv) * T -> 1, 2 or 4 m16
# tiles (warps_m), > 64 rows -> two row blocks
CASES = [
    (1, 1, 2, 2, 64, [1], 16, None, torch.float16, 0),
    (2, 1, 4, 4, 64, [97, 17], 97, None, torch.float16, 0),
    (2, 1, 4, 1, 64, [113, 1], 113, 16, torch.bfloat16, 0),
    (2, 2, 8, 2, 128, [97, 17], 128, 64, torch.float16, 0),
    (1, 3, 8, 1, 64, [113], 113, None, torch.bfloat16, 3),   # 24 rows: two m16 tiles
    (1, 5, 8, 1, 64, [97], 97, 16, torch.float16, 2),        # 40 rows: four m16 tiles
    (1, 9, 8, 1, 64, [70], 80, None, torch.float16, 1),      # 72 rows: two row blocks
    (3, 1, 8, 2, 128, [17, 1, 113], 113, None, torch.bfloat16, 0),
    (2, 4, 4, 4, 128, [3, 64], 64, 16, torch.bfloat16, 1),   # 3 < T: the first token has no key (zero output)
]


def case_id(c):
    B, T, Hq, Hkv, D, lens, cap, ps, dt, splits = c
    return (f"B{B}-T{T}-h{Hq}/{Hkv}-d{D}-L{'.'.join(map(str, lens))}-{'paged' + str(ps) if ps else 'contig'}"
            f"-{str(dt)[6:]}-splits{splits or 'auto'}")


@emulated
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_emulated_matches_golden(case):
    B, T, Hq, Hkv, D, lens, cap, ps, dtype, splits = case
    gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    k_cache, v_cache, bt = make_cache(B, cap, Hkv, D, dtype, ps, gen=gen)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out = emulate(q, k_cache, v_cache, seqlens, bt, splits=splits)
    check(out, q, k_cache, v_cache, seqlens, bt, what=case_id(case))


FEATURES = [
    dict(window_left=17),
    dict(window_left=0),
    dict(softcap=3.0),
    dict(alibi="heads"),
    dict(alibi="batch", window_left=40, softcap=10.0, scale=0.3),
]


@emulated
@pytest.mark.parametrize("paged", [None, 16], ids=["contig", "paged16"])
@pytest.mark.parametrize("splits", [1, 3], ids=["nosplit", "split3"])
@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_emulated_window_softcap_alibi(paged, splits, feature):
    B, T, Hq, Hkv, D, S = 2, 2, 4, 1, 64, 150
    dtype = torch.float16
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache, bt = make_cache(B, S, Hkv, D, dtype, paged, gen=gen)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    seqlens = torch.tensor([150, 61], dtype=torch.int32)
    kw = dict(feature)
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        kw["alibi"] = torch.rand((Hq,) if alibi == "heads" else (B, Hq), generator=gen) * 0.3
    out = emulate(q, k_cache, v_cache, seqlens, bt, splits=splits, **kw)
    check(out, q, k_cache, v_cache, seqlens, bt, what=f"{feature} paged={paged} splits={splits}", **kw)


# (T, Hq, Hkv, page_size, feature): head dim 128, bf16, every row tile (1, 2 and 4 m16 tiles), features combined
FEATURES_D128 = [
    (1, 8, 8, 64, dict(alibi="heads", window_left=30)),
    (3, 8, 1, None, dict(softcap=5.0, window_left=50)),        # 24 rows
    (5, 8, 1, 16, dict(alibi="batch", softcap=2.0, scale=0.2)),  # 40 rows
    (9, 8, 1, 64, dict(window_left=5, alibi="heads")),          # 72 rows: two row blocks
]


@emulated
@pytest.mark.parametrize("case", FEATURES_D128, ids=lambda c: f"T{c[0]}-h{c[1]}/{c[2]}-paged{c[3]}-" + "-".join(
    f"{k}={v}" for k, v in c[4].items()))
def test_emulated_head_dim_128_features(case):
    T, Hq, Hkv, ps, feature = case
    B, D, S = 2, 128, 113
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache, bt = make_cache(B, S, Hkv, D, dtype, ps, gen=gen)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    seqlens = torch.tensor([113, 40], dtype=torch.int32)
    kw = dict(feature)
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        kw["alibi"] = torch.rand((Hq,) if alibi == "heads" else (B, Hq), generator=gen) * 0.3
    for splits in (1, 2):
        out = emulate(q, k_cache, v_cache, seqlens, bt, splits=splits, **kw)
        check(out, q, k_cache, v_cache, seqlens, bt, what=f"d128 {case} splits={splits}", **kw)


@emulated
def test_emulated_strided_caches():
    """K and V views with their own strides (a padded head dim, every other head of a wider cache): the kernel
    addresses each with its own, 16-byte rows."""
    B, T, Hq, Hkv, D, S = 2, 2, 4, 2, 64, 90
    dtype = torch.float16
    gen = torch.Generator().manual_seed(12)
    k_cache = torch.randn(B, S, Hkv, D + 8, generator=gen).to(dtype)[..., :D]
    v_cache = torch.randn(B, S, 2 * Hkv, D, generator=gen).to(dtype)[:, :, ::2]
    assert k_cache.stride() != v_cache.stride()
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    seqlens = torch.tensor([90, 33], dtype=torch.int32)
    out = emulate(q, k_cache, v_cache, seqlens, splits=2)
    check(out, q, k_cache, v_cache, seqlens, what="strided caches")


@emulated
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_emulated_split_counts(dtype):
    """The same call with 1..5 splits and the automatic choice: each within the bound (the combine of splits that
    did not run -- past a short sequence's length -- is never read: the partials are NaN-poisoned)."""
    B, T, Hq, Hkv, D, S = 2, 1, 8, 2, 64, 300
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, bt = make_cache(B, S, Hkv, D, dtype, 64, gen=gen)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    seqlens = torch.tensor([300, 65], dtype=torch.int32)
    for splits in (1, 2, 3, 5, 0):
        out = emulate(q, k_cache, v_cache, seqlens, bt, window_left=200, splits=splits)
        check(out, q, k_cache, v_cache, seqlens, bt, window_left=200, what=f"splits={splits}")


@emulated
@pytest.mark.parametrize("window_left", [-1, 0, 1, 62, 63, 64, 65])
def test_emulated_mask_edges(window_left):
    """Lengths and window starts on both sides of the 64-key tile edges (the first tile loaded, the last key of a
    tile, a warp's 16-key slice): one sequence per length, two new tokens, with and without a split."""
    lens = [1, 2, 3, 15, 16, 17, 63, 64, 65, 66, 127, 128, 129, 130]
    B, T, Hq, Hkv, D, S = len(lens), 2, 2, 1, 64, 130
    gen = torch.Generator().manual_seed(13)
    k_cache, v_cache, _ = make_cache(B, S, Hkv, D, torch.float16, gen=gen)
    q = torch.randn(B, T, Hq, D, generator=gen).half()
    seqlens = torch.tensor(lens, dtype=torch.int32)
    for splits in (1, 2):
        out = emulate(q, k_cache, v_cache, seqlens, window_left=window_left, splits=splits)
        check(out, q, k_cache, v_cache, seqlens, window_left=window_left,
              what=f"window {window_left} splits {splits}")


@emulated
def test_emulated_unread_slots_may_hold_nan():
    """Slots at or past each length, and before every new token's window, are never read: NaN there changes
    nothing (a product p * NaN would be NaN even with p = 0)."""
    B, T, Hq, Hkv, D, S = 2, 2, 4, 2, 64, 160
    dtype = torch.bfloat16
    for ps in (None, 16):
        gen = torch.Generator().manual_seed(3)
        k_cache, v_cache, bt = make_cache(B, S, Hkv, D, dtype, ps, gen=gen)
        q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
        seqlens = torch.tensor([130, 17], dtype=torch.int32)
        window = 20
        clean = (k_cache.clone(), v_cache.clone())
        for cache in (k_cache, v_cache):  # poison through the logical view
            for b, L in enumerate(seqlens.tolist()):
                for j in list(range(L, S)) + list(range(0, max(L - T - window, 0))):
                    if ps is None:
                        cache[b, j] = float("nan")
                    else:
                        cache[bt[b, j // ps].item(), j % ps] = float("nan")
        out = emulate(q, k_cache, v_cache, seqlens, bt, window_left=window, splits=2)
        check(out, q, *clean, seqlens, bt, window_left=window, what=f"NaN-poisoned slots paged={ps}")


@emulated
def test_emulated_zero_lengths_and_strided_query():
    """A sequence of length 0 (zero output, its later splits never run), and q as a strided view (copied into
    16-byte rows by the plan)."""
    B, T, Hq, Hkv, D, S = 2, 1, 4, 2, 128, 70
    dtype = torch.float16
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache, _ = make_cache(B, S, Hkv, D, dtype, gen=gen)
    q = torch.randn(B, Hq, T, D + 8, generator=gen).to(dtype)[..., :D].transpose(1, 2)
    assert not q.is_contiguous()
    seqlens = torch.tensor([0, 70], dtype=torch.int32)
    out = emulate(q, k_cache, v_cache, seqlens, splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    check(out, q, k_cache, v_cache, seqlens, what="zero length, strided q")
    empty = k_cache[:, :0]  # a cache of capacity 0: every output row is 0
    out = emulate(q, empty, empty, torch.zeros(B, dtype=torch.int32))
    assert torch.equal(out, torch.zeros_like(out))


@emulated
def test_emulated_call_is_deterministic():
    B, T, Hq, Hkv, D, S = 1, 1, 4, 1, 64, 200
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, _ = make_cache(B, S, Hkv, D, torch.float16, gen=gen)
    q = torch.randn(B, T, Hq, D, generator=gen).half()
    seqlens = torch.tensor([200], dtype=torch.int32)
    assert torch.equal(emulate(q, k_cache, v_cache, seqlens, splits=3), emulate(q, k_cache, v_cache, seqlens, splits=3))


def _args(q, k, v, lens, **kw):
    base = dict(block_table=None, alibi_slopes=None, softmax_scale=0.125, window_left=-1, window_right=-1,
                softcap=0.0, cache_batch_idx=None, cache_leftpad=None, causal=True, return_lse=False)
    base.update(kw)
    return (q, k, v, lens, *base.values())


def test_cuda_backend_declines_what_the_kernel_does_not_do():
    q = torch.zeros(1, 1, 2, 64, dtype=torch.float16)
    k = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    lens = torch.tensor([8], dtype=torch.int32)
    assert mma_decline(*_args(q, k, k, lens)) is None
    assert "float32" in mma_decline(*_args(q.float(), k.float(), k.float(), lens))
    q80, k80 = q.new_zeros(1, 1, 2, 80), k.new_zeros(1, 8, 2, 80)
    assert "head_dim 80" in mma_decline(*_args(q80, k80, k80, lens))
    for option, name in ((dict(causal=False), "causal=False"), (dict(return_lse=True), "return_lse"),
                         (dict(cache_leftpad=lens * 0), "cache_leftpad"), (dict(cache_batch_idx=lens * 0),
                                                                             "cache_batch_idx")):
        assert name in mma_decline(*_args(q, k, k, lens, **option))
    odd = torch.zeros(1, 8, 2, 68, dtype=torch.float16)[..., :64]  # rows of 136 bytes: not 16-byte chunks
    assert "aligned" in mma_decline(*_args(q, odd, odd, lens))
    # the backend itself: CUDA tensors only (the emulation is reached through run_mma), not automatic until the
    # GPU acceptance table lists it
    impl = backends._REGISTRY["decode_attention"]["cuda"]
    assert impl.auto == backends.VERIFIED
    assert not backends.automatic("decode_attention", "cuda", impl, torch.device("cuda", 0))
    assert "cuda" in impl.check(*_args(q, k, k, lens))
    with pytest.raises(backends.BackendUnavailable):
        with tk.backend("cuda"):
            tk.decode_attention(q, k, k, lens)


# ---- GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("page_size,new_tokens,dtype", [(None, 1, torch.bfloat16), (64, 1, torch.float16),
                                                        (16, 4, torch.bfloat16), (None, 4, torch.float16)],
                         ids=["contig-T1-bf16", "paged64-T1-fp16", "paged16-T4-bf16", "contig-T4-fp16"])
def test_gpu_cuda_backend_long_cache(page_size, new_tokens, dtype):
    """The forced cuda backend on real sizes: GQA 4 (32 query heads over 8 kv heads), 8k-token caches of different
    lengths (the GPU's own split choice), head dims 128 and 64 with window, softcap and ALiBi."""
    dev = "cuda"
    gen = torch.Generator().manual_seed(6)
    B, Hq, Hkv, S = 4, 32, 8, 8192
    seqlens = torch.tensor([8192, 1, 5000, 8191], dtype=torch.int32, device=dev)
    for D, kw in ((128, {}), (64, dict(window_size=(1000, -1), softcap=30.0,
                                       alibi_slopes=torch.rand(Hq, generator=gen).to(dev) * 0.01))):
        k_cache, v_cache, bt = make_cache(B, S, Hkv, D, dtype, page_size, dev=dev, gen=gen)
        q = torch.randn(B, new_tokens, Hq, D, generator=gen).to(dev, dtype)
        with tk.backend("cuda"):
            out = tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=bt, **kw)
        torch.cuda.synchronize()
        check(out, q, k_cache, v_cache, seqlens, bt, alibi=kw.get("alibi_slopes"),
              window_left=kw.get("window_size", (-1, -1))[0], softcap=kw.get("softcap", 0.0),
              what=f"gpu d{D} T{new_tokens} paged={page_size} {dtype}")
        for splits in (1, 7):
            forced = run_mma(q, k_cache, v_cache, seqlens, bt, kw.get("alibi_slopes"), D ** -0.5,
                             kw.get("window_size", (-1, -1))[0], kw.get("softcap", 0.0), splits=splits)
            check(forced, q, k_cache, v_cache, seqlens, bt, alibi=kw.get("alibi_slopes"),
                  window_left=kw.get("window_size", (-1, -1))[0], softcap=kw.get("softcap", 0.0),
                  what=f"gpu d{D} T{new_tokens} paged={page_size} {dtype} splits={splits}")


@pytest.mark.gpu
def test_gpu_cuda_backend_in_a_cuda_graph():
    """The grid comes from the capacity: a captured call replays correctly after cache_seqlens changed."""
    dev = "cuda"
    gen = torch.Generator().manual_seed(7)
    B, T, Hq, Hkv, D, S = 2, 1, 16, 2, 128, 4096
    k_cache, v_cache, bt = make_cache(B, S, Hkv, D, torch.bfloat16, 64, dev=dev, gen=gen)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dev, torch.bfloat16)
    seqlens = torch.tensor([4096, 100], dtype=torch.int32, device=dev)
    with tk.backend("cuda"):
        tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=bt)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=bt)
        seqlens.copy_(torch.tensor([7, 3000], dtype=torch.int32))
        graph.replay()
        expected = tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=bt)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    check(out, q, k_cache, v_cache, seqlens, bt, what="gpu graph replay")
