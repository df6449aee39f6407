"""Ops called from several Python threads at once (a ThreadPoolExecutor, each worker running its own op, shape,
dtype and backend many times) give the bits they give single-threaded; and the shared state behind them is
thread-safe: the Autotuner (a key is tuned once, tunings never overlap), the loading of turbokernels._C (one
attempt, one warning), the backend choice (`with tk.backend()` is per thread; `tk.set_backend` is process-global
by design) and the Triton interpreter (its per-launch state is global: kernels/_launch.py serializes interpreted
launches; test_interpreted_launches_from_threads fails without that lock).
"""
import contextvars
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import turbokernels as tk
from turbokernels import _ext, backends
from conftest import DEFAULT_THREADS, interpreting, torch_threads

TRITON = interpreting() or torch.cuda.is_available()
HAS_CPU_KERNELS = all(backends.check_extension_op(op, "cpu")(torch.empty(1)) is None
                      for op in ("int4_mm", "sparse24_mm"))
WORKERS = 6


def device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def equal_bits(a, b):
    a, b = (a if isinstance(a, (tuple, list)) else [a]), (b if isinstance(b, (tuple, list)) else [b])
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
                                    for x, y in zip(a, b))


def run_concurrently(jobs, repeats, workers=WORKERS):
    """jobs: {name: fn}. Each fn is run once single-threaded (the expected result), then `repeats` times per job,
    interleaved, on `workers` threads started together; returns the names whose result ever differed."""
    expected = {name: fn() for name, fn in jobs.items()}
    start = threading.Barrier(workers)

    def worker(i):
        start.wait()  # every worker starts at once
        bad = []
        names = list(jobs)
        for r in range(repeats):
            for j in range(len(names)):
                name = names[(i + j + r) % len(names)]  # workers run different jobs at any moment
                if not equal_bits(jobs[name](), expected[name]):
                    bad.append(name)
        return bad

    with ThreadPoolExecutor(workers) as pool:
        return sorted({name for bad in pool.map(worker, range(workers)) for name in bad})


def int4_job(backend, M, K, N, dtype, gs):
    dev = device(backend)
    w = tk.quantize_int4(torch.randn(N, K), group_size=gs).to(dev)
    x, bias = torch.randn(M, K, device=dev).to(dtype), torch.randn(N, device=dev).to(dtype)

    def job():
        with tk.backend(backend):
            return tk.int4_linear(x, w, bias)
    return job


def sparse24_job(backend, M, K, N, dtype):
    dev = device(backend)
    weight = tk.Sparse24Weight.from_dense(tk.prune_24(torch.randn(N, K)).to(dtype)).to(dev)
    x = torch.randn(M, K, device=dev).to(dtype)

    def job():
        with tk.backend(backend):
            return tk.sparse24_linear(x, weight)
    return job


def sparse24_int4_job(backend, M, K, N, dtype):
    dev = device(backend)
    weight = tk.Sparse24Int4Weight.from_dense(tk.prune_24(torch.randn(N, K)), group_size=32).to(dev)
    x = torch.randn(M, K, device=dev).to(dtype)

    def job():
        with tk.backend(backend):
            return tk.sparse24_int4_linear(x, weight)
    return job


def attention_job(backend, b, sq, sk, hq, hkv, d, dtype, **kw):
    dev = device(backend)
    q = torch.randn(b, sq, hq, d, device=dev).to(dtype)
    k, v = (torch.randn(b, sk, hkv, d, device=dev).to(dtype) for _ in range(2))

    def job():
        with tk.backend(backend):
            return tk.attention(q, k, v, return_lse=True, **kw)
    return job


def attention_bwd_job(backend, dtype):
    dev = device(backend)
    q0 = torch.randn(1, 17, 4, 16, device=dev).to(dtype)
    k0, v0 = (torch.randn(1, 23, 2, 16, device=dev).to(dtype) for _ in range(2))
    dout = torch.randn(q0.shape, device=dev).to(dtype)

    def job():
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        with tk.backend(backend):
            tk.attention(q, k, v, causal=True, deterministic=True).backward(dout)
        return q.grad, k.grad, v.grad
    return job


def decode_job(backend, paged, dtype):
    dev = device(backend)
    B, T, Hq, Hkv, D = 2, 1, 4, 2, 32
    if paged:
        k_cache, v_cache = (torch.randn(9, 16, Hkv, D, device=dev).to(dtype) for _ in range(2))
        block_table = torch.randperm(9, device=dev)[:8].view(B, 4).to(torch.int32)
    else:
        k_cache, v_cache = (torch.randn(B, 80, Hkv, D, device=dev).to(dtype) for _ in range(2))
        block_table = None
    q = torch.randn(B, T, Hq, D, device=dev).to(dtype)
    seqlens = torch.tensor([64, 23], dtype=torch.int32, device=dev)

    def job():
        with tk.backend(backend):
            return tk.decode_attention(q, k_cache, v_cache, seqlens, block_table=block_table, softcap=4.0)
    return job


def append_job():
    k0, v0 = (torch.randn(2, 32, 2, 16, dtype=torch.float16) for _ in range(2))
    k_new, v_new = (torch.randn(2, 3, 2, 16, dtype=torch.float16) for _ in range(2))
    seqlens = torch.tensor([0, 20], dtype=torch.int32)

    def job():
        k, v = k0.clone(), v0.clone()  # each call appends into its own copy
        return k, v, tk.kv_cache_append(k, v, k_new, v_new, seqlens)
    return job


# ---- the ops --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="turbokernels._C has no CPU kernels")
def test_cpu_kernels_from_threads():
    """The C++ kernels (at::parallel_for inside) called from several Python threads at once: every path by M."""
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    jobs = {
        "int4 M=1 fp16": int4_job("cpu", 1, 512, 1000, f16, 128),
        "int4 M=5 bf16 g100": int4_job("cpu", 5, 300, 257, bf16, 100),
        "int4 M=200 fp32 (BLAS)": int4_job("cpu", 200, 256, 300, f32, 64),
        "sparse24 M=3 fp16": sparse24_job("cpu", 3, 520, 1024, f16),
        "sparse24 M=17 bf16": sparse24_job("cpu", 17, 256, 300, bf16),
        "sparse24 M=100 fp32 (BLAS)": sparse24_job("cpu", 100, 128, 200, f32),
        "decode bf16": decode_job("cpu", False, bf16),
        "decode paged fp16": decode_job("cpu", True, f16),
    }
    with torch_threads(DEFAULT_THREADS):  # torch's default (under pytest-xdist this process may be at 1)
        assert run_concurrently(jobs, repeats=20) == []


def test_reference_from_threads():
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    jobs = {
        "int4": int4_job("reference", 7, 256, 130, bf16, 64),
        "sparse24": sparse24_job("reference", 9, 128, 70, f16),
        "sparse24_int4": sparse24_int4_job("reference", 5, 128, 40, f32),
        "attention": attention_job("reference", 2, 33, 40, 4, 2, 32, f16, causal=True),
        "attention alibi+softcap": attention_job("reference", 1, 20, 20, 2, 1, 64, f32, softcap=5.0,
                                                 alibi_slopes=torch.rand(2)),
        "attention bwd": attention_bwd_job("reference", bf16),
        "decode paged": decode_job("reference", True, f16),
        "decode": decode_job("reference", False, bf16),
        "kv_cache_append": append_job(),
    }
    assert run_concurrently(jobs, repeats=10) == []


@pytest.mark.skipif(not TRITON, reason="triton needs CUDA or TRITON_INTERPRET=1")
def test_interpreted_launches_from_threads():
    """Triton launchers from several threads. Under the interpreter this needs kernels/_launch.py's lock: without
    it launches fail with "y >= grid_dim[1]" or "`_semantic` argument must be provided outside of JIT functions"
    (the interpreter's global builder and patched triton.language are shared between threads)."""
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    jobs = {
        "int4 M=3": int4_job("triton", 3, 64, 40, f16, 32),
        "int4 M=17 g40": int4_job("triton", 17, 80, 17, bf16, 40),
        "sparse24": sparse24_job("triton", 5, 48, 33, f32),
        "sparse24_int4": sparse24_int4_job("triton", 2, 64, 17, f16),
        "attention": attention_job("triton", 1, 17, 20, 2, 1, 16, f16, causal=True),
        "decode": decode_job("triton", False, f16),
        "decode paged": decode_job("triton", True, bf16),
    }
    assert run_concurrently(jobs, repeats=2, workers=4) == []


@pytest.mark.skipif(not interpreting(), reason="the interpreter's lock")
def test_interpreter_lock_is_held_for_each_launch(monkeypatch):
    """Every interpreted launch (`kernel[grid](...)`, ours or anyone's) runs inside the lock, which is released
    after the launch, also after a failed one."""
    from triton.runtime.interpreter import InterpretedFunction
    from turbokernels.kernels import _launch
    from turbokernels.kernels.int4_mm import int4_mm_kernel
    held = []

    def lock_is_free():  # asked from another thread: the lock is reentrant for its owner
        with ThreadPoolExecutor(1) as pool:
            def try_acquire():
                if _launch.INTERPRETER_LOCK.acquire(blocking=False):
                    _launch.INTERPRETER_LOCK.release()
                    return True
                return False
            return pool.submit(try_acquire).result()

    def probe(self, *args, **kwargs):  # stands in for the interpreter's own run
        held.append(not lock_is_free())
        raise RuntimeError("probe")

    monkeypatch.setattr(InterpretedFunction, "_turbokernels_run", probe)
    with pytest.raises(RuntimeError, match="probe"):
        int4_mm_kernel[(1,)]()
    assert held == [True]
    assert lock_is_free()


# ---- the autotuner --------------------------------------------------------------------------------------------
class FakeBench:
    """Replaces _launch._benchmark: records every timing, how many run at once, and sleeps a little so that
    threads overlap; candidate c takes c.ms."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []
        self.running = 0
        self.max_running = 0

    def __call__(self, fn):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            cand = fn()
            time.sleep(0.01)
            with self.lock:
                self.calls.append(cand)
            return cand.ms
        finally:
            with self.lock:
                self.running -= 1


class Cand:
    def __init__(self, name, ms):
        self.name, self.ms = name, ms

    def __repr__(self):
        return self.name


def test_autotuner_tunes_each_key_once_under_concurrency(monkeypatch):
    """8 threads ask for 3 keys at once on a (pretend) CUDA device: each key's candidates are timed exactly once,
    never two timings at the same time, and every thread gets the key's fastest candidate."""
    from turbokernels.kernels import _launch
    bench = FakeBench()
    monkeypatch.setattr(_launch, "_benchmark", bench)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("TURBOKERNELS_AUTOTUNE", raising=False)
    tuner = _launch.Autotuner()
    cands = {key: [Cand(f"{key}-slow", 3.0), Cand(f"{key}-fast", 1.0), Cand(f"{key}-mid", 2.0)]
             for key in ("a", "b", "c")}
    dev = torch.device("cuda", 0)
    start = threading.Barrier(8)

    def ask(i):
        key = "abc"[i % 3]
        start.wait()
        return key, tuner.choose(dev, cands[key], key, lambda cand: cand)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert all(best.name == f"{key}-fast" for key, best in answers), answers
    assert sorted(map(repr, bench.calls)) == sorted(repr(c) for cs in cands.values() for c in cs), bench.calls
    assert bench.max_running == 1
    # tuned keys are answered without timing again
    assert tuner.choose(dev, cands["a"], "a", lambda cand: cand).name == "a-fast" and len(bench.calls) == 9


def test_autotuner_skips_failing_candidates_and_stays_usable(monkeypatch):
    from turbokernels.kernels import _launch
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("TURBOKERNELS_AUTOTUNE", raising=False)

    def bench(fn):
        cand = fn()
        if cand.ms is None:
            raise RuntimeError("out of shared memory")
        return cand.ms
    monkeypatch.setattr(_launch, "_benchmark", bench)
    tuner = _launch.Autotuner()
    dev = torch.device("cuda", 0)
    assert tuner.choose(dev, [Cand("big", None), Cand("ok", 2.0)], "k", lambda c: c).name == "ok"
    assert tuner.choose(dev, [Cand("x", None), Cand("y", None)], "k2", lambda c: c).name == "x"  # none ran: first
    # a candidate's launch may tune another key (reentrant lock: no deadlock)
    inner = _launch.Autotuner()
    nested = tuner.choose(dev, [Cand("p", 1.0), Cand("q", 2.0)], "outer",
                          lambda c: (inner.choose(dev, [Cand("i1", 5.0), Cand("i2", 4.0)], "inner", lambda d: d), c)[1])
    assert nested.name == "p" and inner.best[(0, "inner")].name == "i2"


# ---- turbokernels._C loading ----------------------------------------------------------------------------------
def test_extension_load_is_attempted_once_and_warns_once(monkeypatch):
    """Several threads make the first call at once and the load fails: one attempt, one warning, the same error
    for everyone."""
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.delenv("TURBOKERNELS_NO_EXT", raising=False)
    attempts = []

    def failing_import():
        attempts.append(threading.get_ident())
        time.sleep(0.05)  # long enough for every thread to arrive while the first one loads
        raise ImportError("undefined symbol: _ZN3c10fake")
    monkeypatch.setattr(_ext, "_import_extension", failing_import)
    start = threading.Barrier(8)

    def first_call(_):
        start.wait()
        return _ext.available(), _ext.load_error()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(first_call, range(8)))
    assert len(attempts) == 1
    assert len([w for w in caught if "turbokernels._C could not be loaded" in str(w.message)]) == 1
    assert results == [(False, "ImportError: undefined symbol: _ZN3c10fake")] * 8


def test_extension_loads_once_from_threads(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.delenv("TURBOKERNELS_NO_EXT", raising=False)
    attempts = []

    def slow_import():
        attempts.append(1)
        time.sleep(0.05)
    monkeypatch.setattr(_ext, "_import_extension", slow_import)
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda _: _ext.available(), range(8)))
    assert len(attempts) == 1


def test_kernel_lookup_cache_from_threads():
    """The lru_cache'd lookup of compiled kernels (_ext._has_kernel) filled by many threads at once."""
    _ext._has_kernel.cache_clear()
    x = torch.empty(1)
    checks = [backends.check_extension_op(op, "cpu") for op in ("int4_mm", "sparse24_mm", "no_such_op")]
    expected = [None, None, "turbokernels._C was built without a cpu kernel for no_such_op"] if _ext.available() \
        else [check(x) for check in checks]
    _ext._has_kernel.cache_clear()
    start = threading.Barrier(8)

    def ask(_):
        start.wait()
        return [check(x) for check in checks for _ in range(50)][::50]

    with ThreadPoolExecutor(8) as pool:
        assert all(got == expected for got in pool.map(ask, range(8)))


# ---- choosing the backend ---------------------------------------------------------------------------------------
def int4_args():
    w = tk.quantize_int4(torch.randn(40, 64), group_size=32)
    return torch.randn(3, 64), w.qweight, w.scales, w.offsets, 32


def test_backend_context_is_per_thread():
    """Threads forcing different backends with `with tk.backend()` at the same time each get their own: the
    choice is a contextvar."""
    args = int4_args()
    names = ["reference", None] + (["cpu"] if HAS_CPU_KERNELS else []) + (["triton"] if TRITON else [])
    auto = backends.select("int4_mm", *args)[0]
    start = threading.Barrier(len(names))

    def worker(name):
        start.wait()
        got = []
        for _ in range(200):
            with tk.backend(name):
                got.append(backends.select("int4_mm", *args)[0])
            time.sleep(0)  # let the others run in between
        return got

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(worker, names))
    for name, got in zip(names, results):
        assert set(got) == {name or auto}, (name, set(got))


def test_backend_context_does_not_follow_work_into_a_thread_pool():
    """A thread pool's workers do not inherit the submitting thread's context: a backend forced with
    `with tk.backend()` does not apply to work submitted from inside the block (copy the context to take it
    along)."""
    args = int4_args()
    auto = backends.select("int4_mm", *args)[0]
    with ThreadPoolExecutor(1) as pool, tk.backend("reference"):
        assert pool.submit(lambda: backends.select("int4_mm", *args)[0]).result() == auto
        ctx = contextvars.copy_context()
        assert pool.submit(ctx.run, lambda: backends.select("int4_mm", *args)[0]).result() == "reference"


def test_set_backend_is_process_global():
    """tk.set_backend is global by design (one switch for the whole process, e.g. at start-up): another thread
    sees it, and a thread's `with tk.backend()` still wins inside that thread."""
    args = int4_args()
    try:
        tk.set_backend("reference")
        with ThreadPoolExecutor(2) as pool:
            assert pool.submit(lambda: backends.select("int4_mm", *args)[0]).result() == "reference"

            def forced_inside():
                with tk.backend(None):  # 'auto' inside the block overrides the global choice
                    return backends.select("int4_mm", *args)[0]
            assert pool.submit(forced_inside).result() == ("cpu" if HAS_CPU_KERNELS else "reference")
    finally:
        tk.set_backend(None)
    assert backends.forced_backend() is None
