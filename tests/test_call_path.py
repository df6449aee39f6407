"""The short call path of the linear entries (ops/_library.call, ops/_linear, nn/_packed plans, backends.select's
remembered choices): a forced backend is honored after a choice was remembered, a replaced module buffer is
revalidated, bad input still raises naming the argument, and whatever must see the op still sees it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import turbokernels as tk
from turbokernels import backends
from conftest import serving_spy

K, N = 64, 16


def _layers():
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    return {"int4_mm": tk.nn.Int4Linear.from_linear(lin, group_size=32),
            "sparse24_mm": tk.nn.Sparse24Linear.from_linear(lin),
            "sparse24_int4_mm": tk.nn.Sparse24Int4Linear.from_linear(lin, group_size=32),
            "w4a8_mm": tk.nn.W4A8Linear.from_linear(lin, group_size=32)}


LINEAR_USUAL_OPS = ("int4_mm", "sparse24_mm", "sparse24_int4_mm", "w4a8_mm")  # turbokernels._C.linear_usual's op ids


@pytest.fixture
def spy(monkeypatch):
    """spy(op) -> list of the backend names that ran `op` (each Impl's fn wrapped; the one-call C++ entry of the
    usual CPU call, turbokernels._C.linear_usual, counts as the cpu backend it runs)."""
    import turbokernels.ops._linear as linear

    def install(op):
        ran = []
        for name, impl in backends.registered(op).items():
            monkeypatch.setattr(impl, "fn", (lambda fn, name: lambda *a: ran.append(name) or fn(*a))(impl.fn, name))
        real = linear._linear_usual()
        if real:
            def fast(*a):
                out = real(*a)
                if out is not None and LINEAR_USUAL_OPS[a[0]] == op:
                    ran.append("cpu")
                return out
            monkeypatch.setattr(linear, "_LINEAR_USUAL", fast)
        return ran
    return install


@pytest.mark.parametrize("op", ["int4_mm", "sparse24_mm", "sparse24_int4_mm", "w4a8_mm"])
def test_forced_backend_is_honored_after_the_choice_was_remembered(op, spy, monkeypatch):
    layer = _layers()[op]
    ran = spy(op)
    x = torch.randn(2, K)
    auto = layer(x)
    layer(x)  # the choice is remembered now
    assert len(ran) == 2 and ran[0] == ran[1]
    with tk.backend("reference"):
        forced = layer(x)
    assert ran[-1] == "reference"
    try:
        tk.set_backend("reference")
        layer(x)
        assert ran[-1] == "reference"
    finally:
        tk.set_backend(None)
    monkeypatch.setenv("TURBOKERNELS_BACKEND", "reference")
    layer(x)
    assert ran[-1] == "reference"
    monkeypatch.delenv("TURBOKERNELS_BACKEND")
    layer(x)
    assert ran[-1] == ran[0]
    with tk.backend("cuda"):  # no CUDA tensors (or no cuda backend): an error, never the remembered choice
        with pytest.raises(tk.BackendUnavailable):
            layer(x)
    torch.testing.assert_close(auto, forced, atol=1e-4, rtol=1e-4)


def test_select_runs_the_checks_once_per_key_and_register_forgets():
    calls = []
    op = "_test_keyed_op"
    backends.register(op, "reference", check=lambda x: calls.append("ref") or None)(lambda x: x)
    backends.register(op, "cpu", check=lambda x: calls.append("cpu") or "not here")(lambda x: x)
    x = torch.ones(1)
    for _ in range(3):
        assert backends.select(op, x, key=("k", 1))[0] == "reference"
    assert calls == ["cpu", "ref"]
    assert backends.select(op, x, key=("k", 2))[0] == "reference"  # another key: checked again
    assert calls == ["cpu", "ref"] * 2
    with tk.backend("cpu"):  # forced: its own entry, and a failing check is never remembered
        for _ in range(2):
            with pytest.raises(tk.BackendUnavailable, match="not here"):
                backends.select(op, x, key=("k", 1))
    backends.register(op, "cpu", check=lambda x: None)(lambda x: x)  # now cpu can run it, first in AUTO_ORDER
    assert backends.select(op, x, key=("k", 1))[0] == "cpu"


@pytest.mark.parametrize("op", ["int4_mm", "sparse24_mm", "sparse24_int4_mm", "w4a8_mm"])
def test_replaced_buffer_is_revalidated(op):
    layer = _layers()[op]
    x = torch.randn(3, K)
    layer(x)
    name = layer.PACKED[0]
    good = getattr(layer, name)
    named = rf"\(({'|'.join(layer.PACKED)})\): "  # an error naming the argument, not a kernel's
    setattr(layer, name, good[:-1].clone())  # the wrong shape
    with pytest.raises(ValueError, match=named):
        layer(x)
    setattr(layer, name, good)
    layer(x)
    getattr(layer, name).resize_(1, good.shape[1])  # in place, a new shape: the version changed
    with pytest.raises(ValueError, match=named):
        layer(x)


def test_replaced_buffer_with_a_valid_weight_is_used():
    torch.manual_seed(1)
    layer = _layers()["int4_mm"]
    x = torch.randn(2, K)
    other = tk.nn.Int4Linear.from_linear(torch.nn.Linear(K, N), group_size=32)
    layer(x)
    for n in layer.PACKED:
        setattr(layer, n, getattr(other, n))
    layer.bias = other.bias
    torch.testing.assert_close(layer(x), other(x), atol=0, rtol=0)
    layer.load_state_dict(_layers()["int4_mm"].state_dict())
    torch.testing.assert_close(layer(x), _layers()["int4_mm"](x), atol=0, rtol=0)


def test_bad_input_still_raises_naming_the_argument():
    layers = _layers()
    for op, entry in (("int4_mm", "int4_linear"), ("sparse24_mm", "sparse24_linear"),
                      ("sparse24_int4_mm", "sparse24_int4_linear"), ("w4a8_mm", "w4a8_linear")):
        layer = layers[op]
        layer(torch.randn(1, K))  # a plan and a remembered choice exist
        with pytest.raises(ValueError, match=rf"{entry}\(x\): last dimension"):
            layer(torch.randn(1, K + 4))
        with pytest.raises(TypeError, match=rf"{entry}\(x\): dtype"):
            layer(torch.randn(1, K).to(torch.float64))
        with pytest.raises(TypeError, match=rf"{entry}\(x\)"):
            layer([0.0] * K)
        layer.bias.data = torch.zeros(N + 1)  # neither identity nor version changes: the bias is checked per call
        with pytest.raises(ValueError, match=rf"{entry}\(bias\): expected shape"):
            layer(torch.randn(1, K))
    w = tk.quantize_int4(torch.randn(N, K), group_size=32)
    tk.int4_linear(torch.randn(1, K), w)
    with pytest.raises(ValueError, match=r"int4_linear\(bias\)"):
        tk.int4_linear(torch.randn(1, K), w, torch.zeros(N + 1))
    with pytest.raises(TypeError, match=r"int4_linear\(weight\)"):
        tk.int4_linear(torch.randn(1, K), w.qweight)


def test_what_must_see_the_op_still_sees_it():
    layer = _layers()["int4_mm"]
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, K)
    with Log():
        layer(x)
    assert any("turbokernels.int4_mm" in f for f in seen), seen
    xg = x.clone().requires_grad_()
    y = layer(xg)  # autograd: through the op, whose backward gives the gradient
    y.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y.detach(), atol=0, rtol=0)  # the direct path: the same result
    with torch.inference_mode():
        inf = tk.nn.Int4Linear.from_linear(torch.nn.Linear(K, N), group_size=32)  # inference tensors: no version
        assert inf(x).shape == (2, N) and inf(x).shape == (2, N)


def test_bias_requiring_grad_goes_through_autograd():
    """The plan's short path looks only at x and the bias: a bias that requires grad (x does not) must still get
    its gradient, through the op's autograd."""
    for op, layer in _layers().items():
        layer.bias.requires_grad_(True)  # the converted layers' bias is frozen by default
        y = layer(torch.randn(3, K))
        assert y.grad_fn is not None, op
        y.sum().backward()
        torch.testing.assert_close(layer.bias.grad, torch.full((N,), 3.0), atol=0, rtol=0)


def _kernel_args(op, layer, x, with_bias):
    w = layer.weight
    b = layer.bias.detach().to(x.dtype) if with_bias else None
    if op in ("int4_mm", "w4a8_mm"):
        return (x, w.qweight, w.scales, w.offsets, w.effective_group_size, b)
    if op == "sparse24_mm":
        return (x, w.values, w.meta, b)
    return (x, w.qweight, w.scales, w.offsets, w.meta, w.kept_group_size, b)


@pytest.mark.parametrize("op", ["int4_mm", "sparse24_mm", "sparse24_int4_mm", "w4a8_mm"])
def test_extension_functions_are_the_dispatcher_ops(op):
    """turbokernels._C.<op> (the backends' entry, csrc/ops.cpp) runs the kernel torch.ops.turbokernels_C.<op> runs:
    the same bits, the same refusals."""
    from turbokernels import _ext
    if not _ext.available():
        pytest.skip(f"turbokernels._C is not available: {_ext.load_error()}")
    layer = _layers()[op]
    for rows in (1, 5, 37):
        for with_bias in (False, True):
            args = _kernel_args(op, layer, torch.randn(rows, K), with_bias)
            ours = getattr(_ext.C, op)(*args)
            theirs = getattr(torch.ops.turbokernels_C, op)(*args)
            assert ours.shape == (rows, N) and torch.equal(ours, theirs), (op, rows, with_bias)
    bad = _kernel_args(op, layer, torch.randn(2, K + 8), False)
    with pytest.raises(RuntimeError, match=rf"{op}\("):
        getattr(_ext.C, op)(*bad)
    # below autograd, as the public op's own kernel runs it: an input that requires grad gives no graph here
    args = _kernel_args(op, layer, torch.randn(2, K).requires_grad_(), False)
    assert getattr(_ext.C, op)(*args).grad_fn is None


def test_functional_weight_plan_follows_the_weight():
    """The functionals keep a plan per weight object (ops/_linear.weight_plan): a replaced tensor, or one changed in
    place, is what the next call uses; x is still checked per call; the plan does not keep the weight alive."""
    import gc
    from turbokernels.ops import _linear
    torch.manual_seed(1)
    lin = torch.nn.Linear(K, N)
    x = torch.randn(3, K)
    w = tk.Int4Weight.from_float(lin.weight.detach(), group_size=32)

    def fresh():  # a new object: a new plan, built from the tensors as they are now
        return tk.int4_linear(x, tk.Int4Weight(w.qweight, w.scales, w.offsets, w.group_size, w.in_features))

    first = tk.int4_linear(x, w)
    assert torch.equal(first, fresh())
    w.scales = w.scales * 2  # replaced
    assert torch.equal(tk.int4_linear(x, w), fresh()) and not torch.equal(tk.int4_linear(x, w), first)
    before = tk.int4_linear(x, w)
    w.offsets.add_(0.5)  # in place
    assert torch.equal(tk.int4_linear(x, w), fresh()) and not torch.equal(tk.int4_linear(x, w), before)
    with pytest.raises(ValueError, match=r"int4_linear\(x\)"):
        tk.int4_linear(torch.randn(3, K + 1), w)
    n = len(_linear._WEIGHT_PLANS)
    del w
    gc.collect()
    assert len(_linear._WEIGHT_PLANS) == n - 1


@pytest.mark.parametrize("op", LINEAR_USUAL_OPS)
def test_usual_cpu_call_in_one_cxx_call(op, monkeypatch):
    """The modules' and functionals' usual CPU call runs in one C++ call (turbokernels._C.linear_usual: the checks of
    x and the bias, the reshape, the kernel): the bits of the op on the same arguments, for 1-, 2- and 3-D x in each
    dtype, with and without a bias; a call it does not serve (x requiring grad, a forced backend) runs the Python
    steps."""
    import turbokernels.ops._linear as linear
    real = linear._linear_usual()
    if not real:
        pytest.skip("the extension's one-call entry")
    served = []
    monkeypatch.setattr(linear, "_LINEAR_USUAL", serving_spy(real, served))
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lin = torch.nn.Linear(K, N).to(dtype)
        layer = {"int4_mm": lambda: tk.nn.Int4Linear.from_linear(lin, group_size=32),
                 "sparse24_mm": lambda: tk.nn.Sparse24Linear.from_linear(lin),
                 "sparse24_int4_mm": lambda: tk.nn.Sparse24Int4Linear.from_linear(lin, group_size=32),
                 "w4a8_mm": lambda: tk.nn.W4A8Linear.from_linear(lin, group_size=32)}[op]()
        w, b = layer.weight, layer.bias.to(dtype)
        functional = {"int4_mm": tk.int4_linear, "sparse24_mm": tk.sparse24_linear,
                      "sparse24_int4_mm": tk.sparse24_int4_linear, "w4a8_mm": tk.w4a8_linear}[op]
        weights = {"int4_mm": lambda: (w.qweight, w.scales, w.offsets, w.effective_group_size),
                   "w4a8_mm": lambda: (w.qweight, w.scales, w.offsets, w.effective_group_size),
                   "sparse24_mm": lambda: (w.values, w.meta),
                   "sparse24_int4_mm": lambda: (w.qweight, w.scales, w.offsets, w.meta, w.kept_group_size)}[op]()
        for shape in ((K,), (3, K), (2, 5, K)):
            x = torch.randn(shape).to(dtype)
            for bias in (None, b):
                served.clear()
                with torch.no_grad():
                    out_f = functional(x, w, bias)
                    out_m = layer(x) if bias is b else None
                x2 = x.reshape(-1, K)
                want = getattr(torch.ops.turbokernels, op)(x2, *weights, bias).reshape(*shape[:-1], N)
                assert served and all(served), (op, dtype, shape)
                assert out_f.shape == want.shape and torch.equal(out_f, want), (op, dtype, shape, bias is None)
                if out_m is not None:
                    assert torch.equal(out_m, want)
    served.clear()
    xg = torch.randn(3, K, dtype=dtype, requires_grad=True)
    functional(xg, w, None).float().sum().backward()
    assert not any(served) and xg.grad is not None  # x requires grad: the C++ entry declines it (autograd's path)
    served.clear()
    with tk.backend("cpu"):
        functional(x, w, None)
    assert served == []  # a forced backend: the Python steps (which honour it)
