"""Hypothesis fuzzing of every op on every backend runnable here against a float64 golden result.

Shapes (1, odd primes, zero-size batches), dtypes, group sizes, symmetric/asymmetric int4, bias, GQA ratios, head
dims, causal/window/softcap/ALiBi combinations and memory layouts (transposed, sliced, stride-2, storage offsets,
broadcast rows; the padding around a view is NaN, so a kernel reading outside it fails) are drawn by hypothesis;
every output is checked with the tolerance rule (turbokernels.testing.assert_close: float64 golden + the allowance
of the backend's arithmetic, `operand_dtype(backend, dtype)`). kv_cache_append is checked exactly.

Profiles (registered in tests/conftest.py): "ci" (default; a fixed seed per test, small shapes, ~10-25 examples per
op and backend) and "long" (500 random examples per unit of budget, larger shapes):
    HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py
A failure prints the drawn case (a dict of sizes and flags, plus the seed of the tensors' values) and
`@reproduce_failure(...)`: paste it to replay the example.
"""
import contextlib
import math
import os

import pytest
import torch
from hypothesis import assume, given, note, settings, strategies as st

import turbokernels as tk
from turbokernels import backends
from turbokernels.reference import attention as ref_attention
from turbokernels.reference.decode_attention import decode_attention as ref_decode
from turbokernels.testing import (assert_close, attention_allowance, attention_bwd_allowance, cancelling_bias,
                                  cpu_isa_caps,
                                  decode_allowance, int4_dequant_magnitudes, matmul_allowance, operand_dtype)
from _int4_cases import allowance as int4_allowance, golden_and_baseline as int4_golden_and_baseline
from conftest import interpreting

LONG = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "long"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TRITON = interpreting() or torch.cuda.is_available()


def has_cpu_kernel(op: str) -> bool:
    return backends.check_extension_op(op, "cpu")(torch.empty(1)) is None


def backends_of(op: str, cpu_kernel: bool = False) -> list:
    names = ["reference"] + (["triton"] if TRITON else [])
    if cpu_kernel and has_cpu_kernel(op):
        names.append("cpu")
    return names


def device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def fuzz(strategy, budget: float):
    """Run `check(case)` on `budget` x the profile's max_examples cases drawn from `strategy` (one hypothesis test
    per call, so each op x backend gets its own example count and its own derandomized seed)."""
    n = max(1, round(settings().max_examples * budget))

    def run(check):
        @settings(max_examples=n)
        @given(case=strategy)
        def fuzzed(case):
            check(case)
        fuzzed()
    return run


def sizes(ci, long_extra):
    """sampled_from shrinks towards the first element: list the simplest size first."""
    return st.sampled_from(list(ci) + (list(long_extra) if LONG else []))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, shape, dtype, scale=1.0, dev="cpu"):
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(dtype).to(dev)


def nan_like(t, shape):
    return torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of `t` (or, for "broadcast", of its first row repeated) in another memory layout; storage around
    the view is NaN.
      contiguous   as is
      transposed   the last two dims swapped in memory (strides (1, rows) for a matrix)
      heads_major  dims -3 and -2 swapped in memory ((B, H, S, D) memory for a (B, S, H, D) view)
      packed       one slot of a (..., 3, H, D) buffer (a fused qkv projection)
      sliced       the last dim a window of a wider row
      stride2      every other element of the last dim
      offset       a contiguous view at a storage offset
      broadcast    stride 0 along dim 0 (every row is row 0)"""
    if layout == "contiguous" or t.numel() == 0:
        return t.contiguous()
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "heads_major" and t.dim() >= 3:
        return t.transpose(-3, -2).contiguous().transpose(-3, -2)
    if layout == "packed" and t.dim() >= 2:
        big = nan_like(t, t.shape[:-2] + (3,) + t.shape[-2:])
        big[..., 1, :, :] = t
        return big[..., 1, :, :]
    if layout == "sliced":
        n = t.shape[-1]
        big = nan_like(t, t.shape[:-1] + (n + 5,))
        big[..., 2:2 + n] = t
        return big[..., 2:2 + n]
    if layout == "stride2":
        big = nan_like(t, t.shape[:-1] + (2 * t.shape[-1],))
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "offset":
        flat = nan_like(t, (t.numel() + 7,))
        flat[7:] = t.reshape(-1)
        return flat[7:].view(t.shape)
    if layout == "broadcast" and t.dim() >= 2:
        return t[:1].expand(t.shape)
    return t.contiguous()


@contextlib.contextmanager
def cpu_isa(isa):
    """TURBOKERNELS_CPU_ISA for the C++ kernels (read per call): None/"best" = the best this CPU has."""
    old = os.environ.pop("TURBOKERNELS_CPU_ISA", None)
    if isa not in (None, "best"):
        os.environ["TURBOKERNELS_CPU_ISA"] = isa
    try:
        yield
    finally:
        os.environ.pop("TURBOKERNELS_CPU_ISA", None)
        if old is not None:
            os.environ["TURBOKERNELS_CPU_ISA"] = old


# ---- linear ops: int4_mm, sparse24_mm, sparse24_int4_mm --------------------------------------------------------
M_SIZES = sizes([1, 2, 3, 5, 7, 13, 16, 17, 31], [33, 64, 97, 130, 257])
N_SIZES = sizes([1, 3, 8, 17, 31, 40], [64, 97, 128, 257])
MATMUL_LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced", "stride2", "offset", "broadcast"])
CPU_ISAS = st.sampled_from(cpu_isa_caps())
BIASES = st.sampled_from([False, True, "cancelling"])


@st.composite
def lead_shape(draw):
    """The batch dims of x: (M,), (B, M), and (one time in eight) a zero-size batch."""
    m = draw(M_SIZES)
    if draw(st.integers(0, 7)) == 7:
        return draw(st.sampled_from([(0,), (2, 0), (0, m)]))
    return draw(st.sampled_from([(m,), (2, m), (1, m)]))


@st.composite
def int4_case(draw, backend):
    groups = [32, 64, 128, -1, 40, 100, 16, 24]
    if backend != "triton":
        groups += [1, 3, 8]  # Triton needs >= 16 (-1 with K < 16 too: it must refuse, see check_linear)
    case = dict(
        lead=draw(lead_shape()), K=draw(sizes([1, 3, 8, 16, 17, 37, 40, 64, 97, 128], [200, 256, 331, 576, 1031])),
        N=draw(N_SIZES), group_size=draw(st.sampled_from(groups)), symmetric=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)), scale_dtype=draw(st.sampled_from(DTYPES)),
        act_order=draw(st.booleans()), bias=draw(BIASES), layout=draw(MATMUL_LAYOUTS),
        seed=draw(st.integers(0, 2 ** 31 - 1)))
    if backend == "cpu":
        case["isa"] = draw(CPU_ISAS)
        case["lead"] = draw(st.sampled_from([case["lead"], (draw(st.sampled_from([129, 130, 200])),)]))  # BLAS path
    return case


def make_bias(g, c, golden_no_bias, dtype, dev):
    """The drawn bias (N,): none, random, or "cancelling" (testing.cancelling_bias: it nearly cancels the first
    output row, so that a second rounding -- of the product before the bias is added -- fails the check)."""
    N = c["N"]
    if not c["bias"]:
        return None
    if c["bias"] == "cancelling" and golden_no_bias.numel():
        return cancelling_bias(golden_no_bias.reshape(-1, N)[0].cpu(), dtype, generator=g).to(dev)
    return randn(g, (N,), dtype, dev=dev)


def check_linear(backend, x, run, golden, baseline, allowance, what, unsupported=None):
    """Run the functional on `backend` and compare with the golden: the bias is added to the fp32 sum before the
    one rounding of the output (rule (1) allows that one rounding only). unsupported: the reason the backend
    refuses this call (it must raise BackendUnavailable saying so: never a silent fallback), or None."""
    with tk.backend(backend):
        if unsupported is not None:
            with pytest.raises(tk.BackendUnavailable, match=unsupported):
                run()
            return
        out = run()
    assert out.shape == golden.shape and out.dtype == x.dtype and out.device == x.device, what
    assert_close(out, golden, baseline, allowance=allowance, what=what)


def add_bias(golden, baseline, bias):
    if bias is None:
        return golden, baseline
    return golden + bias.double(), baseline + bias


def run_int4(backend, c):
    g = generator(c["seed"])
    K, N, dtype = c["K"], c["N"], c["dtype"]
    dev = device(backend)
    weight = tk.quantize_int4(randn(g, (N, K), c["scale_dtype"]), group_size=c["group_size"],
                              symmetric=c["symmetric"])
    if c["act_order"]:
        weight = tk.Int4Weight(weight.qweight, weight.scales, weight.offsets, weight.group_size, K,
                               perm=torch.randperm(K, generator=g))
    weight = weight.to(dev)
    x = with_layout(randn(g, c["lead"] + (K,), dtype, dev=dev), c["layout"])
    golden0, baseline0 = int4_golden_and_baseline(x, weight)
    bias = make_bias(g, c, golden0, dtype, dev)
    golden, baseline = add_bias(golden0, baseline0, bias)
    allowance = int4_allowance(x, weight, backend, bias)  # with the roundings of the backend's dequantization
    note(f"x strides {x.stride()}, weight {weight}")
    with cpu_isa(c.get("isa")):
        check_linear(backend, x, lambda: tk.int4_linear(x, weight, bias), golden, baseline, allowance,
                     f"int4 {backend} {c}",
                     unsupported="group_size" if backend == "triton" and weight.effective_group_size < 16 else None)


@pytest.mark.parametrize("backend", backends_of("int4_mm", cpu_kernel=True))
def test_int4_linear(backend):
    fuzz(int4_case(backend), {"reference": 1.0, "cpu": 1.25, "triton": 0.75}[backend])(
        lambda c: run_int4(backend, c))


@pytest.mark.skipif(not has_cpu_kernel("int4_mm"), reason="no C++ int4_mm kernel")
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("isa", ["best", "avx2", "scalar"])
def test_cpu_int4_constant_group(isa, legacy):
    """Found by the fuzz (K = 1: one group of one weight): quantize_int4 stored a constant group as s = 1, o = w and
    the C++ kernel rounded o + 8 s = w + 8 in fp32 (w = 1e-6 came out 9.54e-7). Now the quantizer picks s on the
    group's own scale, and the kernel keeps o + 8 s exactly (legacy: a weight stored the old way, s = 1). Checked
    with the default allowance: roundings relative to |w| only."""
    weight = tk.quantize_int4(torch.tensor([[1e-6]]), group_size=32)
    if legacy:
        weight = tk.Int4Weight(weight.qweight, torch.ones_like(weight.scales), weight.offsets, 32, 1)
    else:
        assert weight.scales.item() < 1e-6
    x = torch.ones(1, 1)
    with cpu_isa(isa), tk.backend("cpu"):
        out = tk.int4_linear(x, weight)
    w64 = weight.dequantize(torch.float64)
    assert w64.item() == torch.tensor(1e-6).item()
    assert_close(out, x.double() @ w64.t(), allowance=matmul_allowance(x, w64.t()), what=f"isa={isa}")


def random_24(g, N, K, dtype):
    """A 2:4 weight with groups of 2, 1 and 0 nonzeros (every position of the single nonzero)."""
    w = torch.randn(N, K // 4, 4, generator=g)
    keep = torch.rand(N, K // 4, 4, generator=g).argsort(-1)[..., :2]  # two random positions per group
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(N, K // 4, 4, generator=g) > 0.2  # ~1/3 of groups lose one or both
    return (w * mask).reshape(N, K).to(dtype)


K24_SIZES = sizes([4, 8, 12, 16, 20, 36, 48, 52, 100, 128], [160, 260, 576, 1028])


@st.composite
def sparse24_case(draw, backend):
    case = dict(lead=draw(lead_shape()), K=draw(K24_SIZES), N=draw(N_SIZES), dtype=draw(st.sampled_from(DTYPES)),
                bias=draw(BIASES), layout=draw(MATMUL_LAYOUTS), seed=draw(st.integers(0, 2 ** 31 - 1)))
    if backend == "cpu":
        case["isa"] = draw(CPU_ISAS)
        case["lead"] = draw(st.sampled_from([case["lead"], (draw(st.sampled_from([63, 64, 65, 257])),)]))
    return case


def run_sparse24(backend, c):
    g = generator(c["seed"])
    K, N, dtype = c["K"], c["N"], c["dtype"]
    dev = device(backend)
    w = random_24(g, N, K, dtype).to(dev)
    weight = tk.Sparse24Weight.from_dense(w)
    x = with_layout(randn(g, c["lead"] + (K,), dtype, dev=dev), c["layout"])
    golden0 = x.double() @ w.double().t()
    bias = make_bias(g, c, golden0, dtype, dev)
    golden, baseline = add_bias(golden0, x @ w.t(), bias)
    allowance = matmul_allowance(x, w.t(), bias=bias)
    note(f"x strides {x.stride()}")
    with cpu_isa(c.get("isa")):
        check_linear(backend, x, lambda: tk.sparse24_linear(x, weight, bias), golden, baseline, allowance,
                     f"sparse24 {backend} {c}")


@pytest.mark.parametrize("backend", backends_of("sparse24_mm", cpu_kernel=True))
def test_sparse24_linear(backend):
    fuzz(sparse24_case(backend), {"reference": 1.0, "cpu": 1.25, "triton": 0.75}[backend])(
        lambda c: run_sparse24(backend, c))


@st.composite
def sparse24_int4_case(draw, backend):
    # group sizes in dense columns (even; the Triton kernel needs >= 16: 8 kept values)
    groups = [16, 32, 64, 128, -1, 24, 36, 40, 100] + ([2, 6, 10] if backend != "triton" else [])
    case = dict(lead=draw(lead_shape()), K=draw(K24_SIZES), N=draw(N_SIZES), group_size=draw(st.sampled_from(groups)),
                symmetric=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
                wdtype=draw(st.sampled_from(DTYPES)), bias=draw(BIASES), layout=draw(MATMUL_LAYOUTS),
                seed=draw(st.integers(0, 2 ** 31 - 1)))
    if backend == "cpu":  # the C++ kernel's SIMD paths, and M around its row tiles and fused / expand limits
        case["isa"] = draw(CPU_ISAS)
        case["lead"] = draw(st.sampled_from([case["lead"], (draw(st.sampled_from([5, 9, 257])),)]))
    return case


def run_sparse24_int4(backend, c):
    g = generator(c["seed"])
    K, N, dtype = c["K"], c["N"], c["dtype"]
    dev = device(backend)
    weight = tk.Sparse24Int4Weight.from_dense(random_24(g, N, K, c["wdtype"]), group_size=c["group_size"],
                                              symmetric=c["symmetric"]).to(dev)
    x = with_layout(randn(g, c["lead"] + (K,), dtype, dev=dev), c["layout"])
    w64 = weight.dequantize(torch.float64)
    golden0 = x.double() @ w64.t()
    bias = make_bias(g, c, golden0, dtype, dev)
    golden, baseline = add_bias(golden0, x @ w64.to(dtype).t(), bias)
    allowance = matmul_allowance(x, w64.t(), bias=bias, operand_dtype=operand_dtype(backend, dtype),
                                 dequant_magnitudes=int4_dequant_magnitudes(weight, backend))
    note(f"x strides {x.stride()}")
    with cpu_isa(c.get("isa")):
        check_linear(backend, x, lambda: tk.sparse24_int4_linear(x, weight, bias), golden, baseline, allowance,
                     f"sparse24_int4 {backend} {c}",
                     unsupported="group_size" if backend == "triton" and weight.kept_group_size < 8 else None)


@pytest.mark.parametrize("backend", backends_of("sparse24_int4_mm", cpu_kernel=True))
def test_sparse24_int4_linear(backend):
    fuzz(sparse24_int4_case(backend), {"reference": 1.0, "cpu": 1.25, "triton": 0.75}[backend])(
        lambda c: run_sparse24_int4(backend, c))


# ---- attention forward (dense and varlen) and backward ----------------------------------------------------------
SEQ = sizes([1, 2, 3, 5, 7, 13, 17, 31, 0], [37, 64, 65, 97, 128, 129, 203])
VARLEN_SEQ = sizes([1, 0, 2, 3, 5, 7, 13, 17], [31, 64, 65, 97, 130])
HEAD_DIMS = sizes([1, 2, 3, 8, 16, 17, 32, 40, 59, 64], [80, 96, 100, 128, 160, 200, 256])
ATTN_LAYOUTS = st.sampled_from(["contiguous", "heads_major", "packed", "stride2", "offset", "broadcast"])


@st.composite
def attention_case(draw, varlen: bool):
    case = dict(dtype=draw(st.sampled_from(DTYPES)), hkv=draw(st.sampled_from([1, 2])),
                ratio=draw(st.sampled_from([1, 2, 3])), d=draw(HEAD_DIMS))
    if varlen:
        n = draw(st.integers(1, 3))
        # cu_seqlens[-1] is the packed length: rows past it are not an input the functional accepts (nor one whose
        # output rows any backend specifies), so the packed tensors hold exactly the sequences
        case.update(seqlens_q=draw(st.lists(VARLEN_SEQ, min_size=n, max_size=n)),
                    seqlens_k=draw(st.lists(VARLEN_SEQ, min_size=n, max_size=n)))
    else:
        case.update(batch=draw(st.sampled_from([1, 2, 1, 2, 1, 2, 3, 0])), sq=draw(SEQ), sk=draw(SEQ))
    window = st.sampled_from([-1, -1, 0, 1, 4, 16])
    case.update(causal=draw(st.booleans()), window=(draw(window), draw(window)),
                softcap=draw(st.sampled_from([0.0, 0.0, 0.5, 5.0, 30.0])),
                alibi=draw(st.sampled_from([None, "heads", "batch"])),
                scale=draw(st.sampled_from([None, None, 0.05, 0.5, 2.0])),
                magnitude=draw(st.sampled_from([1.0, 3.0])),
                layouts=tuple(draw(ATTN_LAYOUTS) for _ in range(4)),  # q, k, v, dout
                seed=draw(st.integers(0, 2 ** 31 - 1)))
    return case


def attention_inputs(c, dev, requires_grad=False):
    """(q, k, v, kwargs of tk.attention, batch) for a drawn case."""
    g = generator(c["seed"])
    hq, hkv, d, dtype, mag = c["hkv"] * c["ratio"], c["hkv"], c["d"], c["dtype"], c["magnitude"]
    if "seqlens_q" in c:
        batch = len(c["seqlens_q"])
        cu_q = torch.tensor([0] + c["seqlens_q"]).cumsum(0).to(torch.int32).to(dev)
        cu_k = torch.tensor([0] + c["seqlens_k"]).cumsum(0).to(torch.int32).to(dev)
        q_shape, k_shape = (sum(c["seqlens_q"]), hq, d), (sum(c["seqlens_k"]), hkv, d)
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    else:
        batch = c["batch"]
        q_shape, k_shape = (batch, c["sq"], hq, d), (batch, c["sk"], hkv, d)
        kw = {}
    q, k, v = (with_layout(randn(g, shape, dtype, mag, dev), layout)
               for shape, layout in zip((q_shape, k_shape, k_shape), c["layouts"]))
    if requires_grad:  # leaves that keep the drawn layout
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if c["alibi"] is not None:
        kw["alibi_slopes"] = (torch.rand((hq,) if c["alibi"] == "heads" else (batch, hq), generator=g) * 0.5
                              + 0.01).to(dev)
    kw.update(causal=c["causal"], window_size=c["window"], softcap=c["softcap"], softmax_scale=c["scale"])
    return q, k, v, kw, batch


def run_attention_fwd(backend, c):
    q, k, v, kw, _ = attention_inputs(c, device(backend))
    note(f"strides q {q.stride()} k {k.stride()} v {v.stride()}")
    with tk.backend(backend):
        out, lse = tk.attention(q, k, v, return_lse=True, **kw)
    f64 = torch.float64
    golden, golden_lse = ref_attention.attention(q.to(f64), k.to(f64), v.to(f64), **kw)
    baseline, baseline_lse = ref_attention.attention(q, k, v, compute_dtype=q.dtype, **kw)
    a_out, a_lse = attention_allowance(q, k, v, operand_dtype=operand_dtype(backend, q.dtype), **kw)
    what = f"attention fwd {backend} {c}"
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32, what
    assert_close(out, golden, baseline, allowance=a_out, what=what)
    assert_close(lse, golden_lse, baseline_lse, allowance=a_lse, what=what + " lse")


@pytest.mark.parametrize("backend", backends_of("attention_fwd"))
def test_attention_forward(backend):
    fuzz(attention_case(varlen=False), {"reference": 1.0, "triton": 0.75}[backend])(
        lambda c: run_attention_fwd(backend, c))


@pytest.mark.parametrize("backend", backends_of("attention_fwd"))
def test_attention_forward_varlen(backend):
    fuzz(attention_case(varlen=True), {"reference": 0.75, "triton": 0.5}[backend])(
        lambda c: run_attention_fwd(backend, c))


def run_attention_bwd(backend, c):
    dev = device(backend)
    q, k, v, kw, _ = attention_inputs(c, dev, requires_grad=True)
    dout = with_layout(randn(generator(c["seed"] + 1), q.shape, q.dtype, dev=dev), c["layouts"][3])
    note(f"strides q {q.stride()} k {k.stride()} v {v.stride()} dout {dout.stride()}")
    with tk.backend(backend):
        out, lse = tk.attention(q, k, v, return_lse=True, deterministic=c["deterministic"], **kw)
        out.backward(dout)
    grads = [t.grad for t in (q, k, v)]
    golden, baseline = [], []
    for dt, sink in ((torch.float64, golden), (q.dtype, baseline)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, _ = ref_attention.attention(*leaves, compute_dtype=dt, **kw)
        if o.requires_grad:  # else no query row belongs to a sequence: every gradient is 0
            o.backward(dout.to(dt))
        sink.extend(t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves)
    allowances = attention_bwd_allowance(q.detach(), k.detach(), v.detach(), dout, out.detach(), lse, **kw,
                                         operand_dtype=operand_dtype(backend, q.dtype))
    for name, ours, gold, base, a, t in zip(("dq", "dk", "dv"), grads, golden, baseline, allowances, (q, k, v)):
        what = f"attention bwd {backend} {name} {c}"
        assert ours is not None and ours.shape == t.shape and ours.dtype == t.dtype, what
        assert_close(ours, gold, base, allowance=a, what=what)


@pytest.mark.parametrize("batch, sk", [(1, 0), (0, 3), (0, 0)])
def test_reference_backward_gqa_without_keys(batch, sk):
    """Found by the fuzz: GQA with no keys or no batch made the reference backward raise (a reshape with -1 of 0
    elements). Now dq is exactly 0 and dk, dv have k's shape."""
    q = torch.randn(batch, 1, 2, 8, requires_grad=True)
    k, v = (torch.randn(batch, sk, 1, 8, requires_grad=True) for _ in range(2))
    with tk.backend("reference"):
        tk.attention(q, k, v).sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


@st.composite
def attention_bwd_case(draw):
    case = draw(attention_case(varlen=draw(st.booleans())))
    case["deterministic"] = draw(st.booleans())
    return case


@pytest.mark.parametrize("backend", backends_of("attention_bwd"))
def test_attention_backward(backend):
    fuzz(attention_bwd_case(), {"reference": 0.5, "triton": 0.4}[backend])(lambda c: run_attention_bwd(backend, c))


# ---- decode_attention and kv_cache_append -----------------------------------------------------------------------
@st.composite
def cache_case(draw):
    """A KV cache (contiguous or paged) with lengths per sequence; `new` tokens."""
    batch = draw(st.sampled_from([1, 2, 3]))
    paged = draw(st.sampled_from([None, 16, 32]))
    if paged:
        pages_per_seq = draw(st.sampled_from([1, 2, 3, 5] + ([9] if LONG else [])))
        capacity = pages_per_seq * paged
    else:
        capacity = draw(sizes([1, 5, 17, 31, 64, 80], [129, 300, 513]))
        pages_per_seq = None
    return dict(batch=batch, page_size=paged, pages_per_seq=pages_per_seq, capacity=capacity,
                new=draw(st.sampled_from([1, 2, 4])), hkv=draw(st.sampled_from([1, 2])),
                d=draw(sizes([1, 3, 16, 40, 64], [80, 128, 256])), dtype=draw(st.sampled_from(DTYPES)),
                cache_layout=draw(st.sampled_from(["contiguous", "seq_sliced", "heads_sliced", "k_only_sliced"])),
                lengths=draw(st.lists(st.floats(0.0, 1.0), min_size=batch, max_size=batch)),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def lengths(c, new=0):
    """cache_seqlens from the drawn fractions of the capacity, at most capacity - new."""
    cap = c["capacity"] - new
    return [min(cap, max(0, round(f * cap))) for f in c["lengths"]]


def make_cache(c, g, dev, lens, garbage="large"):
    """(k_cache, v_cache, block_table, used): the caches in the drawn layout, `used` (bool, the caches' shape up
    to the head dims) the slots below each sequence's length. Every other slot, and the storage around a sliced
    cache, is garbage: 100 x randn, or NaN (which must not reach the output either: keys at or past a sequence's
    length are never seen)."""
    B, Hkv, D, dtype = c["batch"], c["hkv"], c["d"], c["dtype"]
    ps = c["page_size"]
    if ps:
        num_pages = B * c["pages_per_seq"] + 2
        shape = (num_pages, ps, Hkv, D)
        pages = torch.randperm(num_pages, generator=g)[:B * c["pages_per_seq"]].view(B, -1).to(torch.int32)
        # a table wider than needed: the extra entries point outside the cache and are never used
        block_table = torch.cat([pages, torch.full((B, 1), 10_000, dtype=torch.int32)], dim=1).to(dev)
        used = torch.zeros(num_pages, ps, dtype=torch.bool)
        for b in range(B):
            for p in range(c["pages_per_seq"]):
                used[int(pages[b, p])] = torch.arange(p * ps, (p + 1) * ps) < lens[b]
    else:
        shape = (B, c["capacity"], Hkv, D)
        block_table = None
        used = torch.arange(c["capacity"]).view(1, -1) < torch.tensor(lens).view(-1, 1)
    used = used.to(dev)

    def junk(shape_):
        if garbage == "nan":
            return torch.full(shape_, float("nan"), dtype=dtype, device=dev)
        return randn(g, shape_, dtype, 100.0, dev)

    def one(layout):
        values = torch.where(used[..., None, None], randn(g, shape, dtype, 1.0, dev), junk(shape))
        if layout == "seq_sliced":  # paged: the pages at a storage offset; else windows of longer sequences
            if ps:
                big = junk((shape[0] + 1,) + shape[1:])
                big[1:] = values
                return big[1:]
            big = junk((shape[0], shape[1] + 3) + shape[2:])
            big[:, :shape[1]] = values
            return big[:, :shape[1]]
        if layout == "heads_sliced":  # the kv heads out of a wider group of heads: strides not contiguous
            big = junk(shape[:2] + (Hkv + 2,) + shape[3:])
            big[:, :, 1:1 + Hkv] = values
            return big[:, :, 1:1 + Hkv]
        return values

    layout = c["cache_layout"]
    k_cache = one("heads_sliced" if layout == "k_only_sliced" else layout)
    v_cache = one("contiguous" if layout == "k_only_sliced" else layout)  # k and v strides differ
    return k_cache, v_cache, block_table, used


@st.composite
def decode_case(draw):
    case = draw(cache_case())
    window = st.sampled_from([-1, -1, 0, 1, 7, 40])
    case.update(ratio=draw(st.sampled_from([1, 2, 4])), window=(draw(window), draw(window)),
                softcap=draw(st.sampled_from([0.0, 0.0, 0.5, 30.0])),
                alibi=draw(st.sampled_from([None, "heads", "batch"])),
                scale=draw(st.sampled_from([None, None, 0.05, 2.0])),
                q_layout=draw(ATTN_LAYOUTS), num_splits=draw(st.sampled_from([None, None, 1, 2, 3, 7])),
                garbage=draw(st.sampled_from(["large", "nan"])),
                # FlashAttention's options (not for the cpu backend, which declines them): non-causal, leftpads as
                # fractions of each length (the slots before them garbage too), lse
                causal=draw(st.sampled_from([True, True, False])),
                leftpad=draw(st.one_of(st.none(), st.lists(st.floats(0.0, 1.0), min_size=case["batch"],
                                                           max_size=case["batch"]))),
                return_lse=draw(st.booleans()))
    return case


@contextlib.contextmanager
def decode_splits(num_splits):
    """Force the Triton launcher's number of KV splits (None: its own choice)."""
    import turbokernels.kernels.attention_decode as kernel_module
    launch = kernel_module.decode_attention
    if num_splits is not None:
        kernel_module.decode_attention = lambda *a, **kw: launch(*a, num_splits=num_splits, **kw)
    try:
        yield
    finally:
        kernel_module.decode_attention = launch


def run_decode(backend, c):
    dev = device(backend)
    g = generator(c["seed"])
    lens = lengths(c)
    k_cache, v_cache, block_table, used = make_cache(c, g, dev, lens, c["garbage"])
    B, T, Hq, D, dtype = c["batch"], c["new"], c["hkv"] * c["ratio"], c["d"], c["dtype"]
    q = with_layout(randn(g, (B, T, Hq, D), dtype, dev=dev), c["q_layout"])
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    alibi = None
    if c["alibi"] is not None:
        alibi = (torch.rand((Hq,) if c["alibi"] == "heads" else (B, Hq), generator=g) * 0.3 + 0.01).to(dev)
    scale = D ** -0.5 if c["scale"] is None else c["scale"]
    options = backend != "cpu"  # the C++ kernel declines FlashAttention's options
    causal, return_lse = (c["causal"], c["return_lse"]) if options else (True, False)
    leftpad = None
    if options and c["leftpad"] is not None:
        pads = [min(n, round(f * n)) for f, n in zip(c["leftpad"], lens)]
        leftpad = torch.tensor(pads, dtype=torch.int32, device=dev)
        junk = float("nan") if c["garbage"] == "nan" else 1e4
        for b, n in enumerate(pads):  # the padding: garbage, never read (the golden ignores it: no key attends it)
            pos = torch.arange(n, device=dev)
            for cache in (k_cache, v_cache):
                if block_table is None:
                    cache[b, pos] = junk
                else:
                    cache[block_table[b, pos // c["page_size"]].long(), pos % c["page_size"]] = junk
    note(f"seqlens {lens} leftpad {None if leftpad is None else leftpad.tolist()} q strides {q.stride()} k_cache "
         f"strides {k_cache.stride()}")
    with tk.backend(backend), (decode_splits(c["num_splits"]) if backend == "triton" else contextlib.nullcontext()):
        out = tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=block_table, softmax_scale=c["scale"],
                                  window_size=c["window"], softcap=c["softcap"], alibi_slopes=alibi, causal=causal,
                                  cache_leftpad=leftpad, return_lse=return_lse)
    # the golden never sees the garbage: unused slots zeroed
    k_clean, v_clean = (t.masked_fill(~used[..., None, None], 0) for t in (k_cache, v_cache))
    args = (seqlens, block_table, alibi, scale, c["window"][0], c["window"][1], c["softcap"])
    opts = dict(cache_leftpad=leftpad, causal=causal)
    golden, golden_lse = ref_decode(q.double(), k_clean.double(), v_clean.double(), seqlens, block_table,
                                    None if alibi is None else alibi.double(), *args[3:], return_lse=True, **opts)
    baseline = ref_decode(q, k_clean, v_clean, *args, compute_dtype=dtype, **opts)
    allowance, lse_allowance = decode_allowance(q, k_clean, v_clean, *args, operand_dtype=operand_dtype(backend, dtype),
                                                return_lse=True, **opts)
    what = f"decode {backend} {c}"
    if return_lse:
        out, lse = out
        assert lse.shape == (B, Hq, T) and lse.dtype == torch.float32, what
        assert_close(lse, golden_lse, allowance=lse_allowance, what=f"{what} lse")
    assert out.shape == q.shape and out.dtype == dtype, what
    assert_close(out, golden, baseline, allowance=allowance, what=what)


@pytest.mark.parametrize("backend", backends_of("decode_attention", cpu_kernel=True))
def test_decode_attention(backend):
    fuzz(decode_case(), {"reference": 1.0, "triton": 0.75, "cpu": 1.0}[backend])(lambda c: run_decode(backend, c))


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["k", "v", "kv"])
def test_reference_decode_nan_garbage(junk, where):
    """Found by the fuzz: the reference multiplied the values of slots past cache_seqlens by p = 0, so a NaN/inf
    there (torch.empty caches) made the output NaN. Slots no query may attend are now never read."""
    k_cache = torch.zeros(1, 2, 1, 1)
    v_cache = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    if "k" in where:
        k_cache[0, 1] = junk
    if "v" in where:
        v_cache[0, 1] = junk
    q = torch.ones(1, 1, 1, 1)
    with tk.backend("reference"):
        out = tk.decode_attention(q, k_cache, v_cache, torch.tensor([1], dtype=torch.int32))
    assert torch.equal(out, torch.ones(1, 1, 1, 1))


@st.composite
def append_case(draw):
    case = draw(cache_case())
    case["new_layout"] = draw(st.sampled_from(["contiguous", "heads_major", "stride2", "offset", "broadcast"]))
    return case


def run_append(c):
    g = generator(c["seed"])
    B, Hkv, D, dtype = c["batch"], c["hkv"], c["d"], c["dtype"]
    T = min(c["new"], c["capacity"])
    lens = lengths(c, new=T)
    k_cache, v_cache, block_table, _ = make_cache(c, g, "cpu", lens)
    k_new, v_new = (with_layout(randn(g, (B, T, Hkv, D), dtype), c["new_layout"]) for _ in range(2))
    seqlens = torch.tensor(lens, dtype=torch.int32)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    for b in range(B):  # the spec, one token at a time
        for t in range(T):
            pos = lens[b] + t
            if block_table is None:
                row, slot = b, pos
            else:
                row, slot = int(block_table[b, pos // c["page_size"]]), pos % c["page_size"]
            expect_k[row, slot] = k_new[b, t]
            expect_v[row, slot] = v_new[b, t]
    # a sliced cache: the storage around the view must not change either
    bases = [(cache, cache._base, cache._base.clone(), expect) for cache, expect in
             ((k_cache, expect_k), (v_cache, expect_v)) if cache._base is not None]
    before = seqlens.clone()
    with tk.backend("reference"):
        new_lens = tk.kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, block_table=block_table)
    assert torch.equal(seqlens, before), "cache_seqlens must not be modified"
    assert new_lens.dtype == torch.int32 and new_lens.tolist() == [n + T for n in lens]
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v), f"kv_cache_append {c}"
    for cache, base, old, expect in bases:
        old.as_strided(cache.shape, cache.stride(), cache.storage_offset() - base.storage_offset()).copy_(expect)
        assert torch.equal(base, old), f"kv_cache_append wrote outside the cache view {c}"


def test_kv_cache_append():
    """Exact: every new token lands at its position (through the block table), nothing else changes. One backend
    (reference) serves every device."""
    fuzz(append_case(), 1.0)(run_append)
