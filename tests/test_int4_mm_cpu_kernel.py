"""The C++ CPU kernel of int4_mm (csrc/cpu/int4_mm.cpp), called directly as torch.ops.turbokernels_C.int4_mm.

Golden: float64 x @ the exact dequantized weight (python/turbokernels/reference in float64). The kernel must be within
2x the error of a plain matmul in x's dtype (x @ W.to(x.dtype)) plus one rounding of the summed terms' size
(turbokernels.testing.assert_close), for every SIMD path it has: the best one of this CPU, and the AVX2 and plain C++ ones (TURBOKERNELS_CPU_ISA caps the choice).
With a bias, the bias joins the fp32 sum before the one rounding to x's dtype, on every path (fused and
dequantize + BLAS).
"""
import itertools

import pytest
import torch

import turbokernels as tk
from turbokernels import _ext
from turbokernels.formats.int4 import pack_int4
from turbokernels.reference.int4_mm import dequantize_int4
from turbokernels.testing import (assert_close, cancelling_bias, cpu_isa_caps, int4_dequant_magnitudes,
                                  matmul_allowance, operand_dtype)
from conftest import DEFAULT_THREADS, torch_threads

pytestmark = pytest.mark.skipif(
    not _ext.available() or _ext.missing_op_reason("int4_mm", "cpu") is not None,
    reason=f"turbokernels._C has no CPU int4_mm kernel ({_ext.load_error() or _ext.missing_op_reason('int4_mm', 'cpu')})")

ISAS = cpu_isa_caps()  # a cap above what the CPU has falls back to the best it has


def op(x, qweight, scales, offsets, group_size, bias=None):
    return torch.ops.turbokernels_C.int4_mm(x, qweight, scales, offsets, group_size, bias)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param == "best":
        monkeypatch.delenv("TURBOKERNELS_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("TURBOKERNELS_CPU_ISA", request.param)
    return request.param


def check(x, qweight, scales, offsets, group_size, what="", bias=None):
    """Run the kernel and compare with the float64 golden (the exact q * scale + offset weight, plus the bias) by the
    shared rule."""
    M, K = x.shape
    N = qweight.shape[1]
    out = op(x, qweight, scales, offsets, group_size, bias)
    assert out.shape == (M, N) and out.dtype == x.dtype, what
    if M == 0:
        return
    w64 = dequantize_int4(qweight, scales, offsets, group_size, K, dtype=torch.float64)
    golden = x.double() @ w64
    baseline = x @ dequantize_int4(qweight, scales, offsets, group_size, K).to(x.dtype)
    if bias is not None:
        golden, baseline = golden + bias.double(), baseline + bias
    assert torch.isfinite(out).all(), what
    magnitudes = int4_dequant_magnitudes(tk.Int4Weight._trusted(qweight, scales, offsets, group_size, K), "cpu")
    allowance = matmul_allowance(x, w64, bias=bias, dequant_magnitudes=magnitudes,
                                 operand_dtype=operand_dtype("cpu", x.dtype, "int4_mm"))  # AMX: bf16 x, M >= 12
    assert_close(out, golden, baseline, allowance=allowance,
                 what=f"{what} bias={bias is not None}")


SHAPES = [(8, 1), (17, 97), (113, 40), (576, 64), (256, 4097), (4096, 32)]


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantized_grid(K, N, xdtype):
    """The main grid on this CPU's best path: every M class, group size kind (a few words, 128, per-channel, one
    ending mid-word) and scale dtype. (64 and 256 ran the same paths as 32 and 128: cut for the suite's time.)"""
    w = torch.randn(N, K)
    for gs, sdtype, symmetric in itertools.product([32, 128, K, 100], [torch.float16, torch.float32],
                                                   [False, True]):
        if symmetric and sdtype == torch.float32 and gs not in (128, K):
            continue  # keep it quick: symmetric mostly matters for the offset term, covered by the others
        qw = tk.quantize_int4(w.to(sdtype), group_size=gs, symmetric=symmetric)
        offsets = qw.offsets.float()  # fp32 offsets, as real checkpoints with non-exact zero points
        # every M class on the small shapes; on the 4097-wide one (a float64 golden of 4097 x 256 per case) the
        # decode and GEMM paths only
        # (M = 0; 1 and 3: the streaming decode path; 17: the block path's full 4-row tiles and a remainder; 64)
        for M in ([0, 1, 3, 17, 64] if N < 4097 else [1, 17]):
            x = torch.randn(M, K).to(xdtype)
            bias = torch.randn(N).to(xdtype) if M % 2 else None
            check(x, qw.qweight, qw.scales, offsets, qw.effective_group_size,
                  f"M={M} K={K} N={N} gs={gs} x={xdtype} s={sdtype} sym={symmetric}", bias)


def random_weight(K, N, G, sdtype, odtype, garbage_padding=False):
    q = torch.randint(0, 16, (K, N), dtype=torch.int32)
    qweight = pack_int4(q)
    if garbage_padding and K % 8:  # nibbles of rows >= K must never be read as weights
        pad = torch.randint(0, 16, (8 - K % 8, N), dtype=torch.int64)
        shifts = (torch.arange(K % 8, 8) * 4).view(-1, 1)
        extra = ((pad << shifts).sum(0))
        last = qweight[-1].to(torch.int64) | extra
        qweight[-1] = torch.where(last >= 2**31, last - 2**32, last).to(torch.int32)
    scales = (torch.rand(G, N) * 0.1 + 0.01).to(sdtype)
    offsets = (torch.randn(G, N) * 0.5).to(odtype)
    return qweight, scales, offsets


@pytest.mark.parametrize("K,N", [(17, 97), (113, 40), (576, 64), (256, 130), (40, 33)])
def test_every_simd_path(isa, K, N):
    """Each SIMD path (and its dequantize + BLAS path for larger M) on random weights, incl. odd group sizes; every
    other case with a bias."""
    for i, (gs, M, (xdtype, sdtype, odtype)) in enumerate(itertools.product(
            [1, 3, 8, 32, 100, K], [1, 2, 3, 5, 9, 17, 130],
            [(torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.float16, torch.float32),
             (torch.float16, torch.bfloat16, torch.float16)])):
        if gs < 8 and M > 5:
            continue
        G = -(-K // gs)
        qweight, scales, offsets = random_weight(K, N, G, sdtype, odtype, garbage_padding=True)
        x = torch.randn(M, K).to(xdtype)
        bias = torch.randn(N).to(xdtype) if i % 2 else None
        check(x, qweight, scales, offsets, gs, f"isa={isa} M={M} K={K} N={N} gs={gs} {xdtype}/{sdtype}/{odtype}",
              bias)


def test_large_m_panels(isa):
    """More rows than one work panel (256), fused or dequantize + BLAS (or AMX tiles) depending on the path."""
    K, N, gs = 200, 70, 64
    qweight, scales, offsets = random_weight(K, N, -(-K // gs), torch.float16, torch.float32)
    x = torch.randn(300, K)
    check(x, qweight, scales, offsets, gs, f"isa={isa}")
    check(x, qweight, scales, offsets, gs, f"isa={isa}", torch.randn(N))
    xb = x.to(torch.bfloat16)
    check(xb, qweight, scales, offsets, gs, f"isa={isa} bf16", torch.randn(N).to(torch.bfloat16))
    # bf16 x above 512 rows: on an AMX CPU, dequantized chunks through torch's bf16 matmul, the bias inside it
    xb = torch.randn(600, K).to(torch.bfloat16)
    check(xb, qweight, scales, offsets, gs, f"isa={isa} bf16 M=600", torch.randn(N).to(torch.bfloat16))
    check(xb, qweight, scales, offsets, gs, f"isa={isa} bf16 M=600")


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=str)
def test_bias_is_rounded_once(isa, xdtype):
    """A bias that cancels row 0 of the product: one rounding after the bias (in fp32) is within rule (1) of the
    small golden outputs; rounding the product first would not be. M = 1 and 5 (fused), 300 (fused with AVX-512,
    dequantize + BLAS with AVX2 and plain C++)."""
    K, N, gs = 200, 70, 64
    qweight, scales, offsets = random_weight(K, N, -(-K // gs), torch.float16, torch.float32)
    w64 = dequantize_int4(qweight, scales, offsets, gs, K, dtype=torch.float64)
    for M in (1, 5, 300):
        x = torch.randn(M, K).to(xdtype)
        bias = cancelling_bias(x[0].double() @ w64, xdtype)
        check(x, qweight, scales, offsets, gs, f"isa={isa} M={M} {xdtype} cancelling", bias)


@pytest.mark.parametrize("scale", [1e-35, 1e30], ids=["tiny", "huge"])
def test_extreme_activation_magnitudes(isa, scale):
    """Activations far from 1 in magnitude, alone and mixed with ordinary ones, on every path (M = 1, 3: streaming;
    9: fused; 130: dequantize + BLAS on AVX2 and plain C++). The AVX2 streaming kernel reads x 2^-28 against
    nibbles placed at 2^28 (csrc/cpu/int4_mm.cpp, avx2::Vec::stream_nibble): below 2^-98 that scaling would lose
    bits (x 1e-35 becomes a subnormal with ~1 significant bit), so such calls must take the block path; at 1e30
    nothing may overflow."""
    K, N, gs = 200, 70, 64
    qweight, scales, offsets = random_weight(K, N, -(-K // gs), torch.float32, torch.float32)
    for M in (1, 3, 9, 130):
        x = torch.randn(M, K) * scale
        check(x, qweight, scales, offsets, gs, f"isa={isa} M={M} |x|~{scale:g}")
        x[:, ::7] = torch.randn(M, (K + 6) // 7)  # mixed with ordinary values, as a real row would be
        check(x, qweight, scales, offsets, gs, f"isa={isa} M={M} |x|~{scale:g} mixed")


def test_decode_layer_shape():
    """The benchmark shape at decode: 4096x4096, g128, bf16 activations, fp16 scales."""
    w = torch.randn(4096, 4096, dtype=torch.float16)
    qw = tk.quantize_int4(w, group_size=128)
    for M in (1, 4):
        check(torch.randn(M, 4096, dtype=torch.bfloat16), qw.qweight, qw.scales, qw.offsets, 128, f"M={M}")


def test_non_contiguous_x_and_empty():
    K, N, gs = 96, 50, 32
    qweight, scales, offsets = random_weight(K, N, 3, torch.float32, torch.float32)
    xt = torch.randn(K, 5).t()  # (5, K), strides (1, 5)
    check(xt, qweight, scales, offsets, gs, "transposed x")
    xs = torch.randn(4, 2 * K, dtype=torch.bfloat16)[:, ::2]  # (4, K), stride 2 along K
    check(xs, qweight, scales, offsets, gs, "strided x")
    out = op(torch.empty(0, K, dtype=torch.float16), qweight, scales, offsets, gs)
    assert out.shape == (0, N) and out.dtype == torch.float16
    bias = torch.randn(2 * N)[::2]  # a strided bias
    check(xt, qweight, scales, offsets, gs, "transposed x, strided bias", bias)
    out = op(torch.empty(0, K), qweight, scales, offsets, gs, bias)
    assert out.shape == (0, N)


def test_k_zero_is_the_bias():
    """K = 0: the product is empty, the output is the bias (a new tensor, never the caller's), or zeros."""
    qweight = torch.zeros(0, 6, dtype=torch.int32)
    scales = offsets = torch.ones(1, 6)
    bias = torch.randn(6)
    out = op(torch.empty(1, 0), qweight, scales, offsets, 32, bias)
    assert torch.equal(out, bias.view(1, 6)) and out.data_ptr() != bias.data_ptr()
    assert torch.equal(op(torch.empty(2, 0), qweight, scales, offsets, 32), torch.zeros(2, 6))


def test_thread_count_does_not_change_the_result():
    """Columns are independent: 1 thread and all threads (torch's default, at least 2) give bit-identical outputs."""
    K, N, gs = 512, 1000, 128
    qweight, scales, offsets = random_weight(K, N, 4, torch.bfloat16, torch.float32)
    x = torch.randn(3, K)
    with torch_threads(1):
        one = op(x, qweight, scales, offsets, gs)
    with torch_threads(max(2, DEFAULT_THREADS)):  # under pytest-xdist this process may be at 1
        assert torch.equal(one, op(x, qweight, scales, offsets, gs))


def test_bad_arguments_name_the_argument():
    K, N, gs = 64, 16, 32
    qweight, scales, offsets = random_weight(K, N, 2, torch.float32, torch.float32)
    x = torch.randn(2, K)
    with pytest.raises(RuntimeError, match="qweight"):
        op(x, qweight[:-1], scales, offsets, gs)
    with pytest.raises(RuntimeError, match="qweight"):
        op(x, qweight.float(), scales, offsets, gs)
    with pytest.raises(RuntimeError, match="scales"):
        op(x, qweight, scales[:1], offsets, gs)
    with pytest.raises(RuntimeError, match="offsets"):
        op(x, qweight, scales, offsets.double(), gs)
    with pytest.raises(RuntimeError, match="x"):
        op(x.to(torch.int32), qweight, scales, offsets, gs)
    with pytest.raises(RuntimeError, match="group_size"):
        op(x, qweight, scales, offsets, 0)
    with pytest.raises(RuntimeError, match=r"int4_mm\(bias\): expected a 1-D tensor of N = 16"):
        op(x, qweight, scales, offsets, gs, torch.randn(15))
    with pytest.raises(RuntimeError, match=r"int4_mm\(bias\): expected a 1-D"):
        op(x, qweight, scales, offsets, gs, torch.randn(1, 16))
    with pytest.raises(RuntimeError, match=r"int4_mm\(bias\): dtype"):
        op(x, qweight, scales, offsets, gs, torch.randn(16, dtype=torch.float16))
