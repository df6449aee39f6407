"""W4A8Linear: an Int4Linear whose activations are quantized to int8 per block of 32 input features before the
product (w4a8_mm underneath): opt-in, for CPUs, where integer dot products run several times faster than the int4 x
fp32 loop on AVX2 (bench/int4.py's w4a8 column). Same weight, same state dict; the output differs from an
Int4Linear's by the activations' rounding (python/turbokernels/reference/w4a8_mm.py: the spec and its bound)."""
from __future__ import annotations

import torch

from ..ops import w4a8_mm
from .int4_linear import Int4Linear


class W4A8Linear(Int4Linear):
    """Int4Linear (same constructors: from_linear, from_weight; same buffers and state dict) running
    turbokernels.w4a8_linear. `Int4Linear.from_weight(w4a8_layer.weight, bias)` goes back to exact activations."""

    _functional = staticmethod(w4a8_mm.w4a8_linear)

    def _make_plan(self):
        perm = self.perm
        plan = w4a8_mm.plan("W4A8Linear", self.qweight, self.scales, self.offsets, self.group_size,
                            self.in_features,
                            perm if isinstance(perm, torch.Tensor) and perm.numel() else None)
        if plan.out_features != self.out_features:
            raise ValueError(f"W4A8Linear(qweight): qweight has {plan.out_features} columns, this layer has "
                             f"out_features={self.out_features}")
        return plan

    def extra_repr(self) -> str:
        return super().extra_repr() + ", activations=int8 per 32"
