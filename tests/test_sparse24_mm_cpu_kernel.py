"""The C++ CPU kernel of sparse24_mm (csrc/cpu/sparse24_mm.cpp), called as torch.ops.turbokernels_C.sparse24_mm.

Golden: float64 x @ the exact dense 2:4 weight. The kernel must be within 2x the error of a plain matmul in x's
dtype (x @ W.T) plus one rounding of the summed terms' size (turbokernels.testing.assert_close), for every SIMD path
it has: the best one of this CPU, and the AVX2 and plain C++ ones (TURBOKERNELS_CPU_ISA caps the choice). With a
bias, the fp32 accumulator of every path (gather, row-vectorized, expand + BLAS) starts from it, so the one rounding to
x's dtype comes after it.
"""
import pytest
import torch

import turbokernels as tk
from turbokernels import _ext
from turbokernels.testing import assert_close, cancelling_bias, matmul_allowance
from conftest import DEFAULT_THREADS, torch_threads

pytestmark = pytest.mark.skipif(
    not _ext.available() or _ext.missing_op_reason("sparse24_mm", "cpu") is not None,
    reason=f"turbokernels._C has no CPU sparse24_mm kernel "
           f"({_ext.load_error() or _ext.missing_op_reason('sparse24_mm', 'cpu')})")

ISAS = ["best", "avx2", "scalar"]  # a cap above what the CPU has falls back to the best it has
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K): K = 16 one meta element; 48 a partial AVX-512 block (24 values); 20 a padded meta element and a partial
# AVX2 block; 4104 many blocks, a partial last one and a padded last meta element
SHAPES = [(1, 16), (17, 48), (113, 20), (64, 4104)]
# Paths by M: AVX-512 gather < 16 <= row-vectorized <= 256 < expand + BLAS; AVX2 8 / 64; plain C++ 4 / 8
M_VALUES = [0, 1, 3, 5, 9, 16, 17, 64]


def op(x, values, meta, bias=None):
    return torch.ops.turbokernels_C.sparse24_mm(x, values, meta, bias)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param == "best":
        monkeypatch.delenv("TURBOKERNELS_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("TURBOKERNELS_CPU_ISA", request.param)
    return request.param


def make_sparse(N, K, dtype):
    """A 2:4 weight (N, K) in `dtype` with groups of 0 nonzeros and of 1 nonzero at each of the 4 positions."""
    w = tk.prune_24(torch.randn(N, K)).to(dtype)
    groups = w.view(N, K // 4, 4)
    if K >= 8:
        groups[:, 0] = 0
    for p in range(4):
        if K >= 4 * (p + 2):
            groups[:, p + 1] = 0
            groups[:, p + 1, p] = torch.randn(N).to(dtype)
    return w


def check(x, w, what="", bias=None):
    """Run the kernel on w's compressed form and compare with the float64 golden by the shared rule."""
    weight = tk.Sparse24Weight.from_dense(w)
    out = op(x, weight.values, weight.meta, bias)
    M, N = x.shape[0], w.shape[0]
    assert out.shape == (M, N) and out.dtype == x.dtype, what
    if M == 0:
        return
    assert torch.isfinite(out).all(), what
    golden = x.double() @ w.double().t()
    if bias is not None:
        golden = golden + bias.double()
    assert_close(out, golden, torch.nn.functional.linear(x, w, bias), allowance=matmul_allowance(x, w.t(), bias=bias),
                 what=f"{what} bias={bias is not None}")


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid(isa, N, K, dtype):
    """Every SIMD path x shape x dtype x M class (register tiles of 1..4 rows, ragged last tiles), every other M
    with a bias."""
    w = make_sparse(N, K, dtype)
    for i, M in enumerate(M_VALUES):
        if K > 1000 and M > 17 and isa == "scalar":
            continue  # keep it quick: the scalar expand path is covered by the smaller shapes
        bias = torch.randn(N).to(dtype) if (i + N) % 2 else None
        check(torch.randn(M, K).to(dtype), w, f"isa={isa} M={M} N={N} K={K} {dtype}", bias)


def test_large_m_expand_path(isa):
    """Large M: row-vectorized (AVX-512, M = 130) and expand to dense + BLAS (M = 300), ragged column chunks, with and
    without a bias."""
    w = make_sparse(70, 200, torch.float32)
    x = torch.randn(300, 200)
    check(x, w, f"isa={isa}")
    check(x, w, f"isa={isa}", torch.randn(70))
    wh = make_sparse(33, 52, torch.bfloat16)
    xh = torch.randn(130, 52, dtype=torch.bfloat16)
    check(xh, wh, f"isa={isa} bf16")
    check(xh, wh, f"isa={isa} bf16", torch.randn(33, dtype=torch.bfloat16))
    check(torch.randn(300, 52, dtype=torch.bfloat16), wh, f"isa={isa} bf16", torch.randn(33, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bias_is_rounded_once(isa, dtype):
    """A bias that cancels row 0 of the product: one rounding after the bias (in fp32) is within rule (1) of the
    small golden outputs; rounding the product first would not be. Every path: M = 1, 5 (gather), 20, 130
    (row-vectorized or expand + BLAS, by ISA), 300 (expand + BLAS)."""
    w = make_sparse(70, 208, dtype)
    for M in (1, 5, 20, 130, 300):
        x = torch.randn(M, 208).to(dtype)
        bias = cancelling_bias(x[0].double() @ w.double().t(), dtype)
        check(x, w, f"isa={isa} M={M} {dtype} cancelling", bias)


def test_all_zero_and_single_nonzero_groups(isa):
    """Rows that are entirely zero, and every (idx0, idx1) pair with one or two nonzeros."""
    K = 64
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    w = torch.zeros(2 + 4 + len(pairs), K)
    for i in range(4):  # one nonzero at position i of every group
        w[2 + i, i::4] = torch.randn(K // 4)
    for j, (a, b) in enumerate(pairs):
        w[6 + j, a::4] = torch.randn(K // 4)
        w[6 + j, b::4] = torch.randn(K // 4)
    for dtype in DTYPES:
        check(torch.randn(5, K).to(dtype), w.to(dtype), f"isa={isa} {dtype}")


def test_non_contiguous_x_and_empty():
    K, N = 96, 50
    w = make_sparse(N, K, torch.float32)
    check(torch.randn(K, 5).t(), w, "transposed x")  # (5, K), strides (1, 5)
    wb = w.to(torch.bfloat16)
    check(torch.randn(4, 2 * K, dtype=torch.bfloat16)[:, ::2], wb, "strided x")  # stride 2 along K
    check(torch.randn(K, 20).t(), w, "transposed x, strided bias", torch.randn(2 * N)[::2])  # row-vectorized
    weight = tk.Sparse24Weight.from_dense(w.half())
    out = op(torch.empty(0, K, dtype=torch.float16), weight.values, weight.meta)
    assert out.shape == (0, N) and out.dtype == torch.float16
    out = op(torch.empty(0, K, dtype=torch.float16), weight.values, weight.meta, torch.randn(N).half())
    assert out.shape == (0, N)


def test_k_zero_is_the_bias():
    """K = 0: the product is empty, the output is the bias (a new tensor, never the caller's), or zeros."""
    values, meta = torch.zeros(6, 0), torch.zeros(6, 0, dtype=torch.int16)
    bias = torch.randn(6)
    out = op(torch.empty(1, 0), values, meta, bias)
    assert torch.equal(out, bias.view(1, 6)) and out.data_ptr() != bias.data_ptr()
    assert torch.equal(op(torch.empty(2, 0), values, meta), torch.zeros(2, 6))


def test_thread_count_does_not_change_the_result():
    """Rows of W are independent: 1 thread and all threads (torch's default, at least 2) give bit-identical
    outputs."""
    w = make_sparse(1000, 512, torch.float32)
    weight = tk.Sparse24Weight.from_dense(w)
    for M in (3, 20):  # the gather path and the row-vectorized one
        x = torch.randn(M, 512)
        with torch_threads(1):
            one = op(x, weight.values, weight.meta)
        with torch_threads(max(2, DEFAULT_THREADS)):  # under pytest-xdist this process may be at 1
            assert torch.equal(one, op(x, weight.values, weight.meta)), M


def test_through_the_op_dispatches_to_cpu():
    w = make_sparse(40, 64, torch.bfloat16)
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    bias = torch.randn(40, dtype=torch.bfloat16)
    assert tk.backends.select("sparse24_mm", x.view(6, 64), weight.values, weight.meta, bias)[0] == "cpu"
    with tk.backend("cpu"):
        out = tk.sparse24_linear(x, weight, bias)
    assert_close(out.view(6, 40), x.view(6, 64).double() @ w.double().t() + bias.double(),
                 torch.nn.functional.linear(x.view(6, 64), w, bias),
                 allowance=matmul_allowance(x.view(6, 64), w.t(), bias=bias))


def test_bad_arguments_name_the_argument():
    K, N = 64, 16
    weight = tk.Sparse24Weight.from_dense(make_sparse(N, K, torch.float32))
    v, m = weight.values, weight.meta
    x = torch.randn(2, K)
    with pytest.raises(RuntimeError, match="values"):
        op(x, v[:, :-2], m)
    with pytest.raises(RuntimeError, match="values"):
        op(x, v.half(), m)
    with pytest.raises(RuntimeError, match="meta"):
        op(x, v, m[:, :-1])
    with pytest.raises(RuntimeError, match="meta"):
        op(x, v, m.to(torch.int32))
    with pytest.raises(RuntimeError, match=r"\(x\)"):
        op(x.to(torch.int32), v, m)
    with pytest.raises(RuntimeError, match=r"\(x\)"):
        op(torch.randn(2, 62), torch.randn(N, 31), m)
    with pytest.raises(RuntimeError, match=r"\(x\)"):
        op(x[0], v, m)
    with pytest.raises(RuntimeError, match=r"sparse24_mm\(bias\): expected a 1-D tensor of N = 16"):
        op(x, v, m, torch.randn(17))
    with pytest.raises(RuntimeError, match=r"sparse24_mm\(bias\): expected a 1-D"):
        op(x, v, m, torch.randn(1, 16))
    with pytest.raises(RuntimeError, match=r"sparse24_mm\(bias\): dtype"):
        op(x, v, m, torch.randn(16, dtype=torch.bfloat16))


@pytest.mark.parametrize("M", [1, 20, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_x_like_the_dense_spec(isa, M, dtype):
    """The spec is the dense product: a NaN/Inf in x times a pruned zero makes the output NaN. The kernel skips the
    zeros and must still be non-finite exactly where the dense product is, on each path (M = 1 direct, 20 rows as
    vectors with AVX-512, 300 expand + BLAS with AVX2 and plain C++). It once was finite there (a strict xfail)."""
    w = make_sparse(40, 96, dtype)
    x = torch.randn(M, 96).to(dtype)
    x[0, 9] = float("inf")
    x[M - 1, 50] = float("nan")
    weight = tk.Sparse24Weight.from_dense(w)
    out = op(x, weight.values, weight.meta)
    # products summed elementwise, not by a BLAS (which may skip a zero and with it Inf * 0 = NaN)
    expected = (x.double()[:, None, :] * w.double()[None]).sum(-1)
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected)), (M, dtype)
    assert not torch.isfinite(out[0]).any() and not torch.isfinite(out[M - 1]).any()
