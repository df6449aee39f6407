"""kv_cache_append's Triton kernel (kernels/kv_cache_append.py) and FlashAttention's append options.

The Triton kernel (interpreted on CPU tensors) against the reference bit for bit: contiguous and paged caches (page
size 16 and 32), fp16/bf16/fp32, odd shapes, NaN-poisoned caches whose unwritten slots must stay untouched,
cache_batch_idx, cache_leftpad, rotary (interleaved or not, rotary_dim == or < head_dim). The rotary spec
(reference.apply_rotary) against an oracle written here from FlashAttention's formulas and against HF transformers'
Llama apply_rotary_pos_emb in float64. opcheck, a fullgraph torch.compile, the grid's independence of the
lengths' values, and the static code generation of the kernel (sm_80, sm_90: no spills, 64-bit offsets, no fused
multiply-add in the rotation)."""
import math

import pytest
import torch

import turbokernels as tk
from turbokernels.reference import decode_attention as ref
from turbokernels.testing import CodegenJob, compile_triton, int32_stride_products, skip_reason_no_ptxas
from conftest import RecordingMode, interpreting

f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
needs_triton = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                  reason="triton needs CUDA or TRITON_INTERPRET=1")


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: equal bits, NaN payloads included."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(ours, want, what):
    assert ours.dtype == want.dtype and ours.shape == want.shape, what
    same = bits(ours) == bits(want)
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} elements differ"


def i32(*values):
    return torch.tensor(values, dtype=torch.int32, device=device())


def make_caches(layout: str, B: int, capacity: int, Hkv: int, D: int, dtype, rows: int = 0):
    """(k_cache, v_cache, block_table) full of NaN: contiguous (rows or B, capacity, Hkv, D), or paged ("paged16",
    "paged32") with a shuffled block table and two spare pages."""
    dev = device()
    if layout == "contig":
        k = torch.full((rows or B, capacity, Hkv, D), float("nan"), dtype=dtype, device=dev)
        return k, k.clone(), None
    page_size = int(layout.removeprefix("paged"))
    pages = capacity // page_size
    k = torch.full((B * pages + 2, page_size, Hkv, D), float("nan"), dtype=dtype, device=dev)
    bt = torch.randperm(B * pages + 2, device=dev)[:B * pages].view(B, pages).to(torch.int32)
    return k, k.clone(), bt


def rotary_tables(rows: int, rotary_dim: int, dtype, base: float = 10000.0):
    """cos, sin (rows, rotary_dim / 2) of the usual frequencies, in `dtype`."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(rows, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype).to(device()), angles.sin().to(dtype).to(device())


def append_both(k_cache, v_cache, k_new, v_new, seqlens, **kw):
    """{backend: (k_cache, v_cache, new lengths)}: the append on copies of the caches by the reference and Triton."""
    out = {}
    for name in ("reference", "triton"):
        kc, vc = k_cache.clone(), v_cache.clone()
        with tk.backend(name):
            lens = tk.kv_cache_append(kc, vc, k_new, v_new, seqlens, **kw)
        out[name] = (kc, vc, lens)
    return out


def check_triton_is_reference(results, seqlens, T, what):
    (rk, rv, rl), (tk_, tv, tl_) = results["reference"], results["triton"]
    assert_same_bits(tk_, rk, f"{what} k_cache")
    assert_same_bits(tv, rv, f"{what} v_cache")
    assert tl_.dtype == torch.int32 and torch.equal(tl_, seqlens + T) and torch.equal(rl, seqlens + T)


# ---- the kernel against the reference, exactly ------------------------------------------------------------------
# (layout, dtype, B, T, Hkv, D): T 1 and 17 (crossing pages), head dims 64, 80 (not a power of two) and 128, MQA.
CASES = [
    ("contig", f16, 2, 1, 1, 64),
    ("contig", bf16, 2, 17, 3, 80),
    ("contig", f32, 3, 2, 3, 128),
    ("paged16", f16, 2, 17, 1, 128),
    ("paged16", bf16, 3, 1, 3, 64),
    ("paged32", f32, 2, 17, 3, 80),
    ("paged32", bf16, 2, 5, 1, 128),
]


@needs_triton
@pytest.mark.parametrize("layout,dtype,B,T,Hkv,D", CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-B{c[2]}T{c[3]}H{c[4]}D{c[5]}" for c in CASES])
def test_triton_matches_reference(layout, dtype, B, T, Hkv, D):
    capacity = 64
    k_cache, v_cache, bt = make_caches(layout, B, capacity, Hkv, D, dtype)
    k_new = torch.randn(B, T, Hkv, D, device=device()).to(dtype)
    if T > 1:  # a strided view (heads-major storage)
        k_new = torch.randn(B, Hkv, T, D, device=device()).to(dtype).transpose(1, 2)
    v_new = torch.randn(B, T, Hkv, D, device=device()).to(dtype)
    seqlens = i32(*[(0, capacity - T, 13)[b % 3] for b in range(B)])
    results = append_both(k_cache, v_cache, k_new, v_new, seqlens, block_table=bt)
    check_triton_is_reference(results, seqlens, T, f"{layout} {dtype}")
    kc, vc, _ = results["triton"]
    # exactly B * T slots written (the NaN poison elsewhere untouched), each holding its token
    for cache in (kc, vc):
        assert int((~torch.isnan(cache)).all(-1).all(-1).sum()) == B * T
        assert int(torch.isnan(cache).all(-1).all(-1).sum()) == cache.shape[0] * cache.shape[1] - B * T
    rows, slots = ref.append_positions(seqlens, T, k_cache.shape[1], bt)
    assert torch.equal(kc[rows, slots], k_new) and torch.equal(vc[rows, slots], v_new)


# (layout, dtype, interleaved, rotary_dim, D, leftpad, batch_idx)
ROTARY_CASES = [
    ("contig", f16, False, 64, 64, False, False),
    ("contig", bf16, True, 64, 64, True, True),
    ("contig", f32, True, 128, 128, False, True),
    ("paged16", f32, False, 32, 80, True, False),
    ("paged32", bf16, True, 48, 80, False, False),
    ("paged16", f16, False, 96, 128, True, False),
]


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0, unused
@pytest.mark.parametrize("layout,dtype,interleaved,rotary_dim,D,leftpad,batch_idx", ROTARY_CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-{'gptj' if c[2] else 'neox'}-r{c[3]}-d{c[4]}"
                              + ("-leftpad" if c[5] else "") + ("-batchidx" if c[6] else "") for c in ROTARY_CASES])
def test_rotary_triton_matches_reference(layout, dtype, interleaved, rotary_dim, D, leftpad, batch_idx):
    B, T, Hkv, capacity = 2, 3, 2, 64
    k_cache, v_cache, bt = make_caches(layout, B, capacity, Hkv, D, dtype, rows=3 if batch_idx else 0)
    k_new = (torch.randn(B, T, Hkv, D, device=device()) * 3).to(dtype)
    v_new = torch.randn(B, T, Hkv, D, device=device()).to(dtype)
    if rotary_dim < D:  # non-finite values past rotary_dim stay where they are and do not leak into the rotation
        k_new[0, 0, 0, -1] = float("inf")
        k_new[1, 1, 1, rotary_dim] = float("nan")
    seqlens = i32(40, 61)
    kw = dict(block_table=bt, rotary_interleaved=interleaved)
    kw["rotary_cos"], kw["rotary_sin"] = rotary_tables(capacity, rotary_dim, dtype)
    if leftpad:
        kw["cache_leftpad"] = i32(7, 0)
    if batch_idx:
        kw["cache_batch_idx"] = i32(2, 0)
    results = append_both(k_cache, v_cache, k_new, v_new, seqlens, **kw)
    check_triton_is_reference(results, seqlens, T, f"rotary {layout} {dtype} interleaved={interleaved}")
    kc, vc, _ = results["triton"]
    rows, slots = ref.append_positions(seqlens, T, k_cache.shape[1], bt, kw.get("cache_batch_idx"))
    assert torch.equal(vc[rows, slots], v_new), "v_new is never rotated"
    assert_same_bits(kc[rows, slots][..., rotary_dim:], k_new[..., rotary_dim:], "dims past rotary_dim")
    assert not torch.equal(kc[rows, slots][..., :rotary_dim], k_new[..., :rotary_dim])


# ---- cache_batch_idx and cache_leftpad against explicit oracles -----------------------------------------------------
@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("rows,idx", [(3, (2, 0, 1)), (5, (4, 1))], ids=["permutation", "subset"])
def test_cache_batch_idx(backend_name, rows, idx):
    B, T, Hkv, D, S = len(idx), 2, 2, 16, 32
    k_cache, v_cache, _ = make_caches("contig", B, S, Hkv, D, f32, rows=rows)
    k_new, v_new = (torch.randn(B, T, Hkv, D, device=device()) for _ in range(2))
    seqlens = i32(*[(3, 30, 0)[b] for b in range(B)])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b in range(B):  # sequence b's token t at slot seqlens[b] + t of row idx[b]
        for t in range(T):
            want_k[idx[b], int(seqlens[b]) + t] = k_new[b, t]
            want_v[idx[b], int(seqlens[b]) + t] = v_new[b, t]
    with tk.backend(backend_name):
        new = tk.kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, cache_batch_idx=i32(*idx))
    assert torch.equal(new, seqlens + T)
    assert_same_bits(k_cache, want_k, "k_cache")
    assert_same_bits(v_cache, want_v, "v_cache")


def fa_rotate_half(x, interleaved):
    """flash_attn/layers/rotary.py rotate_half, written out here (einops' "(d two)" is a stack and a flatten)."""
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def fa_apply_rotary_emb_torch(x, cos, sin, interleaved):
    """flash_attn/layers/rotary.py apply_rotary_emb_torch: x (..., seqlen, heads, D), cos / sin (..., seqlen, r/2):
    cos repeated "(2 d)" (cat) when not interleaved, "(d 2)" (each twice in place) when interleaved, one head axis
    inserted; computed in fp32 (fp64 for fp64 x) and rounded once, our spec's precision."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    ro_dim = cos.shape[-1] * 2
    assert ro_dim <= x.shape[-1]
    if interleaved:
        cos = torch.stack((cos, cos), dim=-1).flatten(-2)
        sin = torch.stack((sin, sin), dim=-1).flatten(-2)
    else:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    cos, sin = cos.unsqueeze(-2).to(work), sin.unsqueeze(-2).to(work)
    xr = x[..., :ro_dim].to(work)
    return torch.cat([(xr * cos + fa_rotate_half(xr, interleaved) * sin).to(x.dtype), x[..., ro_dim:]], dim=-1)


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=needs_triton)])
def test_cache_leftpad_shifts_only_the_rotary_positions(backend_name):
    """Writes at slot cache_seqlens[b] + t; rotated as position cache_seqlens[b] - cache_leftpad[b] + t."""
    B, T, Hkv, D, S = 2, 2, 1, 32, 32
    k_cache, v_cache, _ = make_caches("contig", B, S, Hkv, D, f32)
    k_new, v_new = (torch.randn(B, T, Hkv, D, device=device()) for _ in range(2))
    seqlens, leftpad = i32(9, 4), i32(6, 0)
    cos, sin = rotary_tables(8, D, f32)  # positions 3, 4 and 4, 5: within 8 rows only thanks to the left padding
    with tk.backend(backend_name):
        tk.kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, cache_leftpad=leftpad, rotary_cos=cos,
                           rotary_sin=sin)
    for b, (start, pos0) in enumerate(((9, 3), (4, 4))):
        positions = torch.arange(pos0, pos0 + T, device=device())
        want = fa_apply_rotary_emb_torch(k_new[b], cos[positions], sin[positions], interleaved=False)
        assert_same_bits(k_cache[b, start:start + T], want, f"sequence {b}")
        assert_same_bits(v_cache[b, start:start + T], v_new[b], f"sequence {b} values")
    assert int((~torch.isnan(k_cache)).all(-1).all(-1).sum()) == B * T


# ---- the rotary spec against independent oracles ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, f32, bf16, f16])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [80, 48], ids=["full", "partial"])
def test_apply_rotary_is_flash_attention_formula(dtype, interleaved, rotary_dim):
    B, T, H, D, rows = 2, 5, 3, 80, 40
    x = torch.randn(B, T, H, D, dtype=torch.float64).to(dtype)
    angles = torch.rand(rows, rotary_dim // 2, dtype=torch.float64) * 2 * math.pi
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.randint(0, rows, (B, T))
    got = ref.apply_rotary(x, cos, sin, positions, interleaved)
    want = fa_apply_rotary_emb_torch(x, cos[positions], sin[positions], interleaved)
    assert_same_bits(got, want, f"apply_rotary {dtype} interleaved={interleaved} r={rotary_dim}")


def test_rotary_append_is_hf_llama_rotary():
    """The reference append with rotary (float64, rotary_dim == head_dim, not interleaved) writes, bit for bit, the
    keys that HF transformers' Llama apply_rotary_pos_emb computes from cat(freqs, freqs).cos() / .sin()."""
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    B, T, Hkv, D, S = 2, 3, 2, 64, 32
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq[None, :]             # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                                 # HF's (S, D)
    k_cache, v_cache = torch.zeros(B, S, Hkv, D, dtype=torch.float64), torch.zeros(B, S, Hkv, D, dtype=torch.float64)
    k_new, v_new = torch.randn(B, T, Hkv, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64)
    seqlens = torch.tensor([0, 20], dtype=torch.int32)
    with tk.backend("reference"):
        tk.kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, rotary_cos=freqs.cos(), rotary_sin=freqs.sin())
    position_ids = seqlens.long()[:, None] + torch.arange(T)[None, :]                       # (B, T)
    cos, sin = emb.cos()[position_ids], emb.sin()[position_ids]                             # (B, T, D)
    k_hf = k_new.transpose(1, 2)                                                            # (B, H, T, D)
    _, k_embed = modeling_llama.apply_rotary_pos_emb(k_hf, k_hf, cos, sin)
    for b in range(B):
        start = int(seqlens[b])
        assert_same_bits(k_cache[b, start:start + T], k_embed[b].transpose(0, 1), f"sequence {b}")


# ---- opcheck, torch.compile, no host sync ---------------------------------------------------------------------------
def test_opcheck_with_the_append_options():
    op = torch.ops.turbokernels.kv_cache_append.default
    kn, vn = torch.randn(2, 3, 2, 32), torch.randn(2, 3, 2, 32)
    cos, sin = rotary_tables(48, 16, f32)
    lens = torch.tensor([4, 30], dtype=torch.int32)
    kc, vc = torch.zeros(3, 40, 2, 32), torch.zeros(3, 40, 2, 32)
    torch.library.opcheck(op, (kc, vc, kn, vn, lens, None, torch.tensor([2, 0], dtype=torch.int32),
                               torch.tensor([1, 3], dtype=torch.int32), cos.cpu(), sin.cpu(), False))
    kc, vc = torch.zeros(7, 16, 2, 32), torch.zeros(7, 16, 2, 32)
    bt = torch.tensor([[6, 0, 2], [1, 5, 3]], dtype=torch.int32)
    torch.library.opcheck(op, (kc, vc, kn.half(), vn.half(), lens, bt, None, None, cos.half().cpu(),
                               sin.half().cpu(), True))


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph(backend_name):
    """The append with every option traces in one graph (the value checks as torch._assert_async); a bad value
    still fails in the compiled function."""
    def step(k_cache, v_cache, k_new, v_new, lens, idx, pad, cos, sin):
        return tk.kv_cache_append(k_cache, v_cache, k_new, v_new, lens, cache_batch_idx=idx, cache_leftpad=pad,
                                  rotary_cos=cos, rotary_sin=sin, rotary_interleaved=True)

    kc, vc, _ = make_caches("contig", 2, 32, 2, 16, f32, rows=3)
    kn, vn = (torch.randn(2, 2, 2, 16, device=device()) for _ in range(2))
    cos, sin = rotary_tables(32, 16, f32)
    args = (kn, vn, i32(5, 20), i32(2, 0), i32(1, 4), cos, sin)
    want_k, want_v = kc.clone(), vc.clone()
    with tk.backend(backend_name):
        want_lens = step(want_k, want_v, *args)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got_k, got_v = kc.clone(), vc.clone()
        lens = compiled(got_k, got_v, *args)
        assert torch.equal(lens, want_lens)
        assert_same_bits(got_k, want_k, "compiled k_cache")
        assert_same_bits(got_v, want_v, "compiled v_cache")
        with pytest.raises(RuntimeError, match=r"kv_cache_append\(cache_batch_idx/cache_leftpad/rotary_cos\)"):
            compiled(got_k, got_v, kn, vn, i32(5, 20), i32(2, 0), i32(6, 4), cos, sin)  # leftpad 6 > length 5


@needs_triton
def test_grid_and_host_reads_do_not_depend_on_the_lengths(monkeypatch):
    """The launch grid comes from the shapes only, and the launcher reads no tensor value on the host (no .item(),
    no .tolist(): nothing to synchronize on, CUDA-graph capturable)."""
    import turbokernels.kernels.kv_cache_append as kernel_module
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kernel_module, "kv_cache_append_kernel", Recorder())
    B, T, Hkv, D = 3, 2, 3, 64
    k_cache, v_cache, bt = make_caches("paged16", B, 32, Hkv, D, f16)
    k_new = torch.randn(B, T, Hkv, D, device=device()).to(f16)
    cos, sin = rotary_tables(40, D, f16)
    for lens in ((0, 0, 0), (30, 7, 16)):
        with RecordingMode() as mode:
            kernel_module.kv_cache_append(k_cache, v_cache, k_new, k_new, i32(*lens), bt, None, i32(0, 3, 1), cos,
                                          sin, False)
        assert not [op for op in mode.ops if "_local_scalar_dense" in op or "item" in op], mode.ops
    block_h = kernel_module.block_sizes(Hkv, D)[0]
    assert grids == [(B * T, math.ceil(Hkv / block_h))] * 2


@pytest.mark.gpu
def test_gpu_append_with_options_in_a_cuda_graph_without_host_sync():
    """The append with every option (the value checks included) makes no host sync and is captured in a CUDA
    graph; each replay, with the lengths it returned fed back, writes what the reference writes."""
    B, T, Hkv, D, S, steps = 3, 2, 8, 128, 64, 4
    kc0, vc0, _ = make_caches("contig", B, S, Hkv, D, bf16, rows=5)
    cos, sin = rotary_tables(S, D, bf16)
    idx, pad, start = i32(4, 0, 2), i32(3, 0, 10), i32(3, 20, 40)
    news = [(torch.randn(B, T, Hkv, D, device="cuda").to(bf16), torch.randn(B, T, Hkv, D, device="cuda").to(bf16))
            for _ in range(steps)]
    opts = dict(cache_batch_idx=idx, cache_leftpad=pad, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False)
    want_k, want_v, lens = kc0.clone(), vc0.clone(), start.clone()
    with tk.backend("reference"):
        for kn, vn in news:
            lens = tk.kv_cache_append(want_k, want_v, kn, vn, lens, **opts)
    kc, vc = kc0.clone(), vc0.clone()
    kn_s, vn_s, lens_s = news[0][0].clone(), news[0][1].clone(), start.clone()
    with tk.backend("triton"):
        tk.kv_cache_append(kc, vc, kn_s, vn_s, lens_s, **opts)  # warm-up (compiles); the first replay rewrites it
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                new_lens_s = tk.kv_cache_append(kc, vc, kn_s, vn_s, lens_s, **opts)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for kn, vn in news:
        kn_s.copy_(kn)
        vn_s.copy_(vn)
        graph.replay()
        lens_s.copy_(new_lens_s)
    torch.cuda.synchronize()
    assert torch.equal(lens_s, lens)
    assert_same_bits(kc, want_k, "k_cache")
    assert_same_bits(vc, want_v, "v_cache")


# ---- static code generation ----------------------------------------------------------------------------------
KERNEL = "turbokernels.kernels.kv_cache_append:kv_cache_append_kernel"
SIGNATURE = {
    "k_cache_ptr": "*{dt}", "v_cache_ptr": "*{dt}", "k_new_ptr": "*{dt}", "v_new_ptr": "*{dt}", "seqlens_ptr": "*i32",
    "block_table_ptr": "*i32", "batch_idx_ptr": "*i32", "leftpad_ptr": "*i32", "cos_ptr": "*{dt}", "sin_ptr": "*{dt}",
    **{name: "i32" for name in ("T", "Hkv", "D", "capacity", "page_size", "seqlen_ro", "stride_kcb", "stride_kcn",
                                "stride_kch", "stride_vcb", "stride_vcn", "stride_vch", "stride_knb", "stride_knt",
                                "stride_knh", "stride_vnb", "stride_vnt", "stride_vnh", "stride_btb")},
}
# what the JIT sees for contiguous tensors with head_dim 128: 16-byte aligned pointers, multiples of 16
ALIGNED = tuple(name for name in SIGNATURE if name.endswith("_ptr") or name.startswith("stride_")) + ("D", "page_size")


def codegen_cases():
    """sm_80 and sm_90 x (fp16 contiguous with cache_batch_idx, bf16 paged) x (plain, rotary: NeoX with left padding
    on the contiguous cache, GPT-J on the paged one), 8 kv heads of 128, compiled as launched (fp fusion off)."""
    from turbokernels.kernels.kv_cache_append import block_sizes
    block_h, block_d, num_warps = block_sizes(8, 128)
    for cap in (80, 90):
        for dt, paged in (("fp16", False), ("bf16", True)):
            for rotary in (False, True):
                constexprs = dict(stride_knd=1, stride_vnd=1, BLOCK_H=block_h, BLOCK_D=block_d, PAGED=paged,
                                  HAS_BATCH_IDX=not paged, HAS_LEFTPAD=rotary and not paged, ROTARY=rotary,
                                  ROT_HALF=64 if rotary else 0, INTERLEAVED=rotary and paged)
                job = CodegenJob(KERNEL, tuple((k, v.format(dt=dt)) for k, v in SIGNATURE.items()),
                                 tuple(constexprs.items()), cap, num_warps, 1, ALIGNED, (("enable_fp_fusion", False),))
                yield f"sm{cap}-{dt}-{'paged' if paged else 'contig'}{'-rotary' if rotary else ''}", rotary, job


CODEGEN_CASES = list(codegen_cases())
needs_ptxas = pytest.mark.skipif(skip_reason_no_ptxas() is not None, reason=str(skip_reason_no_ptxas()))


@pytest.fixture(scope="module")
def codegen_reports():
    return dict(zip([c[0] for c in CODEGEN_CASES], compile_triton([c[2] for c in CODEGEN_CASES])))


@needs_ptxas
@pytest.mark.parametrize("name,rotary,job", CODEGEN_CASES, ids=[c[0] for c in CODEGEN_CASES])
def test_codegen(codegen_reports, name, rotary, job):
    """Zero register spills; every stride product that can pass 2^31 in 64 bits (testing.int32_stride_products);
    16-byte global loads and stores of the rows; and no FFMA: the rotation's products and sum are rounded
    separately, as the reference's, so that a GPU gives the reference's bits too."""
    report = codegen_reports[name]
    assert report.spill_bytes == 0, f"register spills: {report.ptxas_log}"
    assert int32_stride_products(report.ttir, [k for k, _ in job.signature]) == []
    assert report.count(r"LDG\S*\.128", in_sass=True) > 0 and report.count(r"STG\S*\.128", in_sass=True) > 0
    assert report.count(r"\bFFMA\b", in_sass=True) == 0, "a fused multiply-add in the rotation"
    if rotary:
        assert report.count(r"\bFMUL\b", in_sass=True) > 0
