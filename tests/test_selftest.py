"""turbokernels selftest (python/turbokernels/selftest.py): in-process on the CPU backends, the Triton kernels under
the interpreter on one small op, a deliberately broken backend making it fail with exit code 1, and the CLI."""
import os
import subprocess
import sys

import pytest
import torch

from turbokernels import backends, cli, selftest
from conftest import interpreting


def test_every_op_passes_on_the_cpu_backends():
    """Every op, one shape each, fp16/bf16/fp32, on reference and the C++ CPU kernels (where built)."""
    report = selftest.run(quick=True, device="cpu", backend_names=["reference", "cpu"])
    assert {r.op for r in report.rows} == set(selftest.OPS)
    assert not report.failures, "\n".join(selftest.format_row(r) for r in report.failures)
    for r in report.rows:
        assert r.ok and r.ratio <= 1.0 and r.max_error <= r.max_bound, selftest.format_row(r)
    assert {r.dtype for r in report.rows} == {"float16", "bfloat16", "float32"}


@pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or CUDA")
def test_triton_decode_attention_passes():
    report = selftest.run(ops=["decode_attention"], quick=True, backend_names=["triton"])
    assert [r.backend for r in report.rows] == ["triton"] * 3 and not report.skipped
    assert not report.failures, "\n".join(selftest.format_row(r) for r in report.failures)


def test_a_broken_backend_fails_with_exit_code_1(monkeypatch, capsys):
    """The reference int4_mm returning out * 1.01: every row of it fails, the others pass, main returns 1."""
    impl = backends.registered("int4_mm")["reference"]
    good = impl.fn
    monkeypatch.setattr(impl, "fn", lambda *args: good(*args) * 1.01)
    report = selftest.run(ops=["int4_mm"], quick=True, device="cpu", backend_names=["reference", "cpu"])
    bad = {(r.backend, r.dtype) for r in report.failures}
    assert bad == {("reference", dt) for dt in ("float16", "bfloat16", "float32")}
    assert all("exceed the derived bound" in r.note for r in report.failures)
    assert selftest.main(ops=["int4_mm"], quick=True) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "failed" in out.splitlines()[-1]


def test_a_wrong_kv_cache_append_is_caught(monkeypatch):
    """kv_cache_append is compared exactly: the new tokens written one slot early fail."""
    from turbokernels.reference import decode_attention as ref
    impl = backends.registered("kv_cache_append")["reference"]
    monkeypatch.setattr(impl, "fn", lambda kc, vc, kn, vn, lens, bt, *options:
                        ref.kv_cache_append(kc, vc, kn, vn, lens - 1, bt, *options) + 1)
    report = selftest.run(ops=["kv_cache_append"], quick=True, device="cpu", backend_names=["reference"])
    assert report.rows and all(not r.ok and "differs" in r.note for r in report.rows)


def test_cli_runs_one_op(capsys):
    assert cli.main(["selftest", "--op", "kv_cache_append", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("kv_cache_append")]
    ran = 2 if interpreting() else 1  # reference, and the Triton kernel under the interpreter
    assert len(rows) == 3 * ran and all(line.endswith("  ok") for line in rows)
    assert f"{3 * ran} passed, 0 failed" in out.splitlines()[-1]


def test_cli_names_the_skipped_triton_backend():
    """Without the interpreter on a CPU: Triton is listed as skipped, with the way to include it."""
    if torch.cuda.is_available():
        pytest.skip("Triton runs here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "turbokernels.cli", "selftest", "--op", "attention_fwd", "--quick"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "skipped: attention_fwd on triton" in res.stdout and "TRITON_INTERPRET=1" in res.stdout
    assert "run `TRITON_INTERPRET=1 turbokernels selftest`" in res.stdout
