"""Defining a turbokernels op: a torch.library schema, a fake (meta) implementation and the backend dispatch.

Every op is defined the same way:

    int4_mm = define("int4_mm", "(Tensor x, ...) -> Tensor", fake=_fake)

which makes `torch.ops.turbokernels.int4_mm`. Its CPU and CUDA kernels are one Python function that asks
backends.dispatch which backend table entry to run, so forcing a backend works the same for every op.
`Library.define/impl` is used rather than `custom_op` because its per-call overhead is about half (~6 us vs
~11 us, pytorch#139500), which matters for decode-sized calls.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import backends

NAMESPACE = "turbokernels"
LIB = torch.library.Library(NAMESPACE, "DEF")


def define(name: str, schema: str, *, fake: Callable, before: Optional[Callable] = None):
    """Define torch.ops.turbokernels.<name>.

    before(*args): optional fast path run ahead of dispatch (e.g. empty inputs); returns a result or None.
    """
    LIB.define(name + schema)

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
    return getattr(torch.ops.turbokernels, name)
