"""sparse24_int4_mm: x (M, K) @ W.T -> (M, N), W (N, K) 2:4-sparse with int4 kept values (Sparse24Int4Weight).

    functional   turbokernels.sparse24_int4_linear(x, weight, bias)   checks arguments once, any leading batch shape
    op           torch.ops.turbokernels.sparse24_int4_mm(x, qweight, scales, offsets, meta, group_size, bias=None)
                 (group_size counts KEPT values per scale row)   schema + fake + autograd; the bias is added in
                 fp32 before the output's one rounding
    backends     reference  python/turbokernels/reference/sparse24_int4_mm.py
                 triton     kernels/sparse24_int4_mm.py
                 cpu        csrc/cpu/sparse24_int4_mm.cpp  (torch.ops.turbokernels_C.sparse24_int4_mm)
                 cuda       csrc/cuda/sparse24_int4_mm.cuh (torch.ops.turbokernels_C.sparse24_int4_mm_mma, mma.sp on
                            int4-dequantized kept values, repacked once: Sparse24Int4Weight.mma_layout); forced only
                            until the GPU acceptance table lists it
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext, backends
from ..formats.sparse24_int4 import Sparse24Int4Weight
from ..reference import sparse24_int4_mm as reference
from . import _linear
from ._library import define
from .int4_mm import LayoutCache

OP = "sparse24_int4_mm"
_is_compiling = torch.compiler.is_compiling


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
    return _ext.C.sparse24_int4_mm(x, qweight, scales, offsets, meta, group_size, bias)


_cuda_ext = backends.check_extension_op("sparse24_int4_mm_mma", "cuda")


def _check_cuda(x, qweight, scales, offsets, meta, group_size, bias=None):
    """csrc/cuda/sparse24_int4_mm.cu (mma.sp, sm_80+): automatic only where the acceptance table says it passed on a
    GPU."""
    reason = _cuda_ext(x)
    if reason is not None:
        return reason
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"x is {x.dtype}: the CUDA int4 + 2:4 kernel takes float16 or bfloat16"
    K = x.shape[1]
    if K % 32:
        return f"in_features={K} is not a multiple of 32 (the k of mma.sp)"
    if group_size % 16 and group_size < K // 2:
        return (f"group_size={group_size} kept values is neither a multiple of 16 nor one group over K/2={K // 2}: "
                f"a k32 step's 16 kept values must share one scale row")
    if meta.dtype != torch.int16 or qweight.dtype != torch.int32:
        return f"meta must be int16 and qweight int32, got {meta.dtype} and {qweight.dtype}"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "needs compute capability 8.0 or newer (mma.sp, cp.async)"
    return None


_MMA_LAYOUTS = LayoutCache()


def mma_layout_of(qweight, scales, offsets, group_size, in_features, dtype):
    """The kept values in the CUDA kernel's layout (formats/sparse24_int4.py mma_layout), repacked on first use and
    kept while qweight lives (ops/int4_mm.py's LayoutCache)."""
    from ..formats.sparse24_int4 import mma_layout
    return _MMA_LAYOUTS.get(qweight, scales, offsets, group_size, in_features, dtype, mma_layout)


def run_mma(x, qweight, scales, offsets, meta, group_size, bias=None, splits=0, sms=0):
    """The cuda backend's call, on any device: CUDA tensors run the kernel, CPU tensors its emulation (tests)."""
    layout = mma_layout_of(qweight, scales, offsets, group_size, x.shape[1], x.dtype)
    return torch.ops.turbokernels_C.sparse24_int4_mm_mma(x, layout.qweight, layout.scales, layout.offsets, meta,
                                                         group_size, qweight.shape[1], bias, splits, sms)


@backends.register(OP, "cuda", check=_check_cuda, auto=backends.VERIFIED)
def _cuda(x, qweight, scales, offsets, meta, group_size, bias=None):
    return run_mma(x, qweight, scales, offsets, meta, group_size, bias)


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
    if not _is_compiling():  # the weight's plan (kept per weight object); traced: the checks below, in the graph
        i4 = weight.int4  # its kept values (attributes read directly: the properties cost ~1 us a call)
        parts = (i4, i4.qweight, i4.scales, i4.offsets, i4.group_size, i4.in_features, weight.meta)
        return _linear.planned(_linear.weight_plan(weight, parts, lambda: _linear.LinearPlan(
            OP, "sparse24_int4_linear", (i4.qweight, i4.scales, i4.offsets, weight.meta, weight.kept_group_size),
            weight.in_features, i4.qweight.shape[1], i4.qweight.device)), x, bias)
    qweight = weight.qweight
    K, N = weight.in_features, qweight.shape[1]
    _linear.check_x("sparse24_int4_linear", x, K, qweight.device)
    if bias is not None:
        _linear.check_bias("sparse24_int4_linear", bias, N, x)
    return _linear.run(OP, x, (qweight, weight.scales, weight.offsets, weight.meta, weight.kept_group_size), K, N,
                       None, bias)


def plan(qweight, scales, offsets, meta, group_size: int, in_features: int) -> _linear.LinearPlan:
    """A LinearPlan of these tensors, validated (Sparse24Int4Weight's checks; group_size in dense columns)."""
    w = Sparse24Int4Weight(qweight, scales, offsets, meta, group_size, in_features)
    return _linear.LinearPlan(OP, "sparse24_int4_linear",
                              (w.qweight, w.scales, w.offsets, w.meta, w.kept_group_size), in_features,
                              w.out_features, w.device)
