"""Sparse24Weight: the compressed 2:4 semi-structured weight every sparse24 kernel of turbokernels reads.

For a linear layer y = x @ W.T with W of shape (N, K) = (out_features, in_features), 2:4-sparse along K (in every
group of 4 consecutive input columns of a row at most 2 weights are nonzero):

  values  (N, K/2), W's dtype      the two kept values of each group of 4, in increasing column order. A group with
                                   fewer than 2 nonzeros keeps zeros at the (valid, distinct) indices it encodes.
  meta    int16 (N, ceil(K/16))    row-major: per group of 4 columns a nibble idx0 | idx1 << 2 (the columns of the
                                   two kept values inside the group, idx0 < idx1); 4 groups per int16, group g of
                                   the 4 in bits 4*g..4*g+3. When K is not a multiple of 16 the last element is
                                   padded with the encoding of all-zero groups.

This is exactly PyTorch's per-element CUTLASS encoding (torch/sparse/_semi_structured_conversions.py) before its
reordering scatter, including its choice of indices for groups with fewer than 2 nonzeros:

    nonzeros (col 0..3)  -> (idx0, idx1)       nonzeros        -> (idx0, idx1)
    none, {3}, {2}       -> (2, 3)             {0}             -> (0, 2)
    {1}                  -> (1, 2)             any 2 {a < b}   -> (a, b)

so `to_cutlass()` gives the (values, meta_reordered) pair of torch's `sparse_semi_structured_from_dense_cutlass`
bit for bit (fp16/bf16; CUTLASS's fp32 format is 1:2 pairs, a different sparsity), and `from_cutlass` inverts it.
The kernels read the simple row-major layout: a (BLOCK_N, BLOCK_K/16) tile of meta is one rectangular load.
Bytes per dense element, fp16: 0.5 * 2 (values) + 2/16 (meta) = 1.125 of 2, i.e. ~0.56 of dense.
"""
from __future__ import annotations

from typing import Optional

import torch

from .int4 import FLOAT_DTYPES

CUTLASS_DTYPES = (torch.float16, torch.bfloat16)


def _meta_cols(in_features: int) -> int:
    return (in_features + 15) // 16


def encode_groups(nonzero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool (..., 4) nonzero flags of groups with at most 2 nonzeros -> (idx0, idx1) int64 (...), with PyTorch's
    CUTLASS choice for groups of fewer than 2 nonzeros (the table in the module docstring). Column 2's flag is not
    needed: with at most two nonzeros, the flags of columns 0, 1 and 3 determine the pair."""
    m0, m1, m3 = nonzero[..., 0], nonzero[..., 1], nonzero[..., 3]
    idx0 = (~m0 & m1).to(torch.int64) | ((~m0 & ~m1).to(torch.int64) << 1)
    idx1 = ((m0 & m1) | (~m0 & ~m1) | m3).to(torch.int64) | (((~m0 & m1) | ~m1).to(torch.int64) << 1)
    return idx0, idx1


def pack_meta(idx0: torch.Tensor, idx1: torch.Tensor) -> torch.Tensor:
    """(N, G) indices, G a multiple of 4 -> int16 (N, G/4): group g of each 4 at bits 4*g (idx0 | idx1 << 2)."""
    N, G = idx0.shape
    nib = (idx0 | (idx1 << 2)).view(N, G // 4, 4)
    word = (nib << torch.arange(0, 16, 4, device=nib.device)).sum(dim=-1)  # 0..65535
    return torch.where(word >= 2**15, word - 2**16, word).to(torch.int16)


def cutlass_meta_offsets(rows: int, meta_cols: int, device=None) -> torch.Tensor:
    """Flat position in CUTLASS's reordered int16 metadata of each row-major meta element [r, c], as int64
    (rows * meta_cols,). CUTLASS's sparse tensor-core GEMM reads fp16/bf16 metadata (int16 elements, 4 groups each)
    in the layout of `ColumnMajorInterleaved<2>` after `reorder_meta` (cutlass/util/host_reorder.h):
      1. within each block of 32 rows, row r goes to (r % 8) * 4 + (r % 32) // 8: the 4 sub-blocks of 8 rows are
         interleaved, so the metadata of rows i, i+8, i+16, i+24 (one mma.sp A fragment's rows) are neighbours;
      2. each 2x2 block of (row, column) is transposed: element [2i, 2j+1] <-> [2i+1, 2j];
      3. column-major interleaved by 2: pairs of columns are stored one after another, each pair row by row
         (offset = (c // 2) * rows * 2 + r * 2 + c % 2).
    Scatter the row-major meta to these offsets to get the reordered matrix; gather from them to undo it."""
    r = torch.arange(rows, device=device).view(rows, 1).expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device).view(1, meta_cols).expand(rows, meta_cols)
    r = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8
    swap = ((r % 2 == 0) & (c % 2 == 1)).to(torch.int64) - ((r % 2 == 1) & (c % 2 == 0)).to(torch.int64)
    r, c = r + swap, c - swap
    return ((c // 2) * rows * 2 + r * 2 + c % 2).reshape(-1)


def check_meta_encoding(entry: str, meta: torch.Tensor, in_features: int) -> None:
    """Every group encodes two distinct indices idx0 < idx1 (a corrupt meta would make the kernels read the wrong
    columns). One host sync; meta tensors have no values to check."""
    if meta.device.type == "meta":
        return
    from ..reference.sparse24_mm import meta_indices
    idx0, idx1 = meta_indices(meta, in_features // 4)
    bad = idx0 >= idx1
    if bad.any():
        r, g = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{entry}(meta): meta is corrupt: the group at row {r}, column {4 * g} encodes indices "
                         f"({int(idx0[r, g])}, {int(idx1[r, g])}); each group needs idx0 < idx1")


class Sparse24Weight:
    """A compressed 2:4 weight of a linear layer (see the module docstring for the layout)."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor):
        """Shapes, dtypes and devices are checked, and every group's encoding (one host sync, on real tensors: a
        one-time check when a weight is built or loaded)."""
        e = "Sparse24Weight"
        for name, t in (("values", values), ("meta", meta)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{e}({name}): {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2:
                raise ValueError(f"{e}({name}): {name} must be 2-D, got shape {tuple(t.shape)}")
        if values.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{e}(values): values must be float16, bfloat16 or float32, got {values.dtype}")
        if meta.dtype != torch.int16:
            raise TypeError(f"{e}(meta): meta must be int16 (4 groups of 4 bits per element), got {meta.dtype}")
        N, half = values.shape
        if N < 1 or half < 2 or half % 2:
            raise ValueError(f"{e}(values): values must have shape (out_features, in_features / 2) with out_features "
                             f">= 1 and in_features a positive multiple of 4, got {tuple(values.shape)}")
        K = 2 * half
        if tuple(meta.shape) != (N, _meta_cols(K)):
            raise ValueError(f"{e}(meta): meta must have shape (out_features, ceil(in_features / 16)) = "
                             f"({N}, {_meta_cols(K)}) for values of shape {tuple(values.shape)}; got "
                             f"{tuple(meta.shape)}")
        if meta.device != values.device:
            raise ValueError(f"{e}(meta): meta is on {meta.device} but values is on {values.device}")
        check_meta_encoding(e, meta, K)
        self.values = values.contiguous()
        self.meta = meta.contiguous()

    @classmethod
    def _trusted(cls, values: torch.Tensor, meta: torch.Tensor) -> "Sparse24Weight":
        """No validation: for tensors that were validated when they entered (Sparse24Linear's buffers)."""
        self = cls.__new__(cls)
        self.values, self.meta = values, meta
        return self

    # ---- shape facts -------------------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def in_features(self) -> int:
        return 2 * self.values.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), as nn.Linear.weight."""
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "meta": self.meta}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Sparse24Weight":
        """Move and/or cast the values (a cast keeps the sparsity pattern: the metadata is unchanged)."""
        from .._checks import requested_device
        requested_device("Sparse24Weight.to(device)", device)
        values = self.values.to(device=device, dtype=dtype)
        return Sparse24Weight._trusted(values.contiguous(), self.meta.to(device=values.device))

    def __repr__(self) -> str:
        return (f"Sparse24Weight(out_features={self.out_features}, in_features={self.in_features}, "
                f"dtype={self.dtype}, device={self.device})")

    # ---- conversions -------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "Sparse24Weight":
        """Compress a 2:4-sparse (out_features, in_features) weight (see turbokernels.prune_24 to make one). NaN
        and Inf count as nonzero and are kept exactly; a meta weight gives a meta Sparse24Weight."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"Sparse24Weight.from_dense(weight): expected a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"Sparse24Weight.from_dense(weight): expected a 2-D (out_features, in_features) tensor, "
                             f"got shape {tuple(weight.shape)}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"Sparse24Weight.from_dense(weight): dtype must be float16, bfloat16 or float32, got "
                            f"{weight.dtype}")
        N, K = weight.shape
        if N < 1 or K < 4 or K % 4:
            raise ValueError(f"Sparse24Weight.from_dense(weight): in_features must be a positive multiple of 4 and "
                             f"out_features positive, got shape {tuple(weight.shape)}")
        w = weight.detach()
        nonzero = (w != 0).reshape(N, K // 4, 4)
        count = nonzero.sum(dim=-1)
        bad = count > 2
        if w.device.type != "meta" and bad.any():  # a meta weight has no values: its meta encodes all-zero groups
            r, g = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"Sparse24Weight.from_dense(weight): not 2:4 sparse: the group at (row {r}, column "
                             f"{4 * g}) (columns {4 * g}..{4 * g + 3}) has {int(count[r, g])} nonzeros; at most 2 of "
                             f"every 4 consecutive input columns may be nonzero (turbokernels.prune_24 makes a 2:4 "
                             f"weight)")
        Kp = _meta_cols(K) * 16
        dense = w.contiguous()
        if Kp != K:  # pad with zero groups to whole meta elements; their values are dropped again below
            dense = torch.cat([dense, dense.new_zeros(N, Kp - K)], dim=1)
            nonzero = torch.cat([nonzero, nonzero.new_zeros(N, (Kp - K) // 4, 4)], dim=1)
        idx0, idx1 = encode_groups(nonzero)
        dense4 = dense.view(N, Kp // 4, 4)
        values = torch.stack((dense4.gather(2, idx0.unsqueeze(-1)).squeeze(-1),
                              dense4.gather(2, idx1.unsqueeze(-1)).squeeze(-1)), dim=-1).view(N, Kp // 2)
        return cls(values[:, : K // 2].contiguous(), pack_meta(idx0, idx1))

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (out_features, in_features) weight, exactly (in the values' dtype, or `dtype`, e.g. float64)."""
        from ..reference.sparse24_mm import sparse24_to_dense
        return sparse24_to_dense(self.values, self.meta, dtype or self.dtype)

    @staticmethod
    def _check_cutlass_shape(fn: str, N: int, K: int) -> None:
        if N % 32 or K % 32:
            raise ValueError(f"{fn}: PyTorch's CUTLASS layout needs out_features % 32 == 0 and in_features % 32 == 0 "
                             f"(metadata is reordered in blocks of 32 rows and 2x2 blocks of int16 meta columns, "
                             f"16 dense columns each), got ({N}, {K})")

    def to_cutlass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, meta_reordered) in PyTorch's CUTLASS layout: equal to
        torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass(self.to_dense())."""
        if self.dtype not in CUTLASS_DTYPES:
            raise TypeError(f"Sparse24Weight.to_cutlass(): needs float16 or bfloat16 values, got {self.dtype} "
                            f"(CUTLASS's float32 format is 1:2 sparsity, not 2:4)")
        N, K = self.shape
        self._check_cutlass_shape("Sparse24Weight.to_cutlass()", N, K)
        offsets = cutlass_meta_offsets(N, K // 16, self.device)
        reordered = torch.empty_like(self.meta).view(-1).scatter_(0, offsets, self.meta.view(-1))
        return self.values.clone(), reordered.view(N, K // 16)

    @classmethod
    def from_cutlass(cls, values: torch.Tensor, meta_reordered: torch.Tensor) -> "Sparse24Weight":
        """The inverse of to_cutlass: PyTorch's CUTLASS (values, meta_reordered) pair for fp16/bf16."""
        for name, t in (("values", values), ("meta_reordered", meta_reordered)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"Sparse24Weight.from_cutlass({name}): expected a 2-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if values.dtype not in CUTLASS_DTYPES:
            raise TypeError(f"Sparse24Weight.from_cutlass(values): needs float16 or bfloat16, got {values.dtype}")
        if meta_reordered.dtype != torch.int16:
            raise TypeError(f"Sparse24Weight.from_cutlass(meta_reordered): needs int16, got {meta_reordered.dtype}")
        N, K = values.shape[0], 2 * values.shape[1]
        cls._check_cutlass_shape("Sparse24Weight.from_cutlass(values)", N, K)
        if tuple(meta_reordered.shape) != (N, K // 16):
            raise ValueError(f"Sparse24Weight.from_cutlass(meta_reordered): expected shape ({N}, {K // 16}) for values "
                             f"of shape {tuple(values.shape)}, got {tuple(meta_reordered.shape)}")
        if meta_reordered.device != values.device:
            raise ValueError(f"Sparse24Weight.from_cutlass(meta_reordered): on {meta_reordered.device} but values "
                             f"is on {values.device}")
        offsets = cutlass_meta_offsets(N, K // 16, values.device)
        meta = meta_reordered.reshape(-1).gather(0, offsets).view(N, K // 16)
        return cls(values.contiguous(), meta)
