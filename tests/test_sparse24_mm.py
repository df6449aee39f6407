"""sparse24_mm / sparse24_linear / Sparse24Linear, prune_24 and Sparse24Weight: every backend runnable here against
a float64 golden result, metadata equality with PyTorch's CUTLASS conversion, and the static codegen check."""
import pytest
import torch
from torch.sparse._semi_structured_conversions import (sparse_semi_structured_from_dense_cutlass,
                                                       sparse_semi_structured_to_dense_cutlass)

import turbokernels as tk
from turbokernels import backends
from turbokernels.testing import (CodegenJob, assert_close, cancelling_bias, compile_triton, matmul_allowance,
                                  skip_reason_no_ptxas)
from conftest import interpreting

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def runnable_backends():
    names = ["reference"]
    if interpreting() or torch.cuda.is_available():
        names.append("triton")
    if not torch.cuda.is_available() and backends.check_extension_op("sparse24_mm", "cpu")(torch.empty(1)) is None:
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


def golden_and_baseline(x, w, bias=None):
    golden = x.double() @ w.double().t()
    if bias is not None:
        golden = golden + bias.double()
    return golden, torch.nn.functional.linear(x, w, bias)


# (M, N, K): M 1, 17, 97; N 1, 17, 113; K 16, 48; K = 20 pads the last meta element
SHAPES = [(1, 1, 16), (1, 113, 48), (17, 17, 48), (17, 113, 16), (97, 17, 48), (97, 113, 16), (5, 33, 20)]


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_sparse24_linear_matches_golden(backend_name, dtype, M, N, K):
    w = make_sparse(N, K, dtype, device())
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(M, K, device=device()).to(dtype)
    bias = torch.randn(N, device=device()).to(dtype) if M % 2 else None
    with tk.backend(backend_name):
        out = tk.sparse24_linear(x, weight, bias)
    golden, baseline = golden_and_baseline(x, w, bias)
    assert out.dtype == dtype and out.device == x.device
    assert_close(out, golden, baseline, allowance=matmul_allowance(x, w.t(), bias=bias),
                 what=f"{backend_name} {dtype} M={M} N={N} K={K}")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_long_k(backend_name):
    """K = 4104: many K tiles, split-K, and a padded last meta element, once per backend, with and without a bias."""
    w = make_sparse(17, 4104, torch.float16, device())
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(3, 4104, device=device(), dtype=torch.float16)
    for bias in (None, torch.randn(17, device=device(), dtype=torch.float16)):
        with tk.backend(backend_name):
            out = tk.sparse24_linear(x, weight, bias)
        golden, baseline = golden_and_baseline(x, w, bias)
        assert_close(out, golden, baseline, allowance=matmul_allowance(x, w.t(), bias=bias),
                     what=f"{backend_name} bias={bias is not None}")


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 72, 256), (33, 40, 208)])
def test_bias_is_rounded_once(backend_name, dtype, M, N, K):
    """A bias that cancels row 0 of the product: its outputs are far smaller than the product, so rounding the
    product before adding the bias would be off by up to half an ulp of the product. One rounding (the bias added
    in fp32, as F.linear) stays within one rounding of |golden| (rule (1), element by element). M = 1 runs the split-K
    decode configs (Triton) and the gather path (C++), M = 33 the GEMM tiles and the row-vectorized path."""
    w = make_sparse(N, K, dtype, device())
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(M, K, device=device()).to(dtype)
    bias = cancelling_bias(x[0].double() @ w.double().t(), dtype)
    with tk.backend(backend_name):
        out = tk.sparse24_linear(x, weight, bias)
    golden, baseline = golden_and_baseline(x, w, bias)
    assert golden[0].abs().max() < 0.05 * (golden[0] - bias.double()).abs().mean(), "the bias does not cancel"
    assert_close(out, golden, baseline, allowance=matmul_allowance(x, w.t(), bias=bias),
                 what=f"{backend_name} {dtype} M={M} N={N} K={K} cancelling bias")


def test_every_triton_config_is_correct(monkeypatch):
    """Each shipped config (all architectures) on one awkward shape, forcing the split-K and tile paths, with and
    without a bias (added by the kernel, or by the launcher to the split-K sum), with NaN-poisoned output buffers so
    an element the kernel forgets to write fails the test."""
    if "triton" not in runnable_backends():
        pytest.skip("triton cannot run here")
    import turbokernels.kernels.sparse24_mm as kernel_module
    from turbokernels.kernels.sparse24_mm import CONFIGS, sparse24_mm as launch
    monkeypatch.setattr(kernel_module, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    M, N, K = 5, 72, 328
    w = make_sparse(N, K, torch.float16, device())
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(M, K, device=device(), dtype=torch.float16)
    seen = set()
    for arch in CONFIGS.values():
        for cfg in arch["decode"] + arch["gemm"]:
            if cfg in seen:
                continue
            seen.add(cfg)
            for bias in (None, torch.randn(N, device=device(), dtype=torch.float16)):
                out = launch(x, weight.values, weight.meta, bias, config=cfg)
                golden, baseline = golden_and_baseline(x, w, bias)
                assert_close(out, golden, baseline, allowance=matmul_allowance(x, w.t(), bias=bias),
                             what=f"{cfg} bias={bias is not None}")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_strided_and_batched_input(backend_name):
    w = make_sparse(48, 96, torch.float32, device())
    weight = tk.Sparse24Weight.from_dense(w)
    base = torch.randn(2, 3, 200, device=device())
    x = base[..., 10:106]  # strides (600, 200, 1)
    xt = torch.randn(96, 6, device=device()).t()  # transposed view: strides (1, 6)
    with tk.backend(backend_name):
        out = tk.sparse24_linear(x, weight)
        out_t = tk.sparse24_linear(xt, weight)
    for inp, o in ((x, out), (xt, out_t)):
        golden, baseline = golden_and_baseline(inp, w)
        assert o.shape == inp.shape[:-1] + (48,)
        assert_close(o, golden, baseline, allowance=matmul_allowance(inp, w.t()),
                     what=f"{backend_name} strides {inp.stride()}")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_empty_batch_and_determinism(backend_name):
    weight = tk.Sparse24Weight.from_dense(make_sparse(24, 64, torch.float16))
    x = torch.randn(4, 64, dtype=torch.float16)
    with tk.backend(backend_name):
        assert tk.sparse24_linear(torch.randn(0, 64, dtype=torch.float16), weight).shape == (0, 24)
        assert tk.sparse24_linear(torch.randn(2, 0, 64, dtype=torch.float16), weight).shape == (2, 0, 24)
        assert torch.equal(tk.sparse24_linear(x, weight), tk.sparse24_linear(x, weight))


# ---- the format ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,K", [(32, 64), (64, 128)])
def test_metadata_equals_torch_cutlass_conversion(dtype, N, K):
    w = make_sparse(N, K, dtype)
    w[5, 8:12] = 0  # more all-zero groups
    ours = tk.Sparse24Weight.from_dense(w)
    values, meta_reordered = ours.to_cutlass()
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert values.dtype == ref_values.dtype and meta_reordered.dtype == ref_meta.dtype == torch.int16
    assert torch.equal(values, ref_values)
    assert torch.equal(meta_reordered, ref_meta)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta_reordered), w)
    back = tk.Sparse24Weight.from_cutlass(ref_values, ref_meta)
    assert torch.equal(back.values, ours.values) and torch.equal(back.meta, ours.meta)
    assert torch.equal(back.to_dense(), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(1, 4), (3, 20), (7, 48)])
def test_from_dense_to_dense_round_trip(dtype, N, K):
    w = make_sparse(N, K, dtype)
    weight = tk.Sparse24Weight.from_dense(w)
    assert weight.values.shape == (N, K // 2) and weight.meta.shape == (N, (K + 15) // 16)
    assert weight.meta.dtype == torch.int16 and weight.values.dtype == dtype
    assert torch.equal(weight.to_dense(), w)
    assert torch.equal(weight.to_dense(torch.float64), w.double())
    assert weight.shape == (N, K) and "Sparse24Weight(out_features=" in repr(weight)
    assert weight.nbytes() == N * K // 2 * w.element_size() + weight.meta.numel() * 2


def test_from_dense_refuses_non_24_naming_the_group():
    w = make_sparse(8, 32)
    w[3, 8:11] = 1.0  # 3 nonzeros in the group of row 3 starting at column 8
    w[5, 0:4] = 1.0
    with pytest.raises(ValueError, match=r"row 3, column 8"):
        tk.Sparse24Weight.from_dense(w)


def test_cutlass_requirements_are_stated():
    with pytest.raises(ValueError, match="% 32"):
        tk.Sparse24Weight.from_dense(make_sparse(17, 64, torch.float16)).to_cutlass()
    with pytest.raises(TypeError, match="1:2"):
        tk.Sparse24Weight.from_dense(make_sparse(32, 64)).to_cutlass()


# ---- pruning ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prune_magnitude_keeps_two_largest(dtype):
    w = torch.randn(16, 64).to(dtype)
    before = w.clone()
    p = tk.prune_24(w)
    assert torch.equal(w, before), "the input was modified"
    assert p.dtype == dtype and p.shape == w.shape
    kept = (p != 0).view(16, 16, 4)
    assert (kept.sum(-1) == 2).all()
    a = w.abs().float().view(16, 16, 4)
    kept_min = torch.where(kept, a, torch.inf).amin(-1)
    dropped_max = torch.where(kept, -torch.inf, a).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert torch.equal(p[p != 0], w[p != 0]), "kept values must be unchanged"
    assert tk.is_24_sparse(p) and not tk.is_24_sparse(w)


def test_prune_wanda_uses_the_norms():
    w = torch.tensor([[1.0, 0.9, 0.1, 0.05, -2.0, 0.5, 0.25, -0.75]])
    norm = torch.tensor([1.0, 1.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert torch.equal(tk.prune_24(w), torch.tensor([[1.0, 0.9, 0, 0, -2.0, 0, 0, -0.75]]))
    assert torch.equal(tk.prune_24(w, "wanda", norm), torch.tensor([[1.0, 0, 0.1, 0, -2.0, 0, 0, -0.75]]))
    with pytest.raises(ValueError, match="activation_norm"):
        tk.prune_24(w, "wanda")
    with pytest.raises(ValueError, match=r"activation_norm.*\(8,\)"):
        tk.prune_24(w, "wanda", torch.ones(7))
    with pytest.raises(ValueError, match="method"):
        tk.prune_24(w, "random")
    with pytest.raises(ValueError, match="multiple of 4"):
        tk.prune_24(torch.randn(4, 6))


def test_is_24_sparse():
    assert tk.is_24_sparse(torch.zeros(3, 8))
    assert tk.is_24_sparse(make_sparse(5, 32))
    assert tk.is_24_sparse(torch.tensor([[0.0, 1.0, 0.0, 2.0]]))
    assert not tk.is_24_sparse(torch.tensor([[0.0, 1.0, 3.0, 2.0]]))
    assert not tk.is_24_sparse(torch.zeros(2, 6))  # in_features not a multiple of 4
    assert tk.is_24_sparse(make_sparse(8, 16).t().contiguous().t())  # non-contiguous views work


# ---- op machinery ----------------------------------------------------------------------------------------------
def test_autograd_input_gradient():
    w = make_sparse(32, 64)
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(5, 64, requires_grad=True)
    with tk.backend("reference"):
        tk.sparse24_linear(x, weight).square().sum().backward()
    xd = x.detach().double().requires_grad_()
    (xd @ w.double().t()).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_bias_gradient(dtype):
    """The bias gradient is grad_out summed over the rows (in fp32, cast to the bias dtype), batch dims included;
    x's gradient is unchanged by the bias."""
    weight = tk.Sparse24Weight.from_dense(make_sparse(24, 64, dtype))
    x = torch.randn(2, 3, 64).to(dtype).requires_grad_()
    bias = torch.randn(24).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 3, 24).to(dtype)
    expected = grad_out.reshape(6, 24).float().sum(0).to(dtype)
    tk.sparse24_linear(x, weight, bias).backward(grad_out)
    assert bias.grad.dtype == dtype and torch.equal(bias.grad, expected)
    x_grad_with_bias = x.grad.clone()
    x.grad = None
    tk.sparse24_linear(x, weight).backward(grad_out)
    assert torch.equal(x.grad, x_grad_with_bias)
    bias.grad = None
    tk.sparse24_linear(x.detach(), weight, bias).backward(grad_out)  # only the bias requires a gradient
    assert torch.equal(bias.grad, expected)


def test_opcheck():
    w = make_sparse(40, 96)
    for dtype in DTYPES:
        weight = tk.Sparse24Weight.from_dense(w.to(dtype))
        x = torch.randn(3, 96).to(dtype)
        torch.library.opcheck(torch.ops.turbokernels.sparse24_mm.default, (x, weight.values, weight.meta))
        torch.library.opcheck(torch.ops.turbokernels.sparse24_mm.default,
                              (x, weight.values, weight.meta, torch.randn(40).to(dtype)))
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(3, 96, requires_grad=True)
    torch.library.opcheck(torch.ops.turbokernels.sparse24_mm.default, (x, weight.values, weight.meta))
    torch.library.opcheck(torch.ops.turbokernels.sparse24_mm.default,
                          (x, weight.values, weight.meta, torch.randn(40, requires_grad=True)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch_compile_fullgraph(bias):
    model = torch.nn.Sequential(tk.nn.Sparse24Linear.from_linear(torch.nn.Linear(64, 48, bias=bias)),
                                torch.nn.GELU())
    x = torch.randn(4, 64)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected)


# ---- the module ------------------------------------------------------------------------------------------------
def test_module_from_linear_and_state_dict_round_trip():
    lin = torch.nn.Linear(96, 40).half()
    layer = tk.nn.Sparse24Linear.from_linear(lin)
    assert torch.equal(layer.to_dense(), tk.prune_24(lin.weight.detach()))
    x = torch.randn(2, 5, 96, dtype=torch.float16)
    y = layer(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float16
    w = layer.to_dense()
    golden, baseline = golden_and_baseline(x, w, lin.bias.detach())
    assert_close(y, golden, baseline, allowance=matmul_allowance(x, w.t(), bias=lin.bias.detach()))
    again = tk.nn.Sparse24Linear(96, 40, dtype=torch.float16)
    again.load_state_dict(layer.state_dict())
    for name in ("values", "meta", "bias"):
        a, b = getattr(layer, name), getattr(again, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(again(x), y)
    r = repr(layer)
    assert "in_features=96" in r and "out_features=40" in r and "2:4" in r


def test_module_wanda_and_no_bias():
    lin = torch.nn.Linear(32, 8, bias=False)
    norm = torch.rand(32) * 10
    layer = tk.nn.Sparse24Linear.from_linear(lin, method="wanda", activation_norm=norm)
    assert layer.bias is None
    assert torch.equal(layer.to_dense(), tk.prune_24(lin.weight.detach(), "wanda", norm))
    with pytest.raises(ValueError, match="activation_norm"):
        tk.nn.Sparse24Linear.from_linear(lin, method="wanda")


def test_module_rejects_corrupt_state_dict_without_change():
    layer = tk.nn.Sparse24Linear.from_linear(torch.nn.Linear(64, 32))
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    for key, bad in (("meta", torch.zeros(32, 4, dtype=torch.int16)),  # idx0 == idx1: not a valid encoding
                     ("meta", torch.zeros(32, 3, dtype=torch.int16)),
                     ("values", torch.zeros(32, 31)),
                     ("bias", torch.zeros(31))):
        sd = layer.state_dict()
        sd[key] = bad
        with pytest.raises(RuntimeError, match=key):
            layer.load_state_dict(sd)
        for k, v in layer.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, before[k]), (key, k)
    with pytest.raises(RuntimeError):
        tk.nn.Sparse24Linear(128, 32).load_state_dict(layer.state_dict())


# ---- bad inputs ------------------------------------------------------------------------------------------------
def test_sparse24_linear_rejects_bad_inputs():
    weight = tk.Sparse24Weight.from_dense(make_sparse(32, 64, torch.float16))
    with pytest.raises(TypeError, match=r"sparse24_linear\(x\): dtype torch.float32 does not match"):
        tk.sparse24_linear(torch.randn(2, 64), weight)
    with pytest.raises(TypeError, match=r"sparse24_linear\(x\): dtype must be"):
        tk.sparse24_linear(torch.ones(2, 64, dtype=torch.int32), weight)
    with pytest.raises(ValueError, match=r"in_features=64"):
        tk.sparse24_linear(torch.randn(2, 60, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="x is on meta"):
        tk.sparse24_linear(torch.randn(2, 64, dtype=torch.float16, device="meta"), weight)
    with pytest.raises(TypeError, match=r"sparse24_linear\(weight\)"):
        tk.sparse24_linear(torch.randn(2, 64, dtype=torch.float16), torch.randn(32, 64))
    with pytest.raises(ValueError, match=r"sparse24_linear\(bias\)"):
        tk.sparse24_linear(torch.randn(2, 64, dtype=torch.float16), weight, torch.randn(31, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"sparse24_linear\(bias\): dtype"):
        tk.sparse24_linear(torch.randn(2, 64, dtype=torch.float16), weight, torch.randn(32))


@pytest.mark.parametrize("values,meta,exc,match", [
    (torch.zeros(8, 16), torch.zeros(8, 2, dtype=torch.int32), TypeError, "meta must be int16"),
    (torch.zeros(8, 16), torch.full((8, 3), -4370, dtype=torch.int16), ValueError,
     r"meta must have shape.* = \(8, 2\)"),
    (torch.zeros(8, 16), torch.full((8,), -4370, dtype=torch.int16), ValueError, "meta must be 2-D"),
    (torch.zeros(8, 16, dtype=torch.float64), torch.full((8, 2), -4370, dtype=torch.int16), TypeError, "values must"),
    (torch.zeros(8, 15), torch.full((8, 2), -4370, dtype=torch.int16), ValueError, "values must have shape"),
    (torch.zeros(8, 16), torch.zeros(8, 2, dtype=torch.int16), ValueError, r"meta is corrupt.*row 0, column 0"),
])
def test_sparse24_weight_rejects_bad_tensors(values, meta, exc, match):
    with pytest.raises(exc, match=match):
        tk.Sparse24Weight(values, meta)


def test_from_dense_rejects_bad_weights():
    with pytest.raises(ValueError, match="multiple of 4"):
        tk.Sparse24Weight.from_dense(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="2-D"):
        tk.Sparse24Weight.from_dense(torch.zeros(8))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        tk.Sparse24Weight.from_dense(torch.zeros(4, 8, dtype=torch.int32))


# ---- static code generation ------------------------------------------------------------------------------------
KERNEL = "turbokernels.kernels.sparse24_mm:sparse24_mm_kernel"
SIGNATURE = {
    "x_ptr": "*{dt}", "values_ptr": "*{dt}", "meta_ptr": "*i16", "bias_ptr": "*{dt}", "out_ptr": "*{dt}",
    "M": "i32", "N": "i32",
    "K": "i32", "stride_xm": "i32", "stride_vn": "i32", "stride_mn": "i32", "stride_os": "i32", "stride_om": "i32",
    "k_per_split": "i32",
}
ALIGNED = ("x_ptr", "values_ptr", "meta_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_xm", "stride_vn",
           "stride_om")


def codegen_cases():
    """fp16 and bf16 with a bias; for the GEMM configs also fp16 without one (the decode configs split K, where the
    kernel leaves the bias to the launcher: the same code either way)."""
    from turbokernels.kernels.sparse24_mm import CONFIGS
    for cap, table in sorted(CONFIGS.items()):
        for kind in ("decode", "gemm"):
            for cfg in table[kind]:
                variants = (("fp16", True), ("bf16", True)) + ((("fp16", False),) if cfg.SPLIT_K == 1 else ())
                for dt, has_bias in variants:
                    constexprs = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                      GROUP_M=cfg.GROUP_M, SPLIT_K=cfg.SPLIT_K, HAS_BIAS=has_bias, UPCAST=False,
                                      stride_xk=1, stride_on=1)  # unit strides: the JIT specializes them
                    job = CodegenJob(KERNEL, tuple((k, v.format(dt=dt)) for k, v in SIGNATURE.items()),
                                     tuple(constexprs.items()), cap, cfg.num_warps, cfg.num_stages, ALIGNED)
                    name = (f"sm{cap}-{kind}-{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}-s{cfg.SPLIT_K}"
                            f"-w{cfg.num_warps}-p{cfg.num_stages}-{dt}{'' if has_bias else '-nobias'}")
                    yield name, cap, cfg, job


CODEGEN_CASES = list(codegen_cases())


@pytest.fixture(scope="module")
def codegen_reports():
    reason = skip_reason_no_ptxas()
    if reason is not None:
        pytest.skip(reason)
    return dict(zip([c[0] for c in CODEGEN_CASES], compile_triton([c[3] for c in CODEGEN_CASES])))


@pytest.mark.parametrize("name,cap,cfg", [c[:3] for c in CODEGEN_CASES], ids=[c[0] for c in CODEGEN_CASES])
def test_sparse24_mm_codegen(codegen_reports, name, cap, cfg):
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
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(M, 4096, device="cuda", dtype=dtype)
    with tk.backend("triton"):
        out = tk.sparse24_linear(x, weight)
    golden, baseline = golden_and_baseline(x, w)
    assert_close(out, golden, baseline, allowance=matmul_allowance(x, w.t()), what=f"M={M}")
