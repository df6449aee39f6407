"""Int4Weight: the one int4 weight-only format every int4 kernel of turbokernels reads.

For a linear layer y = x @ W.T with W of shape (N, K) = (out_features, in_features):

  qweight  int32 (ceil(K/8), N)   word [k//8, n] holds q[k, n] (unsigned 0..15) in bits 4*(k%8)..4*(k%8)+3.
                                   This is GPTQ's qweight layout: contiguous along N, so a Triton tile and a CPU
                                   SIMD lane both read consecutive output columns. Rows past K hold zeros.
  scales   (G, N) fp16/bf16/fp32  G = ceil(K / group_size); the last group is shorter when group_size does not
  offsets  (G, N) fp16/bf16/fp32  divide K (real models need it: SmolLM2 has K=576 and users ask for g128).
  dequantized weight:  W[n, k] = q[k, n] * scales[k // gs, n] + offsets[k // gs, n]
  perm     int64 (K,) or None     act-order (GPTQ g_idx): row k of qweight belongs to input feature perm[k], so
                                   y = x[..., perm] @ Wq. Sorting rows by group at import keeps groups contiguous.

Why a float offset instead of an integer zero point: q*s + o represents, exactly when computed in fp32,
GPTQ/AWQ integer zeros (o = -z*s, z <= 15: 4 + 11 significant bits), HQQ's float zeros (o = -z*s, 11 x 11 bits) and
GGUF Q4_1's min (o = m). Offsets are stored in the scales' dtype when that is exact, else in fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_GROUP_SIZES_DOC = "a positive group size (32, 64, 128, 256 are the usual ones) or -1 for per-channel"


def check_group_size(group_size, name: str = "group_size") -> None:
    """name: how the message names the argument, e.g. "quantize_int4(group_size)"."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{name}: must be an int, got {type(group_size).__name__}")
    if group_size == 0 or group_size < -1:
        raise ValueError(f"{name}: must be {SUPPORTED_GROUP_SIZES_DOC}, got {group_size}")


def effective_group_size(group_size: int, in_features: int) -> int:
    """-1 (per-channel) means one group spanning K."""
    return max(in_features, 1) if group_size == -1 else group_size


def num_groups(group_size: int, in_features: int) -> int:
    return max(1, math.ceil(in_features / effective_group_size(group_size, in_features)))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(K, N) integers in 0..15 -> int32 (ceil(K/8), N) in the Int4Weight layout."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4(q): expected a 2-D (K, N) tensor, got shape {tuple(q.shape)}")
    K, N = q.shape
    K8 = (K + 7) // 8
    # One nibble slot at a time into (K8, N) int64 words: peak memory stays a quarter of an int64 copy of q.
    words = torch.zeros(K8, N, dtype=torch.int64, device=q.device)
    for i in range(8):
        rows = q[i::8]
        words[: rows.shape[0]] |= (rows.to(torch.int64) & 0xF) << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 (ceil(K/8), N) -> uint8 (K, N): the inverse of pack_int4."""
    K8, N = qweight.shape
    shifts = (torch.arange(8, device=qweight.device, dtype=torch.int32) * 4).view(1, 8, 1)
    q = (qweight.view(K8, 1, N) >> shifts) & 0xF  # arithmetic shift is fine: the mask keeps the low nibble
    return q.reshape(K8 * 8, N)[:in_features].to(torch.uint8)


def exact_offsets(offsets_fp32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Store offsets in `dtype` when that loses nothing, else keep fp32 (meta tensors: `dtype`)."""
    cast = offsets_fp32.to(dtype)
    if offsets_fp32.device.type == "meta":
        return cast
    return cast if torch.equal(cast.to(torch.float32), offsets_fp32) else offsets_fp32


def validate_int4_tensors(entry: str, qweight, scales, offsets, group_size, in_features, perm=None, note: str = ""):
    """The checks of Int4Weight's constructor, with messages `entry(argument): ...`; returns perm as int64 (or
    None). Shapes, dtypes and devices always; perm's values (a permutation of 0..K-1, which a kernel's index_select
    relies on) with one host sync, on real tensors: a one-time check when a weight is built or loaded. `note` is
    appended to the shape messages (Sparse24Int4Weight: in_features and group_size count kept values there)."""
    check_group_size(group_size, f"{entry}(group_size)")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"{entry}(in_features): must be a positive int, got {in_features!r}")
    for name, t in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{entry}({name}): {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{entry}({name}): {name} must be 2-D, got shape {tuple(t.shape)}")
    if qweight.dtype != torch.int32:
        raise TypeError(f"{entry}(qweight): qweight must be int32 (8 nibbles per word), got {qweight.dtype}")
    K8, N = qweight.shape
    if K8 != (in_features + 7) // 8:
        raise ValueError(f"{entry}(qweight): qweight has {K8} rows but in_features={in_features}{note} needs "
                         f"ceil(K/8)={(in_features + 7) // 8}")
    G = num_groups(group_size, in_features)
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{entry}({name}): {name} must be float16, bfloat16 or float32, got {t.dtype}")
        if tuple(t.shape) != (G, N):
            raise ValueError(f"{entry}({name}): {name} must have shape (num_groups, out_features) = ({G}, {N}) for "
                             f"in_features={in_features}, group_size={group_size}{note}; got {tuple(t.shape)}")
        if t.device != qweight.device:
            raise ValueError(f"{entry}({name}): {name} is on {t.device} but qweight is on {qweight.device}")
    if perm is None:
        return None
    if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{entry}(perm): perm must be an int64 (or int32) tensor of shape ({in_features},), got "
                        f"{perm.dtype if isinstance(perm, torch.Tensor) else type(perm).__name__}")
    if perm.dim() != 1 or perm.numel() != in_features:
        raise ValueError(f"{entry}(perm): perm must be an int64 (or int32) tensor of shape ({in_features},), got "
                         f"{tuple(perm.shape)}")
    if perm.device != qweight.device:
        raise ValueError(f"{entry}(perm): perm is on {perm.device} but qweight is on {qweight.device}")
    perm = perm.to(torch.int64)
    if perm.device.type != "meta" and not torch.equal(perm.sort().values,
                                                      torch.arange(in_features, device=perm.device)):
        raise ValueError(f"{entry}(perm): must be a permutation of 0..{in_features - 1} (row k of qweight holds "
                         f"input feature perm[k]), got values in [{int(perm.min())}, {int(perm.max())}] with "
                         f"{in_features - int(perm.unique().numel())} repeated")
    return perm


class Int4Weight:
    """A packed int4 weight of a linear layer (see the module docstring for the layout)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                 in_features: int, perm: Optional[torch.Tensor] = None):
        perm = validate_int4_tensors("Int4Weight", qweight, scales, offsets, group_size, in_features, perm)
        self.qweight = qweight.contiguous()
        self.scales = scales.contiguous()
        self.offsets = offsets.contiguous()
        self.group_size = group_size  # as given: -1 means per-channel
        self.in_features = in_features
        self.perm = perm

    @classmethod
    def _trusted(cls, qweight, scales, offsets, group_size, in_features, perm=None) -> "Int4Weight":
        """No validation: for tensors that were validated when they entered (Int4Linear's buffers)."""
        self = cls.__new__(cls)
        self.qweight, self.scales, self.offsets, self.perm = qweight, scales, offsets, perm
        self.group_size, self.in_features = group_size, in_features
        return self

    # ---- shape facts -------------------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), as nn.Linear.weight."""
        return (self.out_features, self.in_features)

    @property
    def effective_group_size(self) -> int:
        return effective_group_size(self.group_size, self.in_features)

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def tensors(self) -> dict[str, Optional[torch.Tensor]]:
        return {"qweight": self.qweight, "scales": self.scales, "offsets": self.offsets, "perm": self.perm}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)

    def to(self, device) -> "Int4Weight":
        from .._checks import requested_device
        requested_device("Int4Weight.to(device)", device)
        return Int4Weight(self.qweight.to(device), self.scales.to(device), self.offsets.to(device), self.group_size,
                          self.in_features, None if self.perm is None else self.perm.to(device))

    # ---- conversions -------------------------------------------------------------------------------------------
    def mma_layout(self, dtype: torch.dtype) -> "MmaLayout":
        """This weight in the layout the CUDA C++ int4 kernel reads (csrc/cuda/int4_mm_layout.h), for activations
        of `dtype` (float16/bfloat16). Computed once per weight and dtype and kept (ops/int4_mm.py's cuda backend);
        the Int4Weight (and an Int4Linear's state dict) stays the one stored form."""
        return mma_layout(self.qweight, self.scales, self.offsets, self.effective_group_size, self.in_features,
                          dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight in nn.Linear orientation (out_features, in_features); computed in fp32 (float64 when
        asked for float64: the exact value of q * scale + offset), then cast."""
        from ..reference.int4_mm import dequantize_int4
        w = dequantize_int4(self.qweight, self.scales, self.offsets, self.effective_group_size, self.in_features,
                            torch.float64 if dtype == torch.float64 else torch.float32)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm, w)
        return w.t().contiguous().to(dtype)

    def __repr__(self) -> str:
        return (f"Int4Weight(out_features={self.out_features}, in_features={self.in_features}, "
                f"group_size={self.group_size}, scales={self.scales.dtype}, offsets={self.offsets.dtype}, "
                f"act_order={self.perm is not None}, device={self.device})")

    # ---- importers (formats/int4_importers.py holds the format-specific rules) ---------------------------------
    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> "Int4Weight":
        return quantize_int4(weight, group_size=group_size, symmetric=symmetric)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, *, in_features=None, group_size=None,
                  version: int = 1) -> "Int4Weight":
        from .int4_importers import from_gptq
        return from_gptq(qweight, qzeros, scales, g_idx, in_features=in_features, group_size=group_size,
                         version=version)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, *, group_size=None) -> "Int4Weight":
        from .int4_importers import from_awq
        return from_awq(qweight, qzeros, scales, group_size=group_size)

    @classmethod
    def from_compressed_tensors(cls, weight_packed, weight_scale, weight_zero_point=None, weight_g_idx=None,
                                weight_shape=None) -> "Int4Weight":
        from .int4_importers import from_compressed_tensors
        return from_compressed_tensors(weight_packed, weight_scale, weight_zero_point, weight_g_idx, weight_shape)

    @classmethod
    def from_gguf(cls, data, ggml_type: str, shape) -> "Int4Weight":
        from .int4_importers import from_gguf
        return from_gguf(data, ggml_type, shape)


def _constant_group_scale(offsets: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The scale of an asymmetric group whose range is 0 in `scale_dtype` (a constant group: q = 0, w = offset o):
    any scale reproduces o, so pick one on o's own scale that keeps every kernel's fp32 arithmetic exact: s =
    2^lsb(o) / 8, lsb(o) the exponent of o's lowest set bit, so that o + 8 s (the C++ kernel's centered form,
    csrc/cpu/int4_mm_simd.h) is o plus one unit of its last place, exact in fp32. (A scale of 1 made that o + 8 and
    kept ~24 - log2(8 / |o|) bits of o.) Not below the scale dtype's smallest normal number; o = 0: that one."""
    tiny = torch.finfo(scale_dtype).tiny
    o = offsets.to(torch.float64)
    mantissa, exponent = torch.frexp(o)  # o = m 2^e, |m| in [0.5, 1): m 2^53 is an integer
    m = (mantissa.abs() * 2.0 ** 53).to(torch.int64)
    lowest_bit = torch.ldexp((m & -m).to(torch.float64), exponent - 53)  # 2^lsb(o); 0 for o = 0
    return (lowest_bit / 8).clamp(min=tiny).to(scale_dtype).to(torch.float32)


def check_scale_dtype(scale_dtype, where: str) -> None:
    """None (the default rule) or a float dtype the kernels read scales in; else a TypeError naming `where`."""
    if scale_dtype is not None and scale_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: must be None, torch.float16, torch.bfloat16 or torch.float32, got {scale_dtype!r}")


def quantize_int4(weight: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  scale_dtype: Optional[torch.dtype] = None) -> Int4Weight:
    """Round-to-nearest, min-max int4 quantization of an nn.Linear weight (out_features, in_features).

    asymmetric: per group, offset = min, scale = (max - min) / 15, q = round((w - min) / scale) -- a float offset,
                so the group's minimum is exact and a constant group is exact (its scale, which any value would
                do, is a power of two on the group's own scale: _constant_group_scale).
    symmetric:  scale = absmax / 7, q = clamp(round(w / scale), -8, 7) + 8, offset = -8 * scale (an all-zero group:
                the scale dtype's smallest normal number).
    Scales are kept in the weight's dtype for fp16/bf16 weights, fp32 otherwise (or `scale_dtype`).
    Inf/NaN weights are refused (one host sync: a one-time conversion); a meta weight gives a meta Int4Weight.
    """
    fn = "quantize_int4"
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}(weight): expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}(weight): must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}(weight): dtype must be float16, bfloat16 or float32, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{fn}(weight): must not be empty, got shape {tuple(weight.shape)}")
    if weight.device.type != "meta" and not torch.isfinite(weight).all():
        raise ValueError(f"{fn}(weight): contains inf or NaN ({int((~torch.isfinite(weight)).sum())} elements); int4 "
                         f"quantization needs finite values")
    check_group_size(group_size, f"{fn}(group_size)")
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype != torch.float32 else torch.float32
    if scale_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}(scale_dtype): must be float16, bfloat16 or float32, got {scale_dtype}")

    N, K = weight.shape
    gs = effective_group_size(group_size, K)
    G = num_groups(group_size, K)
    w = weight.detach().to(torch.float32).t()  # (K, N)
    pad = G * gs - K
    lo_src = torch.cat([w, w.new_full((pad, N), math.inf)]) if pad else w
    hi_src = torch.cat([w, w.new_full((pad, N), -math.inf)]) if pad else w
    lo = lo_src.view(G, gs, N).amin(dim=1)
    hi = hi_src.view(G, gs, N).amax(dim=1)
    group_of_k = torch.arange(K, device=w.device) // gs
    scale, offsets = group_grid(lo, hi, symmetric, scale_dtype)
    if symmetric:
        q = torch.clamp(torch.round(w / scale[group_of_k]), -8, 7) + 8
    else:
        q = torch.clamp(torch.round((w - offsets[group_of_k]) / scale[group_of_k]), 0, 15)
    return Int4Weight(pack_int4(q), scale.to(scale_dtype), exact_offsets(offsets, scale_dtype), group_size, K)


def group_grid(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, scale_dtype: torch.dtype):
    """The int4 grid of groups with minimum lo and maximum hi (fp32): (scale, offset), fp32 values the scale dtype
    holds exactly, q = (w - offset) / scale rounded and clamped to 0..15 (quantize_int4's rules; GPTQ uses them too).
    symmetric: scale = absmax / 7, offset = -8 scale; asymmetric: scale = (hi - lo) / 15, offset = lo."""
    if symmetric:
        scale = (torch.maximum(hi.abs(), lo.abs()) / 7).to(scale_dtype).to(torch.float32)
        # all zeros (or below the scale dtype's range): any scale represents the group; the smallest keeps q * s
        # and every kernel's intermediate on the group's own scale
        scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(scale_dtype).tiny))
        return scale, -8 * scale
    scale = ((hi - lo) / 15).to(scale_dtype).to(torch.float32)
    offsets = lo.to(scale_dtype).to(torch.float32)  # lo is a weight value: exact in the weight's dtype
    return torch.where(scale > 0, scale, _constant_group_scale(offsets, scale_dtype)), offsets


class MmaLayout(tuple):
    """(qweight, scales, offsets, zero_points) in the CUDA int4 kernel's layout (csrc/cuda/int4_mm_layout.h):
      qweight  int32 (ceil(K/16), ceil(N/16) * 32): 16 x 16 blocks, one word per lane of a warp, the nibbles in the
               order of that lane's mma.m16n8k16 B registers (repacked by turbokernels_C::int4_mm_mma_repack, from
               the same C++ function the kernel is written against)
      scales, offsets  (G, ceil(N/16) * 16), zero-padded columns, in one of the kernel's dequantization modes:
               both in the activations' dtype when both are exact there (one fp16/bf16 fma: q s + o);
               zero_points: the offsets are -z s for integer zero points z (GPTQ, AWQ) whose product is exact, the
               scales exact in the activations' dtype: `offsets` then holds -(M + z) in that dtype (M = 1024 for
               fp16, 128 for bf16: the kernel's magic number) and the kernel computes (q - z) exactly, then one
               rounding of (q - z) s;
               else float32 (fp32 fma, then one rounding)."""

    @property
    def qweight(self) -> torch.Tensor:
        return self[0]

    @property
    def scales(self) -> torch.Tensor:
        return self[1]

    @property
    def offsets(self) -> torch.Tensor:
        return self[2]

    @property
    def zero_points(self) -> bool:
        return self[3]


# the magic numbers of csrc/cuda/int4_mm.cuh's dequantization: one ulp of the 16-bit float is 1 there
_MMA_MAGIC = {torch.float16: 1024, torch.bfloat16: 128}


def _integer_zero_points(scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """z with offsets == -z * scales exactly (float64), z integral and M + z exact in `dtype`; else None."""
    s, o = scales.to(torch.float64), offsets.to(torch.float64)
    z = torch.where(s != 0, -o / s, torch.zeros_like(s)).round()
    limit = _MMA_MAGIC[dtype]  # M + z stays an integer the 16-bit float holds exactly (fp16: to 2048, bf16: to 256)
    if not torch.equal(-z * s, o) or bool((z.abs() > limit).any()):
        return None
    return z


def mma_layout(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
               in_features: int, dtype: torch.dtype) -> MmaLayout:
    """Int4Weight tensors (group_size: the effective one) -> MmaLayout for activations of `dtype`. Needs
    turbokernels._C (the repack is C++)."""
    from .. import _ext
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"mma_layout(dtype): the CUDA int4 kernel takes float16 or bfloat16 activations, got {dtype}")
    if group_size % 16 and group_size < in_features:
        raise ValueError(f"mma_layout(group_size): the CUDA int4 kernel needs a multiple of 16 or one group over K "
                         f"(per-channel), got {group_size} for in_features={in_features}")
    reason = _ext.missing_op_reason("int4_mm_mma_repack", qweight.device.type)
    if reason is not None:
        raise RuntimeError(f"mma_layout: {reason}")
    packed = torch.ops.turbokernels_C.int4_mm_mma_repack(qweight, in_features)
    N = qweight.shape[1]
    pad = lambda t: torch.nn.functional.pad(t, (0, (N + 15) // 16 * 16 - N)).contiguous()  # noqa: E731
    exact = lambda t: t.dtype == dtype or torch.equal(t.to(dtype).to(t.dtype), t)  # noqa: E731
    if exact(scales) and exact(offsets):
        return MmaLayout((packed, pad(scales.to(dtype)), pad(offsets.to(dtype)), False))
    z = _integer_zero_points(scales, offsets, dtype) if exact(scales) else None
    if z is not None:
        return MmaLayout((packed, pad(scales.to(dtype)), pad((-(_MMA_MAGIC[dtype] + z)).to(dtype)), True))
    return MmaLayout((packed, pad(scales.to(torch.float32)), pad(offsets.to(torch.float32)), False))
