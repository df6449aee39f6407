"""PackedWeightModule: the state-dict behaviour shared by the modules whose weight is a packed format.

load_state_dict keeps the layer's own dtypes, as nn.Linear does (it copies into its existing parameters): the packed
float tensors (scales, values) are cast to the layer's current dtype -- an fp16 checkpoint loaded into an fp32 layer
gives fp32 scales holding the same values; an fp32 one loaded into an fp16 layer rounds them, as .half() would --
and offsets follow the format's rule (the scales' dtype when that is exact, else fp32). The bias is copied into the
existing parameter by torch. Integer tensors (qweight, meta, perm) are taken as saved.

Nothing is half-changed: the packed tensors, the bias and the extra state are validated together first; a corrupt
tensor, an incomplete set of packed tensors (whatever `strict` says: new qweight with old scales is never a weight)
or, in the layer's own load_state_dict with strict=True, a missing or unexpected key is reported as torch's
RuntimeError and leaves the layer untouched. (Loaded as part of a larger model, torch's own rule applies to the
model: it loads every valid module before reporting missing or unexpected keys.) A layer built on the "meta"
device is materialized on the state dict's device, in its own dtypes.

forward trusts the packed buffers: they are validated once, by the format's own checks, into a plan
(ops/_linear.LinearPlan: the op's weight arguments and the signature its backend choice is remembered under), and
the plan is reused while every packed buffer is the same tensor at the same version. A buffer replaced
(`layer.qweight = t`, `.to()`, load_state_dict) or changed in place by a shape-changing op (`resize_`, `set_`:
they bump the version) gets the plan rebuilt, so a bad replacement raises an error naming the argument, at the
next call, instead of reaching a kernel. (A tensor's `.data = ...` assignment changes neither identity nor version:
call `layer.replan()` after one. Inference tensors have no version: their identity alone is watched.) x and the bias
are checked on every call, as the functionals check them.

A layer split over ranks by turbokernels.parallel keeps its class and global sizes; its packed buffers are DTensors
and `_tp` (parallel.Sharding) runs forward on this rank's shard; a state dict loads into it as whole tensors (each
rank takes its slice) or as DTensors of its placements (parallel.load_local_).
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.int4 import FLOAT_DTYPES
from ..ops._linear import planned, tensor_version

is_compiling = torch.compiler.is_compiling


def check_features(entry: str, in_features, out_features, multiple_of: int = 1) -> None:
    """in_features / out_features of a layer's constructor: positive ints (in_features a multiple of `multiple_of`)."""
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{entry}({name}): must be an int, got {type(v).__name__}")
    if in_features < 1 or in_features % multiple_of:
        what = "a positive int" if multiple_of == 1 else f"a positive multiple of {multiple_of}"
        raise ValueError(f"{entry}(in_features): must be {what}, got {in_features}")
    if out_features < 1:
        raise ValueError(f"{entry}(out_features): must be a positive int, got {out_features}")


def check_dtype(entry: str, dtype) -> torch.dtype:
    dtype = dtype or torch.float32
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{entry}(dtype): must be float16, bfloat16 or float32, got {dtype}")
    return dtype


class PackedWeightModule(nn.Module):
    PACKED: tuple[str, ...] = ()  # names of the buffers that hold the packed weight
    _plan = None  # the current plan (instance attribute once built); see the module docstring
    _plan_watch: tuple = ()  # ((buffer name, tensor, version), ...) the plan was built from
    _tp = None  # tensor parallel: the layer's parallel.Sharding when its buffers are DTensor shards

    def _make_plan(self):
        """A LinearPlan of the current packed buffers, validated (TypeError/ValueError naming the argument)."""
        raise NotImplementedError

    def replan(self):
        """Validate the packed buffers now and use them from the next call on (forward does this by itself when a
        buffer is replaced; see the module docstring)."""
        buffers = self._buffers
        watch = tuple((n, buffers.get(n), tensor_version(buffers.get(n))) for n in self.PACKED)
        plan = self._make_plan()
        self._plan, self._plan_watch = plan, watch
        return plan

    # forward's two class choices: the functional a traced call goes through (e.g. ops.int4_mm.int4_linear), and
    # whether the bias follows x's dtype (the int4 layers: their bias is kept in the scales' dtype)
    _functional = None
    _bias_follows_x = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tp is not None:  # sharded (turbokernels.parallel): this rank's shard, DTensor in and out
            return self._tp.forward(self, x)
        bias = self._parameters.get("bias", self.__dict__.get("bias"))  # not nn.Module.__getattr__: ~2 us a call
        if bias is not None and self._bias_follows_x:
            xdt = getattr(x, "dtype", None)
            if xdt is not None and bias.dtype != xdt:
                bias = bias.to(xdt)
        if is_compiling():  # traced: the buffers as they are, no plan bookkeeping in the graph
            return type(self)._functional(x, self.weight, bias)
        plan = self._plan  # still current? (checked here, not in a method: a Python call costs ~1 us)
        if plan is not None:
            buffers = self._buffers
            for name, t, version in self._plan_watch:
                if buffers.get(name) is not t or (version is not None and t._version != version):
                    plan = self.replan()
                    break
        else:
            plan = self.replan()
        return planned(plan, x, bias)

    def _apply(self, fn, recurse=True):
        self._plan = None  # .to()/.half()/...: new buffers; do not keep the old ones alive through the plan
        return super()._apply(fn, recurse)

    def _validate_packed(self, packed: dict[str, torch.Tensor]) -> None:
        """Raise TypeError/ValueError naming what is wrong with these packed tensors for this layer."""
        raise NotImplementedError

    def _cast_packed(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The validated packed tensors in this layer's own dtypes (as nn.Linear keeps its parameters' dtype)."""
        return packed

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's, except that with strict=True missing or unexpected keys are reported before anything is loaded
        (torch reports them after loading the rest), so a failed call leaves the layer unchanged."""
        if strict and hasattr(state_dict, "keys"):
            expected = set(self.state_dict().keys())
            missing = [k for k in self.state_dict() if k not in state_dict]
            unexpected = [k for k in state_dict if k not in expected]
            if missing or unexpected:
                msgs = []
                if missing:
                    msgs.append("Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
                if unexpected:
                    msgs.append("Unexpected key(s) in state_dict: {}. ".format(
                        ", ".join(f'"{k}"' for k in unexpected)))
                raise RuntimeError("Error(s) in loading state_dict for {}:\n\t{}".format(type(self).__name__,
                                                                                          "\n\t".join(msgs)))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_sharded(self, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs, where) -> None:
        """A tensor-parallel layer (turbokernels.parallel): whole tensors (each rank takes its slice) or DTensors of
        the layer's placements, all validated on this rank's slice before anything changes."""
        from .. import parallel
        names = list(self.PACKED) + (["bias"] if self._parameters.get("bias") is not None else [])
        given = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        packed = [n for n in self.PACKED if n in given]
        if packed and len(packed) != len(self.PACKED):
            error_msgs.append(f"{where}: load_state_dict({', '.join(self.PACKED)}): must be loaded together; missing "
                              f"{', '.join(n for n in self.PACKED if n not in given)}")
            return
        try:
            if prefix + "_extra_state" in state_dict:
                self.set_extra_state(state_dict[prefix + "_extra_state"])  # validates only
            if given:
                parallel.load_local_(self, given)
        except (TypeError, ValueError) as exc:
            error_msgs.append(f"{where}: {exc}")
            return
        if strict:
            missing_keys.extend(prefix + n for n in names if n not in given)
            expected = {prefix + n for n in names} | {prefix + "_extra_state"}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected
                                   and "." not in k[len(prefix):])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        where = f"{type(self).__name__} ({prefix or 'root'})"
        if self._tp is not None:
            return self._load_sharded(state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs, where)
        extra_key = prefix + "_extra_state"
        packed = {n: state_dict[prefix + n] for n in self.PACKED if prefix + n in state_dict}
        if packed and len(packed) != len(self.PACKED):  # never mix new and old parts of one weight
            error_msgs.append(f"{where}: load_state_dict({', '.join(self.PACKED)}): must be loaded together; missing "
                              f"{', '.join(n for n in self.PACKED if n not in packed)}")
            return
        has_bias = getattr(self, "bias", None) is not None and prefix + "bias" in state_dict
        try:
            if packed:
                self._validate_packed(packed)
            if has_bias:
                bias = state_dict[prefix + "bias"]
                if not isinstance(bias, torch.Tensor):
                    raise TypeError(f"load_state_dict(bias): expected a torch.Tensor, got {type(bias).__name__}")
                if bias.shape != (self.out_features,):
                    raise ValueError(f"load_state_dict(bias): bias has shape {tuple(bias.shape)}, expected "
                                     f"({self.out_features},)")
            if extra_key in state_dict:
                self.set_extra_state(state_dict[extra_key])  # validates only: the layer is not changed
            cast = self._cast_packed(packed) if packed else {}
        except (TypeError, ValueError) as exc:
            error_msgs.append(f"{where}: {exc}")
            return
        taken = set(cast)
        if cast:
            self._plan = None
            first = getattr(self, self.PACKED[0])
            device = first.device if first.device.type != "meta" else cast[self.PACKED[0]].device
            for n, t in cast.items():
                self._buffers[n] = t.detach().to(device=device, memory_format=torch.contiguous_format, copy=True)
        if has_bias and self.bias.device.type == "meta":  # a layer built on "meta": materialize it, keep its dtype
            src = state_dict[prefix + "bias"].detach()
            self.bias = nn.Parameter(src.to(dtype=self.bias.dtype, memory_format=torch.contiguous_format,
                                            copy=True), requires_grad=self.bias.requires_grad)
            taken.add("bias")
        rest = {k: v for k, v in state_dict.items() if k[len(prefix):] not in taken}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # The base class reports what was taken above as missing, since it was not in `rest`.
        for n in taken:
            if prefix + n in missing_keys:
                missing_keys.remove(prefix + n)
