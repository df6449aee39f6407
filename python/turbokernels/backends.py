"""The one dispatch mechanism of turbokernels: every op has a table of backends, and one function picks one.

Backends (the same names for every op):
  reference  pure PyTorch, the spec of the op; runs anywhere
  triton     kernels/<op>.py; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (how CI proves them)
  cpu        C++ in csrc/cpu/<op>.cpp, from turbokernels._C
  cuda       CUDA C++ in csrc/cuda/<op>.cu, from turbokernels._C
  torch      torch's own fused kernels, where they compute the op exactly and are the fastest we have (attention
             on CPU tensors: ops/_torch_attention.py)

Choosing: a forced backend wins (innermost `with backend(name)`, then `set_backend(name)`, then the environment
variable TURBOKERNELS_BACKEND). A forced backend that cannot run the call raises BackendUnavailable with the
reason -- never a silent fallback. Unforced, the first backend in AUTO_ORDER[device] whose check passes runs.

A backend registered with `auto=False` runs only when forced. One registered with `auto=VERIFIED` (the CUDA C++
kernels) is tried automatically only on the GPU architectures where python/turbokernels/acceptance.py records that
it passed its GPU tests and beat our Triton kernel, and runs only when forced everywhere else: code that has not
run on a GPU is never a default, and one architecture's result does not vouch for another's.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Callable, Iterator, Optional, Union

import torch

from . import acceptance

BACKENDS = ("reference", "triton", "cpu", "cuda", "torch")
# Order tried when nothing is forced. The Triton backend is not auto on CPU tensors: the interpreter is a
# correctness tool, not a fast path.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "torch", "reference"),
}
ENV_VAR = "TURBOKERNELS_BACKEND"


# Impl.auto's third value: automatic only where the GPU acceptance table (acceptance.py) says so.
VERIFIED = "verified"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call (missing build, wrong device, unsupported shape...)."""


@dataclasses.dataclass
class Impl:
    fn: Callable
    # check(*args) -> None when this backend can run the call, else a short reason (shown to the user).
    check: Callable[..., Optional[str]]
    # True: tried by automatic selection; False: only when forced; VERIFIED: tried only on CUDA devices whose
    # architecture the acceptance table lists for this (op, backend) as passed and faster than Triton.
    auto: Union[bool, str] = True


_REGISTRY: dict[str, dict[str, Impl]] = {}
_global_backend: Optional[str] = None
_context_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("turbokernels_backend", default=None)


def _validate(name: Optional[str], what: str) -> Optional[str]:
    if name is None or name == "" or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {BACKENDS} or None/'auto'")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force one backend for every turbokernels op in this process (None or 'auto': choose automatically)."""
    global _global_backend
    _global_backend = _validate(name, "set_backend(name)")


@contextlib.contextmanager
def backend(name: Optional[str]) -> Iterator[None]:
    """`with turbokernels.backend("triton"): ...` forces a backend inside the block (None: automatic)."""
    token = _context_backend.set(_validate(name, "backend(name)") or "auto")
    try:
        yield
    finally:
        _context_backend.reset(token)


# os.environ's own mapping (CPython's os._Environ; updated by os.environ[...] = ..., monkeypatch.setenv, putenv via
# os.environ), keyed by the encoded name; None elsewhere (then os.environ.get).
_environ_data = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _environ_data is not None and hasattr(os.environ, "encodekey") else None
if _ENV_KEY is None:
    _environ_data = None


def forced_backend() -> Optional[str]:
    """The backend forced for the current call, or None when the choice is automatic."""
    ctx = _context_backend.get()
    if ctx is not None:
        return None if ctx == "auto" else ctx
    if _global_backend is not None:
        return _global_backend
    # os.environ.get raises and catches a KeyError when the variable is unset (the usual case): ~1 us per op call
    raw = _environ_data.get(_ENV_KEY) if _environ_data is not None else os.environ.get(ENV_VAR)
    if raw is None:
        return None
    return _validate(os.environ.get(ENV_VAR), f"environment variable {ENV_VAR}")


def register(op: str, backend_name: str, *, check: Callable[..., Optional[str]], auto: Union[bool, str] = True):
    """Decorator: register `fn` as the `backend_name` implementation of `op` (auto: True, False or VERIFIED)."""
    _validate(backend_name, "register(backend_name)")
    if auto is not True and auto is not False and auto != VERIFIED:
        raise ValueError(f"register(auto): expected True, False or backends.VERIFIED, got {auto!r}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend_name] = Impl(fn=fn, check=check, auto=auto)
        _CHOSEN.clear()  # a remembered choice may no longer be the one select would make
        return fn

    return deco


def registered(op: str) -> dict[str, Impl]:
    return dict(_REGISTRY.get(op, {}))


def ops() -> list[str]:
    return sorted(_REGISTRY)


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def _call_device(args) -> Optional[torch.device]:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


# CUDA device index -> (major, minor); a device's capability never changes within a process.
_CAPABILITIES: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (tests replace this function to pretend a GPU architecture)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITIES.get(index)
    if cap is None:
        cap = _CAPABILITIES[index] = tuple(torch.cuda.get_device_capability(index))
    return cap


_uniform: Optional[bool] = None


def _capabilities_uniform() -> bool:
    """Whether every visible CUDA device has the same compute capability: then a VERIFIED backend's verdict
    depends on the device type alone, which every select key implies (the attention and decode keys name only
    the device type, not its index)."""
    global _uniform
    if _uniform is None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _uniform = len({tuple(torch.cuda.get_device_capability(i)) for i in range(n)}) <= 1
    return _uniform


def automatic(op: str, name: str, impl: Impl, device: Optional[torch.device]) -> bool:
    """Whether automatic selection may try `impl` (op's `name` backend) for a call on `device`."""
    auto = impl.auto
    if auto is True or auto is False:
        return auto
    # the table first: a backend it does not list needs no capability query (no CUDA call)
    return (device is not None and device.type == "cuda" and (op, name) in acceptance.PASSED
            and acceptance.verified(op, name, device_capability(device)))


# Choices remembered by select(..., key=...): (op, forced backend, key) -> (name, impl). A forced backend is part of
# the key, so `with backend(...)`, set_backend and the environment variable are honored after the cache was filled
# (they are resolved on every call, before the lookup); register() empties it. Bounded: emptied when full.
# ops/_linear.planned reads it inline (a module's call): emptied in place, never rebound.
_CHOSEN: dict[tuple, tuple[str, Impl]] = {}
_CHOSEN_MAX = 4096


def select(op: str, *args, key=None) -> tuple[str, Impl]:
    """The (name, impl) that `dispatch` would run for these arguments.

    key: a hashable value that determines every backend check's answer for these arguments (the caller's statement:
    e.g. the linear ops' device, dtypes, shapes and strides, known to the entry that checked them). With a key the
    checks run once per (op, forced backend, key) and the choice is reused; a call that no backend can run is never
    remembered (it raises every time). An auto=VERIFIED backend's verdict depends on the GPU's architecture: it is
    remembered under the key only while every visible GPU has the same one (then the device type fixes it).
    """
    forced = forced_backend()
    if key is not None:
        hit = _CHOSEN.get((op, forced, key))
        if hit is not None:
            return hit
    table = _REGISTRY[op]
    if forced is not None:
        impl = table.get(forced)
        if impl is None:
            raise BackendUnavailable(f"turbokernels.{op}: there is no {forced!r} backend for this op "
                                     f"(it has: {', '.join(table)})")
        reason = impl.check(*args)
        if reason is not None:
            raise BackendUnavailable(f"turbokernels.{op}: the forced backend {forced!r} cannot run this call: {reason}")
        chosen = forced, impl
    else:
        device = _device_type(args)
        reasons = []
        for name in AUTO_ORDER.get(device, ("reference",)):
            impl = table.get(name)
            if impl is None or impl.auto is False:
                continue
            if impl.auto is not True:
                if not _capabilities_uniform():
                    key = None  # either verdict depends on the device index, which a key need not hold
                if not automatic(op, name, impl, _call_device(args)):
                    reasons.append(f"{name}: automatic only on the GPU architectures in the acceptance table")
                    continue
            reason = impl.check(*args)
            if reason is None:
                chosen = name, impl
                break
            reasons.append(f"{name}: {reason}")
        else:
            raise BackendUnavailable(f"turbokernels.{op}: no backend can run this call on {device} "
                                     f"({'; '.join(reasons)})")
    if key is not None:
        if len(_CHOSEN) >= _CHOSEN_MAX:
            _CHOSEN.clear()
        _CHOSEN[(op, forced, key)] = chosen
    return chosen


def dispatch(op: str, *args, key=None):
    return select(op, *args, key=key)[1].fn(*args)


# ---- reusable checks -------------------------------------------------------------------------------------------

def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton(*args) -> Optional[str]:
    """Triton runs CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was imported."""
    device = _device_type(args)
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device == "cuda":
        return None
    if device == "cpu" and triton_interpreting():
        return None
    return f"needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 for CPU tensors"


INT32_LIMIT = 2 ** 31
# Split-K (M <= 16 rows) keeps up to this many fp32 partial outputs (the GEMM kernels' CONFIGS: SPLIT_K <= 8).
MAX_SPLIT_K = 8


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel computes for `t`: sum over dims of (size - 1) * |stride|."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) if t.numel() else 0


def check_int32_offsets(out_rows: int, out_cols: int, **tensors) -> Optional[str]:
    """None when every operand's element offsets, and the (out_rows, out_cols) output's (with split-K partials for
    a decode-sized out_rows), fit in 32 bits, as the Triton GEMM kernels' offsets do; else the reason."""
    for name, t in tensors.items():
        if t is not None and max_offset(t) >= INT32_LIMIT:
            return (f"{name} of shape {tuple(t.shape)} and strides {t.stride()} spans 2^31 or more elements: the "
                    f"kernel's offsets are 32-bit")
    out = out_rows * out_cols * (MAX_SPLIT_K if out_rows <= 16 else 1)
    if out >= INT32_LIMIT:
        return (f"the output ({out_rows}, {out_cols}) (with split-K partials) has {out} elements, 2^31 or more: "
                f"the kernel's offsets are 32-bit")
    return None


def check_device(device_type: str) -> Callable[..., Optional[str]]:
    def check(*args) -> Optional[str]:
        got = _device_type(args)
        return None if got == device_type else f"needs {device_type} tensors (got {got})"
    return check


def check_extension_op(namespace_op: str, device_type: str) -> Callable[..., Optional[str]]:
    """Check for a kernel compiled into turbokernels._C as torch.ops.turbokernels_C.<name>."""
    from . import _ext

    def check(*args) -> Optional[str]:
        got = _device_type(args)
        if got != device_type:
            return f"needs {device_type} tensors (got {got})"
        return _ext.missing_op_reason(namespace_op, device_type)

    return check


def always(*args) -> Optional[str]:
    return None
