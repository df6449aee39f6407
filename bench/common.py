"""Shared benchmark plumbing: timing (medians), the measured roofline, environment facts, CSV and plots."""
from __future__ import annotations

import contextlib
import csv
import datetime
import os
import platform
import statistics
import time
from typing import Callable, ContextManager, Iterable, Optional

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20,
              min_time_s: float = 0.2) -> float:
    """Median wall time of fn() in milliseconds; on CUDA triton's do_bench (L2 flushed, events)."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time_s and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def refusal(exc: BaseException) -> Optional[str]:
    """Why a contender cannot run a case, when `exc` says so: turbokernels' BackendUnavailable (the op has no such
    backend, or its check refuses the case), a turbokernels._C built without the kernel, or an SDPA backend that
    does not take the case. None for anything else: a failure, not a refusal."""
    from turbokernels.backends import BackendUnavailable
    text = str(exc)
    if isinstance(exc, BackendUnavailable):
        return text
    if isinstance(exc, (AttributeError, RuntimeError, NotImplementedError)) and "turbokernels_C" in text:
        return f"turbokernels._C lacks the kernel ({text.splitlines()[0] if text else type(exc).__name__})"
    # torch's words when the imposed SDPA backend cannot take the case: on CUDA tensors, and on CPU tensors
    if isinstance(exc, RuntimeError) and ("No available kernel" in text or "No viable backend" in text):
        return "this SDPA backend does not take the case"
    return None


def optional_ms(fn: Callable[[], object], device: torch.device,
                context: Optional[Callable[[], ContextManager]] = None, first_calls: int = 1) -> tuple:
    """(median ms, "") of fn() run inside `context()` (e.g. `lambda: tk.backend("cuda")`, an SDPA backend), or
    ("", why) when it cannot run: the CSV gets an empty cell and the run goes on, since the CUDA C++ backends exist
    for some ops and builds only and SDPA backends refuse some cases. Any other error gives an empty cell too, with
    why = "error: ...": one failing kernel should not cost the rest of a GPU run (the caller prints and records
    it). first_calls: untimed calls first (a rotation's length: the CUDA int4 backend repacks each weight copy on
    its first call, a one-time cost that is not the kernel's)."""
    try:
        with (context or contextlib.nullcontext)():
            for _ in range(max(1, first_calls)):
                fn()  # a refusal raises here, before any timing
            return median_ms(fn, device), ""
    except Exception as exc:  # noqa: BLE001 - reported in the cell's note, never swallowed silently
        why = refusal(exc)
        return "", why if why is not None else f"error: {type(exc).__name__}: {exc}".splitlines()[0]


def rounded(value, digits: int):
    """round(value, digits), or "" for an empty cell."""
    return "" if value == "" else round(value, digits)


def ratio(numerator, denominator, digits: int = 3):
    """numerator / denominator rounded, or "" when either is an empty cell."""
    if numerator == "" or denominator == "" or not denominator:
        return ""
    return round(numerator / denominator, digits)


def interleaved_medians(fns: dict, warmup: int = 2, rounds: int = 9, min_time_s: float = 1.0,
                        max_rounds: int = 200) -> dict:
    """{name: median ms} of several functions timed in turns (a, b, a, b, ...): on a shared, noisy CPU a load
    change then hits every contender alike, where timing one after the other would credit it to one of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    start = time.perf_counter()
    n = 0
    while n < rounds or (time.perf_counter() - start < min_time_s and n < max_rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        n += 1
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def cpu_environment() -> dict:
    """The CPU facts a CPU result needs: model (from /proc/cpuinfo), torch's threads, logical CPUs."""
    env = environment(torch.device("cpu"))
    env["threads"] = torch.get_num_threads()
    env["logical_cpus"] = os.cpu_count()
    return env


def cpu_description() -> str:
    """The CPU model, its SIMD level (what our C++ kernels can use) and torch's thread count."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == (platform.processor() or platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = ("AMX" if "amx_tile" in flags else "") or ("AVX-512" if "avx512f" in flags else "") or \
        ("AVX2" if "avx2" in flags else "no AVX2")
    extras = [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "bf16")) if flag in flags]
    if isa == "AMX":
        isa = "AVX-512, AMX"
    # a cap on our kernels' SIMD level (csrc/cpu/cpu_isa.h) is part of what a figure was measured with
    cap = os.environ.get("TURBOKERNELS_CPU_ISA", "")
    capped = f", our kernels capped to {cap} (TURBOKERNELS_CPU_ISA)" if cap else ""
    return (f"{model}, {isa}{' + ' + '/'.join(extras) if extras else ''}{capped}, "
            f"{torch.get_num_threads()} threads")


def measured_roofline(device: torch.device, dtype: torch.dtype) -> dict:
    """Peak memory bandwidth (a large copy) and peak matmul throughput in `dtype`, measured now, here."""
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    bandwidth = 2 * n_bytes / (ms * 1e-3)  # read + write
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device)
    flops = 2 * n ** 3 / (ms * 1e-3)
    del src, dst, a, b
    return {"peak_bytes_per_s": bandwidth, "peak_flops": flops, "roofline_dtype": str(dtype).replace("torch.", "")}


def rotating(copies: list) -> Callable[[], object]:
    """A function returning the next of `copies` each call: benchmarks cycle through more weight bytes than the
    caches hold, so that repeated calls measure memory, as a real model's layers do, not the last-level cache
    (triton's do_bench flushes the GPU's L2 itself; a CPU's 32 MB L3 would hold a whole int4 4096x4096 layer)."""
    state = {"i": -1}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    next_copy.count = len(copies)
    return next_copy


def copies_to_exceed_cache(n_bytes: int, device: torch.device, cache_bytes: int = 256 << 20, cap: int = 32) -> int:
    return 1 if device.type == "cuda" else max(1, min(cap, -(-cache_bytes // max(n_bytes, 1))))


def roofline_fraction(flops: float, n_bytes: float, ms: float, roof: dict) -> float:
    """Achieved fraction of the time the roofline allows: max(compute time, memory time) / measured time."""
    best = max(flops / roof["peak_flops"], n_bytes / roof["peak_bytes_per_s"])
    return best / (ms * 1e-3)


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                               platform.machine())
    if device.type == "cpu":
        name = cpu_description()
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "date": datetime.date.today().isoformat()}


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_speedup(rows: Iterable[dict], path: str, x: str, y: str, series: Iterable[str], title: str) -> bool:
    """Line plot of `y` against `x` (log2), one line per distinct value of the `series` keys. False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = list(rows)
    series = list(series)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in series), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r[x])
        ax.plot([r[x] for r in rs], [r[y] for r in rs], marker="o", label=" ".join(str(k) for k in key))
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
