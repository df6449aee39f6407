"""Defining a turbokernels op: a torch.library schema, a fake (meta) implementation and the backend dispatch.

Every op is defined the same way:

    int4_mm = define("int4_mm", "(Tensor x, ...) -> Tensor", fake=_fake)

which makes `torch.ops.turbokernels.int4_mm`. Its CPU and CUDA kernels are one Python function that asks
backends.dispatch which backend table entry to run, so forcing a backend works the same for every op.
`Library.define/impl` is used rather than `custom_op` because its per-call overhead is about half (~6 us vs
~11 us, pytorch#139500), which matters for decode-sized calls.

`call(name, args)` is how a functional entry runs its op: through `torch.ops.turbokernels.<name>` whenever
something above the kernel must see the op (autograd, torch.compile/export tracing, a dispatch or function mode,
functorch transforms, forward AD, the profiler, tensor subclasses, torch.jit tracing), else straight to
`backends.dispatch`. The dispatcher round trip with the autograd registration costs ~30 us of Python per call on a
2-core EPYC (bench/overhead.py), twice a tiny layer's kernel; the direct path runs the same backend, chosen by
the same rules, with the same `before` fast path.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import backends

NAMESPACE = "turbokernels"
LIB = torch.library.Library(NAMESPACE, "DEF")
_BEFORE: dict[str, Optional[Callable]] = {}
OPS: dict[str, Callable] = {}  # name -> torch.ops.turbokernels.<name>


def define(name: str, schema: str, *, fake: Callable, before: Optional[Callable] = None):
    """Define torch.ops.turbokernels.<name>.

    before(*args): optional fast path run ahead of dispatch (e.g. empty inputs); returns a result or None.
    """
    LIB.define(name + schema)
    _BEFORE[name] = before

    if before is None:
        def impl(*args):
            return backends.dispatch(name, *args)
    else:
        def impl(*args):
            out = before(*args)
            return backends.dispatch(name, *args) if out is None else out

    impl.__name__ = f"{name}_impl"
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    OPS[name] = getattr(torch.ops.turbokernels, name)
    return OPS[name]


_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_C = torch._C
_is_compiling = torch.compiler.is_compiling


def watched() -> bool:
    """True when something that is not a tensor argument must see every op call: torch.compile/export tracing, a
    function or dispatch mode, a functorch transform, torch.jit tracing, the profiler, forward AD."""
    if _is_compiling():  # first: dynamo reads it as True and traces the op, never the checks below
        return True
    return bool(_C._is_torch_function_mode_enabled() or _C._len_torch_dispatch_stack()
                or _C._are_functorch_transforms_active() or _C._get_tracing_state() is not None
                or _C._autograd._profiler_enabled() or _forward_ad._current_level >= 0)


def direct(args) -> bool:
    """True when running the backend here gives what torch.ops.turbokernels.<op>(*args) gives (args: the op's
    arguments, the first a tensor), and nothing above the kernel (autograd, a tracer, a mode, a transform, the
    profiler, a tensor subclass, the fake impl of meta tensors) needs to see the op."""
    if watched():
        return False
    first = args[0]  # the activations; the entries checked that every tensor is on its device
    if not (first.is_cpu or first.is_cuda):  # meta (the fake impl), or a device the op has no kernel for
        return False
    grad = _C.is_grad_enabled()
    for a in args:
        t = type(a)
        if t is _Tensor or t is _Parameter:
            if grad and a.requires_grad:
                return False
        elif isinstance(a, _Tensor):  # a subclass (FakeTensor, DTensor...) dispatches itself
            return False
    return True


def direct_exact(a, b, c) -> bool:
    """direct((a, b, c)) for three tensors the caller knows to be torch.Tensor exactly (no subclass) on the CPU or
    a CUDA device: only the global tests and requires_grad remain (~1 us less on a hot entry)."""
    return not (watched() or (_C.is_grad_enabled() and (a.requires_grad or b.requires_grad or c.requires_grad)))


def call(name: str, args: tuple, key=None):
    """torch.ops.turbokernels.<name>(*args), or the same backend's result without the dispatcher round trip when
    `direct(args)`. key: see backends.select (the choice is remembered per key)."""
    if not direct(args):
        return OPS[name](*args)
    before = _BEFORE[name]
    if before is not None:
        out = before(*args)
        if out is not None:
            return out
    return backends.dispatch(name, *args, key=key)
