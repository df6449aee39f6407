"""sparse24_int4_mm's CUDA C++ kernel (csrc/cuda/sparse24_int4_mm.cuh: mma.sp on int4-dequantized kept values), the
"cuda" backend.

Without a GPU: the kernel's own source on the CPU emulator (csrc/emu/: turbokernels_C::sparse24_int4_mm_mma on CPU
tensors, through ops/sparse24_int4_mm.py's run_mma and the weight's repack, as the backend calls it) against a
float64 golden result with the bound tests/test_sparse24_int4_mm.py builds for backend "cuda" (the weight rounded to
x's dtype before the dot); the repacked layout against the PTX ISA's sparse A fragment, written out again here; the
plan's checks. With a GPU (`-m gpu`, bench/gpu_check.sh): the forced backend on real sizes.
"""
import pytest
import torch

import turbokernels as tk
from turbokernels import _ext
from turbokernels.formats.int4 import pack_int4
from turbokernels.formats.sparse24_int4 import mma_layout
from turbokernels.ops.sparse24_int4_mm import mma_layout_of, run_mma
from turbokernels.testing import (assert_close, cancelling_bias, int4_dequant_magnitudes, matmul_allowance,
                                  operand_dtype)

pytestmark = pytest.mark.skipif(not _ext.available(), reason="turbokernels._C is not built")
DTYPES = [torch.float16, torch.bfloat16]


def make_sparse(N, K, device="cpu"):
    """A 2:4 weight with all-zero groups and single-nonzero groups at every position (the odd metadata encodings)."""
    w = tk.prune_24(torch.randn(N, K, device=device))
    groups = w.view(N, K // 4, 4)
    groups[:, 0] = 0
    for p in range(min(4, K // 4 - 1)):
        groups[:, p + 1] = 0
        groups[:, p + 1, p] = torch.randn(N, device=device)
    return w


def weight_for(N, K, group_size, symmetric, dtype, mode, device="cpu"):
    """A Sparse24Int4Weight (group_size in dense columns) whose scales/offsets make the kernel dequantize in `mode`:
    "half" (both exact in x's dtype: one fp16/bf16 fma) or "float" (fp32 scales x's dtype cannot hold: fp32 fma,
    then one rounding)."""
    w = tk.Sparse24Int4Weight.from_dense(make_sparse(N, K, device), group_size=group_size, symmetric=symmetric)
    if mode == "half":
        scales, offsets = w.scales.to(dtype), w.offsets.to(dtype)
    else:
        scales, offsets = w.scales.float() * (1 + 2.0 ** -14), w.offsets.float()  # below fp16's/bf16's resolution
    return tk.Sparse24Int4Weight(w.qweight, scales, offsets, w.meta, group_size, K)


def golden(x, weight, bias=None):
    w64 = weight.dequantize(torch.float64)
    g = x.double() @ w64.t()
    baseline = x @ w64.to(x.dtype).t()
    if bias is not None:
        g = g + bias.double()
        baseline = baseline + bias
    return g, baseline, w64


def run(x, weight, bias=None, splits=0, sms=0):
    return run_mma(x, weight.qweight, weight.scales, weight.offsets, weight.meta, weight.kept_group_size, bias,
                   splits=splits, sms=sms)


def check(x, weight, bias=None, splits=0, what="", sms=0):
    out = run(x, weight, bias, splits, sms)
    g, baseline, w64 = golden(x, weight, bias)
    assert out.dtype == x.dtype and out.shape == g.shape
    allowance = matmul_allowance(x, w64.t(), bias=bias, operand_dtype=operand_dtype("cuda", x.dtype),
                                 dequant_magnitudes=int4_dequant_magnitudes(weight, "cuda"))
    assert_close(out, g, baseline, allowance=allowance, what=what)
    return out


# (M, N, K, dense group size): N and M odd or not a multiple of the tiles (128 x 16 for M <= 16, else 64 x 64); K
# one k32 step, a last stage of one step (96, 160), whole stages; groups of 16 kept values (one k32 step: dense 32),
# 32, 64, 128 kept, a short last group (K = 96, dense 64: 32 + 16 kept), per-channel (-1) and one group wider than
# K/2 (dense 512 over K = 160)
SHAPES = [
    (1, 1, 32, 32),
    (1, 113, 576, 128),
    (3, 40, 96, 64),
    (16, 64, 160, -1),
    (17, 113, 256, 64),
    (33, 17, 160, 512),
    (70, 130, 320, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,group_size", SHAPES)
@pytest.mark.parametrize("mode", ["half", "float"])
def test_emulated_kernel_matches_golden(dtype, M, N, K, group_size, mode):
    torch.manual_seed(M * 1000 + K + N)
    weight = weight_for(N, K, group_size, symmetric=(M % 2 == 1), dtype=dtype, mode=mode)
    layout = weight.mma_layout(dtype)
    assert layout.scales.dtype == (dtype if mode == "half" else torch.float32)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if (M + N) % 2 else None
    check(x, weight, bias, what=f"emulated {dtype} {mode} M={M} N={N} K={K} g={group_size}")


@pytest.mark.parametrize("M", [1, 5, 40])
def test_split_k_parts_are_exact_and_deterministic(M):
    """Forced split-K: every part count gives a result within the bound, the same bits on every run (the last part
    sums the partials in part order), and the counters are left at zero (checked by the emulated launcher)."""
    torch.manual_seed(M)
    K, N = 1024, 136
    weight = weight_for(N, K, 64, False, torch.float16, "half")
    x = torch.randn(M, K).to(torch.float16)
    bias = torch.randn(N).to(torch.float16)
    for splits in (1, 2, 3, 5):
        first = check(x, weight, bias, splits=splits, what=f"splits={splits}")
        assert torch.equal(first, run(x, weight, bias, splits=splits))
    # automatic: few output tiles, 8 k tiles on an H100's 132 SMs -> 2 parts; the result must not care
    check(x, weight, bias, splits=0, sms=132, what="auto split")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_is_added_before_the_one_rounding(dtype):
    torch.manual_seed(3)
    M, K, N = 2, 256, 48
    weight = weight_for(N, K, 128, False, dtype, "float")
    x = torch.randn(M, K).to(dtype)
    product = x.double() @ weight.dequantize(torch.float64).t()
    bias = cancelling_bias(product[0], dtype)
    for splits in (1, 2):
        check(x, weight, bias, splits=splits, what=f"cancelling bias, splits={splits}")


def test_scale_follows_the_fragment_rows():
    """Every row n its own scale and offset (powers of two apart), each kept group its own: a scale or offset read
    for the wrong row or group is off by far more than the bound."""
    torch.manual_seed(5)
    N, K = 48, 128  # kept group 16 = one k32 step: 4 groups
    base = weight_for(N, K, 32, False, torch.float16, "half")
    G = base.scales.shape[0]
    scales = (2.0 ** torch.randint(-6, 0, (G, N))).to(torch.float16)
    offsets = (torch.randint(-8, 8, (G, N)) * 2.0 ** -5).to(torch.float16)
    weight = tk.Sparse24Int4Weight(base.qweight, scales, offsets, base.meta, 32, K)
    x = torch.randn(3, K).to(torch.float16)
    check(x, weight, what="per-row, per-group scales")


def test_repacked_nibbles_sit_where_the_isa_sparse_a_fragment_wants_them():
    """Independently of csrc/cuda/sparse24_int4_mm_layout.h: word `lane` of block (ks, nb) must hold, in nibble slot
    s, the kept value the mma.sp m16n8k32 A fragment of that lane needs. PTX ISA ("Matrix fragments for sparse
    mma.m16n8k32 with .f16 and .bf16 types"): element a_i, i = 0..7, two per register (register i // 2, the lower
    half i even), row = groupID for i in {0, 1, 4, 5}, groupID + 8 otherwise; its 4-wide chunk of dense columns starts
    at threadID_in_group * 4 (i < 4) or threadID_in_group * 4 + 16 (i >= 4), and it is nonzero number i % 2 of that
    chunk, i.e. kept (compressed) column 2 * (chunk start / 4) + i % 2. Nibble slot s: register s % 4, half s // 4,
    i.e. element i = 2 (s % 4) + s // 4."""
    torch.manual_seed(0)
    K, N = 96, 35  # 3 k32 steps x 3 n16 blocks, padded
    q = torch.randint(0, 16, (K // 2, N), dtype=torch.int32)  # kept values (K/2, N)
    packed = torch.ops.turbokernels_C.sparse24_int4_mm_mma_repack(pack_int4(q), K)
    assert packed.shape == (3, 3 * 32) and packed.dtype == torch.int32
    words = packed.view(3, 3, 32).to(torch.int64) & 0xFFFFFFFF
    for ks in range(3):
        for nb in range(3):
            for lane in range(32):
                group, tig = lane // 4, lane % 4
                for slot in range(8):
                    i = 2 * (slot % 4) + slot // 4
                    row = group if i in (0, 1, 4, 5) else group + 8
                    chunk_start = tig * 4 + (16 if i >= 4 else 0)  # dense column within the k32 step
                    kept = chunk_start // 4 * 2 + i % 2
                    n, c = nb * 16 + row, ks * 16 + kept
                    expected = int(q[c, n]) if n < N else 0  # padding is zero
                    got = (int(words[ks, nb, lane]) >> (4 * slot)) & 0xF
                    assert got == expected, (ks, nb, lane, slot)


def test_layout_is_cached_per_weight_and_dtype_and_follows_in_place_changes():
    weight = weight_for(32, 64, 32, False, torch.float16, "half")
    args = (weight.qweight, weight.scales, weight.offsets, 16, 64)
    a = mma_layout_of(*args, torch.float16)
    assert mma_layout_of(*args, torch.float16) is a
    b = mma_layout_of(*args, torch.bfloat16)
    assert b is not a and mma_layout_of(*args, torch.float16) is a
    weight.qweight[0, 0] ^= 0x11  # in place: the version counter moves, the cached layout is stale
    c = mma_layout_of(*args, torch.float16)
    assert c is not a and not torch.equal(c.qweight, a.qweight)
    assert torch.equal(c.qweight, mma_layout(*args, torch.float16).qweight)
    # other scale tensors (a module's buffers replaced) are a new layout, never a stale one
    scales = weight.scales.clone()
    d = mma_layout_of(weight.qweight, scales, weight.offsets, 16, 64, torch.float16)
    assert d is not c and mma_layout_of(weight.qweight, scales, weight.offsets, 16, 64, torch.float16) is d
    # nothing rides on the tensor (a saved state dict stays as it was), and the entry goes with the tensor
    import gc
    from turbokernels.ops import sparse24_int4_mm as module
    assert not weight.qweight.__dict__
    ident = id(weight.qweight)
    del weight, args, a, b, c, d, scales
    gc.collect()
    assert ident not in module._MMA_LAYOUTS


def test_plan_rejects_bad_arguments():
    weight = weight_for(32, 64, 32, False, torch.float16, "half")
    layout = weight.mma_layout(torch.float16)
    meta = weight.meta
    x = torch.randn(2, 64).to(torch.float16)
    op = torch.ops.turbokernels_C.sparse24_int4_mm_mma
    with pytest.raises(RuntimeError, match="x must be float16 or bfloat16"):
        op(x.float(), layout.qweight, layout.scales, layout.offsets, meta, 16, 32)
    with pytest.raises(RuntimeError, match="must be a positive multiple of 32"):
        op(torch.randn(2, 48).to(torch.float16), layout.qweight, layout.scales, layout.offsets, meta, 16, 32)
    with pytest.raises(RuntimeError, match="qweight must be the int32 mma layout"):
        op(x, layout.qweight[:, :32], layout.scales, layout.offsets, meta, 16, 32)
    with pytest.raises(RuntimeError, match="meta must be int16"):
        op(x, layout.qweight, layout.scales, layout.offsets, meta.int(), 16, 32)
    with pytest.raises(RuntimeError, match="meta must be int16"):
        op(x, layout.qweight, layout.scales, layout.offsets, meta[:, :2], 16, 32)
    with pytest.raises(RuntimeError, match="group_size \\(kept values\\) must be a multiple of 16"):
        op(x, layout.qweight, layout.scales, layout.offsets, meta, 12, 32)
    with pytest.raises(RuntimeError, match="scales must have shape"):
        op(x, layout.qweight, layout.scales[:1], layout.offsets, meta, 16, 32)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(x, layout.qweight, layout.scales, layout.offsets.float(), meta, 16, 32)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, layout.qweight, layout.scales, layout.offsets, meta, 16, 32, torch.zeros(31, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="splits must be"):
        op(x, layout.qweight, layout.scales, layout.offsets, meta, 16, 32, None, 65)
    misaligned = torch.empty(layout.scales.numel() + 1, dtype=layout.scales.dtype)[1:].view_as(layout.scales)
    misaligned.copy_(layout.scales)
    with pytest.raises(RuntimeError, match="scales must be contiguous and start at a 16-byte aligned address"):
        op(x, layout.qweight, misaligned, layout.offsets, meta, 16, 32)
    with pytest.raises(TypeError, match="mma_layout\\(dtype\\)"):
        weight.mma_layout(torch.float32)
    with pytest.raises(ValueError, match="mma_layout\\(group_size\\)"):
        mma_layout(weight.qweight, weight.scales, weight.offsets, 12, 64, torch.float16)
    with pytest.raises(ValueError, match="mma_layout\\(in_features\\)"):
        mma_layout(weight.qweight, weight.scales, weight.offsets, 16, 48, torch.float16)
    with pytest.raises(RuntimeError, match="sparse24_int4_mm_mma_repack: in_features"):
        torch.ops.turbokernels_C.sparse24_int4_mm_mma_repack(weight.qweight, 48)
    assert op(x[:0], layout.qweight, layout.scales, layout.offsets, meta, 16, 32).shape == (0, 32)  # M == 0: no launch


def test_backend_is_forced_only_and_declines_what_it_cannot_run():
    from turbokernels import backends
    impl = backends.registered("sparse24_int4_mm")["cuda"]
    assert impl.auto == backends.VERIFIED  # not automatic until the acceptance table lists a GPU run
    weight = weight_for(32, 64, 32, False, torch.float16, "half")
    x = torch.randn(2, 64).to(torch.float16)
    reason = impl.check(x, weight.qweight, weight.scales, weight.offsets, weight.meta, 16)
    assert reason is not None and "cuda" in reason  # CPU tensors
    from turbokernels.cli import CUDA_KERNELS
    assert CUDA_KERNELS["sparse24_int4_mm"] == "sparse24_int4_mm_mma"


def test_backend_declines_k_and_group_sizes_it_cannot_run(monkeypatch):
    """With the extension check passed (pretend CUDA): K % 32 and kept group sizes that are neither multiples of 16
    nor one group are declined with a reason; fp32 x too."""
    from turbokernels.ops import sparse24_int4_mm as mod
    monkeypatch.setattr(mod, "_cuda_ext", lambda x: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q, s, o = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1), torch.zeros(1, 1)
    meta = torch.zeros(1, 1, dtype=torch.int16)
    x = torch.zeros(1, 48, dtype=torch.float16)
    assert "multiple of 32" in mod._check_cuda(x, q, s, o, meta, 24)
    x = torch.zeros(1, 64, dtype=torch.float16)
    assert "neither a multiple of 16" in mod._check_cuda(x, q, s, o, meta, 12)
    assert mod._check_cuda(x, q, s, o, meta, 16) is None
    assert mod._check_cuda(x, q, s, o, meta, 32) is None  # one group over K/2
    assert "float16 or bfloat16" in mod._check_cuda(x.float(), q, s, o, meta, 16)


# ---- on a GPU ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 7, 16, 17, 300])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_gpu_forced_backend_matches_golden(dtype, M, group_size):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs sm_80+")
    torch.manual_seed(M)
    K, N = 4096, 1536
    weight = tk.Sparse24Int4Weight.from_dense(make_sparse(N, K, "cuda"), group_size=group_size)
    x = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    with tk.backend("cuda"):
        out = tk.sparse24_int4_linear(x, weight, bias)
    g, baseline, w64 = golden(x, weight, bias)
    allowance = matmul_allowance(x, w64.t(), bias=bias, operand_dtype=operand_dtype("cuda", x.dtype),
                                 dequant_magnitudes=int4_dequant_magnitudes(weight, "cuda"))
    assert_close(out, g, baseline, allowance=allowance, what=f"cuda {dtype} M={M} g={group_size}")


@pytest.mark.gpu
def test_gpu_split_k_and_cuda_graph_replay():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs sm_80+")
    torch.manual_seed(1)
    K, N = 2048, 512
    weight = weight_for(N, K, 128, False, torch.float16, "float", device="cuda")
    x = torch.randn(4, K, device="cuda", dtype=torch.float16)
    for splits in (1, 3, 0):
        check(x, weight, splits=splits, what=f"gpu splits={splits}")
    with tk.backend("cuda"):
        out = tk.sparse24_int4_linear(x, weight)
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        tk.sparse24_int4_linear(static_x, weight)  # warm-up: repack outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            static_out = tk.sparse24_int4_linear(static_x, weight)
        graph.replay()
        first = static_out.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(first, static_out) and torch.equal(first, out)
