"""bench/gpu_check.sh fits the lending machine (no GPU needed: its dry run echoes each step and fakes its outputs).

What comes back from a lent GPU is at most 8 plain files of $OUT, 16 MiB each, at most two folders down, named with
[A-Za-z0-9._-]; anything else is silently lost. And the whole check must fit in 8 minutes: the steps' caps must add
up to less than 480 s."""
import glob
import os
import re
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
BUDGET_S = 480
NAME = re.compile(r"[A-Za-z0-9._-]+")
BENCHMARKS = ("int4", "sparse24", "attention", "decode", "e2e", "overhead")


def _dry_run(out, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full.update(GPU_CHECK_DRY_RUN="1", OUT=str(out), **env)
    res = subprocess.run(["bash", SCRIPT], env=full, capture_output=True, text=True, timeout=60, cwd=str(out))
    return res.returncode, res.stdout + res.stderr


def _returned(out):
    """The files of $OUT as the lending machine sees them: (relative path, size), after checking its limits."""
    files = []
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, out)
            assert NAME.fullmatch(name), rel
            assert not os.path.islink(path), rel
            if name in filenames:
                assert os.path.isfile(path), rel
                assert rel.count(os.sep) <= 2, rel
                assert os.path.getsize(path) <= 16 << 20, rel
                files.append(rel)
    assert len(files) <= 8, files
    return sorted(files)


def _members(archive):
    with tarfile.open(archive) as tar:
        return {os.path.normpath(m.name) for m in tar.getmembers() if m.isfile()}


def test_bash_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_dry_run_returns_three_files_with_everything_packed(tmp_path):
    rc, log = _dry_run(tmp_path)
    assert rc == 0, log
    assert _returned(tmp_path) == ["gpu_check.log", "results.tar.gz", "summary.txt"]
    packed = _members(tmp_path / "results.tar.gz")
    expected = {"gpu_tests_cuda.xml", "gpu_tests.xml"}
    expected |= {f"{b}_cuda.{ext}" for b in BENCHMARKS for ext in ("csv", "png")}
    assert packed == expected
    assert "+ timeout" in (tmp_path / "gpu_check.log").read_text()
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[-1] == "status 0" and all(" ok " in line for line in summary[:-1])


def test_steps_run_in_order_cuda_kernel_tests_first(tmp_path):
    rc, log = _dry_run(tmp_path)
    assert rc == 0, log
    commands = [line[2:] for line in log.splitlines() if line.startswith("+ timeout ")]
    order = ["nvidia-smi", "-c ", "pip install", "turbokernels.cli info", "pytest", "pytest", "cli selftest",
             *(f"bench/{b}.py" for b in ("int4", "sparse24", "attention", "attention_decode", "e2e", "overhead"))]
    assert len(commands) == len(order)
    for command, what in zip(commands, order):
        assert what in command, (what, command)
    cuda_files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*cuda*.py")))
    assert "tests/test_sparse24_mm_cuda_sass.py" in cuda_files
    first, rest = commands[4], commands[5]
    assert "-m gpu" in first and "-m gpu" in rest
    assert first.split()[-len(cuda_files):] == cuda_files
    assert all(f"--ignore={f}" in rest.split() for f in cuda_files) and rest.split()[-1] == "tests"


def test_caps_fit_the_budget_and_match_the_header(tmp_path):
    rc, log = _dry_run(tmp_path)
    assert rc == 0, log
    caps = [int(m) for m in re.findall(r"^\+ timeout (\d+) ", log, flags=re.M)]
    text = open(SCRIPT).read()
    declared = [int(v) for v in re.findall(r"^CAP_[A-Z0-9_]+=(\d+)$", text, flags=re.M)]
    assert len(caps) == 13 and sorted(caps) == sorted(declared)   # each declared cap used once, none else
    assert sum(caps) < BUDGET_S
    assert not re.search(r"\btimeout +[0-9]", text)   # no step capped outside the declared budget
    total = re.search(r"^#\s+total .*= +(\d+)$", text, flags=re.M)
    assert total and int(total.group(1)) == sum(caps)   # the header's arithmetic stays true
    assert f"caps total {sum(caps)} s" in text


@pytest.mark.parametrize("step", ["int4", "versions"])
def test_a_timed_out_step_still_returns_the_archive(tmp_path, step):
    """A benchmark that times out, or the machine step whose failure ends the script: the EXIT trap packs."""
    rc, log = _dry_run(tmp_path, GPU_CHECK_DRY_FAIL=step)
    assert rc != 0
    assert _returned(tmp_path) == ["gpu_check.log", "results.tar.gz", "summary.txt"]
    packed = _members(tmp_path / "results.tar.gz")
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(rf"^{step} +TIMED OUT", summary, flags=re.M)
    assert summary.splitlines()[-1] == "status 1"
    if step == "int4":
        assert "int4_cuda.csv" not in packed and {"sparse24_cuda.csv", "overhead_cuda.csv"} <= packed
    else:
        assert packed == set() and "pip install" not in log
