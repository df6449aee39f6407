"""The CPU emulator the CUDA C++ kernels are tested on (csrc/emu/): its fragment tables against the PTX ISA, a plain
GEMM through its ldmatrix + mma, and the errors it must report (a test of the tests: each planted bug fails)."""
import pytest
import torch

from turbokernels import _ext

# every build of _C holds the emulator (csrc/emu/ is plain C++): without _C there is nothing to test
pytestmark = pytest.mark.skipif(not _ext.available(), reason="turbokernels._C is not built")


def ops():
    return torch.ops.turbokernels_C


def isa_tables():
    """The PTX ISA's fragment formulas ("Warp-level matrix fragments", mma.m16n8k16 / m16n8k32 and ldmatrix),
    written out again here, independently of csrc/emu/ptx_fragments.h: (kind, lane, element) -> (row, col)."""
    expected = {}
    for lane in range(32):
        group, tig = lane // 4, lane % 4  # groupID, threadID_in_group
        for i in range(8):
            # A: "row = groupID for a0, a1, a4, a5; groupID + 8 for a2, a3, a6, a7";
            #    "col = threadID_in_group * 2 + (i & 0x1) for ai where i < 4; ... + 8 for ai where i >= 4"
            row = group if i in (0, 1, 4, 5) else group + 8
            col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
            expected[(0, lane, i)] = (row, col)
            # B (k32 for the sparse mma; k16 uses b0..b3): "row = threadID_in_group * 2 + (i & 0x1) for bi where
            #    i < 2; + 8 for 2 <= i < 4 ..."; "col = groupID"
            expected[(1, lane, i)] = (tig * 2 + (i & 1) + 8 * (i // 2), group)
        for i in range(4):
            # C/D: "row = groupID for c0, c1; groupID + 8 for c2, c3"; "col = threadID_in_group * 2 + (i & 0x1)"
            expected[(2, lane, i)] = (group if i < 2 else group + 8, tig * 2 + (i & 1))
        for h in range(2):
            # ldmatrix: "each thread receives ... row = laneid / 4, elements 2 * (laneid % 4) and the next"
            expected[(3, lane, h)] = (lane // 4, 2 * (lane % 4) + h)
            # .trans: "the matrix is loaded in column-major format": the stored matrix's column laneid / 4, rows
            # 2 * (laneid % 4) and the next
            expected[(4, lane, h)] = (2 * (lane % 4) + h, lane // 4)
    return expected


def test_fragment_tables_follow_the_isa():
    tables = ops().emu_fragment_tables()
    assert tables.shape == (5, 32, 8, 2)
    expected = isa_tables()
    for (kind, lane, i), coord in expected.items():
        assert tuple(tables[kind, lane, i].tolist()) == coord, (kind, lane, i)
    # unused entries stay -1 (C has 4 elements, ldmatrix 2 per register)
    assert (tables[2, :, 4:] == -1).all() and (tables[3:, :, 2:] == -1).all()
    # hand-read from the ISA's figures: lane 5 (groupID 1, threadID_in_group 1)
    assert tables[0, 5, :, :].tolist() == [[1, 2], [1, 3], [9, 2], [9, 3], [1, 10], [1, 11], [9, 10], [9, 11]]
    assert tables[1, 5, :4, :].tolist() == [[2, 1], [3, 1], [10, 1], [11, 1]]
    assert tables[2, 31, :4, :].tolist() == [[7, 6], [7, 7], [15, 6], [15, 7]]  # lane 31: groupID 7, tig 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_gemm_matches_torch(dtype):
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        a = torch.randn(16, 16, generator=g).to(dtype)
        bt = torch.randn(16, 16, generator=g).to(dtype)
        c = ops().emu_mma_gemm(a, bt)
        golden = a.double() @ bt.double().T
        # 16-bit products are exact in fp32; 16 fp32 additions: at most 16 u32 of the sum of magnitudes
        bound = 16 * 2.0 ** -24 * (a.double().abs() @ bt.double().abs().T)
        assert ((c.double() - golden).abs() <= bound).all()
    # B stored k-major (attention's V) through ldmatrix .trans
    for _ in range(2):
        a = torch.randn(16, 16, generator=g).to(dtype)
        b = torch.randn(16, 16, generator=g).to(dtype)
        c = ops().emu_mma_gemm(a, b, True)
        golden = a.double() @ b.double()
        bound = 16 * 2.0 ** -24 * (a.double().abs() @ b.double().abs())
        assert ((c.double() - golden).abs() <= bound).all()
    # a transposed operand or a swapped fragment would move elements: check a one-hot case exactly
    a = torch.zeros(16, 16, dtype=dtype)
    bt = torch.zeros(16, 16, dtype=dtype)
    a[3, 11] = 2
    bt[13, 11] = 3
    c = ops().emu_mma_gemm(a, bt)
    expected = torch.zeros(16, 16)
    expected[3, 13] = 6
    assert torch.equal(c, expected)
    assert torch.equal(ops().emu_mma_gemm(a, bt.T.contiguous(), True), expected)


def test_planted_bugs_are_reported():
    assert ops().emu_planted_bug("none").tolist() == [20.0, 21.0, 22.0, 23.0]
    # a read of shared memory before cp.async.wait_group sees the poison, not the data
    assert torch.isnan(ops().emu_planted_bug("missing_wait")).all()
    # ... and so does a read of what another warp copied, without the __syncthreads between
    assert torch.isnan(ops().emu_planted_bug("missing_barrier")).all()
    for bug, message in [("divergent_warp", "warp divergence"), ("out_of_bounds", "outside every buffer"),
                         ("deadlock", "deadlock"), ("misaligned_ldmatrix", "misaligned shared access")]:
        with pytest.raises(RuntimeError, match=message):
            ops().emu_planted_bug(bug)
