"""Reference packers of published int4 formats, written from the formats' descriptions (not from the importers):
start from integer q, integer zeros and float scales, produce the tensors a checkpoint of that format holds, and
the float64 weight the format's own formula gives. Word arithmetic is done in numpy uint32, element by element
along the packed axis, so a bug shared with the importers (which use torch shifts on int32) is unlikely.

Conventions: q and zeros are unsigned 4-bit integers unless said; W is (N, K) = nn.Linear orientation.
"""
from __future__ import annotations

import numpy as np
import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble slot i of an AWQ word holds column AWQ_ORDER[i] of its 8


def _words_to_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(words.astype(np.uint32)).view(np.int32).copy())


def pack_dim0(values: np.ndarray) -> torch.Tensor:
    """(R, C) ints 0..15 -> int32 (ceil(R/8), C): word [r//8, c] holds values[r, c] at bits 4*(r%8)."""
    R, C = values.shape
    words = np.zeros(((R + 7) // 8, C), dtype=np.uint32)
    for r in range(R):
        words[r // 8] |= (values[r].astype(np.uint32) & 0xF) << np.uint32(4 * (r % 8))
    return _words_to_int32(words)


def pack_dim1(values: np.ndarray, order=None) -> torch.Tensor:
    """(R, C) ints 0..15 -> int32 (R, ceil(C/8)): column c goes to word c//8, slot c%8 (or, with order, to the slot
    i with order[i] == c%8)."""
    R, C = values.shape
    words = np.zeros((R, (C + 7) // 8), dtype=np.uint32)
    for c in range(C):
        slot = c % 8 if order is None else order.index(c % 8)
        words[:, c // 8] |= (values[:, c].astype(np.uint32) & 0xF) << np.uint32(4 * slot)
    return _words_to_int32(words)


def group_index(K: int, gs: int) -> np.ndarray:
    return np.arange(K) // gs


# ---- golden weights in float64 -----------------------------------------------------------------------------------
def golden_zero_point(q: np.ndarray, zeros: np.ndarray, scales: torch.Tensor, g_idx: np.ndarray) -> torch.Tensor:
    """W[n, k] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n], float64, (N, K). q (K, N), zeros (G, N)."""
    s = scales.to(torch.float64).numpy()
    w = (q.astype(np.float64) - zeros[g_idx].astype(np.float64)) * s[g_idx]
    return torch.from_numpy(np.ascontiguousarray(w.T))


# ---- GPTQ --------------------------------------------------------------------------------------------------------
def pack_gptq(q: np.ndarray, zeros: np.ndarray, scales: torch.Tensor, g_idx: np.ndarray, version: int = 1,
              pad_garbage: bool = False):
    """q (K, N) 0..15 in input-feature order; zeros (G, N) 0..15; g_idx (K,) the group of each input feature.
    Returns qweight, qzeros, scales, g_idx (int32) as GPTQ stores them: v2 packs the zero points as they are; v1
    subtracts 0x11111111 from each packed word, as GPTQModel's v2 -> v1 conversion does (a zero point of 0 borrows
    from the next nibble). pad_garbage: fill the nibbles past K (K % 8 != 0) with ones, which a reader must ignore."""
    K, N = q.shape
    assert zeros.min() >= 0 and zeros.max() <= 15
    qweight = pack_dim0(q)
    if pad_garbage and K % 8:
        last = qweight[-1].numpy().view(np.uint32)
        last |= np.uint32(((1 << 32) - 1) ^ ((1 << (4 * (K % 8))) - 1))
        qweight[-1] = torch.from_numpy(last.view(np.int32).copy())
    qzeros = pack_dim1(zeros)
    if version == 1:
        words = qzeros.numpy().view(np.uint32) - np.uint32(0x11111111)  # uint32 arithmetic: wraps mod 2^32
        qzeros = torch.from_numpy(words.view(np.int32).copy())
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=torch.from_numpy(g_idx.astype(np.int32)))


# ---- AWQ ---------------------------------------------------------------------------------------------------------
def pack_awq(q: np.ndarray, zeros: np.ndarray, scales: torch.Tensor):
    """q (K, N) 0..15, zeros (G, N) 0..15 -> AWQ GEMM qweight [K, N/8], qzeros [G, N/8], scales [G, N]."""
    return dict(qweight=pack_dim1(q, AWQ_ORDER), qzeros=pack_dim1(zeros, AWQ_ORDER), scales=scales)


# ---- compressed-tensors ------------------------------------------------------------------------------------------
def pack_compressed_tensors(q_signed: np.ndarray, scale: torch.Tensor, zero_point=None, g_idx=None,
                            pack_zero_point: bool = True):
    """q_signed (N, K) in [-8, 7]; scale (N, G); zero_point (N, G) signed in [-8, 7] or None (symmetric); g_idx (K,)
    or None. Returns the pack-quantized state: weight_packed [N, ceil(K/8)] holding q + 8 along K, weight_scale,
    weight_zero_point (packed along N as int32 [ceil(N/8), G] holding zp + 8, or int8 [N, G]), weight_g_idx,
    weight_shape."""
    N, K = q_signed.shape
    out = dict(weight_packed=pack_dim1(q_signed + 8), weight_scale=scale,
               weight_shape=torch.tensor([N, K], dtype=torch.int64))
    if zero_point is not None:
        out["weight_zero_point"] = (pack_dim0(zero_point + 8) if pack_zero_point
                                    else torch.from_numpy(zero_point.astype(np.int8)))
    if g_idx is not None:
        out["weight_g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
    return out


def golden_compressed_tensors(q_signed, scale: torch.Tensor, zero_point, g_idx) -> torch.Tensor:
    """W[n, k] = (q_signed[n, k] - zp[n, g_idx[k]]) * scale[n, g_idx[k]], float64 (N, K)."""
    zp = np.zeros(tuple(scale.shape), dtype=np.int64) if zero_point is None else zero_point
    s = scale.to(torch.float64).numpy()
    w = (q_signed.astype(np.float64) - zp[:, g_idx]) * s[:, g_idx]
    return torch.from_numpy(w)


# ---- GGUF --------------------------------------------------------------------------------------------------------
def pack_gguf(q: np.ndarray, d: np.ndarray, m=None) -> np.ndarray:
    """q (N, K) 0..15, d (N, K/32) float16, m (N, K/32) float16 for Q4_1 (None: Q4_0) -> the raw block bytes, uint8
    (N * K/32 * block_bytes,): per block d (little-endian fp16) [, m], then 16 bytes, byte j = q[j] | q[j+16] << 4."""
    N, K = q.shape
    out = bytearray()
    for n in range(N):
        for b in range(K // 32):
            blk = q[n, 32 * b:32 * b + 32].astype(np.uint8)
            out += np.asarray(d[n, b], dtype="<f2").tobytes()
            if m is not None:
                out += np.asarray(m[n, b], dtype="<f2").tobytes()
            out += bytes(int(blk[j]) | (int(blk[j + 16]) << 4) for j in range(16))
    return np.frombuffer(bytes(out), dtype=np.uint8)


def pack_gguf_q4_k(q: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K, written from llama.cpp's block_q4_K and get_scale_min_k4: q (N, K) 0..15; d, dmin (N, K/256) float16;
    sc, mn (N, K/32) 0..63, the 6-bit scale and min of each 32-element sub-block. Per super-block: d, dmin
    (little-endian fp16), 12 bytes of scales (j < 4: byte j = sc_j | (sc_{j+4} >> 4) << 6, byte j + 4 = mn_j |
    (mn_{j+4} >> 4) << 6, byte j + 8 = (sc_{j+4} & 15) | (mn_{j+4} & 15) << 4), 128 bytes: byte 32 c + l holds
    element l of sub-block 2c in its low nibble and of sub-block 2c + 1 in its high nibble."""
    N, K = q.shape
    out = bytearray()
    for n in range(N):
        for b in range(K // 256):
            s8, m8 = [int(v) for v in sc[n, 8 * b:8 * b + 8]], [int(v) for v in mn[n, 8 * b:8 * b + 8]]
            assert 0 <= min(s8 + m8) and max(s8 + m8) <= 63
            out += np.asarray(d[n, b], dtype="<f2").tobytes() + np.asarray(dmin[n, b], dtype="<f2").tobytes()
            scales = [0] * 12
            for j in range(4):
                scales[j] = s8[j] | ((s8[j + 4] >> 4) << 6)
                scales[j + 4] = m8[j] | ((m8[j + 4] >> 4) << 6)
                scales[j + 8] = (s8[j + 4] & 15) | ((m8[j + 4] & 15) << 4)
            out += bytes(scales)
            blk = q[n, 256 * b:256 * b + 256].astype(np.uint8)
            for c in range(4):
                out += bytes(int(blk[64 * c + l]) | (int(blk[64 * c + 32 + l]) << 4) for l in range(32))
    return np.frombuffer(bytes(out), dtype=np.uint8)


def golden_gguf_q4_k(q: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray) -> torch.Tensor:
    """Q4_K: w = d * sc * q - dmin * mn per 32-element sub-block; float64 (N, K)."""
    scale = np.repeat(d.astype(np.float64), 8, axis=1) * sc
    off = np.repeat(dmin.astype(np.float64), 8, axis=1) * mn
    return torch.from_numpy(np.repeat(scale, 32, axis=1) * q - np.repeat(off, 32, axis=1))


def golden_gguf(q: np.ndarray, d: np.ndarray, m=None) -> torch.Tensor:
    """Q4_0: w = d * (q - 8); Q4_1: w = d * q + m; float64 (N, K)."""
    dd = np.repeat(d.astype(np.float64), 32, axis=1)
    if m is None:
        return torch.from_numpy(dd * (q.astype(np.float64) - 8))
    return torch.from_numpy(dd * q + np.repeat(m.astype(np.float64), 32, axis=1))
