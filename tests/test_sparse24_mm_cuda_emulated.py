"""sparse24_mm's CUDA C++ kernels (csrc/cuda/sparse24_mm.cuh) without a GPU: the kernels' own source on the CPU
emulator (csrc/emu/: turbokernels_C::sparse24_mm_emulated, both launches of the CUDA launcher's plan, thread by
thread) against a float64 golden result with the derived bound of a tensor-core backend; and the emulated
mma.sp::ordered_metadata m16n8k32 itself against the PTX ISA: its fragment and metadata tables against the ISA's
formulas written out again here, and one instruction on registers built here from a 16 x 32 2:4 tile, against torch.
The GPU run of the same kernels is tests/test_sparse24_mm_cuda_sass.py's `-m gpu` test."""
import random

import pytest
import torch

import turbokernels as tk
from turbokernels import _ext
from turbokernels.testing import assert_close, cancelling_bias, matmul_allowance, operand_dtype

pytestmark = pytest.mark.skipif(not _ext.available(), reason="turbokernels._C is not built")
DTYPES = [torch.float16, torch.bfloat16]
U32 = 2.0 ** -24


def ops():
    return torch.ops.turbokernels_C


def make_sparse(N, K, dtype):
    """A 2:4 weight with all-zero groups and single-nonzero groups at every position (the odd metadata encodings:
    (2, 3), (0, 2), (1, 2) for {}, {0}, {1}), the rest pruned by magnitude."""
    w = tk.prune_24(torch.randn(N, K)).to(dtype)
    groups = w.view(N, K // 4, 4)
    groups[:, 0] = 0
    for p in range(min(4, K // 4 - 1)):
        groups[:, p + 1] = 0
        groups[:, p + 1, p] = torch.randn(N).to(dtype)
    return w


def run(x, w, bias=None, splits=0, sms=0):
    weight = tk.Sparse24Weight.from_dense(w)
    return ops().sparse24_mm_emulated(x, weight.values, weight.meta, bias, splits, sms)


def check(out, x, w, bias, what):
    golden = x.double() @ w.double().t()
    if bias is not None:
        golden = golden + bias.double()
    baseline = torch.nn.functional.linear(x, w, bias)
    assert out.dtype == x.dtype and out.shape == golden.shape
    allowance = matmul_allowance(x, w.t(), bias=bias, operand_dtype=operand_dtype("cuda", x.dtype))
    assert_close(out, golden, baseline, allowance=allowance, what=what)


# ---- the kernels ------------------------------------------------------------------------------------------------
# M: 1 and 16 (the 128 x 16 tile), 17 and 97 (64 x 64, a partial tile); N: 1, 17, 113 (partial tiles, clamped rows),
# 128 (whole 64- and 128-row tiles); K: 32 (one k tile of 32: its second k32 step skipped), 96 and 160 (a last k
# tile of 32 after whole ones), 256 (whole tiles). Each (M, N) takes one K in turn; every case runs 1, 2 and 3
# split-K parts (at most one per k tile: K = 32 and 96 clamp), the second launch (the reduction) included.
MS = [1, 16, 17, 97]
NS = [1, 17, 113, 128]
KS = [32, 96, 160, 256]
CASES = [(M, N, KS[(i + j) % 4]) for i, M in enumerate(MS) for j, N in enumerate(NS)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", CASES)
def test_emulated_kernel_matches_golden(dtype, M, N, K):
    torch.manual_seed(M * 10000 + N * 100 + K)
    w = make_sparse(N, K, dtype)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if (M + N + K) % 2 else None
    for splits in (1, 2, 3):
        out = run(x, w, bias, splits=splits)
        check(out, x, w, bias, f"emulated {dtype} M={M} N={N} K={K} splits={splits} bias={bias is not None}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 33])
def test_bias_is_rounded_once(dtype, M):
    """A bias that cancels row 0 of the product: rounding the product before adding it would be off by up to half an
    ulp of the product; the kernel (M = 33, splits 1) and the split-K reduction (M = 1, 3 parts) add it in fp32."""
    torch.manual_seed(M)
    N, K = 72, 256
    w = make_sparse(N, K, dtype)
    x = torch.randn(M, K).to(dtype)
    bias = cancelling_bias(x[0].double() @ w.double().t(), dtype)
    out = run(x, w, bias, splits=3 if M == 1 else 1)
    check(out, x, w, bias, f"{dtype} M={M} cancelling bias")


def test_automatic_split_k_and_determinism():
    """splits=0: the CUDA launcher's choice (one output tile on 132 SMs, 16 k tiles: 4 parts; on 1 SM: 1); every
    part count within the bound, the same bits on every run (the reduction sums the parts in order)."""
    torch.manual_seed(5)
    M, N, K = 3, 40, 1024
    w = make_sparse(N, K, torch.float16)
    x = torch.randn(M, K).to(torch.float16)
    bias = torch.randn(N).to(torch.float16)
    for splits, sms in ((0, 132), (0, 1), (5, 0), (64, 0)):
        out = run(x, w, bias, splits=splits, sms=sms)
        check(out, x, w, bias, f"splits={splits} sms={sms}")
        assert torch.equal(out, run(x, w, bias, splits=splits, sms=sms))


def test_unaligned_and_strided_inputs():
    """x a view starting 2 bytes into its storage, values and meta non-contiguous views: the plan's aligned copies."""
    torch.manual_seed(7)
    M, N, K = 5, 24, 96
    w = make_sparse(N, K, torch.bfloat16)
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(M, K + 1).to(torch.bfloat16)[:, 1:]
    values = torch.cat([weight.values, weight.values], dim=1)[:, : K // 2]
    meta = torch.cat([weight.meta, weight.meta], dim=1)[:, : K // 16]
    assert not values.is_contiguous() and x.data_ptr() % 16 != 0
    out = ops().sparse24_mm_emulated(x, values, meta)
    check(out, x, w, None, "unaligned")


def test_corrupt_metadata_reaches_the_instruction():
    """The kernel feeds meta to mma.sp as it is (Sparse24Weight validates it, the op does not): a group encoding
    (0, 0) is undefined for ::ordered_metadata, and the emulator names the instruction, lane and row."""
    w = make_sparse(40, 64, torch.float16)
    weight = tk.Sparse24Weight.from_dense(w)
    meta = weight.meta.clone()
    meta[21, 3] = 0  # row 21: the second m16 tile's row 5 (lane 20 + t); k 48..63: the second k32 step, T1
    with pytest.raises(RuntimeError, match="ordered_metadata: lane 21 supplies metadata 0x0 .* row 5, columns 16"):
        ops().sparse24_mm_emulated(torch.randn(3, 64).half(), weight.values, meta)


def test_empty_and_k_zero():
    x = torch.randn(0, 64).half()
    w = make_sparse(8, 64, torch.float16)
    assert run(x, w).shape == (0, 8)
    values, meta = torch.zeros(3, 0, dtype=torch.half), torch.zeros(3, 0, dtype=torch.int16)
    bias = torch.randn(3).half()
    assert torch.equal(ops().sparse24_mm_emulated(torch.randn(2, 0).half(), values, meta, bias), bias.expand(2, 3))
    assert torch.equal(ops().sparse24_mm_emulated(torch.randn(2, 0).half(), values, meta), torch.zeros(2, 3).half())


def test_plan_checks():
    w = make_sparse(8, 48, torch.float16)
    weight = tk.Sparse24Weight.from_dense(w)
    with pytest.raises(RuntimeError, match=r"x.shape\[1\] \(in_features K\) must be a multiple of 32"):
        ops().sparse24_mm_emulated(torch.randn(2, 48).half(), weight.values, weight.meta)
    w = make_sparse(8, 64, torch.float16)
    weight = tk.Sparse24Weight.from_dense(w)
    with pytest.raises(RuntimeError, match="x must be float16 or bfloat16"):
        ops().sparse24_mm_emulated(torch.randn(2, 64), weight.values, weight.meta)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(N,\)"):
        ops().sparse24_mm_emulated(torch.randn(2, 64).half(), weight.values, weight.meta, torch.zeros(7).half())
    with pytest.raises(RuntimeError, match="splits must be"):
        ops().sparse24_mm_emulated(torch.randn(2, 64).half(), weight.values, weight.meta, None, 65)


# ---- the emulated instruction against the PTX ISA ---------------------------------------------------------------
def isa_sparse_tables():
    """The PTX ISA's sparse m16n8k32 .f16/.bf16 formulas (9.7.14.6.2.2 "Matrix Fragments for sparse mma.m16n8k32
    with .f16 and .bf16 types", 9.7.14.6.1 "Sparse matrix storage"), written out again here, independently of
    csrc/emu/ptx_fragments.h: (kind, lane, element) -> (row, first column of the 4-wide chunk)."""
    expected = {}
    for lane in range(32):
        group, tig = lane // 4, lane % 4  # groupID, threadID_in_group
        for i in range(8):
            # A: "row = groupID for ai where 0 <= i < 2 || 4 <= i < 6; groupID + 8 Otherwise";
            #    "firstcol = threadID_in_group * 4 for ai where i < 4; (threadID_in_group * 4) + 16 for ai where i >= 4"
            row = group if (0 <= i < 2 or 4 <= i < 6) else group + 8
            expected[(0, lane, i)] = (row, tig * 4 + (16 if i >= 4 else 0))
            # metadata, selector 0 ("threads T0, T1"): Figure 122, thread T0 of a quad: bits [15..0] = row groupID,
            # columns 0..15; bits [31..16] = row groupID + 8, columns 0..15; T1 the same for columns 16..31; 4 bits
            # per 4-wide chunk, the chunks in column order from the low bits
            if tig < 2:
                expected[(1, lane, i)] = (group + (8 if i >= 4 else 0), 16 * tig + 4 * (i % 4))
            else:
                expected[(1, lane, i)] = (-1, -1)
    return expected


def test_sparse_fragment_tables_follow_the_isa():
    tables = ops().emu_sparse_fragment_tables()
    assert tables.shape == (2, 32, 8, 2)
    for (kind, lane, i), coord in isa_sparse_tables().items():
        assert tuple(tables[kind, lane, i].tolist()) == coord, (kind, lane, i)
    # hand-read: lane 5 (groupID 1, threadID_in_group 1) holds A rows 1 / 9, chunks at columns 4 and 20, and the
    # metadata of columns 16..31 of rows 1 (bits 0..15) and 9 (bits 16..31)
    assert tables[0, 5].tolist() == [[1, 4], [1, 4], [9, 4], [9, 4], [1, 20], [1, 20], [9, 20], [9, 20]]
    assert tables[1, 5].tolist() == [[1, 16], [1, 20], [1, 24], [1, 28], [9, 16], [9, 20], [9, 24], [9, 28]]


def bits16(t, dtype):
    return t.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def pack(lo, hi):
    """Two 16-bit patterns -> the int32 register (lo in the lower half, as PTX holds a pair)."""
    word = lo | (hi << 16)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def isa_registers(a_dense, b, c, dtype, garbage_meta_in_t23=True):
    """Per-lane registers of mma.sp m16n8k32 (selector 0) for A (16 x 32, 2:4), B (32 x 8), C (16 x 8), built from
    the ISA's formulas (isa_sparse_tables and the dense mma's B and C/D fragments). The nonzero positions of a chunk
    with fewer than 2 nonzeros are completed with the lowest unused columns (any increasing pair is valid)."""
    idx = torch.zeros(16, 8, 2, dtype=torch.int64)
    kept = torch.zeros(16, 8, 2, dtype=dtype)
    for r in range(16):
        for j in range(8):
            nz = [q for q in range(4) if a_dense[r, 4 * j + q] != 0]
            pos = sorted((nz + [q for q in range(4) if q not in nz])[:2])
            idx[r, j] = torch.tensor(pos)
            kept[r, j] = a_dense[r, 4 * j + torch.tensor(pos)]
    tables = isa_sparse_tables()
    a = torch.zeros(32, 4, dtype=torch.int32)
    e = torch.zeros(32, dtype=torch.int64)
    rng = random.Random(3)
    for lane in range(32):
        group, tig = lane // 4, lane % 4
        halves = []
        for i in range(8):
            row, col = tables[(0, lane, i)]
            halves.append(bits16(kept[row, col // 4, i & 1].reshape(1), dtype))
        for reg in range(4):
            a[lane, reg] = pack(halves[2 * reg], halves[2 * reg + 1])[0]
        word = 0
        for f in range(8):
            row, col = tables[(1, lane, f)]
            if row >= 0:
                nibble = int(idx[row, col // 4, 0]) | (int(idx[row, col // 4, 1]) << 2)
            else:  # threads T2, T3: ignored under selector 0; an invalid pattern shows that
                nibble = rng.choice([0x0, 0x5, 0xF, 0x1]) if garbage_meta_in_t23 else 0x4
            word |= nibble << (4 * f)
        e[lane] = word
    bk = torch.zeros(32, 4, dtype=torch.int32)
    cc = torch.zeros(32, 4, dtype=torch.float32)
    for lane in range(32):
        group, tig = lane // 4, lane % 4
        for reg in range(4):  # b_i: "row = threadID_in_group * 2 + (i & 0x1) (+ 8 per register)", col = groupID
            k = tig * 2 + 8 * reg
            bk[lane, reg] = pack(bits16(b[k, group].reshape(1), dtype), bits16(b[k + 1, group].reshape(1), dtype))[0]
        for i in range(4):  # c_i: row groupID (+ 8 for c2, c3), col threadID_in_group * 2 + (i & 1)
            cc[lane, i] = c[group + 8 * (i // 2), tig * 2 + (i & 1)]
    e = torch.where(e >= 2 ** 31, e - 2 ** 32, e).to(torch.int32)
    return a, bk, e, cc


def d_matrix(d):
    out = torch.zeros(16, 8, dtype=torch.float32)
    for lane in range(32):
        group, tig = lane // 4, lane % 4
        for i in range(4):
            out[group + 8 * (i // 2), tig * 2 + (i & 1)] = d[lane, i]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_mma_sp_matches_torch(dtype):
    g = torch.Generator().manual_seed(17)
    for trial in range(3):
        a = tk.prune_24(torch.randn(16, 32, generator=g)).to(dtype)
        a[0, 0:4] = 0                        # an empty chunk
        a[1, 4:8] = torch.tensor([0, 0, 0, 2.5]).to(dtype)  # one nonzero, in the last column
        b = torch.randn(32, 8, generator=g).to(dtype)
        c = torch.randn(16, 8, generator=g)
        regs = isa_registers(a, b, c, dtype)
        d = d_matrix(ops().emu_mma_sp(*regs, dtype == torch.bfloat16))
        golden = a.double() @ b.double() + c.double()
        # 16-bit products are exact in fp32; 32 fp32 additions onto c
        bound = 33 * U32 * (a.double().abs() @ b.double().abs() + c.double().abs())
        assert ((d.double() - golden).abs() <= bound).all(), f"trial {trial}"
    # a misplaced element, a swapped index pair or a wrong row of metadata moves a product: one-hot, exactly
    for row, col, n in ((3, 29, 6), (12, 6, 1), (8, 17, 0), (15, 31, 7)):
        a = torch.zeros(16, 32, dtype=dtype)
        b = torch.zeros(32, 8, dtype=dtype)
        a[row, col] = 2
        b[col, n] = 3
        d = d_matrix(ops().emu_mma_sp(*isa_registers(a, b, torch.zeros(16, 8), dtype), dtype == torch.bfloat16))
        expected = torch.zeros(16, 8)
        expected[row, n] = 6
        assert torch.equal(d, expected), (row, col, n)


def test_emulated_mma_sp_rejects_unordered_metadata():
    """::ordered_metadata leaves any chunk whose two indices are not increasing undefined; the emulator reports it
    for the supplying threads (T0, T1 of a quad under selector 0) and ignores T2, T3's registers."""
    a = tk.prune_24(torch.randn(16, 32)).half()
    b = torch.randn(32, 8).half()
    regs = isa_registers(a, b, torch.zeros(16, 8), torch.float16, garbage_meta_in_t23=False)
    clean = ops().emu_mma_sp(*regs, False)
    garbage = isa_registers(a, b, torch.zeros(16, 8), torch.float16, garbage_meta_in_t23=True)
    assert torch.equal(ops().emu_mma_sp(*garbage, False), clean)
    for lane, nibble, pattern in ((0, 0, 0x0), (5, 7, 0x5), (29, 3, 0x1), (1, 6, 0xF)):
        a_r, b_r, e, c_r = (t.clone() for t in regs)
        word = int(e[lane]) & 0xFFFFFFFF
        word = (word & ~(0xF << (4 * nibble))) | (pattern << (4 * nibble))
        e[lane] = word - 2 ** 32 if word >= 2 ** 31 else word
        with pytest.raises(RuntimeError, match=f"ordered_metadata: lane {lane} supplies metadata"):
            ops().emu_mma_sp(a_r, b_r, e, c_r, False)
