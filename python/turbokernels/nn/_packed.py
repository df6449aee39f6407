"""PackedWeightModule: the state-dict behaviour shared by the modules whose weight is a packed format.

The packed buffers (e.g. qweight/scales/offsets, or values/meta) are taken *as saved* -- dtypes included, since a
format may keep some tensors in fp32 for exactness -- and only after they, the bias shape and the extra state have
been validated together: a corrupt state dict is reported as an error and leaves the layer untouched.
"""
from __future__ import annotations

import torch
from torch import nn


class PackedWeightModule(nn.Module):
    PACKED: tuple[str, ...] = ()  # names of the buffers that hold the packed weight

    def _validate_packed(self, packed: dict[str, torch.Tensor]) -> None:
        """Raise TypeError/ValueError naming what is wrong with these packed tensors for this layer."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        packed = {n: state_dict[prefix + n] for n in self.PACKED if prefix + n in state_dict}
        if len(packed) != len(self.PACKED):  # a partial state dict: the base class reports what is missing
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        try:
            self._validate_packed(packed)
            bias = state_dict.get(prefix + "bias")
            if getattr(self, "bias", None) is not None and isinstance(bias, torch.Tensor) \
                    and bias.shape != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            extra = state_dict.get(prefix + "_extra_state")
            if extra is not None:
                self.set_extra_state(extra)
        except (TypeError, ValueError) as exc:
            error_msgs.append(f"{type(self).__name__} ({prefix or 'root'}): {exc}")
            return
        first = getattr(self, self.PACKED[0])
        device = first.device if first.device.type != "meta" else packed[self.PACKED[0]].device
        for n, t in packed.items():
            self._buffers[n] = t.detach().to(device).clone()
        rest = {k: v for k, v in state_dict.items() if k[len(prefix):] not in self.PACKED}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # The base class reports the packed keys as missing, since they were not in `rest`: they were taken above.
        for n in self.PACKED:
            if prefix + n in missing_keys:
                missing_keys.remove(prefix + n)
