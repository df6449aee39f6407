"""Sparse24Int4Linear: a drop-in nn.Linear whose weight is 2:4-sparse with int4 kept values (sparse24_int4_mm)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import requested_device
from ..compress.prune import prune_24
from ..formats.int4 import Int4Weight, exact_offsets, num_groups
from ..formats.sparse24 import _meta_cols
from ..formats.sparse24_int4 import Sparse24Int4Weight, check_dense_group_size
from ..ops import sparse24_int4_mm
from ._packed import PackedWeightModule, check_dtype, check_features

_FORMAT = "turbokernels.sparse24_int4/1"


class Sparse24Int4Linear(PackedWeightModule):
    """y = x @ W.T + b with W 2:4-sparse and its kept values int4 (Sparse24Int4Weight), for fp16, bf16 and fp32
    activations.

    Build one with `Sparse24Int4Linear.from_linear(linear, group_size=128, method="magnitude", activation_norm=None)`
    (prunes to 2:4, then quantizes the kept values; group_size in dense columns) or `from_weight(weight, bias)`. The
    state dict holds qweight, scales, offsets, meta, bias and (extra state) group size and in_features, so
    `Sparse24Int4Linear(in, out, group_size=g, dtype=...).load_state_dict(sd)` restores a layer exactly. Loading keeps
    the layer's dtypes, as nn.Linear does (nn/_packed.py); a corrupt state dict raises and leaves the layer unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        check_features("Sparse24Int4Linear", in_features, out_features, multiple_of=4)
        check_dense_group_size(group_size, "Sparse24Int4Linear(group_size)")
        dtype = check_dtype("Sparse24Int4Linear", dtype)
        requested_device("Sparse24Int4Linear(device)", device)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        half = in_features // 2
        G = num_groups(self._kept_group_size_arg, half)
        self.register_buffer("qweight", torch.zeros((half + 7) // 8, out_features, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(G, out_features, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.zeros(G, out_features, dtype=dtype, device=device))
        # -4370 = 0b1110_1110_1110_1110: every group encodes indices (2, 3), a valid meta.
        self.register_buffer("meta", torch.full((out_features, _meta_cols(in_features)), -4370, dtype=torch.int16,
                                                device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @property
    def _kept_group_size_arg(self) -> int:
        return -1 if self.group_size == -1 else self.group_size // 2

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: Sparse24Int4Weight, bias: Optional[torch.Tensor] = None) -> "Sparse24Int4Linear":
        if not isinstance(weight, Sparse24Int4Weight):
            raise TypeError(f"Sparse24Int4Linear.from_weight(weight): expected a Sparse24Int4Weight, got "
                            f"{type(weight).__name__}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.out_features,)):
            raise ValueError(f"Sparse24Int4Linear.from_weight(bias): expected shape ({weight.out_features},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        layer = cls(weight.in_features, weight.out_features, bias=bias is not None, group_size=weight.group_size,
                    device="meta", dtype=weight.scales.dtype)
        layer.qweight, layer.scales, layer.offsets, layer.meta = (weight.qweight, weight.scales, weight.offsets,
                                                                  weight.meta)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, method: str = "magnitude",
                    activation_norm: Optional[torch.Tensor] = None, symmetric: bool = False) -> "Sparse24Int4Linear":
        """Prune an nn.Linear to 2:4 (turbokernels.prune_24), then quantize the kept values to int4 (group_size in
        dense columns); the linear is not modified."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Sparse24Int4Linear.from_linear(linear): expected an nn.Linear, got "
                            f"{type(linear).__name__}")
        check_dense_group_size(group_size, "Sparse24Int4Linear.from_linear(group_size)")
        pruned = prune_24(linear.weight.detach(), method=method, activation_norm=activation_norm)
        weight = Sparse24Int4Weight.from_dense(pruned, group_size=group_size, symmetric=symmetric)
        return cls.from_weight(weight, None if linear.bias is None else linear.bias.detach())

    # ---- use ---------------------------------------------------------------------------------------------------
    # forward (PackedWeightModule.forward): the functional a traced call takes, and the bias's dtype rule
    _functional = staticmethod(sparse24_int4_mm.sparse24_int4_linear)
    _bias_follows_x = True

    @property
    def weight(self) -> Sparse24Int4Weight:
        int4 = Int4Weight._trusted(self.qweight, self.scales, self.offsets, self._kept_group_size_arg,
                                   self.in_features // 2)
        return Sparse24Int4Weight._trusted(int4, self.meta)

    def _make_plan(self):
        plan = sparse24_int4_mm.plan(self.qweight, self.scales, self.offsets, self.meta, self.group_size,
                                     self.in_features)
        if plan.out_features != self.out_features:
            raise ValueError(f"Sparse24Int4Linear(qweight): qweight has {plan.out_features} columns, this layer has "
                             f"out_features={self.out_features}")
        return plan

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity=2:4, group_size={self.group_size}, scales={self.scales.dtype}")

    # ---- state dict ----------------------------------------------------------------------------------------------
    PACKED = ("qweight", "scales", "offsets", "meta")

    def _validate_packed(self, packed) -> None:
        qweight = packed["qweight"]
        if isinstance(qweight, torch.Tensor) and qweight.dim() == 2 and qweight.shape[1] != self.out_features:
            raise ValueError(f"load_state_dict(qweight): qweight has {qweight.shape[1]} columns, this layer has "
                             f"out_features={self.out_features}")
        Sparse24Int4Weight(packed["qweight"], packed["scales"], packed["offsets"], packed["meta"], self.group_size,
                           self.in_features)

    def _cast_packed(self, packed):
        scales = packed["scales"].to(self.scales.dtype)
        return dict(packed, scales=scales, offsets=exact_offsets(packed["offsets"].to(torch.float32), scales.dtype))

    def get_extra_state(self):
        return {"format": _FORMAT, "group_size": self.group_size, "in_features": self.in_features}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"Sparse24Int4Linear(_extra_state): unknown extra state {state!r}")
        if state.get("group_size") != self.group_size or state.get("in_features") != self.in_features:
            raise ValueError(f"Sparse24Int4Linear(_extra_state): the state dict was saved with group_size="
                             f"{state.get('group_size')}, in_features={state.get('in_features')}; this layer has "
                             f"group_size={self.group_size}, in_features={self.in_features}")
