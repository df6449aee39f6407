"""sparse24_int4_mm: x (M, K) @ W.T -> (M, N), W (N, K) 2:4-sparse with int4 kept values (Sparse24Int4Weight).

    functional   turbokernels.sparse24_int4_linear(x, weight, bias)   checks arguments once, any leading batch shape
    op           torch.ops.turbokernels.sparse24_int4_mm(x, qweight, scales, offsets, meta, group_size, bias=None)
                 (group_size counts KEPT values per scale row)   schema + fake + autograd; the bias is added in
                 fp32 before the output's one rounding
    backends     reference  python/turbokernels/reference/sparse24_int4_mm.py
                 triton     kernels/sparse24_int4_mm.py
                 cpu        csrc/cpu/sparse24_int4_mm.cpp  (torch.ops.turbokernels_C.sparse24_int4_mm)
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ..formats.int4 import FLOAT_DTYPES
from ..formats.sparse24_int4 import Sparse24Int4Weight
from ..reference import sparse24_int4_mm as reference
from ._library import define

OP = "sparse24_int4_mm"


def _fake(x, qweight, scales, offsets, meta, group_size, bias=None):
    return x.new_empty((x.shape[0], qweight.shape[1]))


def _empty(x, qweight, scales, offsets, meta, group_size, bias=None):
    if x.shape[0] == 0:
        return x.new_empty((0, qweight.shape[1]))
    return None


sparse24_int4_mm = define(
    OP, "(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, Tensor meta, int group_size, Tensor? bias=None) "
        "-> Tensor", fake=_fake, before=_empty)


# ---- backends --------------------------------------------------------------------------------------------------
backends.register(OP, "reference", check=backends.always)(reference.sparse24_int4_mm)

# A K tile is at least 16 dense columns (one meta element, the depth of tl.dot) = 8 kept values, and may span at
# most two scale groups.
MIN_KEPT_GROUP_SIZE = 8


def _check_triton(x, qweight, scales, offsets, meta, group_size, bias=None):
    if group_size < MIN_KEPT_GROUP_SIZE:
        return (f"group_size={group_size} kept values (= {2 * group_size} dense columns) < {MIN_KEPT_GROUP_SIZE}: a "
                f"K tile is 16 dense columns (8 kept values) and may span at most two groups")
    if meta.dtype != torch.int16:
        return f"meta must be int16, got {meta.dtype}"
    if qweight.dtype != torch.int32:
        return f"qweight must be int32, got {qweight.dtype}"
    return backends.check_int32_offsets(x.shape[0], qweight.shape[1], x=x, qweight=qweight, scales=scales,
                                        meta=meta) or backends.check_triton(x)


@backends.register(OP, "triton", check=_check_triton)
def _triton(x, qweight, scales, offsets, meta, group_size, bias=None):
    from turbokernels.kernels.sparse24_int4_mm import sparse24_int4_mm as launch
    return launch(x, qweight, scales, offsets, meta, group_size, bias)


@backends.register(OP, "cpu", check=backends.check_extension_op(OP, "cpu"))
def _cpu(x, qweight, scales, offsets, meta, group_size, bias=None):
    return torch.ops.turbokernels_C.sparse24_int4_mm(x, qweight, scales, offsets, meta, group_size, bias)


# ---- autograd: gradients for the activations and the bias (the weight is frozen) -----------------------------------
def _setup_context(ctx, inputs, output):
    x, qweight, scales, offsets, meta, group_size, bias = inputs
    ctx.save_for_backward(qweight, scales, offsets, meta)
    ctx.group_size = group_size
    ctx.in_features = x.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    qweight, scales, offsets, meta = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = reference.sparse24_int4_to_dense(qweight, scales, offsets, meta, ctx.group_size,
                                             ctx.in_features)  # (N, K)
        grad_x = (grad_out.to(torch.float32) @ w).to(grad_out.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
        grad_bias = grad_out.to(torch.float32).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, grad_bias


torch.library.register_autograd(f"turbokernels::{OP}", _backward, setup_context=_setup_context)


# ---- functional entry: all argument checks happen here, once ------------------------------------------------------
def sparse24_int4_linear(x: torch.Tensor, weight: Sparse24Int4Weight,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ weight.dequantize().T + bias, for x of shape (..., in_features) in fp16, bf16 or fp32."""
    if not isinstance(weight, Sparse24Int4Weight):
        raise TypeError(f"sparse24_int4_linear(weight): expected a turbokernels.Sparse24Int4Weight, got "
                        f"{type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sparse24_int4_linear(x): expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sparse24_int4_linear(x): dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ValueError(f"sparse24_int4_linear(x): last dimension must be in_features={weight.in_features}, "
                         f"got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"sparse24_int4_linear(x): x is on {x.device} but the weight is on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"sparse24_int4_linear(bias): expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.out_features,):
            raise ValueError(f"sparse24_int4_linear(bias): expected shape ({weight.out_features},), got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"sparse24_int4_linear(bias): dtype {bias.dtype} does not match x's {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"sparse24_int4_linear(bias): bias is on {bias.device} but x is on {x.device}")
    lead = x.shape[:-1]
    out = sparse24_int4_mm(x.reshape(-1, weight.in_features), weight.qweight, weight.scales, weight.offsets,
                           weight.meta, weight.kept_group_size, bias)
    return out.reshape(*lead, weight.out_features)
