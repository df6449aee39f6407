"""Argument-check helpers shared by the public entries. Messages follow `entry(argument): expected ..., got ...`.

requested_device   a `device=` argument that this process cannot use (device='cuda' without CUDA) is a clear error
                   naming the argument, not torch's failure deep inside the first allocation.
check_values       checks of the VALUES of index tensors (cu_seqlens, cache_seqlens, block_table): read directly on
                   the CPU (nothing to wait for); on CUDA, and while torch.compile traces, one torch._assert_async per
                   call, which costs a few small kernels and no host sync (the call stays CUDA-graph capturable and
                   fullgraph-traceable). A failing device-side assert is fatal to the CUDA context (the process must
                   restart), as FlashAttention's debug checks are: it replaces the out-of-bounds read or write, or the
                   silently wrong result, that the bad value would otherwise cause. Meta tensors have no values: no
                   check.
"""
from __future__ import annotations

import functools
import operator
from typing import Callable, Optional, Sequence

import torch


def requested_device(label: str, device) -> Optional[torch.device]:
    """`device` (None, a string, an index or a torch.device) as a torch.device, checked usable in this process."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{label}: expected a torch.device or a device string, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA GPU or driver is visible to this process")
            raise ValueError(f"{label}: device='{dev}' requested but torch.cuda.is_available() is False ({why}); "
                             f"use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{label}: device='{dev}' requested but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
    return dev


Check = tuple[Callable[[], torch.Tensor], Callable[[], str]]  # (ok() -> 0-dim bool tensor, message() -> str)


def check_values(device: torch.device, checks: Sequence[Check], device_message: str) -> None:
    """Run value checks (see the module docstring). CPU, eager: each ok() is read and the first failure raises
    ValueError(message()). CUDA (any non-CPU device) or torch.compile tracing: torch._assert_async(all ok,
    device_message), no host sync."""
    if device.type == "meta" or not checks:
        return
    if device.type == "cpu" and not torch.compiler.is_compiling():
        for ok, message in checks:
            if not bool(ok()):
                raise ValueError(message())
        return
    # torch's CUDA kernel copies the message into a 256-byte buffer (and refuses a longer one); older versions
    # print no message at all, only "device-side assert triggered".
    torch._assert_async(functools.reduce(operator.and_, (ok() for ok, _ in checks)), device_message[:250])
