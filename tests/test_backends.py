"""The one dispatch mechanism: forcing, precedence, clear errors, and the auto order."""
import os
import subprocess
import sys

import pytest
import torch

import turbokernels as tk
from turbokernels import backends
from _int4_cases import make_weight


def _args(device="cpu"):
    w = make_weight(32, 64, 32).to(device)
    return (torch.randn(2, 64, dtype=torch.float16, device=device), w.qweight, w.scales, w.offsets, 32)


def test_context_manager_forces_and_restores():
    assert backends.forced_backend() is None
    with tk.backend("reference"):
        assert backends.forced_backend() == "reference"
        assert backends.select("int4_mm", *_args())[0] == "reference"
        with tk.backend(None):  # an inner automatic block
            assert backends.forced_backend() is None
    assert backends.forced_backend() is None


def test_set_backend_and_context_precedence():
    try:
        tk.set_backend("reference")
        assert backends.forced_backend() == "reference"
        with tk.backend("triton"):
            assert backends.forced_backend() == "triton"
        assert backends.forced_backend() == "reference"
    finally:
        tk.set_backend(None)
    assert backends.forced_backend() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("TURBOKERNELS_BACKEND", "reference")
    assert backends.forced_backend() == "reference"
    with tk.backend("triton"):
        assert backends.forced_backend() == "triton"
    monkeypatch.setenv("TURBOKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TURBOKERNELS_BACKEND"):
        backends.forced_backend()


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        tk.set_backend("fast")
    with pytest.raises(ValueError, match="unknown backend"):
        with tk.backend("gpu"):
            pass


def test_forced_backend_that_cannot_run_is_an_error_not_a_fallback():
    args = _args()
    with tk.backend("cuda"):  # int4_mm's cuda backend exists, but CPU tensors: an error naming why, no fallback
        with pytest.raises(tk.BackendUnavailable, match="forced backend 'cuda' cannot run this call: needs cuda"):
            torch.ops.turbokernels.int4_mm(*args)
    with tk.backend("torch"):  # and an op without that backend at all
        with pytest.raises(tk.BackendUnavailable, match="no 'torch' backend"):
            torch.ops.turbokernels.int4_mm(*args)
    x, qw, s, o, _ = args
    w8 = make_weight(32, 64, 8)
    with tk.backend("triton"):
        with pytest.raises(tk.BackendUnavailable, match="group_size=8"):
            torch.ops.turbokernels.int4_mm(x, w8.qweight, w8.scales, w8.offsets, 8)


def test_triton_on_cpu_without_interpreter_is_refused():
    code = ("import torch, turbokernels as tk; from turbokernels import backends;"
            "print(backends.check_triton(torch.empty(1)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "TRITON_INTERPRET" in out


def test_auto_order_on_cpu():
    name, _ = backends.select("int4_mm", *_args())
    expected = "cpu" if backends.check_extension_op("int4_mm", "cpu")(torch.empty(1)) is None else "reference"
    assert name == expected


def test_attention_on_cpu_runs_torch_kernels_unless_they_cannot():
    """CPU attention: torch's fused kernels (the `torch` backend) for every call they compute exactly; softcap (no
    additive mask expresses tanh) falls to the reference, and forcing `torch` for it names the reason."""
    assert backends.AUTO_ORDER["cpu"] == ("cpu", "torch", "reference")
    q, k = torch.randn(1, 5, 2, 16), torch.randn(1, 7, 1, 16)
    fwd = (q, k, k, None, None, None, 0.25, True, 3, -1)
    assert backends.select("attention_fwd", *fwd, 0.0)[0] == "torch"
    assert backends.select("attention_fwd", *fwd, 2.0)[0] == "reference"
    with tk.backend("torch"), pytest.raises(tk.BackendUnavailable, match="softcap"):
        backends.select("attention_fwd", *fwd, 2.0)
    cache = torch.randn(1, 8, 1, 16)
    decode = (q[:, :1], cache, cache, torch.tensor([4], dtype=torch.int32), None, None, 0.25, -1, -1)
    plain = (None, None, True, False)  # cache_batch_idx, cache_leftpad, causal, return_lse
    # decode: our C++ kernel (csrc/cpu/decode_attention.cpp, softcap included) when the extension has it
    own = backends.check_extension_op("decode_attention", "cpu")(q) is None
    assert backends.select("decode_attention", *decode, 0.0, *plain)[0] == ("cpu" if own else "torch")
    assert backends.select("decode_attention", *decode, 1.0, *plain)[0] == ("cpu" if own else "reference")
    with tk.backend("torch"):
        assert backends.select("decode_attention", *decode, 0.0, *plain)[0] == "torch"
    # FlashAttention's options (here return_lse): not in the C++ kernel, the torch backend (reference with softcap)
    assert backends.select("decode_attention", *decode, 0.0, None, None, True, True)[0] == "torch"
    assert backends.select("decode_attention", *decode, 1.0, None, None, False, False)[0] == "reference"


def test_non_auto_backend_runs_only_when_forced():
    calls = []
    op = "_test_only_op"
    backends.register(op, "reference", check=backends.always)(lambda x: calls.append("ref") or x)
    backends.register(op, "cpu", check=backends.always, auto=False)(lambda x: calls.append("cpu") or x)
    x = torch.ones(1)
    backends.dispatch(op, x)
    with tk.backend("cpu"):
        backends.dispatch(op, x)
    assert calls == ["ref", "cpu"]


def test_package_imports_without_the_extension():
    code = "import turbokernels as tk, torch; print(tk.int4_linear(torch.randn(1, 64), tk.quantize_int4(torch.randn(8, 64), 32)).shape)"
    env = dict(os.environ, TURBOKERNELS_NO_EXT="1")
    res = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 8])" in res.stdout


def test_broken_extension_warns_once_and_falls_back():
    code = ("import sys, warnings; sys.modules['turbokernels._C'] = None\n"  # importing it now raises ImportError
            "import torch, turbokernels as tk\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    w = tk.quantize_int4(torch.randn(8, 64), 32)\n"
            "    for _ in range(3): y = tk.int4_linear(torch.randn(2, 64), w)\n"
            "print(sum('turbokernels._C could not be loaded' in str(c.message) for c in caught),"
            " tk.backends.select('int4_mm', torch.randn(2, 64), w.qweight, w.scales, w.offsets, 32)[0])\n")
    env = {k: v for k, v in os.environ.items() if k != "TURBOKERNELS_NO_EXT"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "reference"]


def test_extension_built_for_another_torch_is_refused():
    """_C is tied to the torch release it was compiled against: under another one it is not used (one warning that
    names both versions; the CPU op then runs on the reference), instead of risking an ABI crash."""
    from turbokernels import _ext
    if not _ext.available():
        pytest.skip(f"turbokernels._C is not available: {_ext.load_error()}")
    assert _ext.C.built_for_torch == _ext._torch_release(torch.__version__)
    assert _ext._torch_release("2.14.1+cu130") == "2.14.1" and _ext._torch_release("2.15.0.dev20260101") == "2.15.0"
    code = ("import warnings, torch; torch.__version__ = '1.13.0'\n"
            "import turbokernels as tk\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    w = tk.quantize_int4(torch.randn(8, 64), 32)\n"
            "    y = tk.int4_linear(torch.randn(2, 64), w)\n"
            "print([str(c.message) for c in caught if 'built for torch' in str(c.message)])\n"
            "print(tk.backends.select('int4_mm', torch.randn(2, 64), w.qweight, w.scales, w.offsets, 32)[0])\n")
    env = {k: v for k, v in os.environ.items() if k != "TURBOKERNELS_NO_EXT"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    warned, chosen = res.stdout.strip().splitlines()
    assert f"built for torch {_ext.C.built_for_torch}, this is torch 1.13.0" in warned and warned.count("built") == 1
    assert chosen == "reference"


def test_autotuner_times_each_candidate_once_per_key(monkeypatch):
    """kernels/_launch.Autotuner on a (pretend) CUDA device: the fastest candidate wins and is remembered."""
    import triton.testing

    from turbokernels.kernels._launch import Autotuner
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (calls.append(fn()), times[calls[-1]])[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("TURBOKERNELS_AUTOTUNE", raising=False)
    tuner, device = Autotuner(), torch.device("cuda", 0)
    assert tuner.choose(device, ["a", "b", "c"], "k1", lambda c: c) == "b"
    assert tuner.choose(device, ["a", "b", "c"], "k1", lambda c: c) == "b"
    assert calls == ["a", "b", "c"]  # timed once
    assert tuner.choose(torch.device("cpu"), ["a", "b"], "k1", lambda c: c) == "a"  # interpreter: heuristic
    monkeypatch.setenv("TURBOKERNELS_AUTOTUNE", "0")
    assert tuner.choose(device, ["c", "b"], "k2", lambda c: c) == "c"


def test_autotuner_during_cuda_graph_capture(monkeypatch):
    """While a CUDA graph is captured a tuned key is served (the warm-up call tuned it), and an untuned key is a
    clear error, neither a timing run recorded into the graph nor a silent untuned config."""
    import triton.testing

    from turbokernels.kernels._launch import Autotuner
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: {"a": 2.0, "b": 1.0}[fn()])
    monkeypatch.delenv("TURBOKERNELS_AUTOTUNE", raising=False)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    tuner, device = Autotuner(), torch.device("cuda", 0)
    assert tuner.choose(device, ["a", "b"], "warm", lambda c: c) == "b"  # the warm-up call, outside the capture
    capturing[0] = True
    assert tuner.choose(device, ["a", "b"], "warm", lambda c: c) == "b"
    with pytest.raises(RuntimeError, match="new shape while a CUDA graph is being captured.*warm-up"):
        tuner.choose(device, ["a", "b"], "cold", lambda c: c)
    assert tuner.choose(device, ["a"], "cold", lambda c: c) == "a"  # one candidate: nothing to tune
    monkeypatch.setenv("TURBOKERNELS_AUTOTUNE", "0")
    assert tuner.choose(device, ["a", "b"], "cold", lambda c: c) == "a"
