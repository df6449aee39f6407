"""int4_mm's CUDA C++ kernel (csrc/cuda/int4_mm.cuh), the "cuda" backend.

Without a GPU: the kernel's own source on the CPU emulator (csrc/emu/: turbokernels_C::int4_mm_mma on CPU tensors,
through ops/int4_mm.py's run_mma and the weight's repack, as the backend calls it) against a float64 golden result,
with the bound of tests/_int4_cases.py for a tensor-core backend (the weight rounded to x's dtype before the dot);
the repacked layout against the PTX ISA's B fragment; the plan's checks. With a GPU (`-m gpu`, bench/gpu_check.sh):
the forced backend on real sizes, CUDA graphs, act-order through Int4Linear.
"""
import pytest
import torch

import turbokernels as tk
from turbokernels import _ext
from turbokernels.formats.int4 import mma_layout, unpack_int4
from turbokernels.ops.int4_mm import mma_layout_of, run_mma
from turbokernels.testing import assert_close, cancelling_bias
from _int4_cases import allowance, golden_and_baseline, make_weight

pytestmark = pytest.mark.skipif(not _ext.available(), reason="turbokernels._C is not built")
DTYPES = [torch.float16, torch.bfloat16]


def weight_for(N, K, group_size, symmetric, dtype, mode):
    """An Int4Weight whose scales/offsets make the kernel dequantize in `mode`: "half" (both exact in x's dtype:
    one fp16/bf16 fma), "zero" (GPTQ-style: scales in x's dtype, offsets -z * scale for integer zero points z, in
    fp32 since x's dtype cannot hold most of them) or "float" (fp32 scales that x's dtype cannot hold: fp32 fma,
    then one rounding)."""
    w = make_weight(N, K, group_size, symmetric, dtype=dtype)
    if mode == "half":
        return tk.Int4Weight(w.qweight, w.scales.to(dtype), w.offsets.to(dtype), group_size, K)
    if mode == "zero":
        scales = w.scales.to(dtype)
        z = torch.randint(0, 16, scales.shape).to(torch.float64)
        offsets = (-z * scales.double()).float()  # exact: 4 x 11 (or 8) bits
        assert torch.equal(offsets.double(), -z * scales.double())
        return tk.Int4Weight(w.qweight, scales, offsets, group_size, K)
    scales = w.scales.float() * (1 + 2.0 ** -14)  # below fp16's and bf16's resolution
    return tk.Int4Weight(w.qweight, scales, w.offsets.float(), group_size, K)


def check(x, weight, bias=None, splits=0, what=""):
    out = run_mma(x, weight.qweight, weight.scales, weight.offsets, weight.effective_group_size, bias, splits=splits)
    golden, baseline = golden_and_baseline(x, weight, bias)
    assert out.dtype == x.dtype and out.shape == golden.shape
    assert_close(out, golden, baseline, allowance=allowance(x, weight, "cuda", bias), what=what)
    return out


# (M, K, N, group_size): odd sizes, K not a multiple of 8 or 16 (x padded), short last groups, per-channel, one
# group wider than K, SmolLM2's K = 576, both tiles (M <= 16: 16 x 128; else 64 x 128), N not a multiple of 16
SHAPES = [
    (1, 64, 1, 32),
    (1, 576, 97, 128),
    (3, 113, 40, 32),
    (16, 200, 64, -1),
    (17, 256, 113, 64),
    (33, 97, 17, 256),
    (70, 320, 130, 128),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,group_size", SHAPES)
@pytest.mark.parametrize("mode", ["half", "zero", "float"])
def test_emulated_kernel_matches_golden(dtype, M, K, N, group_size, mode):
    torch.manual_seed(M * 1000 + K + N)
    weight = weight_for(N, K, group_size, symmetric=(M % 2 == 1), dtype=dtype, mode=mode)
    layout = weight.mma_layout(dtype)
    assert layout.scales.dtype == (torch.float32 if mode == "float" else dtype)
    assert layout.zero_points == (mode == "zero")
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if K % 2 else None
    check(x, weight, bias, what=f"emulated {dtype} {mode} M={M} K={K} N={N} g={group_size}")


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
        again = run_mma(x, weight.qweight, weight.scales, weight.offsets, 64, bias, splits=splits)
        assert torch.equal(first, again)
    # automatic: one output tile, 16 k tiles on an H100's 132 SMs -> 4 parts; the result must not care
    auto = run_mma(x, weight.qweight, weight.scales, weight.offsets, 64, bias, splits=0, sms=132)
    golden, baseline = golden_and_baseline(x, weight, bias)
    assert_close(auto, golden, baseline, allowance=allowance(x, weight, "cuda", bias), what="auto split")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_is_added_before_the_one_rounding(dtype):
    torch.manual_seed(3)
    M, K, N = 2, 256, 48
    weight = weight_for(N, K, 128, False, dtype, "float")
    x = torch.randn(M, K).to(dtype)
    product = x.double() @ weight.dequantize(torch.float64).t()
    bias = cancelling_bias(product[0], dtype)
    for splits in (1, 3):
        check(x, weight, bias, splits=splits, what=f"cancelling bias, splits={splits}")


def test_repacked_nibbles_sit_where_the_isa_b_fragment_wants_them():
    """Independently of csrc/cuda/int4_mm_layout.h: word `lane` of block (kb, nb) must hold, in nibble slot s, the
    weight the mma.m16n8k16 B fragment of that lane needs (PTX ISA: B register r of lane (groupID, tig) holds
    k = 2 tig + 8 r (+1 in the upper half) of column n = groupID), register s % 4 = (n8 tile, B register), half
    s // 4."""
    torch.manual_seed(0)
    K, N = 40, 35  # 3 x 3 blocks, padded
    q = torch.randint(0, 16, (K, N), dtype=torch.int32)
    from turbokernels.formats.int4 import pack_int4
    packed = torch.ops.turbokernels_C.int4_mm_mma_repack(pack_int4(q), K)
    assert packed.shape == (3, 3 * 32) and packed.dtype == torch.int32
    words = packed.view(3, 3, 32).to(torch.int64) & 0xFFFFFFFF
    for kb in range(3):
        for nb in range(3):
            for lane in range(32):
                group, tig = lane // 4, lane % 4
                for slot in range(8):
                    reg, upper = slot % 4, slot // 4
                    tile, b_reg = reg // 2, reg % 2
                    k = kb * 16 + 2 * tig + 8 * b_reg + upper
                    n = nb * 16 + tile * 8 + group
                    expected = int(q[k, n]) if k < K and n < N else 0  # padding is zero
                    got = (int(words[kb, nb, lane]) >> (4 * slot)) & 0xF
                    assert got == expected, (kb, nb, lane, slot)


def test_layout_modes():
    """Which dequantization each kind of weight gets: our quantizer's (offsets = the group minimum in the weight's
    dtype, or -8 s) and exact ones: half; GPTQ/AWQ integer zero points whose offsets x's dtype cannot hold: zero;
    anything else (inexact fp32 offsets, a zero point too far out for M + z to be exact): float."""
    half = make_weight(48, 64, 32, False, dtype=torch.float16)
    assert half.offsets.dtype == torch.float16 and not half.mma_layout(torch.float16).zero_points
    zero = weight_for(48, 64, 32, False, torch.float16, "zero")
    layout = zero.mma_layout(torch.float16)
    assert layout.zero_points and layout.scales.dtype == torch.float16
    z = -(zero.offsets.double() / zero.scales.double())
    assert torch.equal(layout.offsets[:, :48].double(), -(1024 + z))  # -(M + z), exact
    # bf16 activations: the scales are fp16 values bf16 cannot hold -> float
    assert zero.mma_layout(torch.bfloat16).scales.dtype == torch.float32
    far = tk.Int4Weight(zero.qweight, zero.scales, (-300 * zero.scales.double()).float(), 32, 64)
    assert not far.mma_layout(torch.bfloat16).zero_points  # 128 + 300 is not exact in bf16
    inexact = tk.Int4Weight(zero.qweight, zero.scales, zero.offsets + 1e-3, 32, 64)
    assert inexact.mma_layout(torch.float16).scales.dtype == torch.float32


def test_layout_is_cached_per_weight_and_dtype_and_follows_in_place_changes():
    weight = make_weight(32, 64, 32, False)
    args = (weight.qweight, weight.scales, weight.offsets, 32, 64)
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
    d = mma_layout_of(weight.qweight, scales, weight.offsets, 32, 64, torch.float16)
    assert d is not c and mma_layout_of(weight.qweight, scales, weight.offsets, 32, 64, torch.float16) is d
    # nothing rides on the tensor (a saved state dict stays as it was), and the entry goes with the tensor
    import io
    import gc
    from turbokernels.ops import int4_mm as module
    assert not weight.qweight.__dict__
    buffer = io.BytesIO()
    torch.save(weight.qweight, buffer)
    assert buffer.tell() < weight.qweight.numel() * 4 + 2048
    ident = id(weight.qweight)
    del weight, args, a, b, c, d, scales
    gc.collect()
    assert ident not in module._MMA_LAYOUTS


def test_plan_rejects_bad_arguments():
    weight = make_weight(32, 64, 32, False)
    layout = weight.mma_layout(torch.float16)
    x = torch.randn(2, 64).to(torch.float16)
    op = torch.ops.turbokernels_C.int4_mm_mma
    with pytest.raises(RuntimeError, match="x must be float16 or bfloat16"):
        op(x.float(), *layout[:3], 32, 32)
    with pytest.raises(RuntimeError, match="qweight must have shape"):
        op(x, layout.qweight[:, :32], layout.scales, layout.offsets, 32, 32)
    with pytest.raises(RuntimeError, match="group_size must be a multiple of 16"):
        op(x, *layout[:3], 24, 32)
    with pytest.raises(RuntimeError, match="scales must have shape"):
        op(x, layout.qweight, layout.scales[:1], layout.offsets, 32, 32)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(x, layout.qweight, layout.scales, layout.offsets.float(), 32, 32)
    with pytest.raises(RuntimeError, match="zero_points=True takes scales and offsets"):
        op(x, layout.qweight, layout.scales.float(), layout.offsets.float(), 32, 32, None, 0, 0, True)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, *layout[:3], 32, 32, torch.zeros(31, dtype=torch.float16))
    misaligned = torch.empty(layout.scales.numel() + 1, dtype=layout.scales.dtype)[1:].view_as(layout.scales)
    misaligned.copy_(layout.scales)
    with pytest.raises(RuntimeError, match="scales must start at a 16-byte aligned address"):
        op(x, layout.qweight, misaligned, layout.offsets, 32, 32)
    with pytest.raises(TypeError, match="mma_layout\\(dtype\\)"):
        weight.mma_layout(torch.float32)
    with pytest.raises(ValueError, match="mma_layout\\(group_size\\)"):
        mma_layout(weight.qweight, weight.scales, weight.offsets, 24, 64, torch.float16)


def test_backend_is_forced_only_and_declines_what_it_cannot_run():
    from turbokernels import backends
    impl = backends.registered("int4_mm")["cuda"]
    assert impl.auto is not True  # not automatic until the acceptance table lists a GPU run
    x = torch.randn(2, 64).to(torch.float16)
    weight = make_weight(32, 64, 32, False)
    reason = impl.check(x, weight.qweight, weight.scales, weight.offsets, 32)
    assert reason is not None and "cuda" in reason  # CPU tensors


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
    weight = make_weight(N, K, group_size, False, dtype=dtype).to("cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    with tk.backend("cuda"):
        out = tk.int4_linear(x, weight, bias)
    golden, baseline = golden_and_baseline(x, weight, bias)
    assert_close(out, golden, baseline, allowance=allowance(x, weight, "cuda", bias),
                 what=f"cuda {dtype} M={M} g={group_size}")


@pytest.mark.gpu
def test_gpu_act_order_linear_and_cuda_graph():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs sm_80+")
    torch.manual_seed(1)
    K, N = 1024, 512
    w = torch.randn(N, K)
    perm = torch.randperm(K)
    weight = tk.Int4Weight.from_float(w[:, perm], group_size=128)
    # row k of qweight holds input feature perm[k] (act-order)
    weight = tk.Int4Weight(weight.qweight, weight.scales, weight.offsets, 128, K, perm=perm).to("cuda")
    x = torch.randn(4, K, device="cuda", dtype=torch.float16)
    with tk.backend("cuda"):
        out = tk.int4_linear(x, weight)
        golden, baseline = golden_and_baseline(x, weight)
        assert_close(out, golden, baseline, allowance=allowance(x, weight, "cuda"), what="act-order")
        # split-K counters reset themselves: a captured graph replays to the same bits
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        tk.int4_linear(static_x, weight)  # warm-up: repack outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            static_out = tk.int4_linear(static_x, weight)
        graph.replay()
        first = static_out.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(first, static_out) and torch.equal(first, out)
