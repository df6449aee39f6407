"""What the three linear entries (int4_linear, sparse24_linear, sparse24_int4_linear) share: the checks of x and
the bias, `run` (the functionals: any weight object, checked per call, backend chosen per call) and `planned` (the
modules, nn/: a weight validated once and kept in a `LinearPlan`, so a call checks x and the bias only, and the
backend choice is remembered per key in backends.select).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad

from ..formats.int4 import FLOAT_DTYPES
from .. import backends
from . import _library

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_is_grad_enabled = torch._C.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_forced_backend, _CHOSEN = backends.forced_backend, backends._CHOSEN
# Interned weight signatures: a plan's choice key starts with a small int instead of a nested tuple hashed per call.
_SIGNATURES: dict[tuple, int] = {}


def signature_id(*tensors_and_values) -> int:
    """A small int naming the (dtype, device, shape, stride) of each tensor and the other values: the weight's part
    of the backend choice key (backends.select), computed once per plan, never per call."""
    sig = tuple((t.dtype, t.device, tuple(t.shape), t.stride()) if isinstance(t, _Tensor) else t
                for t in tensors_and_values)
    return _SIGNATURES.setdefault(sig, len(_SIGNATURES))


class LinearPlan:
    """A weight as one op call needs it: the op's weight arguments, in_features, out_features, device, the act-order
    permutation (int4) and the signature id; built once from validated tensors."""
    __slots__ = ("op", "entry", "weights", "in_features", "out_features", "device", "perm", "dtype", "sig", "plain",
                 "fast")

    def __init__(self, op: str, entry: str, weights: tuple, in_features: int, out_features: int,
                 device: torch.device, perm: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None):
        self.op, self.entry, self.weights, self.perm, self.dtype = op, entry, weights, perm, dtype
        self.in_features, self.out_features, self.device = in_features, out_features, device
        self.sig = signature_id(op, *weights, perm)
        # Plain tensors on a device with kernels: then only x and the bias decide whether a call may skip the
        # dispatcher (_library.direct). A packed weight never takes a gradient (the ops' autograd gives None for
        # it), so its requires_grad does not matter; a subclass (DTensor, FakeTensor...) must dispatch itself.
        self.plain = device.type in ("cpu", "cuda") and all(
            type(t) is _Tensor or type(t) is _Parameter for t in weights if isinstance(t, _Tensor))
        # the one-call entry's arguments (turbokernels._C.linear_usual: planned's checks and the CPU kernel in C++),
        # for plain CPU weights without an act-order permutation
        self.fast = None
        if self.plain and device.type == "cpu" and perm is None and _linear_usual():
            w = weights
            if op == "int4_mm":
                self.fast = (0, w[0], w[1], w[2], None, w[3])
            elif op == "w4a8_mm":
                self.fast = (3, w[0], w[1], w[2], None, w[3])
            elif op == "sparse24_mm":
                self.fast = (1, w[0], w[1], None, None, 0)
            elif op == "sparse24_int4_mm":
                self.fast = (2, w[0], w[1], w[2], w[3], w[4])


# The functionals' plans, per weight object (Int4Weight, Sparse24Weight, Sparse24Int4Weight): weak keys, so a plan
# neither keeps a weight alive nor travels with it (copy, pickle: its signature id is this process's).
_WEIGHT_PLANS: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


def tensor_version(t):
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no version counter
        return None


def weight_plan(weight, parts: tuple, build) -> LinearPlan:
    """The plan of a weight object for its functional, reused while `parts` (the weight's tensors and sizes, as read
    now) are the same objects and values and its tensors are at the same versions, as a module's plan is: the
    functional then checks x and the bias per call, not the weight. build() makes a new plan (no validation beyond
    the weight object's own, as the functionals never revalidated it)."""
    try:
        hit = _WEIGHT_PLANS.get(weight)
    except TypeError:  # a weight type without weak references (a subclass with __slots__): a plan per call
        return build()
    if hit is not None:
        plan, seen, versions = hit
        if len(seen) == len(parts):
            for a, b in zip(seen, parts):
                if a is not b and (type(a) is not int or a != b):
                    break
            else:
                for t, v in versions:
                    if v is not None and t._version != v:
                        break
                else:
                    return plan
    plan = build()
    _WEIGHT_PLANS[weight] = (plan, parts, tuple((t, tensor_version(t)) for t in parts if isinstance(t, _Tensor)))
    return plan


def check_x(entry: str, x, in_features: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> None:
    """x (..., in_features) on the weight's device, fp16/bf16/fp32 (`dtype`: the weight's, which x must match)."""
    if type(x) is not _Tensor and not isinstance(x, _Tensor):
        raise TypeError(f"{entry}(x): expected a torch.Tensor, got {type(x).__name__}")
    xdt = x.dtype
    if xdt not in FLOAT_DTYPES:
        raise TypeError(f"{entry}(x): dtype must be float16, bfloat16 or float32, got {xdt}")
    if dtype is not None and xdt != dtype:
        raise TypeError(f"{entry}(x): dtype {xdt} does not match the weight's values dtype {dtype} (cast the weight "
                        f"once: weight.to(dtype={xdt}))")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{entry}(x): last dimension must be in_features={in_features}, got shape "
                         f"{tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{entry}(x): x is on {x.device} but the weight is on {device}")


def check_bias(entry: str, bias, out_features: int, x: torch.Tensor) -> None:
    if not isinstance(bias, _Tensor):
        raise TypeError(f"{entry}(bias): expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (out_features,):
        raise ValueError(f"{entry}(bias): expected shape ({out_features},), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{entry}(bias): dtype {bias.dtype} does not match x's {x.dtype}")
    if bias.device != x.device:
        raise ValueError(f"{entry}(bias): bias is on {bias.device} but x is on {x.device}")


def run(op: str, x: torch.Tensor, weights: tuple, in_features: int, out_features: int,
        perm: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The functionals' call on checked arguments: x (..., in_features) @ weight -> (..., out_features). Given any
    weight object, they choose the backend per call (no key: a key would cost what the checks cost)."""
    two_d = x.dim() == 2
    x2 = x if two_d else x.reshape(-1, in_features)
    if perm is not None:
        x2 = x2.index_select(1, perm)
    out = _library.call(op, (x2,) + weights + (bias,))
    return out if two_d else out.reshape(*x.shape[:-1], out_features)


_LINEAR_USUAL = None  # turbokernels._C.linear_usual once resolved (False: no extension, or one built without it)


def _linear_usual():
    global _LINEAR_USUAL
    if _LINEAR_USUAL is None:
        from .. import _ext
        _LINEAR_USUAL = (_ext.available() and getattr(_ext.C, "linear_usual", None)) or False
    return _LINEAR_USUAL


def planned(p: LinearPlan, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The entry's call for a weight validated once (a module's plan): x and the bias are checked (errors name the
    functional's arguments), the backend choice is remembered per key. One frame for what check_x, check_bias,
    run and _library.direct do, since each Python call costs about a microsecond here. The usual CPU call goes to
    turbokernels._C.linear_usual (these checks and the kernel in one C++ call), which answers None for any call
    it does not serve: then the steps below run (and raise what a bad call deserves)."""
    fast = p.fast
    if (fast is not None and type(x) is _Tensor and not _is_compiling() and _forward_ad._current_level < 0
            and (bias is None or type(bias) is _Parameter or type(bias) is _Tensor) and _forced_backend() is None):
        out = _LINEAR_USUAL(fast[0], x, bias, fast[1], fast[2], fast[3], fast[4], fast[5], p.in_features,
                            p.out_features)
        if out is not None:
            return out
    tx = type(x)
    plain = tx is _Tensor or tx is _Parameter
    if not plain:
        check_x(p.entry, x, p.in_features, p.device, p.dtype)  # raises, or x is a subclass: the checks passed
    xs, xdt = x.shape, x.dtype
    if (xdt not in FLOAT_DTYPES or (p.dtype is not None and xdt != p.dtype) or not xs or xs[-1] != p.in_features
            or x.device != p.device):
        check_x(p.entry, x, p.in_features, p.device, p.dtype)  # raises
    if bias is not None:
        tb = type(bias)
        if tb is not _Parameter and tb is not _Tensor:
            plain = False
            check_bias(p.entry, bias, p.out_features, x)  # raises, or a subclass: checked
        elif bias.dtype != xdt or bias.shape != (p.out_features,) or bias.device != p.device:
            check_bias(p.entry, bias, p.out_features, x)  # raises
    two_d = len(xs) == 2
    x2 = x if two_d else x.reshape(-1, p.in_features)
    if p.perm is not None:
        x2 = x2.index_select(1, p.perm)
    args = (x2, *p.weights, bias)
    # _library.direct(args), for a plan's plain weights: only x and the bias are looked at
    if (plain and p.plain and not _library.watched()
            and not (_is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):
        if x2.shape[0] == 0:
            out = x2.new_empty((0, p.out_features))
        else:  # backends.select(p.op, *args, key=...), its remembered-choice lookup inline
            key = (p.op, _forced_backend(), (p.sig, xdt, x2.shape, x2.stride(), bias is None))
            hit = _CHOSEN.get(key)
            out = (hit or backends.select(p.op, *args, key=key[2]))[1].fn(*args)
    else:
        out = _library.OPS[p.op](*args)
    return out if two_d else out.reshape(*xs[:-1], p.out_features)
