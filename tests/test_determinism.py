"""Bitwise determinism of every op on every backend runnable here, in one place: the same inputs give the same bits
on every run and with every intra-op thread count (torch.set_num_threads: 1, the default, and more threads than
cores; the reference linear ops, torch's matmul, at the default count only); the C++ kernels on each SIMD path they
have (TURBOKERNELS_CPU_ISA best/avx2/scalar, and avx512 on AMX CPUs: each path repeatable
on its own; the paths may differ from each other in the last bits). The attention backward with deterministic=True
is bitwise repeatable too, across thread counts. (Older single checks stay where they are: test_deterministic in
test_int4_mm.py / test_attention.py, the thread checks of the C++ kernel tests.)

Shapes are chosen to reach every code path of the C++ kernels (fused / gather / row-vectorized / dequantize+BLAS by
M) with enough work that their parallel_for really splits it, and the Triton kernels' split-K / split-KV paths.
"""
import contextlib
import os

import pytest
import torch

import turbokernels as tk
from turbokernels import backends
import conftest
from conftest import interpreting
from turbokernels.testing import cpu_isa_caps

TRITON = interpreting() or torch.cuda.is_available()
DEFAULT_THREADS = torch.get_num_threads()  # this process's count: 1 in a `make test` worker on 2 cores
# 1, the default, torch's default (when they differ: under pytest-xdist) and more threads than cores (another split
# of the work among threads)
THREAD_COUNTS = sorted({1, DEFAULT_THREADS, conftest.DEFAULT_THREADS, conftest.DEFAULT_THREADS + 1})
ISAS = cpu_isa_caps()  # a cap above what the CPU has falls back to the best it has


def device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def backends_of(op, cpu_kernel=False):
    names = ["reference"] + (["triton"] if TRITON else [])
    if cpu_kernel and backends.check_extension_op(op, "cpu")(torch.empty(1)) is None:
        names.append("cpu")
    return names


num_threads = conftest.torch_threads


@contextlib.contextmanager
def cpu_isa(isa):
    old = os.environ.pop("TURBOKERNELS_CPU_ISA", None)
    if isa != "best":
        os.environ["TURBOKERNELS_CPU_ISA"] = isa
    try:
        yield
    finally:
        os.environ.pop("TURBOKERNELS_CPU_ISA", None)
        if old is not None:
            os.environ["TURBOKERNELS_CPU_ISA"] = old


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (NaN == NaN, -0.0 != 0.0)."""
    t = t.detach().contiguous()
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def flatten(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def assert_bitwise_repeatable(fn, what, thread_counts=THREAD_COUNTS, repeats=1):
    """fn() gives the same bits as its first run `repeats` more times under every thread count (the default
    count among them: a plain rerun)."""
    first = flatten(fn())
    for n in thread_counts:
        with num_threads(n):
            for r in range(repeats):
                again = flatten(fn())
                assert len(again) == len(first)
                for i, (a, b) in enumerate(zip(first, again)):
                    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: output {i} changed shape/dtype"
                    same = torch.equal(bits(a), bits(b))
                    assert same, (f"{what}: output {i} differs with {n} thread(s) (default {DEFAULT_THREADS}), run "
                                  f"{r + 1}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}")


# ---- linear ops ---------------------------------------------------------------------------------------------------
# M: 1 and 3 (decode: split-K / gather / fused), 17 (row-vectorized, fused), 200 (dequantize or expand + BLAS on the
# AVX2 and plain C++ paths; Triton GEMM tiles). K, N large enough to be split among threads.
CPU_MS = [1, 3, 17, 200]
TRITON_MS = [1, 17]


def linear_ms(backend):
    return TRITON_MS if backend == "triton" else CPU_MS


def linear_threads(backend):
    """The reference linear ops are torch's matmul, whose sums depend on the thread count on some CPUs (MKL splits a
    gemv's K among threads on AVX-512 Intel CPUs: measured on a Sapphire Rapids, 2-5e-4 apart in fp16): reruns at
    the default count only. Ours are held to every count."""
    return [DEFAULT_THREADS] if backend == "reference" else THREAD_COUNTS


def int4_inputs(M, K, N, dtype, dev, gs=128):
    w = tk.quantize_int4(torch.randn(N, K), group_size=gs).to(dev)
    return torch.randn(M, K, device=dev).to(dtype), w, torch.randn(N, device=dev).to(dtype)


@pytest.mark.parametrize("backend", backends_of("int4_mm", cpu_kernel=True))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_int4_linear(backend, dtype):
    K, N = (256, 48) if backend == "triton" else (512, 1000)
    isas = ISAS if backend == "cpu" else ["best"]
    for M in linear_ms(backend):
        x, w, bias = int4_inputs(M, K, N, dtype, device(backend), gs=100 if M == 17 else 128)
        for isa in isas:
            with cpu_isa(isa), tk.backend(backend):
                assert_bitwise_repeatable(lambda: tk.int4_linear(x, w, bias), f"int4 {backend} isa={isa} M={M}",
                                          linear_threads(backend))


def sparse24_weight(N, K, dtype, dev):
    return tk.Sparse24Weight.from_dense(tk.prune_24(torch.randn(N, K)).to(dtype)).to(dev)


@pytest.mark.parametrize("backend", backends_of("sparse24_mm", cpu_kernel=True))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_sparse24_linear(backend, dtype):
    K, N = (96, 48) if backend == "triton" else (520, 1024)  # K = 520: a padded last meta element
    dev = device(backend)
    weight = sparse24_weight(N, K, dtype, dev)
    isas = ISAS if backend == "cpu" else ["best"]
    for M in linear_ms(backend) + ([64] if backend == "cpu" else []):
        x = torch.randn(M, K, device=dev).to(dtype)
        for isa in isas:
            with cpu_isa(isa), tk.backend(backend):
                assert_bitwise_repeatable(lambda: tk.sparse24_linear(x, weight), f"sparse24 {backend} isa={isa} M={M}",
                                          linear_threads(backend))


@pytest.mark.parametrize("backend", backends_of("sparse24_int4_mm", cpu_kernel=True))
def test_sparse24_int4_linear(backend):
    # cpu: K = 520 a partial last word row, g = 24 kept values rows that span two groups, N = 300 several column
    # units and a plain C++ tail (300 % 8 = 4) on each SIMD path
    K, N, gs = (160, 40, 64) if backend == "triton" else (520, 300, 48)
    dev = device(backend)
    weight = tk.Sparse24Int4Weight.from_dense(tk.prune_24(torch.randn(N, K)), group_size=gs).to(dev)
    isas = ISAS if backend == "cpu" else ["best"]
    for M in linear_ms(backend):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.randn(M, K, device=dev).to(dtype)
            for isa in isas if dtype == torch.float32 else ["best"]:  # the paths differ by M, not by dtype
                with cpu_isa(isa), tk.backend(backend):
                    assert_bitwise_repeatable(lambda: tk.sparse24_int4_linear(x, weight),
                                              f"sparse24_int4 {backend} isa={isa} M={M}", linear_threads(backend))


# ---- attention --------------------------------------------------------------------------------------------------
def qkv(b, sq, sk, hq, hkv, d, dtype, dev, requires_grad=False):
    ts = [torch.randn(b, s, h, d, device=dev).to(dtype) for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]
    return [t.requires_grad_() for t in ts] if requires_grad else ts


# (dtype, options): every dtype, and causal / window + softcap / ALiBi + scale, each once
ATTENTION_CASES = [(torch.float16, dict(causal=True)), (torch.bfloat16, dict(window_size=(5, 2), softcap=3.0)),
                   (torch.float32, dict(alibi_slopes="heads", softmax_scale=0.3))]


def attention_kwargs(opts, hq, dev):
    kw = dict(opts)
    if kw.get("alibi_slopes") == "heads":
        kw["alibi_slopes"] = torch.rand(hq, device=dev) * 0.3
    return kw


def case_id(case):
    return f"{str(case[0])[6:]}-" + "-".join(case[1])


@pytest.mark.parametrize("backend", backends_of("attention_fwd"))
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
def test_attention_forward(backend, case):
    dtype, opts = case
    dev = device(backend)
    q, k, v = qkv(2, 37, 45, 4, 2, 40, dtype, dev)
    kw = attention_kwargs(opts, 4, dev)
    with tk.backend(backend):
        assert_bitwise_repeatable(lambda: tk.attention(q, k, v, return_lse=True, **kw),
                                  f"attention {backend} {opts}")


@pytest.mark.parametrize("backend", backends_of("attention_fwd"))
def test_attention_forward_varlen(backend):
    dev = device(backend)
    seqlens_q, seqlens_k = [17, 0, 33, 1], [20, 5, 33, 0]
    cu_q = torch.tensor([0] + seqlens_q, device=dev).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + seqlens_k, device=dev).cumsum(0).to(torch.int32)
    q = torch.randn(sum(seqlens_q), 4, 32, device=dev, dtype=torch.float16)
    k, v = (torch.randn(sum(seqlens_k), 2, 32, device=dev, dtype=torch.float16) for _ in range(2))
    with tk.backend(backend):
        assert_bitwise_repeatable(
            lambda: tk.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, return_lse=True),
            f"varlen attention {backend}")


@pytest.mark.parametrize("backend", backends_of("attention_fwd"))
def test_scaled_dot_product_attention(backend):
    dev = device(backend)
    q, k, v = (t.transpose(1, 2) for t in qkv(1, 29, 29, 4, 4, 32, torch.bfloat16, dev))  # (B, H, S, D)
    with tk.backend(backend):
        assert_bitwise_repeatable(lambda: tk.scaled_dot_product_attention(q, k, v, is_causal=True),
                                  f"sdpa {backend}")


@pytest.mark.parametrize("backend", backends_of("attention_bwd"))
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
def test_attention_backward_deterministic(backend, case):
    """deterministic=True: dq, dk, dv bitwise repeatable (GQA: dk, dv summed over 3 q heads per kv head)."""
    dtype, opts = case
    dev = device(backend)
    q, k, v = qkv(1, 33, 41, 6, 2, 32, dtype, dev, requires_grad=True)
    dout = torch.randn(q.shape, device=dev).to(dtype)
    kw = attention_kwargs(opts, 6, dev)

    def grads():
        for t in (q, k, v):
            t.grad = None
        with tk.backend(backend):
            tk.attention(q, k, v, deterministic=True, **kw).backward(dout)
        return q.grad.clone(), k.grad.clone(), v.grad.clone()

    assert_bitwise_repeatable(grads, f"attention bwd {backend} {opts}")


@pytest.mark.parametrize("backend", backends_of("attention_bwd"))
def test_attention_backward_varlen_deterministic(backend):
    dev = device(backend)
    seqlens_q, seqlens_k = [9, 0, 21], [15, 4, 21]
    cu_q = torch.tensor([0] + seqlens_q, device=dev).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + seqlens_k, device=dev).cumsum(0).to(torch.int32)
    q = torch.randn(sum(seqlens_q), 4, 16, device=dev, dtype=torch.float16).requires_grad_()
    k, v = (torch.randn(sum(seqlens_k), 1, 16, device=dev, dtype=torch.float16).requires_grad_() for _ in range(2))
    dout = torch.randn(q.shape, device=dev, dtype=torch.float16)

    def grads():
        for t in (q, k, v):
            t.grad = None
        with tk.backend(backend):
            tk.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, deterministic=True).backward(dout)
        return q.grad.clone(), k.grad.clone(), v.grad.clone()

    assert_bitwise_repeatable(grads, f"varlen attention bwd {backend}")


# ---- decode -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends_of("decode_attention", cpu_kernel=True))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_attention(backend, paged):
    """The Triton launcher's own choice of KV splits (several here: a split-KV combine) and one split."""
    dev = device(backend)
    B, T, Hq, Hkv, D, S = 2, 2, 4, 2, 32, 96
    dtype = torch.float16
    if paged:
        k_cache, v_cache = (torch.randn(B * 6 + 1, 16, Hkv, D, device=dev).to(dtype) for _ in range(2))
        block_table = torch.randperm(B * 6 + 1, device=dev)[:B * 6].view(B, 6).to(torch.int32)
    else:
        k_cache, v_cache = (torch.randn(B, S, Hkv, D, device=dev).to(dtype) for _ in range(2))
        block_table = None
    q = torch.randn(B, T, Hq, D, device=dev).to(dtype)
    seqlens = torch.tensor([96, 41], dtype=torch.int32, device=dev)
    splits = [None, 1] if backend == "triton" else [None]
    import turbokernels.kernels.attention_decode as kernel_module
    for num_splits in splits:
        launch = kernel_module.decode_attention
        if num_splits is not None:
            kernel_module.decode_attention = lambda *a, **kw: launch(*a, num_splits=num_splits, **kw)
        try:
            with tk.backend(backend):
                assert_bitwise_repeatable(
                    lambda: tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=block_table, softcap=5.0,
                                                window_size=(50, -1)),
                    f"decode {backend} paged={paged} splits={num_splits}")
        finally:
            kernel_module.decode_attention = launch


def test_kv_cache_append():
    """The append writes the same caches every time (it mutates them: each run starts from a copy)."""
    B, T, Hkv, D = 3, 4, 2, 16
    k0, v0 = (torch.randn(B, 40, Hkv, D, dtype=torch.bfloat16) for _ in range(2))
    k_new, v_new = (torch.randn(B, T, Hkv, D, dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([0, 17, 36], dtype=torch.int32)

    def append():
        k, v = k0.clone(), v0.clone()
        lens = tk.kv_cache_append(k, v, k_new, v_new, seqlens)
        return k, v, lens

    assert_bitwise_repeatable(append, "kv_cache_append")
