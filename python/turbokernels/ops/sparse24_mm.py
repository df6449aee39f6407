"""sparse24_mm: x (M, K) @ W.T -> (M, N), W (N, K) a 2:4-sparse weight given as Sparse24Weight (values + meta).

    functional   turbokernels.sparse24_linear(x, weight, bias)   checks arguments once, any leading batch shape
    op           torch.ops.turbokernels.sparse24_mm(x, values, meta, bias=None)   schema + fake + autograd; the
                 bias is added in fp32 before the output's one rounding
    backends     reference  python/turbokernels/reference/sparse24_mm.py
                 triton     kernels/sparse24_mm.py
                 cpu        csrc/cpu/sparse24_mm.cpp  (torch.ops.turbokernels_C.sparse24_mm)
                 cuda       csrc/cuda/sparse24_mm.cu (auto=VERIFIED: forced only until the GPU acceptance table lists it)
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext, backends
from ..formats.sparse24 import Sparse24Weight
from ..reference import sparse24_mm as reference
from . import _linear
from ._library import define

OP = "sparse24_mm"
_is_compiling = torch.compiler.is_compiling


def _fake(x, values, meta, bias=None):
    return x.new_empty((x.shape[0], values.shape[0]))


def _empty(x, values, meta, bias=None):
    if x.shape[0] == 0:
        return x.new_empty((0, values.shape[0]))
    return None


sparse24_mm = define(OP, "(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor", fake=_fake,
                     before=_empty)


# ---- backends --------------------------------------------------------------------------------------------------
backends.register(OP, "reference", check=backends.always)(reference.sparse24_mm)


def _check_triton(x, values, meta, bias=None):
    if values.dtype != x.dtype:
        return f"values dtype {values.dtype} differs from x's {x.dtype} (the kernel dots them in one dtype)"
    if meta.dtype != torch.int16:
        return f"meta must be int16, got {meta.dtype}"
    return backends.check_int32_offsets(x.shape[0], values.shape[0], x=x, values=values, meta=meta) \
        or backends.check_triton(x)


@backends.register(OP, "triton", check=_check_triton)
def _triton(x, values, meta, bias=None):
    from turbokernels.kernels.sparse24_mm import sparse24_mm as launch
    return launch(x, values, meta, bias)


@backends.register(OP, "cpu", check=backends.check_extension_op(OP, "cpu"))
def _cpu(x, values, meta, bias=None):
    return _ext.C.sparse24_mm(x, values, meta, bias)


_cuda_ext = backends.check_extension_op(OP, "cuda")


def _check_cuda(x, values, meta, bias=None):
    """csrc/cuda/sparse24_mm.cu (mma.sp, sm_80+). Not automatic until it has passed its tests on a real GPU."""
    reason = _cuda_ext(x, values, meta)  # CUDA tensors, and a _C built with the kernel
    if reason is not None:
        return reason
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16 (sparse tensor cores), got {x.dtype}"
    if values.dtype != x.dtype:
        return f"values dtype {values.dtype} differs from x's {x.dtype}"
    if meta.dtype != torch.int16:
        return f"meta must be int16, got {meta.dtype}"
    if x.shape[-1] % 32:
        return f"in_features (x.shape[1]) must be a multiple of 32 (the k of mma.sp), got {x.shape[-1]}"
    if bias is not None and bias.dtype != x.dtype:
        return f"bias dtype {bias.dtype} differs from x's {x.dtype} (the epilogue reads it in x's dtype)"
    return None


@backends.register(OP, "cuda", check=_check_cuda, auto=backends.VERIFIED)
def _cuda(x, values, meta, bias=None):
    return torch.ops.turbokernels_C.sparse24_mm(x, values, meta, bias)


# ---- autograd: gradients for the activations and the bias (the pruned weight is frozen) -------------------------
def _setup_context(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(values, meta)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    values, meta = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = reference.sparse24_to_dense(values, meta, torch.float32)  # (N, K)
        grad_x = (grad_out.to(torch.float32) @ w).to(grad_out.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad_out.to(torch.float32).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias


torch.library.register_autograd(f"turbokernels::{OP}", _backward, setup_context=_setup_context)


# ---- functional entry: all argument checks happen here, once ------------------------------------------------------
def sparse24_linear(x: torch.Tensor, weight: Sparse24Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ weight.to_dense().T + bias, for x of shape (..., in_features) in the weight's dtype (fp16, bf16 or
    fp32: cast the weight once with `weight.to(dtype=...)`, not per call)."""
    if not isinstance(weight, Sparse24Weight):
        raise TypeError(f"sparse24_linear(weight): expected a turbokernels.Sparse24Weight, got "
                        f"{type(weight).__name__}")
    values = weight.values
    if not _is_compiling():  # the weight's plan (kept per weight object); traced: the checks below, in the graph
        meta = weight.meta
        return _linear.planned(_linear.weight_plan(weight, (values, meta), lambda: _linear.LinearPlan(
            OP, "sparse24_linear", (values, meta), weight.in_features, values.shape[0], values.device,
            dtype=values.dtype)), x, bias)
    N, K = values.shape[0], weight.in_features
    _linear.check_x("sparse24_linear", x, K, values.device, values.dtype)
    if bias is not None:
        _linear.check_bias("sparse24_linear", bias, N, x)
    return _linear.run(OP, x, (values, weight.meta), K, N, None, bias)


def plan(entry: str, values, meta, in_features: int) -> _linear.LinearPlan:
    """A LinearPlan of these tensors, validated (Sparse24Weight's checks)."""
    w = Sparse24Weight(values, meta)
    if w.in_features != in_features:
        raise ValueError(f"{entry}(values): values/meta describe in_features={w.in_features}; this layer has "
                         f"in_features={in_features}")
    return _linear.LinearPlan(OP, "sparse24_linear", (w.values, w.meta), in_features, w.out_features, w.device,
                              dtype=w.dtype)
