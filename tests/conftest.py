"""Test setup. On a machine without CUDA the Triton kernels run under the interpreter on CPU tensors; the variable
must be set before triton is first imported, hence here. With a GPU (bench/gpu_check.sh) kernels run for real.

`make test` runs the suite in pytest-xdist workers (`-n N --dist loadfile`, one worker per CPU); `python -m pytest
-q` runs it in one process. In a worker, torch gets its share of the CPUs for its intra-op threads (1 each with 2
workers on 2 cores: more would oversubscribe the cores, and BLAS-heavy tests slow down several times);
DEFAULT_THREADS keeps torch's own default, which the tests that compare thread counts run with."""
import contextlib
import os
import zlib

import torch

DEFAULT_THREADS = torch.get_num_threads()  # torch's default here, before a worker's share is set below
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cpus // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside the block (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs in every test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- hypothesis profiles (tests/test_fuzz.py) ----------------------------------------------------------------------
# "ci" (the default): few examples per op, a fixed seed per test (derandomize: CI runs the same examples every time,
# a failure reproduces locally), no example database, no deadline (the Triton interpreter is slow and its speed
# varies with the machine's load). "long": many random examples on larger shapes, for a nightly or a local hunt:
#     HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py
# function_scoped_fixture is suppressed because the only function-scoped fixture the fuzz tests see is the autouse
# _fresh_seed above, which seeds torch's global generator once per test; the fuzz tests draw every input from a
# torch.Generator seeded by hypothesis, so nothing depends on that fixture being re-run per example.
try:
    from hypothesis import HealthCheck, settings as _hypothesis_settings
except ImportError:  # hypothesis is in the `test` extra; only tests/test_fuzz.py needs it
    pass
else:
    _hypothesis_settings.register_profile(
        "ci", max_examples=20, deadline=None, derandomize=True, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture])
    _hypothesis_settings.register_profile(
        "long", max_examples=500, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture])
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def serving_spy(fn, served: list):
    """fn wrapped to append to `served`, on each call, whether it returned something (a one-call C++ entry that
    answers None for a call it does not serve)."""
    def spy(*args):
        out = fn(*args)
        served.append(out is not None)
        return out
    return spy


class RecordingMode(TorchDispatchMode):
    """A dispatch mode that records the name of every op it sees (and runs it): what must still see our ops."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
