"""Whole-model helpers: swap nn.Linear layers for turbokernels modules, and back.

    tk.model.quantize_int4_(model, group_size=128)   # in place; returns the names of the swapped layers
    tk.model.restore_(model)                          # every Int4Linear back to an nn.Linear (dequantized)

Later op families add their swaps here, so there is one place that walks a model.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Optional

from torch import nn

from .formats.int4 import check_group_size
from .nn import Int4Linear

DEFAULT_EXCLUDE = ("lm_head", "*.lm_head")  # the output projection is usually the most quantization-sensitive


def _swap(model: nn.Module, want: Callable[[str, nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> list[str]:
    # Build every replacement first, then install them: an error while converting leaves the model untouched.
    plan = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if want(full, child):
                plan.append((module, child_name, full, make(child)))
    for parent, child_name, _, new in plan:
        setattr(parent, child_name, new)
    return [full for _, _, full, _ in plan]


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def quantize_int4_(model: nn.Module, group_size: int = 128, symmetric: bool = False,
                   exclude: Iterable[str] = DEFAULT_EXCLUDE,
                   include: Optional[Callable[[str, nn.Linear], bool]] = None) -> list[str]:
    """Replace every nn.Linear of `model` (in place) by an Int4Linear; returns the names replaced.

    exclude: fnmatch patterns of layer names to keep in float (default: the LM head).
    include: optional predicate (name, layer) -> bool for finer control.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int4_(model): expected an nn.Module, got {type(model).__name__}")
    check_group_size(group_size)
    exclude = tuple(exclude)

    def want(name, module):
        return (type(module) is nn.Linear and not _excluded(name, exclude)
                and (include is None or include(name, module)))

    def make(linear):
        layer = Int4Linear.from_linear(linear, group_size=group_size, symmetric=symmetric)
        return layer.to(linear.weight.device)

    return _swap(model, want, make)


def restore_(model: nn.Module) -> list[str]:
    """Replace every Int4Linear by an nn.Linear holding its dequantized weight (the way back)."""

    def make(layer: Int4Linear) -> nn.Linear:
        dtype = layer.bias.dtype if layer.bias is not None else layer.scales.dtype
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.dequantize(dtype), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return linear

    return _swap(model, lambda name, m: isinstance(m, Int4Linear), make)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights (and int4 packing) of the linear layers: what quantization shrinks."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int4Linear):
            total += sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.offsets, m.perm))
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total
