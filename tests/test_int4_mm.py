"""int4_mm / int4_linear / Int4Linear: every backend runnable here against a float64 golden result."""
import pytest
import torch

import turbokernels as tk
from turbokernels import backends
from turbokernels.reference.int4_mm import dequantize_int4
from turbokernels.testing import assert_close, cancelling_bias
from _int4_cases import allowance, golden_and_baseline, make_weight
from conftest import interpreting

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def runnable_backends():
    names = ["reference"]
    if interpreting() or torch.cuda.is_available():
        names.append("triton")
    if backends.check_extension_op("int4_mm", "cpu")(torch.empty(1)) is None:
        names.append("cpu")
    return names


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# (M, K, N, group_size): odd sizes, short last groups, per-channel, a real model's K (SmolLM2: 576)
SHAPES = [
    (1, 64, 1, 32),
    (1, 576, 97, 128),
    (3, 113, 40, 32),
    (16, 200, 64, -1),
    (17, 256, 113, 64),
    (33, 97, 17, 256),
    (64, 128, 96, 100),
]


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,group_size", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_int4_linear_matches_golden(backend_name, dtype, M, K, N, group_size, symmetric):
    weight = make_weight(N, K, group_size, symmetric, dtype=dtype).to(device())
    x = torch.randn(M, K, device=device()).to(dtype)
    bias = torch.randn(N, device=device()).to(dtype)
    with tk.backend(backend_name):
        out = tk.int4_linear(x, weight, bias)
    golden, baseline = golden_and_baseline(x, weight, bias)
    assert out.dtype == dtype and out.device == x.device
    assert_close(out, golden, baseline, allowance=allowance(x, weight, backend_name, bias),
                 what=f"{backend_name} {dtype} M={M} K={K} N={N} g={group_size}")


def exact_weight(weight: tk.Int4Weight) -> torch.Tensor:
    """The (K, N) weight in float64, in x's column order (after the act-order permutation, if any)."""
    return dequantize_int4(weight.qweight, weight.scales, weight.offsets, weight.effective_group_size,
                           weight.in_features, dtype=torch.float64)


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,K,N,group_size", [(1, 256, 72, 64), (33, 200, 40, 40)])
def test_bias_is_rounded_once(backend_name, dtype, M, K, N, group_size):
    """A bias that cancels row 0 of the product: its outputs are far smaller than the product, so rounding the
    product before adding the bias would be off by up to half an ulp of the product. One rounding (the bias added
    in fp32, as F.linear) stays within one rounding of |golden| (rule (1), element by element). M = 1 runs the split-K
    decode configs, M = 33 the GEMM tiles."""
    weight = make_weight(N, K, group_size, dtype=dtype).to(device())
    x = torch.randn(M, K, device=device()).to(dtype)
    bias = cancelling_bias(x[0].double() @ exact_weight(weight), dtype)
    with tk.backend(backend_name):
        out = tk.int4_linear(x, weight, bias)
    golden, baseline = golden_and_baseline(x, weight, bias)
    assert golden[0].abs().max() < 0.05 * (golden[0] - bias.double()).abs().mean(), "the bias does not cancel"
    assert_close(out, golden, baseline, allowance=allowance(x, weight, backend_name, bias),
                 what=f"{backend_name} {dtype} M={M} K={K} N={N} cancelling bias")


def test_every_triton_config_is_correct(monkeypatch):
    """Each shipped config (all architectures) on one awkward shape, forcing the split-K and tile paths, with and
    without a bias (added by the kernel, or by the launcher to the split-K sum), with NaN-poisoned output buffers so
    an element the kernel forgets to write fails the test."""
    if "triton" not in runnable_backends():
        pytest.skip("triton cannot run here")
    import turbokernels.kernels.int4_mm as kernel_module
    from turbokernels.kernels.int4_mm import CONFIGS, int4_mm as launch
    monkeypatch.setattr(kernel_module, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    M, K, N = 5, 328, 72
    seen = set()
    for arch in CONFIGS.values():
        for cfg in arch["decode"] + arch["gemm"]:
            if cfg in seen:
                continue
            seen.add(cfg)
            # 40: scales vary inside a K tile (the per-k scale path); bf16: no operand rounding under the
            # interpreter (UPCAST), so the bound is one output rounding and a second rounding (a bias added
            # after the split-K sum was rounded) shows
            for group_size, dtype in ((64, torch.float16), (40, torch.float16), (64, torch.bfloat16)):
                weight = make_weight(N, K, group_size, dtype=dtype).to(device())
                x = torch.randn(M, K, device=device(), dtype=dtype)
                for bias in (None, torch.randn(N, device=device(), dtype=dtype)):
                    out = launch(x, weight.qweight, weight.scales, weight.offsets, group_size, bias, config=cfg)
                    golden, baseline = golden_and_baseline(x, weight, bias)
                    assert_close(out, golden, baseline, allowance=allowance(x, weight, "triton", bias),
                                 what=f"{cfg} g={group_size} {dtype} bias={bias is not None}")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_strided_and_batched_input(backend_name):
    weight = make_weight(48, 96, 32, dtype=torch.float32).to(device())
    base = torch.randn(2, 3, 200, device=device())
    x = base[..., 10:106]  # last dim not contiguous with the rest: strides (600, 200, 1)
    xt = torch.randn(96, 6, device=device()).t()  # transposed view: strides (1, 6)
    with tk.backend(backend_name):
        out = tk.int4_linear(x, weight)
        out_t = tk.int4_linear(xt, weight)
    for inp, o in ((x, out), (xt, out_t)):
        golden, baseline = golden_and_baseline(inp, weight)
        assert o.shape == inp.shape[:-1] + (48,)
        assert_close(o, golden, baseline, allowance=allowance(inp, weight, backend_name),
                     what=f"{backend_name} strides {inp.stride()}")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_empty_batch(backend_name):
    weight = make_weight(24, 64, 32).to(device())
    with tk.backend(backend_name):
        out = tk.int4_linear(torch.randn(0, 64, device=device(), dtype=torch.float16), weight)
        out3 = tk.int4_linear(torch.randn(2, 0, 64, device=device(), dtype=torch.float16), weight)
    assert out.shape == (0, 24) and out3.shape == (2, 0, 24)


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_deterministic(backend_name):
    weight = make_weight(64, 512, 128).to(device())
    x = torch.randn(4, 512, device=device(), dtype=torch.float16)
    with tk.backend(backend_name):
        assert torch.equal(tk.int4_linear(x, weight), tk.int4_linear(x, weight))


def test_quantize_error_is_bounded():
    """RTN min-max: every dequantized value is within half a step of the original."""
    for symmetric in (False, True):
        w = torch.randn(64, 300)
        q = tk.quantize_int4(w, group_size=64, symmetric=symmetric)
        deq = q.dequantize()
        gs = 64
        err = (deq - w).abs()
        scale = q.scales.float()[torch.arange(300) // gs].t()
        assert (err <= scale * 0.5 + 1e-6).all()


def test_constant_group_is_exact():
    w = torch.full((8, 64), 0.3)
    w[:, 32:] = torch.randn(8, 32)
    q = tk.quantize_int4(w, group_size=32)
    assert torch.equal(q.dequantize()[:, :32], w[:, :32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_group_scale_is_on_the_groups_scale(dtype, symmetric):
    """A constant group's scale is free (asymmetric: q = 0, w = o; symmetric all-zero: w = 0). It used to be 1,
    which the C++ kernel's o + 8 s turned into w + 8 (1e-6 came out 9.54e-7, found by tests/test_fuzz.py). Now it is
    a power of two on the group's own scale: q * s + o reproduces the value exactly and o + 8 s is exact in fp32."""
    values = [1e-6, -1e-6, 0.3, -3.7, 1.0, 0.0, 2.0 ** -20, 1000.0]
    w = torch.tensor(values).repeat_interleave(32).view(1, -1).to(dtype)
    if symmetric:
        w = torch.zeros_like(w)
    q = tk.quantize_int4(w, group_size=32, symmetric=symmetric)
    assert torch.equal(q.dequantize(torch.float64).to(dtype), w)
    s, o = q.scales.float(), q.offsets.float()
    assert torch.equal((o + 8 * s).double(), o.double() + 8 * s.double())
    tiny = torch.finfo(dtype).tiny
    assert (s > 0).all() and (s <= torch.maximum(o.abs() / 8, torch.tensor(tiny))).all()
    if symmetric:
        assert (s == tiny).all()


def test_autograd_input_gradient():
    weight = make_weight(32, 64, 32, dtype=torch.float32)
    x = torch.randn(5, 64, dtype=torch.float64).float().requires_grad_()
    with tk.backend("reference"):
        tk.int4_linear(x, weight).square().sum().backward()
    w = weight.dequantize().double()
    xd = x.detach().double().requires_grad_()
    (xd @ w.t()).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_bias_gradient(dtype):
    """The bias gradient is grad_out summed over the rows (in fp32, cast to the bias dtype), batch dims included;
    x's gradient is unchanged by the bias."""
    weight = make_weight(24, 64, 32, dtype=dtype)
    x = torch.randn(2, 3, 64).to(dtype).requires_grad_()
    bias = torch.randn(24).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 3, 24).to(dtype)
    expected = grad_out.reshape(6, 24).float().sum(0).to(dtype)
    tk.int4_linear(x, weight, bias).backward(grad_out)
    assert bias.grad.dtype == dtype
    assert torch.equal(bias.grad, expected)
    x_grad_with_bias = x.grad.clone()
    x.grad = None
    tk.int4_linear(x, weight).backward(grad_out)
    assert torch.equal(x.grad, x_grad_with_bias)
    # only the bias requires a gradient
    bias.grad = None
    tk.int4_linear(x.detach(), weight, bias).backward(grad_out)
    assert torch.equal(bias.grad, expected)


def test_opcheck():
    weight = make_weight(40, 96, 32)
    for dtype in DTYPES:
        x = torch.randn(3, 96).to(dtype)
        args = (x, weight.qweight, weight.scales, weight.offsets, 32)
        torch.library.opcheck(torch.ops.turbokernels.int4_mm.default, args)
        torch.library.opcheck(torch.ops.turbokernels.int4_mm.default, (*args, torch.randn(40).to(dtype)))
    x = torch.randn(3, 96, requires_grad=True)
    args = (x, weight.qweight, weight.scales.float(), weight.offsets.float(), 32)
    torch.library.opcheck(torch.ops.turbokernels.int4_mm.default, args)
    torch.library.opcheck(torch.ops.turbokernels.int4_mm.default, (*args, torch.randn(40, requires_grad=True)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch_compile_fullgraph(bias):
    lin = torch.nn.Linear(64, 48, bias=bias)
    model = torch.nn.Sequential(tk.nn.Int4Linear.from_linear(lin, group_size=32), torch.nn.GELU())
    x = torch.randn(4, 64)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # traces through the fake impl
    torch.testing.assert_close(compiled(x), expected)


# ---- the module ---------------------------------------------------------------------------------------------
def test_module_from_linear_and_state_dict_round_trip():
    lin = torch.nn.Linear(576, 97).half()
    layer = tk.nn.Int4Linear.from_linear(lin, group_size=128)
    x = torch.randn(2, 5, 576, dtype=torch.float16)
    y = layer(x)
    assert y.shape == (2, 5, 97) and y.dtype == torch.float16
    # against the dequantized weight
    golden = x.double() @ layer.dequantize(torch.float64).t() + lin.bias.double()
    baseline = torch.nn.functional.linear(x, layer.dequantize(torch.float16), lin.bias)
    assert_close(y, golden, baseline, allowance=allowance(x, layer.weight, bias=lin.bias.detach()))
    sd = layer.state_dict()
    again = tk.nn.Int4Linear(576, 97, bias=True, group_size=128, dtype=torch.float16)
    again.load_state_dict(sd)
    for name in ("qweight", "scales", "offsets", "bias"):
        a, b = getattr(layer, name), getattr(again, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(again(x), y)
    assert "group_size=128" in repr(layer) and "in_features=576" in repr(layer)


def test_module_rejects_corrupt_state_dict_without_change():
    layer = tk.nn.Int4Linear.from_linear(torch.nn.Linear(64, 32), group_size=32)
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    sd = layer.state_dict()
    sd["scales"] = sd["scales"][:1]  # wrong number of groups
    with pytest.raises(RuntimeError, match="scales"):
        layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
    other = tk.nn.Int4Linear(64, 32, group_size=64)
    with pytest.raises(RuntimeError):
        other.load_state_dict(layer.state_dict())


def test_module_without_bias_and_dtype_conversion():
    lin = torch.nn.Linear(128, 64, bias=False)
    layer = tk.nn.Int4Linear.from_linear(lin, group_size=64, symmetric=True)
    assert layer.bias is None
    x = torch.randn(3, 128)
    golden, baseline = golden_and_baseline(x, layer.weight)
    assert_close(layer(x), golden, baseline, allowance=allowance(x, layer.weight))
    half = layer.half()  # scales/offsets follow the module dtype like any float buffer
    assert half(x.half()).dtype == torch.float16


# ---- GPU --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 4, 16, 17, 64, 256, 2048])
def test_gpu_triton_real_shapes(dtype, M):
    weight = make_weight(4096, 4096, 128, dtype=dtype).to("cuda")
    x = torch.randn(M, 4096, device="cuda", dtype=dtype)
    with tk.backend("triton"):
        out = tk.int4_linear(x, weight)
    golden, baseline = golden_and_baseline(x, weight)
    assert_close(out, golden, baseline, allowance=allowance(x, weight, "triton"), what=f"M={M}")


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton():
    weight = make_weight(256, 256, 128).to("cuda")
    name, _ = backends.select("int4_mm", torch.empty(1, 256, device="cuda"), weight.qweight, weight.scales,
                              weight.offsets, 128)
    assert name == "triton"
