"""The GPU acceptance table (python/turbokernels/acceptance.py) and the auto=VERIFIED backends it switches on.

No GPU needed: CUDA tensors are FakeTensorMode's (a real torch.Tensor whose device is cuda:0, no driver touched),
the GPU's architecture is backends.device_capability replaced by the test, and the op is a fake one registered
here, so no kernel runs."""
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import turbokernels as tk
from turbokernels import acceptance, backends, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = "_test_acceptance_op"
Evidence = acceptance.Evidence


def _cuda_tensor():
    with FakeTensorMode():
        return torch.empty(4, device="cuda")


@pytest.fixture
def fake_op(monkeypatch):
    """OP with an automatic reference and a VERIFIED cuda backend (each records its calls), on a pretend sm_90."""
    calls = []
    backends.register(OP, "reference", check=backends.always)(lambda x: calls.append("reference"))
    backends.register(OP, "cuda", check=backends.always, auto=backends.VERIFIED)(lambda x: calls.append("cuda"))
    monkeypatch.setattr(backends, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(acceptance, "PASSED", {})
    try:
        yield calls
    finally:
        backends._REGISTRY.pop(OP, None)
        backends._CHOSEN.clear()


def test_the_committed_table_is_well_formed():
    assert acceptance.problems() == []
    for (op, backend), archs in acceptance.PASSED.items():  # empty today; checked as soon as an entry lands
        assert backends.registered(op)[backend].auto == backends.VERIFIED
        for arch, evidence in archs.items():
            assert acceptance.ARCH_RE.fullmatch(arch)
            assert os.path.isfile(os.path.join(ROOT, evidence.results, "gpu_check.log"))


def test_a_malformed_table_is_reported(tmp_path):
    os.makedirs(tmp_path / "bench/results/gpu-h200")
    (tmp_path / "bench/results/gpu-h200/gpu_check.log").write_text("passed\n")
    good = {("sparse24_mm", "cuda"): {"sm_90": Evidence("bench/results/gpu-h200", True)}}
    assert acceptance.problems(good, repo_root=str(tmp_path)) == []
    bad = {
        ("no_such_op", "cuda"): {"sm_90": Evidence("bench/results/gpu-h200", True)},
        ("sparse24_mm", "cpu"): {"sm_90": Evidence("bench/results/gpu-h200", True)},   # auto=True, not VERIFIED
        ("sparse24_mm", "cuda"): {"sm90": Evidence("bench/results/gpu-h200", True),    # malformed architecture
                                  "sm_80": Evidence("bench/out/gpu", True),             # not committed evidence
                                  "sm_86": Evidence("bench/results/gpu-a10", True),     # no such folder
                                  "sm_89": ("bench/results/gpu-h200", True)},           # not an Evidence
        "sparse24_mm": {"sm_90": Evidence("bench/results/gpu-h200", True)},             # key not (op, backend)
    }
    found = acceptance.problems(bad, repo_root=str(tmp_path))
    for expected in ("no 'cuda' backend registered for op 'no_such_op'", "auto=True", "'sm90'", "bench/out/gpu",
                     "gpu-a10/gpu_check.log", "expected an Evidence", "must be (op, backend)"):
        assert any(expected in p for p in found), (expected, found)
    assert len(found) == 7


def test_arch_names():
    assert acceptance.arch_name((9, 0)) == "sm_90"
    assert acceptance.arch_name((8, 6)) == "sm_86"
    assert acceptance.arch_name((12, 0)) == "sm_120"
    assert all(acceptance.ARCH_RE.fullmatch(acceptance.arch_name(c)) for c in ((8, 0), (9, 0), (10, 0), (12, 1)))


def test_verified_needs_the_architecture_and_a_win_over_triton(monkeypatch):
    monkeypatch.setattr(acceptance, "PASSED", {("int4_mm", "cuda"): {
        "sm_90": Evidence("bench/results/x", faster_than_triton=True),
        "sm_80": Evidence("bench/results/y", faster_than_triton=False)}})
    assert acceptance.verified("int4_mm", "cuda", (9, 0))
    assert not acceptance.verified("int4_mm", "cuda", (8, 0))      # correct there, but not faster
    assert not acceptance.verified("int4_mm", "cuda", (8, 6))      # sm_80's evidence does not cover sm_86
    assert not acceptance.verified("int4_mm", "cuda", None)
    assert not acceptance.verified("sparse24_mm", "cuda", (9, 0))
    line = acceptance.listing("int4_mm", "cuda")
    assert "automatic on: sm_90 (bench/results/x)" in line and "sm_80 (bench/results/y)" in line
    assert acceptance.listing("sparse24_mm", "cuda").startswith("only when forced: not yet verified on a GPU")


def test_verified_backend_is_not_automatic_while_the_table_is_empty(fake_op):
    x = _cuda_tensor()
    assert backends.select(OP, x)[0] == "reference"
    assert backends.select(OP, x, key="k")[0] == "reference"
    backends.dispatch(OP, x)
    assert fake_op == ["reference"]


def test_verified_backend_is_automatic_where_the_table_lists_it(fake_op, monkeypatch):
    x = _cuda_tensor()
    monkeypatch.setattr(acceptance, "PASSED", {(OP, "cuda"): {"sm_90": Evidence("bench/results/x", True),
                                                              "sm_80": Evidence("bench/results/y", False)}})
    assert backends.select(OP, x)[0] == "cuda"
    backends.dispatch(OP, x, key="k")
    assert fake_op == ["cuda"]
    monkeypatch.setattr(backends, "device_capability", lambda device: (8, 0))   # passed, not faster: forced only
    assert backends.select(OP, x)[0] == "reference"
    monkeypatch.setattr(backends, "device_capability", lambda device: (8, 9))   # not listed
    assert backends.select(OP, x)[0] == "reference"
    assert backends.select(OP, torch.empty(4))[0] == "reference"                 # CPU tensors: never


def test_forced_verified_backend_runs_regardless_of_the_table(fake_op):
    x = _cuda_tensor()
    with tk.backend("cuda"):
        assert backends.select(OP, x, key="k")[0] == "cuda"
        backends.dispatch(OP, x)
    backends.dispatch(OP, x, key="k")  # the forced choice is remembered under its own key only
    assert fake_op == ["cuda", "reference"]


def test_remembered_choices_follow_the_architecture(fake_op, monkeypatch):
    """A key need not name the device index: with GPUs of different architectures a VERIFIED verdict is not
    remembered (each call decides), with one architecture it is."""
    x = _cuda_tensor()
    monkeypatch.setattr(acceptance, "PASSED", {(OP, "cuda"): {"sm_90": Evidence("bench/results/x", True)}})
    monkeypatch.setattr(backends, "_uniform", False)
    assert backends.select(OP, x, key="k")[0] == "cuda"
    monkeypatch.setattr(backends, "device_capability", lambda device: (8, 0))
    assert backends.select(OP, x, key="k")[0] == "reference"
    assert not any(k[0] == OP for k in backends._CHOSEN)
    monkeypatch.setattr(backends, "_uniform", True)
    assert backends.select(OP, x, key="k")[0] == "reference"
    assert backends._CHOSEN[(OP, None, "k")][0] == "reference"


def test_register_rejects_other_auto_values():
    with pytest.raises(ValueError, match="VERIFIED"):
        backends.register(OP, "cuda", check=backends.always, auto="yes")
    assert OP not in backends._REGISTRY


def test_sparse24_cuda_backend_is_verified_only(monkeypatch):
    impl = backends.registered("sparse24_mm")["cuda"]
    assert impl.auto == backends.VERIFIED
    monkeypatch.setattr(backends, "device_capability", lambda device: (9, 0))
    cuda0 = torch.device("cuda", 0)
    assert not backends.automatic("sparse24_mm", "cuda", impl, cuda0)
    monkeypatch.setattr(acceptance, "PASSED", {("sparse24_mm", "cuda"): {"sm_90": Evidence("bench/results/x", True)}})
    assert backends.automatic("sparse24_mm", "cuda", impl, cuda0)
    assert not backends.automatic("sparse24_mm", "cuda", impl, torch.device("cpu"))


def test_info_says_where_each_verified_backend_is_automatic(monkeypatch, capsys):
    assert cli.cmd_info(None) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("op turbokernels::sparse24_mm")
    cuda = next(line for line in lines[start:] if line.strip().startswith("cuda"))
    assert ("only when forced: not yet verified on a GPU (acceptance table: python/turbokernels/acceptance.py)"
            in cuda)
    monkeypatch.setattr(acceptance, "PASSED", {("sparse24_mm", "cuda"): {
        "sm_90": Evidence("bench/results/gpu-h200-x", True)}})
    assert cli.cmd_info(None) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("op turbokernels::sparse24_mm")
    cuda = next(line for line in lines[start:] if line.strip().startswith("cuda"))
    assert "automatic on: sm_90 (bench/results/gpu-h200-x)" in cuda
