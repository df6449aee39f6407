"""int4_mm: x (M, K) @ dequant(Int4Weight) -> (M, N).

    functional   turbokernels.int4_linear(x, weight, bias)     checks arguments once, any leading batch shape
    op           torch.ops.turbokernels.int4_mm(x, qweight, scales, offsets, group_size, bias=None)
                 schema + fake + autograd; the bias is added in fp32 before the output's one rounding
    backends     reference  python/turbokernels/reference/int4_mm.py
                 triton     kernels/int4_mm.py
                 cpu        csrc/cpu/int4_mm.cpp  (torch.ops.turbokernels_C.int4_mm)
                 cuda       csrc/cuda/int4_mm.cuh (torch.ops.turbokernels_C.int4_mm_mma, the weight repacked once into
                            its layout: Int4Weight.mma_layout); forced only until the GPU acceptance table lists it
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .. import _ext, backends
from ..formats.int4 import Int4Weight, validate_int4_tensors
from ..reference import int4_mm as reference
from . import _linear
from ._library import define

OP = "int4_mm"
_is_compiling = torch.compiler.is_compiling


def _fake(x, qweight, scales, offsets, group_size, bias=None):
    return x.new_empty((x.shape[0], qweight.shape[1]))


def _empty(x, qweight, scales, offsets, group_size, bias=None):
    if x.shape[0] == 0:
        return x.new_empty((0, qweight.shape[1]))
    return None


int4_mm = define(OP, "(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, Tensor? bias=None) "
                     "-> Tensor", fake=_fake, before=_empty)


# ---- backends --------------------------------------------------------------------------------------------------
backends.register(OP, "reference", check=backends.always)(reference.int4_mm)


def _check_triton(x, qweight, scales, offsets, group_size, bias=None):
    if group_size < 16:
        return f"group_size={group_size} < 16 (tl.dot tiles are 16 deep; a tile may span at most two groups)"
    return backends.check_int32_offsets(x.shape[0], qweight.shape[1], x=x, qweight=qweight, scales=scales) \
        or backends.check_triton(x)


@backends.register(OP, "triton", check=_check_triton)
def _triton(x, qweight, scales, offsets, group_size, bias=None):
    from turbokernels.kernels.int4_mm import int4_mm as launch
    return launch(x, qweight, scales, offsets, group_size, bias)


@backends.register(OP, "cpu", check=backends.check_extension_op(OP, "cpu"))
def _cpu(x, qweight, scales, offsets, group_size, bias=None):
    return _ext.C.int4_mm(x, qweight, scales, offsets, group_size, bias)


_cuda_ext = backends.check_extension_op("int4_mm_mma", "cuda")


def _check_cuda(x, qweight, scales, offsets, group_size, bias=None):
    """csrc/cuda/int4_mm.cu (mma.sync, sm_80+): automatic only where the acceptance table says it passed on a GPU."""
    reason = _cuda_ext(x)
    if reason is not None:
        return reason
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"x is {x.dtype}: the CUDA int4 kernel takes float16 or bfloat16"
    if group_size % 16 and group_size < x.shape[1]:
        return f"group_size={group_size} is neither a multiple of 16 nor one group over K={x.shape[1]}"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "needs compute capability 8.0 or newer (mma.sync bf16, cp.async)"
    return None


class LayoutCache:
    """A CUDA kernel's repacked weight layouts, kept beside the qweight tensors they come from, not on them (an
    attribute on the tensor would be pickled with a state dict by torch.save, and copied with it): id(qweight) ->
    (weak reference to it, {activation dtype: (key, weak refs to scales and offsets, layout)}). An entry goes when
    its qweight tensor does; a tensor changed in place (its version counter) or other scale/offset tensors give a new
    layout. Used by ops/int4_mm.py and ops/sparse24_int4_mm.py."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def __contains__(self, ident: int) -> bool:
        """Whether an entry exists for the tensor of this id() (tests: it must go with the tensor)."""
        return ident in self._entries

    def get(self, qweight, scales, offsets, group_size, in_features, dtype, build):
        """The layout for these tensors, build(qweight, scales, offsets, group_size, in_features, dtype) on a miss."""
        ident = id(qweight)
        entry = self._entries.get(ident)
        if entry is None or entry[0]() is not qweight:
            entries = self._entries
            entry = entries[ident] = (weakref.ref(qweight, lambda _, i=ident: entries.pop(i, None)), {})
        key = (group_size, in_features, qweight._version, scales._version, offsets._version)
        hit = entry[1].get(dtype)
        if hit is None or hit[0] != key or hit[1]() is not scales or hit[2]() is not offsets:
            layout = build(qweight, scales, offsets, group_size, in_features, dtype)
            hit = entry[1][dtype] = (key, weakref.ref(scales), weakref.ref(offsets), layout)
        return hit[3]


_MMA_LAYOUTS = LayoutCache()


def mma_layout_of(qweight, scales, offsets, group_size, in_features, dtype):
    """The weight in the CUDA kernel's layout (formats/int4.py mma_layout), repacked on first use and kept while
    qweight lives (LayoutCache)."""
    from ..formats.int4 import mma_layout
    return _MMA_LAYOUTS.get(qweight, scales, offsets, group_size, in_features, dtype, mma_layout)


def run_mma(x, qweight, scales, offsets, group_size, bias=None, splits=0, sms=0):
    """The cuda backend's call, on any device: CUDA tensors run the kernel, CPU tensors its emulation (tests)."""
    layout = mma_layout_of(qweight, scales, offsets, group_size, x.shape[1], x.dtype)
    return torch.ops.turbokernels_C.int4_mm_mma(x, layout.qweight, layout.scales, layout.offsets, group_size,
                                                qweight.shape[1], bias, splits, sms, layout.zero_points)


@backends.register(OP, "cuda", check=_check_cuda, auto=backends.VERIFIED)
def _cuda(x, qweight, scales, offsets, group_size, bias=None):
    return run_mma(x, qweight, scales, offsets, group_size, bias)


# ---- autograd: gradients for the activations and the bias (the int4 weight is frozen, as in QLoRA) -------------
def _setup_context(ctx, inputs, output):
    x, qweight, scales, offsets, group_size, bias = inputs
    ctx.save_for_backward(qweight, scales, offsets)
    ctx.group_size = group_size
    ctx.in_features = x.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    qweight, scales, offsets = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = reference.dequantize_int4(qweight, scales, offsets, ctx.group_size, ctx.in_features)  # (K, N) fp32
        grad_x = (grad_out.to(torch.float32) @ w.t()).to(grad_out.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_bias = grad_out.to(torch.float32).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias


torch.library.register_autograd(f"turbokernels::{OP}", _backward, setup_context=_setup_context)


# ---- functional entry: all argument checks happen here, once ------------------------------------------------------
def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ weight.dequantize().T + bias, for x of shape (..., in_features) in fp16, bf16 or fp32."""
    return weight_linear(OP, "int4_linear", x, weight, bias)


def weight_linear(op: str, entry: str, x: torch.Tensor, weight: Int4Weight, bias: Optional[torch.Tensor]):
    """The functional of an op that takes an Int4Weight's tensors (int4_mm, w4a8_mm): `entry` names the arguments in
    errors."""
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"{entry}(weight): expected a turbokernels.Int4Weight, got {type(weight).__name__}")
    qweight = weight.qweight
    K = weight.in_features
    if not _is_compiling():  # the weight's plan (kept per weight object); traced: the checks below, in the graph
        parts = (qweight, weight.scales, weight.offsets, weight.group_size, K, weight.perm)
        return _linear.planned(_linear.weight_plan(weight, parts, lambda: _linear.LinearPlan(
            op, entry, (qweight, weight.scales, weight.offsets, weight.effective_group_size), K,
            qweight.shape[1], qweight.device, weight.perm)), x, bias)
    N = qweight.shape[1]
    _linear.check_x(entry, x, K, qweight.device)
    if bias is not None:
        _linear.check_bias(entry, bias, N, x)
    return _linear.run(op, x, (qweight, weight.scales, weight.offsets, weight.effective_group_size), K, N,
                       weight.perm, bias)


def plan(entry: str, qweight, scales, offsets, group_size: int, in_features: int, perm, op: str = OP,
         functional: str = "int4_linear") -> _linear.LinearPlan:
    """A LinearPlan of these tensors for `op` (int4_mm, or w4a8_mm with functional="w4a8_linear"), validated
    (Int4Weight's checks, errors naming `entry(argument)`)."""
    perm = validate_int4_tensors(entry, qweight, scales, offsets, group_size, in_features, perm)
    w = Int4Weight._trusted(qweight.contiguous(), scales.contiguous(), offsets.contiguous(), group_size, in_features,
                            perm)
    return _linear.LinearPlan(op, functional, (w.qweight, w.scales, w.offsets, w.effective_group_size),
                              in_features, w.out_features, w.device, perm)
