"""Loading turbokernels._C (the C++/CUDA kernels) -- optional: a missing or broken build warns once, never crashes.

The extension registers its kernels as torch ops in the private namespace `turbokernels_C` (one name per op, the
same as everywhere else: csrc/cpu/int4_mm.cpp -> torch.ops.turbokernels_C.int4_mm). The public ops in namespace
`turbokernels` call them through the dispatch table in backends.py, as `_ext.C.<op>`: the same dispatcher call made
from C++ (csrc/ops.cpp), ~3 us cheaper than torch.ops' boxed Python path.
"""
from __future__ import annotations

import functools
import os
import re
import threading
import warnings
from typing import Optional

import torch

_error: Optional[str] = None
_loaded = False
# The first calls may come from several threads at once (the first op call of each): one of them loads (and warns),
# the others wait for its outcome. After that the flags are read without the lock.
_lock = threading.Lock()


# The loaded module once available() is True: its functions C.<op> are the kernels' cheap entry (csrc/ops.cpp).
C = None


def _torch_release(version: str) -> str:
    """"2.14.1+cu130" / "2.15.0.dev20260101" -> "2.14.1" / "2.15.0": what torch's C++ headers call its version."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return ".".join(m.groups()) if m else version


def _import_extension() -> None:
    global C
    from . import _C  # registers the ops as a side effect
    built = getattr(_C, "built_for_torch", None)
    if built is not None and built != _torch_release(torch.__version__):
        # its ops are registered but never called: missing_op_reason answers "not available" while _loaded is False
        raise ImportError(f"turbokernels._C was built for torch {built}, this is torch {torch.__version__} (the C++ "
                          f"ABI differs between releases)")
    C = _C


def _load() -> None:
    global _error, _loaded
    if _loaded or _error is not None:
        return
    with _lock:
        if _loaded or _error is not None:  # loaded (or failed) by another thread while this one waited
            return
        if os.environ.get("TURBOKERNELS_NO_EXT", "0") not in ("", "0"):
            _error = "disabled by TURBOKERNELS_NO_EXT"
            return
        try:
            _import_extension()
            _loaded = True
        except Exception as exc:  # noqa: BLE001 - ImportError, undefined symbols of a mismatched torch ABI, ...
            _error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"turbokernels: the compiled extension turbokernels._C could not be loaded ({_error}); "
                          "using the Triton/reference backends. Rebuild with `pip install --no-build-isolation -e .` "
                          "against the installed torch.", RuntimeWarning, stacklevel=3)


def load_error() -> Optional[str]:
    _load()
    return _error


def available() -> bool:
    _load()
    return _loaded


@functools.lru_cache(maxsize=None)
def _has_kernel(qualname: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
    except RuntimeError:
        return False


def missing_op_reason(op: str, device_type: str) -> Optional[str]:
    """None when torch.ops.turbokernels_C.<op> has a kernel for the device, else why not."""
    _load()
    if not _loaded:
        return f"turbokernels._C is not available ({_error})"
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    # a device-agnostic kernel (ATen ops only: int4_mm_mma_repack) is registered once, for every device
    if not (_has_kernel(f"turbokernels_C::{op}", key) or _has_kernel(f"turbokernels_C::{op}", "CompositeExplicitAutograd")):
        return f"turbokernels._C was built without a {device_type} kernel for {op}"
    return None
