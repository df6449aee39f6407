"""Sparse24Linear: a drop-in nn.Linear whose weight is 2:4-sparse, stored compressed (sparse24_mm underneath)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import requested_device
from ..compress.prune import prune_24
from ..formats.sparse24 import Sparse24Weight, _meta_cols
from ..ops import sparse24_mm
from ._packed import PackedWeightModule, check_dtype, check_features

_FORMAT = "turbokernels.sparse24/1"


class Sparse24Linear(PackedWeightModule):
    """y = x @ W.T + b with W 2:4-sparse, stored as Sparse24Weight (values (N, K/2) + int16 meta (N, ceil(K/16))).

    Build one with `Sparse24Linear.from_linear(linear, method="magnitude" | "wanda", activation_norm=None)` (prunes,
    then compresses) or `Sparse24Linear.from_weight(sparse24_weight, bias)`. The values keep the layer's dtype
    (`.half()` etc. cast them like any float buffer); x must have the same dtype. The state dict holds values, meta
    and bias, so `Sparse24Linear(in, out, dtype=...).load_state_dict(sd)` restores a layer exactly. Loading keeps the
    layer's dtype, as nn.Linear does (an fp16 state dict into an fp32 layer gives fp32 values); a corrupt state
    dict raises and leaves the layer unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        check_features("Sparse24Linear", in_features, out_features, multiple_of=4)
        dtype = check_dtype("Sparse24Linear", dtype)
        requested_device("Sparse24Linear(device)", device)
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        # 0b1110_1110_1110_1110 = -4370 as int16: the encoding of all-zero groups (indices 2, 3), a valid meta.
        self.register_buffer("meta", torch.full((out_features, _meta_cols(in_features)), -4370, dtype=torch.int16,
                                                device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: Sparse24Weight, bias: Optional[torch.Tensor] = None) -> "Sparse24Linear":
        if not isinstance(weight, Sparse24Weight):
            raise TypeError(f"Sparse24Linear.from_weight(weight): expected a Sparse24Weight, got "
                            f"{type(weight).__name__}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.out_features,)):
            raise ValueError(f"Sparse24Linear.from_weight(bias): expected shape ({weight.out_features},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        layer = cls(weight.in_features, weight.out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
        layer.values, layer.meta = weight.values, weight.meta
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str = "magnitude",
                    activation_norm: Optional[torch.Tensor] = None) -> "Sparse24Linear":
        """Prune an nn.Linear to 2:4 (see turbokernels.prune_24) and compress it; the linear is not modified."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Sparse24Linear.from_linear(linear): expected an nn.Linear, got {type(linear).__name__}")
        pruned = prune_24(linear.weight.detach(), method=method, activation_norm=activation_norm)
        return cls.from_weight(Sparse24Weight.from_dense(pruned), None if linear.bias is None else linear.bias.detach())

    # ---- use ---------------------------------------------------------------------------------------------------
    # forward (PackedWeightModule.forward): the functional a traced call takes, and the bias's dtype rule
    _functional = staticmethod(sparse24_mm.sparse24_linear)

    @property
    def weight(self) -> Sparse24Weight:
        return Sparse24Weight._trusted(self.values, self.meta)

    def _make_plan(self):
        plan = sparse24_mm.plan("Sparse24Linear", self.values, self.meta, self.in_features)
        if plan.out_features != self.out_features:
            raise ValueError(f"Sparse24Linear(values): values has {plan.out_features} rows, this layer has "
                             f"out_features={self.out_features}")
        return plan

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The pruned weight (out_features, in_features), exactly."""
        return self.weight.to_dense(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity=2:4, dtype={self.values.dtype}")

    # ---- state dict ----------------------------------------------------------------------------------------------
    PACKED = ("values", "meta")  # values keep their saved dtype

    def _validate_packed(self, packed) -> None:
        w = Sparse24Weight(packed["values"], packed["meta"])
        if w.shape != (self.out_features, self.in_features):
            raise ValueError(f"load_state_dict(values): values/meta describe a ({w.out_features}, {w.in_features}) "
                             f"weight; this layer is ({self.out_features}, {self.in_features})")

    def _cast_packed(self, packed):
        return dict(packed, values=packed["values"].to(self.values.dtype))

    def get_extra_state(self):
        return {"format": _FORMAT, "in_features": self.in_features}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"Sparse24Linear(_extra_state): unknown extra state {state!r}")
        if state.get("in_features") != self.in_features:
            raise ValueError(f"Sparse24Linear(_extra_state): the state dict was saved with in_features="
                             f"{state.get('in_features')}; this layer has in_features={self.in_features}")
