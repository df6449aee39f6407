"""w4a8_mm: x (M, K) quantized to int8 per block of 32 k, @ dequant(Int4Weight) -> (M, N). Opt-in: the result is
int4_mm's of slightly rounded activations (python/turbokernels/reference/w4a8_mm.py: the spec and its error bound),
in exchange for integer dot products on the CPU (csrc/cpu/w4a8_mm.cpp).

    functional   turbokernels.w4a8_linear(x, weight, bias)     int4_linear's arguments and checks
    module       turbokernels.nn.W4A8Linear                    an Int4Linear that runs this op
    op           torch.ops.turbokernels.w4a8_mm(x, qweight, scales, offsets, group_size, bias=None)
                 int4_mm's schema; fake + autograd (the activations' rounding passed straight through: the
                 gradient is int4_mm's)
    backends     reference  python/turbokernels/reference/w4a8_mm.py  (any device, any group size)
                 cpu        csrc/cpu/w4a8_mm.cpp  (torch.ops.turbokernels_C.w4a8_mm; group sizes that are
                            multiples of 32, or one group over K)
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext, backends
from ..formats.int4 import Int4Weight, num_groups
from ..reference import w4a8_mm as reference
from . import _linear
from . import int4_mm as _int4
from ._library import define

OP = "w4a8_mm"
BLOCK = reference.BLOCK

w4a8_mm = define(OP, "(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, Tensor? bias=None) "
                     "-> Tensor", fake=_int4._fake, before=_int4._empty)

backends.register(OP, "reference", check=backends.always)(reference.w4a8_mm)
_cpu_extension = backends.check_extension_op(OP, "cpu")


def _check_cpu(x, qweight, scales, offsets, group_size, bias=None):
    if num_groups(group_size, x.shape[1]) > 1 and group_size % BLOCK:
        return (f"group_size={group_size} is not a multiple of {BLOCK} (the kernel's activation blocks may not "
                f"straddle two groups)")
    return _cpu_extension(x, qweight, scales, offsets, group_size, bias)


@backends.register(OP, "cpu", check=_check_cpu)
def _cpu(x, qweight, scales, offsets, group_size, bias=None):
    return _ext.C.w4a8_mm(x, qweight, scales, offsets, group_size, bias)


torch.library.register_autograd(f"turbokernels::{OP}", _int4._backward, setup_context=_int4._setup_context)


def w4a8_linear(x: torch.Tensor, weight: Int4Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = quantize8(x) @ weight.dequantize().T + bias, for x of shape (..., in_features) in fp16, bf16 or fp32;
    quantize8: per block of 32 input features, to int8 on the block's absolute maximum (see the module docstring)."""
    return _int4.weight_linear(OP, "w4a8_linear", x, weight, bias)


def plan(entry: str, qweight, scales, offsets, group_size: int, in_features: int, perm) -> _linear.LinearPlan:
    """int4_mm.plan's LinearPlan, running this op."""
    return _int4.plan(entry, qweight, scales, offsets, group_size, in_features, perm, OP, "w4a8_linear")
