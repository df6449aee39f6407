"""sparse24_int4_mm / sparse24_int4_linear / Sparse24Int4Linear and Sparse24Int4Weight (int4 + 2:4): every backend
runnable here against a float64 golden result, every shipped Triton config, op machinery, and the static codegen
check."""
import pytest
import torch

import turbokernels as tk
from turbokernels.testing import (CodegenJob, assert_close, cancelling_bias, compile_triton, int4_dequant_magnitudes,
                                  matmul_allowance, operand_dtype, skip_reason_no_ptxas)
from conftest import interpreting

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def cpu_kernel_built():
    return tk.backends.check_extension_op("sparse24_int4_mm", "cpu")(torch.empty(1)) is None


def runnable_backends():
    names = ["reference"]
    if interpreting() or torch.cuda.is_available():
        names.append("triton")
    if not torch.cuda.is_available() and cpu_kernel_built():
        names.append("cpu")
    return names


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_sparse(N, K, dtype=torch.float32, device="cpu"):
    """A 2:4 weight with some groups of 0 and 1 nonzeros (every position of the single nonzero)."""
    w = tk.prune_24(torch.randn(N, K, device=device)).to(dtype)
    groups = w.view(N, K // 4, 4)
    if K >= 8:
        groups[:, 0] = 0
    for p in range(4):
        if K >= 4 * (p + 2):
            groups[:, p + 1] = 0
            groups[:, p + 1, p] = torch.randn(N, device=device).to(dtype)
    return w


def check(out, x, weight, bias=None, what="", backend="reference"):
    """ours vs the float64 golden x @ W64.T, with torch's same-dtype x @ W.T as the baseline."""
    w64 = weight.dequantize(torch.float64)
    golden = x.double() @ w64.t()
    baseline = x @ w64.to(x.dtype).t()
    if bias is not None:
        golden = golden + bias.double()
        baseline = baseline + bias
    assert out.dtype == x.dtype and out.device == x.device
    allowance = matmul_allowance(x, w64.t(), bias=bias, operand_dtype=operand_dtype(backend, x.dtype),
                                 dequant_magnitudes=int4_dequant_magnitudes(weight, backend))
    assert_close(out, golden, baseline, allowance=allowance, what=what)


# (M, N, K, dense group size): M 1/17/64, N 1/17/113, K 64/160/576, groups 32/64/128/-1; 24 and 36 dense columns
# (12 and 18 kept values) take the kernel's two-groups-per-tile path.
CASES = [(1, 1, 64, 32), (1, 113, 576, 128), (17, 17, 160, 64), (17, 113, 64, -1), (64, 17, 576, -1),
         (64, 113, 160, 32), (1, 17, 160, 128), (17, 1, 576, 64), (5, 33, 160, 24), (3, 40, 576, 36)]


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,gs", CASES)
def test_sparse24_int4_linear_matches_golden(backend_name, dtype, M, N, K, gs):
    w = make_sparse(N, K, dtype, device())
    weight = tk.Sparse24Int4Weight.from_dense(w, group_size=gs, symmetric=bool(M % 2 == 0))
    x = torch.randn(M, K, device=device()).to(dtype)
    bias = torch.randn(N, device=device()).to(dtype) if M % 2 else None
    with tk.backend(backend_name):
        out = tk.sparse24_int4_linear(x, weight, bias)
    check(out, x, weight, bias, what=f"{backend_name} {dtype} M={M} N={N} K={K} g={gs}", backend=backend_name)


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,N,K,gs", [(1, 72, 256, 64), (33, 40, 208, 24)])
def test_bias_is_rounded_once(backend_name, dtype, M, N, K, gs):
    """A bias that cancels row 0 of the product: its outputs are far smaller than the product, so rounding the
    product before adding the bias would be off by up to half an ulp of the product. One rounding (the bias added
    in fp32, as F.linear) stays within one rounding of |golden| (rule (1), element by element). M = 1 runs the split-K
    decode configs, M = 33 the GEMM tiles."""
    weight = tk.Sparse24Int4Weight.from_dense(make_sparse(N, K, dtype, device()), group_size=gs)
    x = torch.randn(M, K, device=device()).to(dtype)
    bias = cancelling_bias(x[0].double() @ weight.dequantize(torch.float64).t(), dtype)
    with tk.backend(backend_name):
        out = tk.sparse24_int4_linear(x, weight, bias)
    check(out, x, weight, bias, what=f"{backend_name} {dtype} M={M} N={N} K={K} cancelling bias",
          backend=backend_name)


def test_every_triton_config_is_correct(monkeypatch):
    """Each shipped config on awkward shapes (split-K and tile paths, one- and two-group tiles), with and without a
    bias (added by the kernel, or by the launcher to the split-K sum), with NaN-poisoned output buffers so an
    element the kernel forgets to write fails the test."""
    if "triton" not in runnable_backends():
        pytest.skip("triton cannot run here")
    import turbokernels.kernels.sparse24_int4_mm as kernel_module
    from turbokernels.kernels.sparse24_int4_mm import CONFIGS, sparse24_int4_mm as launch
    monkeypatch.setattr(kernel_module, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    M, N, K = 5, 72, 328
    x = torch.randn(M, K, device=device(), dtype=torch.float16)
    weights = [tk.Sparse24Int4Weight.from_dense(make_sparse(N, K, torch.float16, device()), group_size=gs)
               for gs in (128, 36)]
    seen = set()
    for arch in CONFIGS.values():
        for cfg in arch["decode"] + arch["gemm"]:
            if cfg in seen:
                continue
            seen.add(cfg)
            for weight in weights:
                for bias in (None, torch.randn(N, device=device(), dtype=torch.float16)):
                    out = launch(x, weight.qweight, weight.scales, weight.offsets, weight.meta,
                                 weight.kept_group_size, bias, config=cfg)
                    check(out, x, weight, bias, what=f"{cfg} g={weight.group_size} bias={bias is not None}",
                          backend="triton")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_strided_batched_and_empty_input(backend_name):
    weight = tk.Sparse24Int4Weight.from_dense(make_sparse(48, 96, torch.float16), group_size=32)
    base = torch.randn(2, 3, 200, dtype=torch.float16)
    x = base[..., 10:106]  # strides (600, 200, 1)
    xt = torch.randn(96, 6, dtype=torch.float16).t()  # transposed view
    with tk.backend(backend_name):
        out = tk.sparse24_int4_linear(x, weight)
        out_t = tk.sparse24_int4_linear(xt, weight)
        assert tk.sparse24_int4_linear(torch.randn(0, 96, dtype=torch.float16), weight).shape == (0, 48)
        assert tk.sparse24_int4_linear(torch.randn(2, 0, 96, dtype=torch.float16), weight).shape == (2, 0, 48)
        assert torch.equal(tk.sparse24_int4_linear(xt, weight), out_t)
    assert out.shape == (2, 3, 48)
    check(out.reshape(6, 48), x.reshape(6, 96), weight, what="batched", backend=backend_name)
    check(out_t, xt, weight, what="transposed", backend=backend_name)


def test_triton_refuses_small_groups_with_a_reason():
    weight = tk.Sparse24Int4Weight.from_dense(make_sparse(8, 64), group_size=8)  # 4 kept values per group
    x = torch.randn(2, 64)
    args = (x, weight.qweight, weight.scales, weight.offsets, weight.meta, weight.kept_group_size)
    reason = tk.backends.registered("sparse24_int4_mm")["triton"].check(*args)
    assert reason is not None and "group_size=4" in reason
    out = tk.sparse24_int4_linear(x, weight)  # automatic selection falls back to a backend that can
    check(out, x, weight)


# ---- the C++ CPU kernel (csrc/cpu/sparse24_int4_mm.cpp) ------------------------------------------------------------
ISAS = ["best", "avx2", "scalar"]  # TURBOKERNELS_CPU_ISA caps the choice; a cap above the CPU's gives its best
# (M, N, K, dense group size). N 1/17/97/113: ragged column vectors (the plain C++ tail), 300 several column units;
# K 4 (one partial word row), 100 / 260 / 1000 (K/2 not a multiple of 8: a partial last word row); kept group sizes
# 6 / 20 (word rows spanning two or more groups), 64, K/2; M 1 / 3 / 4 / 5 / 17 / 65: row tiles of 1-4 rows and
# ragged ones; 9 and 257: expand + BLAS past each path's fused limit (plain C++ 8, AVX2 and AVX-512 256)
CPU_CASES = [(1, 1, 4, -1), (1, 17, 100, 12), (3, 97, 576, 128), (4, 113, 1000, 40), (5, 300, 260, -1),
             (17, 33, 64, 128), (9, 17, 100, 40), (65, 20, 96, 12), (257, 9, 36, -1)]


@pytest.mark.skipif(not cpu_kernel_built(), reason="turbokernels._C has no CPU sparse24_int4_mm kernel")
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_kernel_every_isa_path(isa, monkeypatch):
    """Each SIMD path (capped by TURBOKERNELS_CPU_ISA) x the shapes above, the dtypes in turn (each shape class
    meets each dtype on some path), every other case with a bias, a NaN-poisoned fp32 output buffer
    (TURBOKERNELS_CPU_POISON=1) so an element no path writes fails, fp32 scales for fp16/bf16 x in some (the kernel
    reads any float dtype), and the magnitudes of the kernel's own dequantization. (The dtype-by-shape grid on the
    best path is test_sparse24_int4_linear_matches_golden's.)"""
    if isa == "best":
        monkeypatch.delenv("TURBOKERNELS_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("TURBOKERNELS_CPU_ISA", isa)
    monkeypatch.setenv("TURBOKERNELS_CPU_POISON", "1")
    gen = torch.Generator().manual_seed(8)
    for i, (M, N, K, gs) in enumerate(CPU_CASES):
        dtype = DTYPES[(i + ISAS.index(isa)) % 3]
        w = make_sparse(N, K, dtype)
        weight = tk.Sparse24Int4Weight.from_dense(w, group_size=gs, symmetric=bool(i % 3 == 0))
        if i % 4 == 1:
            weight = tk.Sparse24Int4Weight(weight.qweight, weight.scales.float(), weight.offsets.float(), weight.meta,
                                           gs, K)
        x = torch.randn(M, K, generator=gen).to(dtype)
        bias = torch.randn(N, generator=gen).to(dtype) if i % 2 else None
        with tk.backend("cpu"):
            out = tk.sparse24_int4_linear(x, weight, bias)
        check(out, x, weight, bias, what=f"cpu isa={isa} {dtype} M={M} N={N} K={K} g={gs}", backend="cpu")


@pytest.mark.skipif(not cpu_kernel_built(), reason="turbokernels._C has no CPU sparse24_int4_mm kernel")
@pytest.mark.parametrize("M", [1, 70])
def test_cpu_kernel_nonfinite_x_like_the_dense_spec(M):
    """The spec is the dense product: a NaN/Inf in x times a pruned zero makes the output NaN. The kernel skips the
    zeros and must still be non-finite exactly where the reference is (M = 70: the expand + BLAS path on AVX2)."""
    weight = tk.Sparse24Int4Weight.from_dense(make_sparse(40, 96), group_size=32)
    x = torch.randn(M, 96)
    x[0, 9] = float("inf")
    x[M - 1, 50] = float("nan")
    with tk.backend("cpu"):
        out = tk.sparse24_int4_linear(x, weight)
    with tk.backend("reference"):
        expected = tk.sparse24_int4_linear(x, weight)
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))
    assert not torch.isfinite(out[0]).any() and not torch.isfinite(out[M - 1]).any()


# ---- the format ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs", [32, 64, -1])
def test_format_dequantize_is_the_24_weight_of_the_int4_values(dtype, gs):
    N, K = 9, 160
    w = make_sparse(N, K, dtype)
    weight = tk.Sparse24Int4Weight.from_dense(w, group_size=gs)
    sp = tk.Sparse24Weight.from_dense(w)
    q = tk.quantize_int4(sp.values, group_size=-1 if gs == -1 else gs // 2)
    assert torch.equal(weight.qweight, q.qweight) and torch.equal(weight.scales, q.scales)
    assert torch.equal(weight.meta, sp.meta)
    from turbokernels.reference.sparse24_mm import sparse24_to_dense
    expected = sparse24_to_dense(q.dequantize(torch.float64), sp.meta, torch.float64)
    d64 = weight.dequantize(torch.float64)
    assert d64.dtype == torch.float64 and torch.equal(d64, expected)
    assert tk.is_24_sparse(d64)
    dropped = sparse24_to_dense(torch.ones_like(sp.values), sp.meta) == 0
    assert (d64[dropped] == 0).all(), "only the positions meta keeps may be nonzero"
    assert (d64 - w.double()).abs().max() <= weight.scales.double().abs().max()
    torch.testing.assert_close(weight.dequantize(), expected.float(), rtol=2e-7, atol=1e-7)  # fp32: one rounding
    assert weight.dequantize(dtype).dtype == dtype
    assert weight.shape == (N, K) and weight.in_features == K and weight.out_features == N
    assert weight.group_size == gs and weight.kept_group_size == (K // 2 if gs == -1 else gs // 2)
    assert weight.qweight.shape == ((K // 2 + 7) // 8, N) and weight.meta.shape == (N, (K + 15) // 16)
    r = repr(weight)
    assert "Sparse24Int4Weight(out_features=9, in_features=160" in r and f"group_size={gs}" in r
    moved = weight.to("cpu")
    assert torch.equal(moved.dequantize(), weight.dequantize()) and moved.device == weight.device
    again = tk.Sparse24Int4Weight(weight.qweight, weight.scales, weight.offsets, weight.meta, gs, K)
    assert torch.equal(again.dequantize(torch.float64), d64)


def test_format_bytes_at_4096():
    w = tk.prune_24(torch.randn(4096, 4096, dtype=torch.float16))
    weight = tk.Sparse24Int4Weight.from_dense(w, group_size=128)
    dense = 4096 * 4096 * 2
    assert weight.nbytes() < 0.3 * dense, weight.nbytes() / dense


def test_format_refuses_bad_weights_and_tensors():
    w = make_sparse(8, 32)
    w[3, 8:11] = 1.0
    with pytest.raises(ValueError, match=r"row 3, column 8"):
        tk.Sparse24Int4Weight.from_dense(w)
    with pytest.raises(ValueError, match="multiple of 2"):
        tk.Sparse24Int4Weight.from_dense(make_sparse(8, 32), group_size=33)
    with pytest.raises(ValueError, match="group_size"):
        tk.Sparse24Int4Weight.from_dense(make_sparse(8, 32), group_size=0)
    good = tk.Sparse24Int4Weight.from_dense(make_sparse(8, 64), group_size=32)
    t = (good.qweight, good.scales, good.offsets, good.meta)
    with pytest.raises(ValueError, match="meta is corrupt"):
        tk.Sparse24Int4Weight(*t[:3], torch.zeros_like(good.meta), 32, 64)
    with pytest.raises(TypeError, match="meta must be int16"):
        tk.Sparse24Int4Weight(*t[:3], good.meta.int(), 32, 64)
    with pytest.raises(ValueError, match="meta must have shape"):
        tk.Sparse24Int4Weight(*t[:3], good.meta[:, :2], 32, 64)
    with pytest.raises(ValueError, match="scales must have shape"):
        tk.Sparse24Int4Weight(*t, 64, 64)
    with pytest.raises(ValueError, match="in_features"):
        tk.Sparse24Int4Weight(*t, 32, 62)


# ---- op machinery ----------------------------------------------------------------------------------------------
def test_autograd_input_gradient():
    weight = tk.Sparse24Int4Weight.from_dense(make_sparse(32, 64), group_size=32)
    x = torch.randn(5, 64, requires_grad=True)
    with tk.backend("reference"):
        tk.sparse24_int4_linear(x, weight).square().sum().backward()
    xd = x.detach().double().requires_grad_()
    (xd @ weight.dequantize(torch.float64).t()).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_bias_gradient(dtype):
    """The bias gradient is grad_out summed over the rows (in fp32, cast to the bias dtype), batch dims included;
    x's gradient is unchanged by the bias."""
    weight = tk.Sparse24Int4Weight.from_dense(make_sparse(24, 64, dtype), group_size=32)
    x = torch.randn(2, 3, 64).to(dtype).requires_grad_()
    bias = torch.randn(24).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 3, 24).to(dtype)
    expected = grad_out.reshape(6, 24).float().sum(0).to(dtype)
    tk.sparse24_int4_linear(x, weight, bias).backward(grad_out)
    assert bias.grad.dtype == dtype and torch.equal(bias.grad, expected)
    x_grad_with_bias = x.grad.clone()
    x.grad = None
    tk.sparse24_int4_linear(x, weight).backward(grad_out)
    assert torch.equal(x.grad, x_grad_with_bias)
    bias.grad = None
    tk.sparse24_int4_linear(x.detach(), weight, bias).backward(grad_out)  # only the bias requires a gradient
    assert torch.equal(bias.grad, expected)


def test_opcheck():
    weight = tk.Sparse24Int4Weight.from_dense(make_sparse(40, 96), group_size=64)
    args = (weight.qweight, weight.scales, weight.offsets, weight.meta, weight.kept_group_size)
    op = torch.ops.turbokernels.sparse24_int4_mm.default
    for dtype in DTYPES:
        torch.library.opcheck(op, (torch.randn(3, 96).to(dtype), *args))
        torch.library.opcheck(op, (torch.randn(3, 96).to(dtype), *args, torch.randn(40).to(dtype)))
    x = torch.randn(3, 96, requires_grad=True)
    torch.library.opcheck(op, (x, *args))
    torch.library.opcheck(op, (x, *args, torch.randn(40, requires_grad=True)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch_compile_fullgraph(bias):
    model = torch.nn.Sequential(
        tk.nn.Sparse24Int4Linear.from_linear(torch.nn.Linear(64, 48, bias=bias), group_size=32), torch.nn.GELU())
    x = torch.randn(4, 64)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected)


# ---- the module ------------------------------------------------------------------------------------------------
def test_module_from_linear_and_state_dict_round_trip():
    lin = torch.nn.Linear(96, 40).half()
    layer = tk.nn.Sparse24Int4Linear.from_linear(lin, group_size=32)
    expected = tk.Sparse24Int4Weight.from_dense(tk.prune_24(lin.weight.detach()), group_size=32)
    assert torch.equal(layer.dequantize(torch.float64), expected.dequantize(torch.float64))
    x = torch.randn(2, 5, 96, dtype=torch.float16)
    y = layer(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float16
    check(y.reshape(10, 40), x.reshape(10, 96), layer.weight, lin.bias.detach())
    again = tk.nn.Sparse24Int4Linear(96, 40, group_size=32, dtype=torch.float16)
    again.load_state_dict(layer.state_dict())
    for name in ("qweight", "scales", "offsets", "meta", "bias"):
        a, b = getattr(layer, name), getattr(again, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(again(x), y)
    r = repr(layer)
    assert "in_features=96" in r and "out_features=40" in r and "2:4" in r and "group_size=32" in r


def test_module_wanda_no_bias_and_from_weight():
    lin = torch.nn.Linear(32, 8, bias=False)
    norm = torch.rand(32) * 10
    layer = tk.nn.Sparse24Int4Linear.from_linear(lin, group_size=-1, method="wanda", activation_norm=norm)
    assert layer.bias is None
    pruned = tk.prune_24(lin.weight.detach(), "wanda", norm)
    assert torch.equal(layer.dequantize(torch.float64),
                       tk.Sparse24Int4Weight.from_dense(pruned, group_size=-1).dequantize(torch.float64))
    with pytest.raises(ValueError, match="activation_norm"):
        tk.nn.Sparse24Int4Linear.from_linear(lin, method="wanda")
    with pytest.raises(TypeError, match="Sparse24Int4Weight"):
        tk.nn.Sparse24Int4Linear.from_weight(tk.quantize_int4(lin.weight.detach()))
    with pytest.raises(TypeError, match="nn.Linear"):
        tk.nn.Sparse24Int4Linear.from_linear(layer)


def test_module_rejects_corrupt_state_dict_without_change():
    layer = tk.nn.Sparse24Int4Linear.from_linear(torch.nn.Linear(64, 32), group_size=32)
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    for key, bad in (("meta", torch.zeros(32, 4, dtype=torch.int16)),  # idx0 == idx1: not a valid encoding
                     ("meta", torch.zeros(32, 3, dtype=torch.int16)),
                     ("qweight", torch.zeros(4, 31, dtype=torch.int32)),
                     ("scales", torch.zeros(3, 32)),
                     ("bias", torch.zeros(31))):
        sd = layer.state_dict()
        sd[key] = bad
        with pytest.raises(RuntimeError, match=key):
            layer.load_state_dict(sd)
        for k, v in layer.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, before[k]), (key, k)
    with pytest.raises(RuntimeError):
        tk.nn.Sparse24Int4Linear(64, 32, group_size=64).load_state_dict(layer.state_dict())


# ---- bad inputs ------------------------------------------------------------------------------------------------
def test_sparse24_int4_linear_rejects_bad_inputs():
    weight = tk.Sparse24Int4Weight.from_dense(make_sparse(32, 64, torch.float16), group_size=32)
    f = tk.sparse24_int4_linear
    with pytest.raises(TypeError, match=r"sparse24_int4_linear\(x\): dtype must be"):
        f(torch.ones(2, 64, dtype=torch.int32), weight)
    with pytest.raises(ValueError, match=r"sparse24_int4_linear\(x\).*in_features=64"):
        f(torch.randn(2, 60, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match=r"sparse24_int4_linear\(x\): x is on meta"):
        f(torch.randn(2, 64, dtype=torch.float16, device="meta"), weight)
    with pytest.raises(TypeError, match=r"sparse24_int4_linear\(x\): expected a torch.Tensor"):
        f([1.0] * 64, weight)
    with pytest.raises(TypeError, match=r"sparse24_int4_linear\(weight\)"):
        f(torch.randn(2, 64, dtype=torch.float16), tk.Sparse24Weight.from_dense(make_sparse(32, 64)))
    with pytest.raises(ValueError, match=r"sparse24_int4_linear\(bias\)"):
        f(torch.randn(2, 64, dtype=torch.float16), weight, torch.randn(31, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"sparse24_int4_linear\(bias\): dtype"):
        f(torch.randn(2, 64, dtype=torch.float16), weight, torch.randn(32))


# ---- static code generation ------------------------------------------------------------------------------------
KERNEL = "turbokernels.kernels.sparse24_int4_mm:sparse24_int4_mm_kernel"
SIGNATURE = {
    "x_ptr": "*{dt}", "qweight_ptr": "*i32", "scales_ptr": "*{dt}", "offsets_ptr": "*{dt}", "meta_ptr": "*i16",
    "bias_ptr": "*{dt}", "out_ptr": "*{dt}", "M": "i32", "N": "i32", "K": "i32", "group_size": "i32",
    "stride_xm": "i32", "stride_mn": "i32", "stride_os": "i32", "stride_om": "i32", "k_per_split": "i32",
}
ALIGNED = ("x_ptr", "qweight_ptr", "scales_ptr", "offsets_ptr", "meta_ptr", "bias_ptr", "out_ptr", "N", "K",
           "group_size", "stride_xm", "stride_om")


def codegen_cases():
    from turbokernels.kernels.sparse24_int4_mm import CONFIGS
    for cap, table in sorted(CONFIGS.items()):
        for kind in ("decode", "gemm"):
            for cfg in table[kind]:
                # one_group False: two-group tiles. All with a bias; the GEMM configs also without one (the decode
                # configs split K, where the kernel leaves the bias to the launcher: the same code either way).
                variants = (("fp16", True, True), ("bf16", True, True), ("fp16", False, True))
                if cfg.SPLIT_K == 1:
                    variants += (("fp16", True, False),)
                for dt, one_group, has_bias in variants:
                    constexprs = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                      GROUP_M=cfg.GROUP_M, ONE_GROUP_PER_TILE=one_group, SPLIT_K=cfg.SPLIT_K,
                                      HAS_BIAS=has_bias, UPCAST=False,
                                      stride_xk=1, stride_on=1)  # unit strides: the JIT specializes them
                    job = CodegenJob(KERNEL, tuple((k, v.format(dt=dt)) for k, v in SIGNATURE.items()),
                                     tuple(constexprs.items()), cap, cfg.num_warps, cfg.num_stages, ALIGNED)
                    name = (f"sm{cap}-{kind}-{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}-s{cfg.SPLIT_K}"
                            f"-w{cfg.num_warps}-p{cfg.num_stages}-{dt}{'' if one_group else '-twogroups'}"
                            f"{'' if has_bias else '-nobias'}")
                    yield name, cap, cfg, job


CODEGEN_CASES = list(codegen_cases())


@pytest.fixture(scope="module")
def codegen_reports():
    reason = skip_reason_no_ptxas()
    if reason is not None:
        pytest.skip(reason)
    return dict(zip([c[0] for c in CODEGEN_CASES], compile_triton([c[3] for c in CODEGEN_CASES])))


@pytest.mark.parametrize("name,cap,cfg", [c[:3] for c in CODEGEN_CASES], ids=[c[0] for c in CODEGEN_CASES])
def test_sparse24_int4_mm_codegen(codegen_reports, name, cap, cfg):
    from turbokernels.kernels.int4_mm import SHARED_MEMORY_LIMIT
    report = codegen_reports[name]
    assert report.spill_bytes == 0, f"register spills: {report.ptxas_log}"
    assert report.shared_bytes <= SHARED_MEMORY_LIMIT[cap], f"{report.shared_bytes} B shared memory"
    if cap >= 90 and cfg.BLOCK_M >= 64:
        assert report.uses_wgmma and report.count(r"HGMMA", in_sass=True) > 0, "expected wgmma on sm_90"
    else:
        assert report.uses_mma and report.count(r"HMMA", in_sass=True) > 0, "expected mma.sync tensor-core ops"
        assert not report.uses_wgmma


# ---- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_gpu_triton_real_shapes(dtype, M):
    w = tk.prune_24(torch.randn(4096, 4096, device="cuda", dtype=dtype))
    weight = tk.Sparse24Int4Weight.from_dense(w, group_size=128)
    x = torch.randn(M, 4096, device="cuda", dtype=dtype)
    with tk.backend("triton"):
        out = tk.sparse24_int4_linear(x, weight)
    check(out, x, weight, what=f"M={M}", backend="triton")
