"""Importers of published int4 weight formats into Int4Weight (see int4.py for the target layout).

Every importer follows its format's own public rules and converts them to one representation,
W[n, k] = q[k, n] * scales[g, n] + offsets[g, n], exactly: an integer zero point z becomes the float offset -z*s,
which is exact in fp32 for fp16/bf16 scales (z has at most 5 significant bits), and is stored in the scales' dtype
when that is exact too (exact_offsets). With fp32 scales the product -z*s is rounded once, so W can differ from
(q - z)*s by 1 ulp.

  GPTQ               qweight int32 [ceil(K/8), N] (our layout already), qzeros int32 [G, ceil(N/8)] packed along N
                     (n%8 at bits 4*(n%8)), as z in v2 ("gptq_v2"); v1 (checkpoint_format "gptq") stores the
                     v2 word minus 0x11111111 (GPTQModel's packer subtracts it from the whole word, so a zero point
                     of 0 borrows from the next nibble) and is read as word + 0x11111111 (mod 2^32) -- the same as
                     adding 1 per nibble whenever no stored nibble is 15, and exact in the borrow case; scales
                     [G, N]; g_idx int [K] (group of each input row; act-order when not arange(K)//gs).
                     W = (q - z) * s.
  AWQ (GEMM)         qweight int32 [K, ceil(N/8)] packed along N; nibble slot i of a word holds column
                     [0, 2, 4, 6, 1, 3, 5, 7][i] of its 8 columns; qzeros [G, ceil(N/8)] packed the same way, no
                     off-by-one; scales [G, N]. W = (q - z) * s.
  compressed-tensors pack_quantized, 4 bits: weight_packed int32 [N, ceil(K/8)] (k%8 at bits 4*(k%8)) holding
                     q_signed + 8; weight_scale [N, G] (channel: [N, 1]; tensor: one value); weight_zero_point
                     signed, either unpacked [N, G] or packed like the weight but along N: int32 [ceil(N/8), G]
                     holding zp + 8 (what compressed-tensors writes for asymmetric group/channel schemes);
                     weight_g_idx [K] (group act-order; a g_idx of all -1 is compressed-tensors' "not set" and
                     means column order); weight_shape (N, K). W = (q_signed - zp) * scale.
  GGUF Q4_0 / Q4_1   blocks of 32 along K (ne0), rows of K/32 blocks, little-endian: Q4_0 = fp16 d + 16 bytes,
                     w = d * (q - 8); Q4_1 = fp16 d + fp16 m + 16 bytes, w = d * q + m; byte j of qs holds element
                     j in its low nibble and element j + 16 in its high nibble.
  GGUF Q4_K          super-blocks of 256 along K, 144 bytes: fp16 d, fp16 dmin, 12 bytes holding eight 6-bit
                     scales sc and mins m (llama.cpp's get_scale_min_k4 packing), 128 bytes of nibbles; sub-block
                     s = 2j + h (32 elements) is nibble h (0 low, 1 high) of bytes 32j..32j+31. w = (d sc) q - dmin m:
                     group size 32 with scale d sc and offset -dmin m, both exact in fp32 (11-bit fp16 significands
                     times 6-bit integers), so q * scale + offset rounds once, as gguf's own d*q - dm does.

Group size when the format does not record it (AWQ, GPTQ without g_idx, compressed-tensors without g_idx), from
K and the G rows of scales: G == 1 means per-channel; else the group size gs must satisfy ceil(K / gs) == G, and
among those values the (at most one) power of two is taken, else K / G when it divides, else it is ambiguous and
an error asks for group_size. A given g_idx decides it instead (its largest group), a given group_size always.

Importers do not copy what they can share: a GPTQ qweight without act-order is used as is (a view of the input).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .int4 import FLOAT_DTYPES, Int4Weight, check_group_size, effective_group_size, exact_offsets, num_groups, \
    pack_int4, unpack_int4

INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

# AWQ GEMM: nibble slot i of a word holds column AWQ_ORDER[i] of its group of 8 columns ...
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# ... so column m is found in slot AWQ_SLOT_OF_COLUMN[m] (the "reverse order" of AWQ's unpackers).
AWQ_SLOT_OF_COLUMN = tuple(AWQ_ORDER.index(m) for m in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)

GGUF_BLOCK = 32  # the group size every GGUF type imported here becomes (Q4_K's sub-blocks are 32 too)
# name -> (ggml type id, bytes per block, elements per block)
GGUF_TYPES = {"Q4_0": (2, 18, 32), "Q4_1": (3, 20, 32), "Q4_K": (12, 144, 256)}


# ---- argument checks ---------------------------------------------------------------------------------------------
def _tensor(fmt: str, name: str, t, dtypes, what: str, dim: Optional[int] = 2) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fmt}({name}): expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{fmt}({name}): dtype must be {what}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{fmt}({name}): expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    return t


def _same_device(fmt: str, ref: torch.Tensor, ref_name: str, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{fmt}({name}): {name} is on {t.device} but {ref_name} is on {ref.device}")


def _positive_int(fmt: str, name: str, v) -> int:
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
        v = int(v.item())
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{fmt}({name}): expected a positive int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{fmt}({name}): expected a positive int, got {v}")
    return int(v)


def _shape2(fmt: str, name: str, shape) -> tuple[int, int]:
    """(N, K) from a tuple/list/torch.Size/tensor of two positive ints."""
    if isinstance(shape, torch.Tensor):
        if shape.is_floating_point() or shape.numel() != 2:
            raise ValueError(f"{fmt}({name}): expected 2 integers (out_features, in_features), got a "
                             f"{shape.dtype} tensor of shape {tuple(shape.shape)}")
        shape = shape.reshape(-1).tolist()
    elif isinstance(shape, np.ndarray):
        shape = shape.reshape(-1).tolist()
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"{fmt}({name}): expected 2 integers (out_features, in_features), got {shape!r}")
    return _positive_int(fmt, name, shape[0]), _positive_int(fmt, name, shape[1])


def _check_g_idx(fmt: str, name: str, g_idx, K: int, G: int, ref: torch.Tensor) -> torch.Tensor:
    g_idx = _tensor(fmt, name, g_idx, INT_DTYPES, "an integer type (int32 in checkpoints)", dim=1)
    if g_idx.numel() != K:
        raise ValueError(f"{fmt}({name}): expected one group index per input feature, {K}, got {g_idx.numel()}")
    _same_device(fmt, ref, "the weight", **{name: g_idx})
    g_idx = g_idx.to(torch.int64)
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= G:
        raise ValueError(f"{fmt}({name}): group indices must lie in [0, {G}) for {G} groups of scales, got values "
                         f"in [{lo}, {hi}]")
    return g_idx


# ---- group size and act-order ------------------------------------------------------------------------------------
def _resolve_group_size(fmt: str, K: int, G: int, group_size, g_idx: Optional[torch.Tensor], groups_of: str):
    """The group_size to store (-1 for per-channel) for K input features and G groups (see the module docstring)."""
    if group_size is not None:
        check_group_size(group_size, f"{fmt}(group_size)")
        if num_groups(group_size, K) != G:
            raise ValueError(f"{fmt}(group_size): group_size={group_size} with in_features={K} means "
                             f"{num_groups(group_size, K)} groups, but {groups_of} has {G}")
        return group_size
    if g_idx is not None:
        gs = int(torch.bincount(g_idx, minlength=G).max())
        if num_groups(gs, K) != G:
            raise ValueError(f"{fmt}(g_idx): its largest group has {gs} input features, which makes "
                             f"ceil({K}/{gs})={num_groups(gs, K)} groups, but {groups_of} has {G}")
        return -1 if G == 1 else gs
    if G == 1:
        return -1
    lo = -(-K // G)                    # ceil(K / G): the smallest gs with ceil(K / gs) <= G
    hi = -(-K // (G - 1)) - 1          # the largest gs with ceil(K / gs) >= G
    if lo > hi:
        raise ValueError(f"{fmt}: {groups_of} has {G} groups, which no group size gives for in_features={K}")
    pow2 = [1 << e for e in range(lo.bit_length() - 1, hi.bit_length() + 1) if lo <= (1 << e) <= hi]
    if len(pow2) == 1:
        return pow2[0]
    if K % G == 0:
        return K // G
    raise ValueError(f"{fmt}: cannot tell the group size from in_features={K} and {G} groups ({groups_of}): any "
                     f"of {lo}..{hi} fits; pass group_size (or the format's g_idx)")


def _act_order(fmt: str, name: str, g_idx: torch.Tensor, gs: int, K: int) -> Optional[torch.Tensor]:
    """None when g_idx is the plain arange(K) // gs; else perm, the stable sort of the rows by group, after which
    the groups must be contiguous runs of gs rows (the last may be shorter)."""
    expected = torch.arange(K, device=g_idx.device) // gs
    if torch.equal(g_idx, expected):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], expected):
        counts = torch.bincount(g_idx).tolist()
        shown = counts if len(counts) <= 16 else counts[:16] + ["..."]
        raise ValueError(f"{fmt}({name}): groups must have {gs} input features each (the last may have fewer) to be "
                         f"stored contiguously, got group sizes {shown}")
    return perm


# ---- nibble packing ----------------------------------------------------------------------------------------------
def _unpack_along_cols(packed: torch.Tensor, n: int, slot_of_column=None) -> torch.Tensor:
    """int32 (R, ceil(n/8)) with 8 nibbles per word along dim 1 -> uint8 (R, n). Column 8c+m sits in nibble slot
    slot_of_column[m] of word c (slot m when None)."""
    C = packed.shape[1]
    q = unpack_int4(packed.t(), C * 8).t()  # column 8c+i: slot i of word c
    if slot_of_column is not None:
        base = torch.arange(C, device=packed.device).repeat_interleave(8) * 8
        q = q[:, base + torch.tensor(slot_of_column, device=packed.device).repeat(C)]
    return q[:, :n]


def _zero_tail(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """Clear the nibbles of rows past K (the layout keeps them zero); shares qweight when there are none."""
    r = K % 8
    if r == 0:
        return qweight
    out = qweight.clone()
    out[-1] &= (1 << (4 * r)) - 1
    return out


def _offsets(zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """-z * s (exact in fp32 for fp16/bf16 scales), in the scales' dtype when exact; + 0.0 turns -0.0 into 0.0."""
    off = -(zeros.to(torch.float32) * scales.to(torch.float32)) + 0.0
    return exact_offsets(off, scales.dtype)


def _build(qweight, scales, offsets, group_size, K, perm) -> Int4Weight:
    """Int4Weight from a qweight in input-feature order, its rows sorted by perm first when there is one."""
    if perm is not None:
        qweight = pack_int4(unpack_int4(qweight, K).index_select(0, perm))
    return Int4Weight(qweight, scales, offsets, group_size, K, perm)


# ---- GPTQ --------------------------------------------------------------------------------------------------------
def from_gptq(qweight, qzeros, scales, g_idx=None, *, in_features=None, group_size=None,
              version: int = 1) -> Int4Weight:
    """Import a GPTQ (AutoGPTQ / GPTQModel / optimum) linear layer: W = (q - z) * s.

    qweight int32 [ceil(K/8), N]; qzeros int32 [G, ceil(N/8)]; scales [G, N] (fp16 normally); g_idx int [K] or None.
    in_features: K when it is not qweight.shape[0] * 8. group_size: when given, must match G = ceil(K / gs); else
    taken from g_idx, else inferred from K and G. version: 1 ("gptq": each qzeros word is the v2 word minus
    0x11111111) or 2 ("gptq_v2": the zero points as they are).
    With an act-order g_idx the rows are sorted by group and `perm` records the order.
    """
    fmt = "from_gptq"
    qweight = _tensor(fmt, "qweight", qweight, (torch.int32,), "int32 (8 nibbles per word)")
    qzeros = _tensor(fmt, "qzeros", qzeros, (torch.int32,), "int32 (8 nibbles per word)")
    scales = _tensor(fmt, "scales", scales, FLOAT_DTYPES, "float16, bfloat16 or float32")
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError(f"{fmt}(version): expected 1 (checkpoint_format 'gptq', words stored minus 0x11111111) "
                         f"or 2 ('gptq_v2'), got {version!r}")
    _same_device(fmt, qweight, "qweight", qzeros=qzeros, scales=scales)
    K8, N = qweight.shape
    if in_features is None:
        K = K8 * 8
    else:
        K = _positive_int(fmt, "in_features", in_features)
        if (K + 7) // 8 != K8:
            raise ValueError(f"{fmt}(qweight): has {K8} rows of 8 input features, but in_features={K} needs "
                             f"ceil({K}/8)={(K + 7) // 8}")
    if K8 == 0 or N == 0:
        raise ValueError(f"{fmt}(qweight): must not be empty, got shape {tuple(qweight.shape)}")
    G = scales.shape[0]
    if scales.shape[1] != N or G == 0:
        raise ValueError(f"{fmt}(scales): expected shape [G, N] with N = qweight.shape[1] = {N}, got "
                         f"{tuple(scales.shape)}")
    if tuple(qzeros.shape) != (G, (N + 7) // 8):
        raise ValueError(f"{fmt}(qzeros): expected shape [G, ceil(N/8)] = [{G}, {(N + 7) // 8}] (G from scales, "
                         f"N from qweight), got {tuple(qzeros.shape)}")
    if g_idx is not None:
        g_idx = _check_g_idx(fmt, "g_idx", g_idx, K, G, qweight)
    group_size = _resolve_group_size(fmt, K, G, group_size, g_idx, "scales")
    perm = None if g_idx is None else _act_order(fmt, "g_idx", g_idx, effective_group_size(group_size, K), K)

    if version == 1:  # undo the word-level subtraction, mod 2^32 (in int64: int32 addition would overflow)
        words = (qzeros.to(torch.int64) + 0x11111111) & 0xFFFFFFFF
        qzeros = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    zeros = _unpack_along_cols(qzeros, N)
    return _build(_zero_tail(qweight, K), scales, _offsets(zeros, scales), group_size, K, perm)


# ---- AWQ ---------------------------------------------------------------------------------------------------------
def from_awq(qweight, qzeros, scales, *, group_size=None) -> Int4Weight:
    """Import an AWQ GEMM-version linear layer (AutoAWQ / llm-awq "gemm" checkpoints): W = (q - z) * s.

    qweight int32 [K, ceil(N/8)] packed along N in AWQ's interleaved nibble order; qzeros int32 [G, ceil(N/8)] packed
    the same way; scales [G, N]. group_size: when given, must match G = ceil(K / gs); else inferred from K and G.
    """
    fmt = "from_awq"
    qweight = _tensor(fmt, "qweight", qweight, (torch.int32,), "int32 (8 nibbles per word)")
    qzeros = _tensor(fmt, "qzeros", qzeros, (torch.int32,), "int32 (8 nibbles per word)")
    scales = _tensor(fmt, "scales", scales, FLOAT_DTYPES, "float16, bfloat16 or float32")
    _same_device(fmt, qweight, "qweight", qzeros=qzeros, scales=scales)
    G, N = scales.shape
    if G == 0 or N == 0:
        raise ValueError(f"{fmt}(scales): must not be empty, got shape {tuple(scales.shape)}")
    K, C = qweight.shape
    if K == 0 or C != (N + 7) // 8:
        raise ValueError(f"{fmt}(qweight): expected shape [K, ceil(N/8)] with N = scales.shape[1] = {N}, i.e. "
                         f"[K, {(N + 7) // 8}], got {tuple(qweight.shape)}")
    if tuple(qzeros.shape) != (G, C):
        raise ValueError(f"{fmt}(qzeros): expected shape [G, ceil(N/8)] = [{G}, {C}] (G from scales), got "
                         f"{tuple(qzeros.shape)}")
    group_size = _resolve_group_size(fmt, K, G, group_size, None, "scales")
    q = _unpack_along_cols(qweight, N, AWQ_SLOT_OF_COLUMN)  # (K, N)
    zeros = _unpack_along_cols(qzeros, N, AWQ_SLOT_OF_COLUMN)
    return Int4Weight(pack_int4(q), scales, _offsets(zeros, scales), group_size, K)


# ---- compressed-tensors ------------------------------------------------------------------------------------------
def from_compressed_tensors(weight_packed, weight_scale, weight_zero_point=None, weight_g_idx=None,
                            weight_shape=None) -> Int4Weight:
    """Import a compressed-tensors "pack-quantized" 4-bit linear layer: W = (q_signed - zp) * scale.

    weight_packed int32 [N, ceil(K/8)]; weight_scale [N, G] (group), [N, 1] (channel) or one value (tensor);
    weight_zero_point None (symmetric), signed ints [N, G], or packed int32 [ceil(N/8), G]; weight_g_idx int [K] or
    None; weight_shape (N, K), needed when K is not weight_packed.shape[1] * 8.
    """
    fmt = "from_compressed_tensors"
    packed = _tensor(fmt, "weight_packed", weight_packed, (torch.int32,),
                     "int32 (8 nibbles per word; the 4-bit pack-quantized format)")
    scale = _tensor(fmt, "weight_scale", weight_scale, FLOAT_DTYPES, "float16, bfloat16 or float32", dim=None)
    _same_device(fmt, packed, "weight_packed", weight_scale=scale)
    N, K8 = packed.shape
    if N == 0 or K8 == 0:
        raise ValueError(f"{fmt}(weight_packed): must not be empty, got shape {tuple(packed.shape)}")
    if weight_shape is None:
        K = K8 * 8
    else:
        Ns, K = _shape2(fmt, "weight_shape", weight_shape)
        if Ns != N or (K + 7) // 8 != K8:
            raise ValueError(f"{fmt}(weight_shape): {(Ns, K)} does not match weight_packed of shape "
                             f"{tuple(packed.shape)}, which holds [N, ceil(K/8)]")

    if scale.dim() == 2 and scale.shape[0] == N:
        G = scale.shape[1]
        scales = scale.t()
    elif scale.numel() == 1:  # tensor strategy: one scale, as a per-channel one
        G = 1
        scales = scale.reshape(1, 1).expand(1, N)
    else:
        raise ValueError(f"{fmt}(weight_scale): expected shape [N, G] with N = {N} (or one value for a per-tensor "
                         f"scale), got {tuple(scale.shape)}")
    if G == 0:
        raise ValueError(f"{fmt}(weight_scale): must not be empty, got shape {tuple(scale.shape)}")

    zeros = _ct_zeros(fmt, weight_zero_point, N, G, packed)  # (G, N) int32, zp + 8 in 0..15
    g_idx = None
    if weight_g_idx is not None:
        if isinstance(weight_g_idx, torch.Tensor) and weight_g_idx.numel() > 0 and \
                not weight_g_idx.is_floating_point() and bool((weight_g_idx == -1).all()):
            g_idx = None  # compressed-tensors' initial value: act-order never ran, column order
        else:
            g_idx = _check_g_idx(fmt, "weight_g_idx", weight_g_idx, K, G, packed)
    group_size = _resolve_group_size(fmt, K, G, None, g_idx, "weight_scale")
    perm = None if g_idx is None else _act_order(fmt, "weight_g_idx", g_idx, effective_group_size(group_size, K), K)
    # weight_packed.T is [ceil(K/8), N] with u[n, k] at bits 4*(k%8) of word [k//8, n]: our layout, with q = u and
    # the +8 folded into the zero: (u - 8 - zp) * s = (u - (zp + 8)) * s.
    qweight = _zero_tail(packed.t().contiguous(), K)
    return _build(qweight, scales, _offsets(zeros, scales), group_size, K, perm)


def _ct_zeros(fmt: str, zp, N: int, G: int, ref: torch.Tensor) -> torch.Tensor:
    """compressed-tensors zero points -> (G, N) int32 zp + 8 (the unsigned zero, 0..15)."""
    if zp is None:
        return torch.full((G, N), 8, dtype=torch.int32, device=ref.device)
    zp = _tensor(fmt, "weight_zero_point", zp, INT_DTYPES, "an integer type (int8 unpacked or int32 packed)",
                 dim=None)
    _same_device(fmt, ref, "weight_packed", weight_zero_point=zp)
    packed_shape, unpacked_shape = ((N + 7) // 8, G), (N, G)
    shape = tuple(zp.shape)
    if zp.numel() == 1 and G == 1 and shape != packed_shape:
        zp, shape = zp.reshape(1, 1).expand(N, 1), unpacked_shape  # per-tensor zero point
    # N == 1 makes both shapes (1, G): int32 is what the packer writes, int8 what the quantizer keeps.
    is_packed = shape == packed_shape and (shape != unpacked_shape or zp.dtype == torch.int32)
    if is_packed:
        if zp.dtype != torch.int32:
            raise TypeError(f"{fmt}(weight_zero_point): packed zero points [ceil(N/8), G] must be int32, got "
                            f"{zp.dtype}")
        return _unpack_along_cols(zp.t(), N)  # word [n//8, g] holds zp[n, g] + 8 at bits 4*(n%8)
    if shape != unpacked_shape:
        raise ValueError(f"{fmt}(weight_zero_point): expected shape [N, G] = {list(unpacked_shape)} (unpacked) or "
                         f"[ceil(N/8), G] = {list(packed_shape)} (packed int32), got {list(shape)}")
    zp = zp.to(torch.int32)
    lo, hi = int(zp.min()), int(zp.max())
    if lo < -8 or hi > 7:
        raise ValueError(f"{fmt}(weight_zero_point): 4-bit zero points are signed, in [-8, 7]; got values in "
                         f"[{lo}, {hi}]")
    return (zp + 8).t()


# ---- GGUF --------------------------------------------------------------------------------------------------------
def _gguf_type_name(ggml_type) -> str:
    if isinstance(ggml_type, str):
        name = ggml_type.strip().upper()
        name = name[len("GGML_TYPE_"):] if name.startswith("GGML_TYPE_") else name
        if name not in GGUF_TYPES:
            raise ValueError(f"from_gguf(ggml_type): unsupported type {ggml_type!r}; supported: "
                             f"{', '.join(GGUF_TYPES)}")
        return name
    if isinstance(ggml_type, bool) or not isinstance(ggml_type, (int, np.integer)):
        raise TypeError(f"from_gguf(ggml_type): expected a name ('Q4_0', 'Q4_1', 'Q4_K') or a GGMLQuantizationType, "
                        f"got {type(ggml_type).__name__}")
    for name, (type_id, _, _) in GGUF_TYPES.items():
        if int(ggml_type) == type_id:
            return name
    shown = getattr(ggml_type, "name", int(ggml_type))
    raise ValueError(f"from_gguf(ggml_type): unsupported type {shown}; supported: "
                     + ", ".join(f"{n} ({i})" for n, (i, _, _) in GGUF_TYPES.items()))


def _bytes_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"from_gguf(data): expected the raw block bytes as uint8, got {data.dtype}")
        return data.reshape(-1)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"from_gguf(data): expected the raw block bytes as uint8, got {data.dtype}")
        return torch.from_numpy(np.array(data, copy=True).reshape(-1))  # a copy: GGUFReader's are read-only memmaps
    if isinstance(data, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    raise TypeError(f"from_gguf(data): expected a uint8 torch.Tensor, numpy array or bytes, got {type(data).__name__}")


def from_gguf(data, ggml_type, shape) -> Int4Weight:
    """Import a GGUF Q4_0 / Q4_1 / Q4_K tensor losslessly, as group size 32. data: its raw block bytes (uint8
    tensor, numpy array or bytes, any shape); ggml_type: "Q4_0"/"Q4_1"/"Q4_K" or gguf.GGMLQuantizationType; shape:
    (N, K) = (out_features, in_features), nn.Linear orientation -- GGUF lists dims fastest first (ne0 = K), so it
    is GGUFReader's tensor.shape reversed."""
    fmt = "from_gguf"
    name = _gguf_type_name(ggml_type)
    N, K = _shape2(fmt, "shape", shape)
    _, block_bytes, block_elems = GGUF_TYPES[name]
    if K % block_elems:
        raise ValueError(f"{fmt}(shape): in_features K={K} must be a multiple of {name}'s {block_elems}-element "
                         f"block")
    data = _bytes_tensor(data)
    B = K // block_elems
    expected = N * B * block_bytes
    if data.numel() != expected:
        raise ValueError(f"{fmt}(data): {name} with shape (N, K) = ({N}, {K}) takes {N} x {B} blocks of "
                         f"{block_bytes} bytes = {expected} bytes, got {data.numel()}")
    blocks = data.view(N, B, block_bytes)
    if name == "Q4_K":
        return _from_gguf_q4_k(blocks, N, K)
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(N, B)  # little-endian fp16
    qs = blocks[..., block_bytes - 16:]                                  # (N, B, 16)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(N, K)             # byte j: element j low, j + 16 high
    qweight = pack_int4(q.t())
    scales = d.t().contiguous()                                           # (G = B, N)
    if name == "Q4_0":
        offsets = exact_offsets(-8 * scales.to(torch.float32), torch.float16)
    else:
        offsets = blocks[..., 2:4].contiguous().view(torch.float16).reshape(N, B).t().contiguous()  # m
    return Int4Weight(qweight, scales, offsets, GGUF_BLOCK, K)


def _from_gguf_q4_k(blocks: torch.Tensor, N: int, K: int) -> Int4Weight:
    """blocks: uint8 (N, K/256, 144) -> Int4Weight with group size 32 (8 groups per super-block)."""
    B = blocks.shape[1]
    d = blocks[..., 0:2].contiguous().view(torch.float16).to(torch.float32)     # (N, B, 1)
    dmin = blocks[..., 2:4].contiguous().view(torch.float16).to(torch.float32)
    packed = blocks[..., 4:16].reshape(N, B, 3, 4)
    lo, hi, top = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    # sub-blocks 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7: a nibble of bytes 8-11 below the
    # top 2 bits of bytes 0-3 (scales) / 4-7 (mins)
    sc = torch.cat([lo & 0x3F, (top & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)     # (N, B, 8)
    mn = torch.cat([hi & 0x3F, (top >> 4) | ((hi >> 2) & 0x30)], dim=-1)
    qs = blocks[..., 16:].reshape(N, B, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(N, K)  # sub-block 2j + h: nibble h of bytes 32j..32j+31
    scales = (d * sc.to(torch.float32)).reshape(N, B * 8).t().contiguous()      # exact: 11 x 6 significant bits
    offsets = (-(dmin * mn.to(torch.float32)) + 0.0).reshape(N, B * 8).t().contiguous()  # + 0.0: no -0.0
    return Int4Weight(pack_int4(q.t()), scales, offsets, GGUF_BLOCK, K)
