"""Int4Linear: a drop-in nn.Linear whose weight is an Int4Weight (int4_mm underneath)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import requested_device
from ..formats.int4 import (Int4Weight, check_group_size, check_scale_dtype, exact_offsets, num_groups,
                            quantize_int4)
from ..ops import int4_mm
from ._packed import PackedWeightModule, check_dtype, check_features


class Int4Linear(PackedWeightModule):
    """y = x @ W.T + b with W stored as int4 (Int4Weight layout), for fp16, bf16 and fp32 activations.

    Build one with `Int4Linear.from_linear(linear, group_size=128, symmetric=False)` or
    `Int4Linear.from_weight(int4_weight, bias)`. The state dict holds qweight, scales, offsets, perm (empty when
    there is no act-order permutation), bias, and the group size as extra state, so
    `Int4Linear(in, out, group_size=g, dtype=...).load_state_dict(sd)` restores a layer exactly. Loading keeps the
    layer's dtypes, as nn.Linear does: an fp16 state dict loaded into an fp32 layer gives fp32 scales and bias holding
    the same values (build the layer with dtype=torch.float16 to keep fp16); offsets stay in the scales' dtype when
    exact, else fp32 (nn/_packed.py). A corrupt state dict raises and leaves the layer unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        check_features("Int4Linear", in_features, out_features)
        check_group_size(group_size, "Int4Linear(group_size)")
        dtype = check_dtype("Int4Linear", dtype)
        requested_device("Int4Linear(device)", device)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        G = num_groups(group_size, in_features)
        self.register_buffer("qweight", torch.zeros((in_features + 7) // 8, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.ones(G, out_features, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.zeros(G, out_features, dtype=dtype, device=device))
        self.register_buffer("perm", torch.empty(0, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: Int4Weight, bias: Optional[torch.Tensor] = None) -> "Int4Linear":
        if not isinstance(weight, Int4Weight):
            raise TypeError(f"Int4Linear.from_weight(weight): expected an Int4Weight, got {type(weight).__name__}")
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise TypeError(f"Int4Linear.from_weight(bias): expected a torch.Tensor or None, got "
                            f"{type(bias).__name__}")
        layer = cls(weight.in_features, weight.out_features, bias=bias is not None, group_size=weight.group_size,
                    device="meta", dtype=weight.scales.dtype)
        layer.qweight, layer.scales, layer.offsets = weight.qweight, weight.scales, weight.offsets
        layer.perm = weight.perm if weight.perm is not None else torch.empty(0, dtype=torch.int64,
                                                                                device=weight.device)
        if bias is not None:
            if bias.shape != (weight.out_features,):
                raise ValueError(f"Int4Linear.from_weight(bias): expected shape ({weight.out_features},), got "
                                 f"{tuple(bias.shape)}")
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False,
                    scale_dtype: Optional[torch.dtype] = None) -> "Int4Linear":
        """Quantize an nn.Linear (round-to-nearest, min-max; see turbokernels.quantize_int4). scale_dtype: the
        scales' (and, where exact, offsets') dtype; default the weight's for fp16/bf16 weights, fp32 otherwise."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int4Linear.from_linear(linear): expected an nn.Linear, got {type(linear).__name__}")
        check_group_size(group_size, "Int4Linear.from_linear(group_size)")
        check_scale_dtype(scale_dtype, "Int4Linear.from_linear(scale_dtype)")
        weight = quantize_int4(linear.weight.detach(), group_size=group_size, symmetric=symmetric,
                               scale_dtype=scale_dtype)
        return cls.from_weight(weight, None if linear.bias is None else linear.bias.detach())

    # ---- use ---------------------------------------------------------------------------------------------------
    # forward (PackedWeightModule.forward): the functional a traced call takes, and the bias's dtype rule
    _functional = staticmethod(int4_mm.int4_linear)
    _bias_follows_x = True

    @property
    def weight(self) -> Int4Weight:
        return Int4Weight._trusted(self.qweight, self.scales, self.offsets, self.group_size, self.in_features,
                                   self.perm if self.perm.numel() else None)

    def _make_plan(self):
        perm = self.perm
        plan = int4_mm.plan("Int4Linear", self.qweight, self.scales, self.offsets, self.group_size,
                            self.in_features, perm if isinstance(perm, torch.Tensor) and perm.numel() else None)
        if plan.out_features != self.out_features:
            raise ValueError(f"Int4Linear(qweight): qweight has {plan.out_features} columns, this layer has "
                             f"out_features={self.out_features}")
        return plan

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, scales={self.scales.dtype}, "
                f"act_order={self.perm.numel() > 0}")

    # ---- state dict ----------------------------------------------------------------------------------------------
    PACKED = ("qweight", "scales", "offsets", "perm")

    def _validate_packed(self, packed) -> None:
        perm = packed["perm"]
        if not isinstance(perm, torch.Tensor):
            raise TypeError(f"load_state_dict(perm): expected a torch.Tensor, got {type(perm).__name__}")
        Int4Weight(packed["qweight"], packed["scales"], packed["offsets"], self.group_size, self.in_features,
                   perm if perm.numel() else None)
        if packed["qweight"].shape[1] != self.out_features:
            raise ValueError(f"load_state_dict(qweight): qweight has {packed['qweight'].shape[1]} columns, this "
                             f"layer has out_features={self.out_features}")

    def _cast_packed(self, packed):
        scales = packed["scales"].to(self.scales.dtype)
        return dict(packed, scales=scales, perm=packed["perm"].to(torch.int64),
                    offsets=exact_offsets(packed["offsets"].to(torch.float32), scales.dtype))

    def get_extra_state(self):
        return {"format": "turbokernels.int4/1", "group_size": self.group_size, "in_features": self.in_features}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or state.get("format") != "turbokernels.int4/1":
            raise ValueError(f"Int4Linear(_extra_state): unknown extra state {state!r}")
        if state.get("group_size") != self.group_size or state.get("in_features") != self.in_features:
            raise ValueError(f"Int4Linear(_extra_state): the state dict was saved with group_size="
                             f"{state.get('group_size')}, in_features={state.get('in_features')}; this layer has "
                             f"group_size={self.group_size}, in_features={self.in_features}")
