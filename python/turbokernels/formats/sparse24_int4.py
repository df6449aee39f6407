"""Sparse24Int4Weight: a 2:4-sparse weight whose kept values are quantized to int4 (the Sparse-Marlin idea).

For a linear layer y = x @ W.T with W of shape (N, K), 2:4-sparse along K:

  int4    Int4Weight over the compressed (N, K/2) values matrix (formats/int4.py), i.e.
          qweight int32 (ceil(K/16), N): word [j, n] holds the kept values 8j..8j+7 of row n, which are exactly the
                  kept values of dense columns 16j..16j+15, the ones meta element [n, j] describes;
          scales, offsets (G, N) with G = ceil((K/2) / group_size_kept): groups count KEPT values.
  meta    int16 (N, ceil(K/16)): Sparse24Weight's metadata (formats/sparse24.py), unchanged.

  dequantized weight: the 2:4 weight whose kept value c of row n is q[c, n] * scale[c // gs, n] + offset[c // gs, n].

`from_dense(weight, group_size=128)` takes the group size in DENSE columns (a multiple of 2, or -1 per channel):
a group of 128 dense columns holds 64 kept values. Bytes per dense element: 0.25 (int4 over half the columns) +
0.125 (meta) + scales/offsets, ~0.2 of dense fp16 at g128.
"""
from __future__ import annotations

import torch

from .int4 import Int4Weight, check_group_size, quantize_int4, validate_int4_tensors
from .sparse24 import Sparse24Weight, _meta_cols, check_meta_encoding


def check_meta(meta, out_features: int, in_features: int, device, entry: str = "Sparse24Int4Weight") -> None:
    """The checks Sparse24Weight applies to its meta: int16, (N, ceil(K/16)), same device, idx0 < idx1."""
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"{entry}(meta): meta must be a torch.Tensor, got {type(meta).__name__}")
    if meta.dtype != torch.int16:
        raise TypeError(f"{entry}(meta): meta must be int16 (4 groups of 4 bits per element), got {meta.dtype}")
    if meta.dim() != 2:
        raise ValueError(f"{entry}(meta): meta must be 2-D, got shape {tuple(meta.shape)}")
    expected = (out_features, _meta_cols(in_features))
    if tuple(meta.shape) != expected:
        raise ValueError(f"{entry}(meta): meta must have shape (out_features, ceil(in_features / 16)) = {expected}; "
                         f"got {tuple(meta.shape)}")
    if meta.device != device:
        raise ValueError(f"{entry}(meta): meta is on {meta.device} but qweight is on {device}")
    check_meta_encoding(entry, meta, in_features)


def check_dense_group_size(group_size, name: str = "group_size") -> None:
    """name: how the message names the argument, e.g. "Sparse24Int4Weight.from_dense(group_size)"."""
    check_group_size(group_size, name)
    if group_size != -1 and group_size % 2:
        raise ValueError(f"{name}: counts dense columns and must be a multiple of 2 (half of them are kept) or -1, "
                         f"got {group_size}")


class Sparse24Int4Weight:
    """A 2:4-sparse weight with int4 kept values (see the module docstring for the layout)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, meta: torch.Tensor,
                 group_size: int, in_features: int):
        """group_size in DENSE columns (a multiple of 2) or -1; in_features the dense K (a multiple of 4)."""
        e = "Sparse24Int4Weight"
        check_dense_group_size(group_size, f"{e}(group_size)")
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 4 or in_features % 4:
            raise ValueError(f"{e}(in_features): must be a positive multiple of 4, got {in_features!r}")
        kept_gs = -1 if group_size == -1 else group_size // 2
        validate_int4_tensors(e, qweight, scales, offsets, kept_gs, in_features // 2,
                              note=" (kept values: half of the dense in_features and group_size)")
        int4 = Int4Weight._trusted(qweight.contiguous(), scales.contiguous(), offsets.contiguous(), kept_gs,
                                   in_features // 2)
        check_meta(meta, int4.out_features, in_features, int4.device, e)
        self.int4 = int4
        self.meta = meta.contiguous()

    @classmethod
    def _trusted(cls, int4: Int4Weight, meta: torch.Tensor) -> "Sparse24Int4Weight":
        self = cls.__new__(cls)
        self.int4, self.meta = int4, meta
        return self

    # ---- tensors -----------------------------------------------------------------------------------------------
    @property
    def qweight(self) -> torch.Tensor:
        return self.int4.qweight

    @property
    def scales(self) -> torch.Tensor:
        return self.int4.scales

    @property
    def offsets(self) -> torch.Tensor:
        return self.int4.offsets

    # ---- shape facts -------------------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.int4.out_features

    @property
    def in_features(self) -> int:
        return 2 * self.int4.in_features

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), as nn.Linear.weight."""
        return (self.out_features, self.in_features)

    @property
    def group_size(self) -> int:
        """In dense columns, as given (-1: per channel)."""
        return -1 if self.int4.group_size == -1 else 2 * self.int4.group_size

    @property
    def kept_group_size(self) -> int:
        """Kept values per scale/offset row (what the op takes): group_size // 2, or K/2 for -1."""
        return self.int4.effective_group_size

    @property
    def device(self) -> torch.device:
        return self.int4.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "offsets": self.offsets, "meta": self.meta}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "Sparse24Int4Weight":
        from .._checks import requested_device
        requested_device("Sparse24Int4Weight.to(device)", device)
        return Sparse24Int4Weight._trusted(self.int4.to(device), self.meta.to(device))

    def __repr__(self) -> str:
        return (f"Sparse24Int4Weight(out_features={self.out_features}, in_features={self.in_features}, "
                f"sparsity=2:4, group_size={self.group_size}, scales={self.scales.dtype}, device={self.device})")

    # ---- conversions -------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> "Sparse24Int4Weight":
        """Compress a 2:4-sparse (out_features, in_features) weight (turbokernels.prune_24 makes one) and quantize
        its kept values to int4 with group_size DENSE columns (group_size // 2 kept values) per scale."""
        check_dense_group_size(group_size, "Sparse24Int4Weight.from_dense(group_size)")
        return cls.from_sparse24(Sparse24Weight.from_dense(weight), group_size, symmetric)

    @classmethod
    def from_sparse24(cls, weight: Sparse24Weight, group_size: int = 128,
                      symmetric: bool = False) -> "Sparse24Int4Weight":
        if not isinstance(weight, Sparse24Weight):
            raise TypeError(f"Sparse24Int4Weight.from_sparse24(weight): expected a Sparse24Weight, got "
                            f"{type(weight).__name__}")
        check_dense_group_size(group_size, "Sparse24Int4Weight.from_sparse24(group_size)")
        int4 = quantize_int4(weight.values, -1 if group_size == -1 else group_size // 2, symmetric)
        return cls._trusted(int4, weight.meta)

    def mma_layout(self, dtype: torch.dtype):
        """The kept values in the layout the CUDA C++ kernel reads (csrc/cuda/sparse24_int4_mm_layout.h), for
        activations of `dtype` (float16/bfloat16): an int4 MmaLayout (qweight, scales, offsets); meta is read as it
        is. Computed once per weight and dtype and kept (ops/sparse24_int4_mm.py's cuda backend); the
        Sparse24Int4Weight stays the one stored form."""
        return mma_layout(self.qweight, self.scales, self.offsets, self.kept_group_size, self.in_features, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out_features, in_features) 2:4 weight with the int4-dequantized kept values: computed in fp32
        (float64, exactly, when asked for float64), then cast."""
        from ..reference.sparse24_mm import sparse24_to_dense
        exact = torch.float64 if dtype == torch.float64 else torch.float32
        values = self.int4.dequantize(exact)  # (N, K/2)
        return sparse24_to_dense(values, self.meta, exact).to(dtype)


def mma_layout(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
               in_features: int, dtype: torch.dtype):
    """Sparse24Int4Weight tensors (group_size: KEPT values per scale row, the effective one; in_features: the dense
    K) -> formats.int4.MmaLayout for the CUDA C++ kernel (csrc/cuda/sparse24_int4_mm_layout.h): qweight int32
    (K/32, ceil(N/16) * 32), one word per lane of each 16 (n) x 16 (kept) block holding that lane's mma.sp A
    registers' nibbles (repacked by turbokernels_C::sparse24_int4_mm_mma_repack); scales, offsets (G, ceil(N/16) * 16),
    zero-padded, in `dtype` when both are exact there, else float32; zero_points False (int4_mm's integer zero-point
    mode is not implemented here: such offsets take the float32 mode). Needs turbokernels._C."""
    from .. import _ext
    from .int4 import MmaLayout
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"mma_layout(dtype): the CUDA int4 + 2:4 kernel takes float16 or bfloat16 activations, got "
                        f"{dtype}")
    if in_features % 32:
        raise ValueError(f"mma_layout(in_features): the CUDA int4 + 2:4 kernel needs a multiple of 32 (the k of "
                         f"mma.sp), got {in_features}")
    if group_size % 16 and group_size < in_features // 2:
        raise ValueError(f"mma_layout(group_size): the CUDA int4 + 2:4 kernel needs a multiple of 16 kept values or "
                         f"one group over K/2 (per-channel), got {group_size} for in_features={in_features}")
    reason = _ext.missing_op_reason("sparse24_int4_mm_mma_repack", qweight.device.type)
    if reason is not None:
        raise RuntimeError(f"mma_layout: {reason}")
    packed = torch.ops.turbokernels_C.sparse24_int4_mm_mma_repack(qweight, in_features)
    N = qweight.shape[1]
    pad = (N + 15) // 16 * 16 - N
    exact = lambda t: t.dtype == dtype or torch.equal(t.to(dtype).to(t.dtype), t)  # noqa: E731
    kind = dtype if exact(scales) and exact(offsets) else torch.float32
    return MmaLayout((packed, torch.nn.functional.pad(scales.to(kind), (0, pad)).contiguous(),
                      torch.nn.functional.pad(offsets.to(kind), (0, pad)).contiguous(), False))
