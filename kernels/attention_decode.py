"""KV-cache decode attention in Triton (flash-decoding): out (B, T, Hq, D) from q (B, T, Hq, D) and a KV cache.

The convention (python/turbokernels/reference/decode_attention.py is the spec): the T new tokens are already in
the cache, new token t of sequence b sits at qpos = cache_seqlens[b] - T + t and attends keys j < cache_seqlens[b]
with j <= qpos when CAUSAL, j >= qpos - window_left when WINDOW, j <= qpos + window_right when WINDOW_RIGHT (not
causal), j >= cache_leftpad[b] when LEFTPAD (slots before are never loaded); sequence b reads cache row
cache_batch_idx[b] when BATCH_IDX (contiguous caches). RETURN_LSE also writes lse (B, Hq, T) fp32, the natural log
of each row's softmax denominator (-inf for a row without keys), from the online softmax's m and l.

Decode reads the whole cache once and does little arithmetic per byte, so the run time is the time to stream K and
V. Two kernels:
  1. decode_attention_split_kernel, grid (B * Hkv * row blocks, SPLIT_KV): one program takes ALL the query rows
     that read one kv head -- the (group * T) rows of the GQA group, group = Hq / Hkv -- so each K/V tile crosses
     HBM once per kv head, not once per query head; and one of SPLIT_KV chunks of the KV length, so that long
     caches with few (batch, kv head) pairs still occupy every SM. Online softmax in base 2 with the scale folded
     into one multiply. With SPLIT_KV == 1 it writes the final output (and lse = ln 2 * (m + log2 l)); else a
     partial (row max m, row sum l, unnormalized output acc) per split, in fp32.
  2. decode_attention_combine_kernel, grid (B * T * Hq,): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s
     (and lse = ln 2 * (M + log2 sum_s 2^(m_s - M) l_s)).
The grid is sized from the cache capacity (max_seqlen, or pages per sequence * page_size), never from the values
of cache_seqlens or cache_leftpad (no host sync, CUDA-graph and torch.compile safe); a program whose chunk starts at
or past its sequence's length, or ends at or before its leftpad, exits at once (split 0 always runs), and the
combine kernel reads only the splits that ran.
Read top to bottom: configs, kernels, launcher.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._launch import Autotuner, capability, int32_tile_offsets, nearest_arch, sm_count, upcast_dots


# ---------------------------------------------------------------------------------------------------------------
# Configs, per GPU architecture (compute capability major*10+minor; the nearest lower key applies).
# BLOCK_N keys per tile (the K/V tile is BLOCK_N x head_dim, loaded along the contiguous head dim: 16-byte vector
# loads, a warp covers whole rows). The query tile's height BLOCK_M is not a config: the launcher sizes it from
# group * new_tokens (16 rows, tl.dot's minimum, up to MAX_BLOCK_M). Every config is compiled by the codegen test in
# tests/test_decode_attention.py (triton 3.8 and 3.6) for d=64/128 (fp16 contiguous, bf16 paged) and d=256 (fp16),
# BLOCK_M 16 and the largest allowed: zero spills, shared memory within the part's limit, tensor cores (mma.sync;
# wgmma for 64-row tiles on sm_90), 16-byte cp.async loads of the K/V tiles; and with FlashAttention's options
# (non-causal with a two-sided window, leftpad, batch index, lse) at d=128 and the largest BLOCK_M (triton 3.8 only
# so far: recheck with 3.6 on the GPU image).
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    BLOCK_N: int
    num_warps: int
    num_stages: int


# Chosen from a sweep (BLOCK_N 32/64/128 x 4/8 warps x 2-4 stages) compiled with triton 3.6 (the GPU image's
# version) and 3.8: these are the ones with zero spills in every case of the codegen test under both. ptxas spills a
# few bytes in several neighbours (e.g. 64x4 warps x 2 stages on sm_80 with 32 rows at d=128; 128 keys x 4 warps
# at d=128 under 3.6), so change a config only with both compilers' codegen tests run.
CONFIGS = {
    # Hopper (H100/H200): deeper pipelines keep more K/V bytes in flight per SM.
    90: [Config(64, 4, 3), Config(64, 8, 2), Config(32, 4, 4)],
    # Ampere (A100) and later consumer parts (sm_86/89: within their ~100 KB of shared memory up to d=256).
    80: [Config(64, 8, 2), Config(32, 4, 3)],
}
# Query rows per program at most (by padded head dim): more rows (large GQA groups x new tokens) take more
# programs. 64 rows with d=128 spill on sm_80 (q, acc and the scores tile do not fit 255 registers with 4 warps).
MAX_BLOCK_M = {64: 64, 128: 32, 256: 16}
MAX_SPLITS = 128          # splits of the KV length
WAVES = 2                 # target programs = WAVES * SM count


def configs_for(cap: int) -> list[Config]:
    return CONFIGS[nearest_arch(CONFIGS, cap)]


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def decode_attention_split_kernel(
    q_ptr,            # (B, T, Hq, D) any strides
    k_ptr, v_ptr,     # (B, S, Hkv, D) caches, or (num_pages, page_size, Hkv, D) when PAGED; the same strides, unit in d
    seqlens_ptr,      # (B,) int32 valid length of each cache
    block_table_ptr,  # (B, max_pages) int32 when PAGED (else unused)
    batch_idx_ptr,    # (B,) int32 cache row of each sequence when BATCH_IDX (else unused)
    leftpad_ptr,      # (B,) int32 first valid slot of each sequence when LEFTPAD (else unused)
    alibi_ptr,        # (B, Hq) fp32 slopes, batch stride may be 0 (unused unless HAS_ALIBI)
    out_ptr,          # SPLIT: (SPLIT_KV, B, T, Hq, D) fp32 unnormalized partials; else (B, T, Hq, D) in q's dtype
    m_ptr, l_ptr,     # SPLIT: (SPLIT_KV, B, T, Hq) fp32 row max (base 2) and row sum of 2^(s - m); else unused
    lse_ptr,          # (B, Hq, T) fp32 when RETURN_LSE and not SPLIT (else unused), unit stride in t
    T, Hq, Hkv, D,    # new tokens, query heads, kv heads, head dim
    capacity,         # keys a sequence can hold (max_seqlen, or max_pages * page_size); lengths are clamped to it
    page_size,
    kv_per_split,     # keys per split (a multiple of BLOCK_N)
    qk_scale,         # softmax_scale * log2(e) (without softcap), or softmax_scale (with softcap)
    softcap,          # > 0 when SOFTCAP
    window_left,      # >= 0 when WINDOW
    window_right,     # >= 0 when WINDOW_RIGHT
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh,   # K and V: batch (or page), position in the sequence (or page), kv head
    stride_btb,                        # block table row stride
    stride_ab, stride_ah,              # alibi strides (batch stride 0 for per-head slopes)
    stride_os, stride_ob, stride_ot, stride_oh,   # out strides: split (partials only), batch, token, head; d unit
    stride_ms, stride_mb, stride_mt,              # m/l strides: split, batch, token; head unit
    stride_lb, stride_lh,                         # lse strides: batch, head; token unit
    BLOCK_M: tl.constexpr,    # query rows per program (>= 16 for tl.dot): rows r = g * T + t of the GQA group
    BLOCK_N: tl.constexpr,    # keys per tile
    BLOCK_D: tl.constexpr,    # head dim padded to a power of two
    EVEN_D: tl.constexpr,     # BLOCK_D == D: no head-dim mask
    PAGED: tl.constexpr,
    PAGE_PER_TILE: tl.constexpr,  # PAGED and BLOCK_N divides page_size: one block-table read per tile; else per row
    SPLIT: tl.constexpr,      # write partials (SPLIT_KV > 1) instead of the final output
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr,     # arithmetic and dots in fp32 (ieee): fp32 inputs, and bf16 under the interpreter,
                              # whose bf16 arithmetic is wrong (numpy works on the raw uint16 bits)
    CAUSAL: tl.constexpr,     # keys j <= qpos only (else every valid key, narrowed by the window)
    WINDOW_RIGHT: tl.constexpr,  # not CAUSAL and window_right >= 0: keys j <= qpos + window_right
    LEFTPAD: tl.constexpr, BATCH_IDX: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    pid = tl.program_id(0)
    split = tl.program_id(1)
    group = Hq // Hkv
    rows = group * T
    row_blocks = tl.cdiv(rows, BLOCK_M)
    mb = pid % row_blocks
    bh = pid // row_blocks
    kvh = bh % Hkv
    b = bh // Hkv

    seqlen = tl.minimum(tl.load(seqlens_ptr + b), capacity)
    start = split * kv_per_split
    dead = start >= seqlen
    if LEFTPAD:
        leftpad = tl.minimum(tl.maximum(tl.load(leftpad_ptr + b), 0), seqlen)
        dead = dead | (start + kv_per_split <= leftpad)
    if dead & (split > 0):  # past this sequence, or before its leftpad: the combine kernel does not read this split
        return              # (split 0 always runs, so that an empty sequence still writes its zero output)
    stop = tl.minimum(start + kv_per_split, seqlen)

    # Address offsets are int64 where they can pass 2^31 elements: batch, head, token, page and key times their
    # strides (a 2M-token cache of 8 heads x 128 has 2^31 elements), as vectors of rows; only the head-dim part of
    # a tile stays int32 (the launcher keeps q's below 2^31; K/V's is contiguous).
    b64 = b.to(tl.int64)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < rows
    t = offs_m % T
    h = kvh * group + offs_m // T
    qpos = seqlen - T + t                                   # (BLOCK_M,) position of each row's token
    mask_d = offs_d < D
    if EVEN_D:
        q_mask = row_ok[:, None]
    else:
        q_mask = row_ok[:, None] & mask_d[None, :]
    q_rows = b64 * stride_qb + t.to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + b64 * stride_ab + h.to(tl.int64) * stride_ah, mask=row_ok,
                        other=0.0).to(tl.float32) * LOG2E

    # Tiles that can matter: keys below the sequence's length (= stop-1 at most), and from the first row's window
    # and the leftpad. Tiles start at multiples of BLOCK_N (a paged tile lies in one page).
    lo = start
    if WINDOW:
        # the smallest qpos among the rows is seqlen - T (token 0); earlier tiles are outside every row's window
        lo = tl.maximum(lo, ((seqlen - T - window_left) // BLOCK_N) * BLOCK_N)
    if LEFTPAD:
        lo = tl.maximum(lo, (leftpad // BLOCK_N) * BLOCK_N)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kv_head = kvh.to(tl.int64) * stride_kh
    k_base = k_ptr + kv_head
    v_base = v_ptr + kv_head
    if BATCH_IDX:  # contiguous caches only: sequence b's keys are in cache row cache_batch_idx[b]
        row64 = tl.load(batch_idx_ptr + b).to(tl.int64)
    else:
        row64 = b64
    bt_row = block_table_ptr + b64 * stride_btb
    offs_nb = tl.arange(0, BLOCK_N)  # key in the tile
    for n0 in range(lo, stop, BLOCK_N):
        offs_n = n0 + offs_nb        # key in the sequence
        n_ok = offs_n < stop
        if WINDOW:
            # slots before token 0's window are outside every row's window: never loaded (they may hold NaN, and
            # a masked score's p = 0 times a NaN value would still be NaN)
            n_ok = n_ok & (offs_n >= seqlen - T - window_left)
        if LEFTPAD:  # nor are the slots before the leftpad
            n_ok = n_ok & (offs_n >= leftpad)
        if EVEN_D:
            kv_mask = n_ok[:, None]
        else:
            kv_mask = n_ok[:, None] & mask_d[None, :]
        # int64 row offsets of the K/V tile: page (or batch) times its stride plus the key's position in it,
        # computed per tile (a 64-bit tile base plus int32 offsets inside the tile, loop-invariant and hoisted out
        # of the loop, needed more registers: up to +85 and the one spill measured with the shipped configs)
        if PAGED:
            if PAGE_PER_TILE:  # the tile lies in one page: one block-table read
                page = tl.load(bt_row + n0 // page_size).to(tl.int64)
                rows_off = page * stride_kb + (n0 % page_size + offs_nb).to(tl.int64) * stride_kn
            else:  # a page per key
                pages = tl.load(bt_row + offs_n // page_size, mask=n_ok, other=0).to(tl.int64)
                rows_off = pages * stride_kb + (offs_n % page_size).to(tl.int64) * stride_kn
        else:  # contiguous
            rows_off = row64 * stride_kb + offs_n.to(tl.int64) * stride_kn
        k = tl.load(k_base + rows_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + rows_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            # softcap * tanh(x / softcap) in base 2; tanh(y) = 1 - 2 / (exp(2y) + 1) (no libdevice in the
            # interpreter; saturates correctly at +-inf)
            y = s * (qk_scale / softcap)
            s = (softcap * LOG2E) * (1.0 - 2.0 / (tl.exp2(y * (2.0 * LOG2E)) + 1.0))
        else:
            s = s * qk_scale
        dist = qpos[:, None] - offs_n[None, :]
        if HAS_ALIBI:  # - slope * |qpos - j| (causal: dist >= 0 wherever it is allowed)
            if CAUSAL:
                s = s - slope[:, None] * dist.to(tl.float32)
            else:
                s = s - slope[:, None] * tl.abs(dist).to(tl.float32)
        if CAUSAL:
            allowed = (dist >= 0) & n_ok[None, :]
        else:
            allowed = n_ok[None, :]  # every valid key (broadcast over the rows)
        if WINDOW:
            allowed = allowed & (dist <= window_left)
        if WINDOW_RIGHT:
            allowed = allowed & (dist >= -window_right)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if EVEN_D:
        o_mask = row_ok[:, None]
    else:
        o_mask = row_ok[:, None] & mask_d[None, :]
    # 64-bit row offsets of the outputs, computed here rather than kept live through the key loop
    t64 = (offs_m % T).to(tl.int64)
    h64 = (kvh * group + offs_m // T).to(tl.int64)
    if SPLIT:
        split64 = tl.cast(split, tl.int64)
        o_rows = split64 * stride_os + b64 * stride_ob + t64 * stride_ot + h64 * stride_oh
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], acc, mask=o_mask)
        ml_off = split64 * stride_ms + b64 * stride_mb + t64 * stride_mt + h64
        tl.store(m_ptr + ml_off, m_i, mask=row_ok)
        tl.store(l_ptr + ml_off, l_i, mask=row_ok)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]  # a row with no key to attend: 0
        o_rows = b64 * stride_ob + t64 * stride_ot + h64 * stride_oh
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)
        if RETURN_LSE:  # natural log of sum 2^(s - m) 2^m; a row with no key: -inf
            lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
            tl.store(lse_ptr + b64 * stride_lb + h64 * stride_lh + t64, lse, mask=row_ok)


@triton.jit
def decode_attention_combine_kernel(
    part_ptr,         # (SPLIT_KV, B, T, Hq, D) fp32 unnormalized partial outputs
    m_ptr, l_ptr,     # (SPLIT_KV, B, T, Hq) fp32
    seqlens_ptr,      # (B,) int32
    leftpad_ptr,      # (B,) int32 when LEFTPAD (else unused)
    out_ptr,          # (B, T, Hq, D) in q's dtype
    lse_ptr,          # (B, Hq, T) fp32 when RETURN_LSE (else unused), unit stride in t
    T, Hq, D, capacity, kv_per_split, num_splits,
    stride_ps, stride_pb, stride_pt, stride_ph,   # partial strides; d unit
    stride_ms, stride_mb, stride_mt,              # m/l strides; head unit
    stride_ob, stride_ot, stride_oh,              # out strides; d unit
    stride_lb, stride_lh,                         # lse strides; token unit
    BLOCK_S: tl.constexpr,    # num_splits padded to a power of two
    BLOCK_D: tl.constexpr,
    LEFTPAD: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    LN2: tl.constexpr = 0.6931471805599453
    pid = tl.program_id(0)    # one program per output row (b, t, h)
    h = pid % Hq
    t = (pid // Hq) % T
    b = pid // (Hq * T)
    seqlen = tl.minimum(tl.load(seqlens_ptr + b), capacity)
    n_valid = tl.minimum(tl.cdiv(seqlen, kv_per_split), num_splits)  # the splits that ran (others never wrote)
    first = 0
    if LEFTPAD:  # the splits that end at or before the leftpad did not run either
        first = tl.minimum(tl.maximum(tl.load(leftpad_ptr + b), 0), seqlen) // kv_per_split
    # int64 row offsets: the partials hold splits x B x T x Hq x D elements, which may pass 2^31
    b64, t64, h64 = b.to(tl.int64), t.to(tl.int64), h.to(tl.int64)
    ml_row = b64 * stride_mb + t64 * stride_mt + h64
    offs_s = tl.arange(0, BLOCK_S)
    ml_off = ml_row + offs_s * stride_ms
    s_ok = (offs_s >= first) & (offs_s < n_valid)
    m = tl.load(m_ptr + ml_off, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + ml_off, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(s_ok, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(l * w, 0)
    denom_safe = tl.where(denom == 0.0, 1.0, denom)
    inv = 1.0 / denom_safe
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    base = part_ptr + b64 * stride_pb + t64 * stride_pt + h64 * stride_ph
    for s in range(first, n_valid):
        s64 = tl.cast(s, tl.int64)
        w_s = tl.exp2(tl.load(m_ptr + ml_row + s64 * stride_ms) - m_max)
        acc += w_s * tl.load(base + s64 * stride_ps + offs_d, mask=mask_d, other=0.0)
    tl.store(out_ptr + b64 * stride_ob + t64 * stride_ot + h64 * stride_oh + offs_d,
             (acc * inv).to(out_ptr.dtype.element_ty), mask=mask_d)
    if RETURN_LSE:  # natural log of sum_s 2^(m_s - M) l_s 2^M; a row with no key: -inf
        lse = tl.where(denom == 0.0, float("-inf"), (m_max + tl.log2(denom_safe)) * LN2)
        tl.store(lse_ptr + b64 * stride_lb + h64 * stride_lh + t64, lse)


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
NOMINAL_SMS = 132  # CPU tensors (the interpreter): size splits as on an H100, so tests run the GPU's path


# Every output buffer (final and partial) comes from here, so tests can poison it with NaN.
_empty = torch.empty


def block_m_for(rows: int, block_d: int) -> int:
    cap = MAX_BLOCK_M[max(64, block_d)]
    return min(cap, max(16, triton.next_power_of_2(rows)))


def block_n_for(cfg: Config, block_d: int) -> int:
    """The config's BLOCK_N, halved for d=256 so that the pipelined K and V tiles fit in shared memory."""
    return max(16, min(cfg.BLOCK_N, 16384 // block_d))


def num_splits_for(programs: int, capacity: int, block_n: int, sms: int) -> int:
    """Enough splits for WAVES * sms programs in all, at most one tile per split and MAX_SPLITS."""
    want = triton.cdiv(WAVES * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(capacity, block_n), MAX_SPLITS))


def _launch(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, softcap,
            cfg: Config, num_splits: int | None, window_right: int = -1, causal: bool = True,
            cache_batch_idx=None, cache_leftpad=None, return_lse: bool = False):
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    rows = (Hq // Hkv) * T
    block_d = max(16, triton.next_power_of_2(D))
    block_m = block_m_for(rows, block_d)
    programs = B * Hkv * triton.cdiv(rows, block_m)
    block_n = block_n_for(cfg, block_d)
    # the kernel's int32 offsets along q's head dim (any stride): a view with a huge one is copied
    q = int32_tile_offsets(q, (0, 0, 0, block_d))
    if v_cache.stride() != k_cache.stride():  # the kernel addresses K and V with one set of strides (registers)
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    paged = block_table is not None
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    page_per_tile = paged and page_size % block_n == 0
    if num_splits is None:
        sms = sm_count(q.device.index or 0) if q.device.type == "cuda" else NOMINAL_SMS
        num_splits = num_splits_for(programs, capacity, block_n, sms)
    num_splits = max(1, min(num_splits, triton.cdiv(capacity, block_n)))
    kv_per_split = triton.cdiv(triton.cdiv(capacity, num_splits), block_n) * block_n
    num_splits = triton.cdiv(capacity, kv_per_split)
    split = num_splits > 1
    upcast = upcast_dots(q.dtype)

    out = _empty((B, T, Hq, D), device=q.device, dtype=q.dtype)
    if split:
        part = _empty((num_splits, B, T, Hq, D), device=q.device, dtype=torch.float32)
        m = _empty((num_splits, B, T, Hq), device=q.device, dtype=torch.float32)
        l = _empty((num_splits, B, T, Hq), device=q.device, dtype=torch.float32)
        o_strides, ml_strides = part.stride()[:4], m.stride()[:3]
    else:
        part, m, l = out, out, out
        o_strides, ml_strides = (0,) + out.stride()[:3], (0, 0, 0)
    has_alibi = alibi_slopes is not None
    if has_alibi:
        a_strides = (0, alibi_slopes.stride(0)) if alibi_slopes.dim() == 1 else alibi_slopes.stride()
    else:
        alibi_slopes, a_strides = cache_seqlens, (0, 0)
    bt = block_table if paged else cache_seqlens
    # absent options: any int32 tensor stands in for the pointer (never read)
    batch_idx = cache_seqlens if cache_batch_idx is None else cache_batch_idx
    leftpad = cache_seqlens if cache_leftpad is None else cache_leftpad
    if return_lse:
        lse = _empty((B, Hq, T), device=q.device, dtype=torch.float32)
        l_strides = lse.stride()[:2]
    else:
        lse, l_strides = cache_seqlens, (0, 0)
    window_right = -1 if causal else window_right  # causal: a right window never narrows it
    log2e = 1.4426950408889634
    qk_scale = softmax_scale if softcap > 0 else softmax_scale * log2e
    decode_attention_split_kernel[(programs, num_splits)](
        q, k_cache, v_cache, cache_seqlens, bt, batch_idx, leftpad, alibi_slopes, part, m, l, lse,
        T, Hq, Hkv, D, capacity, page_size, kv_per_split, qk_scale, float(softcap), max(window_left, 0),
        max(window_right, 0),
        *q.stride(), *k_cache.stride()[:3], bt.stride(0) if paged else 0,
        *a_strides, *o_strides, *ml_strides, *l_strides,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == D, PAGED=paged,
        PAGE_PER_TILE=page_per_tile, SPLIT=split, SOFTCAP=softcap > 0, WINDOW=window_left >= 0,
        HAS_ALIBI=has_alibi, UPCAST=upcast, CAUSAL=causal, WINDOW_RIGHT=window_right >= 0,
        LEFTPAD=cache_leftpad is not None, BATCH_IDX=cache_batch_idx is not None, RETURN_LSE=return_lse,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        decode_attention_combine_kernel[(B * T * Hq,)](
            part, m, l, cache_seqlens, leftpad, out, lse, T, Hq, D, capacity, kv_per_split, num_splits,
            *part.stride()[:4], *m.stride()[:3], *out.stride()[:3], *l_strides,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, LEFTPAD=cache_leftpad is not None,
            RETURN_LSE=return_lse, num_warps=1 if block_d <= 64 else 2,
        )
    return (out, lse) if return_lse else out


_tuner = Autotuner()


def _choose(q, k_cache, block_table, args, options) -> Config:
    """The architecture's candidates, timed once per (dtype, shape, capacity bucket, page size); the options
    (causal, window_right, cache_batch_idx, cache_leftpad, return_lse) change no tile's cost much: not keyed."""
    B, T, Hq, D = q.shape
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    key = (q.dtype, B, T, Hq, k_cache.shape[2], D, triton.next_power_of_2(capacity),
           None if block_table is None else k_cache.shape[1])
    return _tuner.choose(q.device, configs_for(capability(q.device)), key,
                         lambda cand: _launch(q, k_cache, *args, cfg=cand, num_splits=None, **options))


def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale: float,
                     window_left: int, softcap: float, config: Config | None = None,
                     num_splits: int | None = None, *, window_right: int = -1, causal: bool = True,
                     cache_batch_idx=None, cache_leftpad=None, return_lse: bool = False):
    """Launch (arguments already checked by turbokernels.decode_attention): out, or (out, lse (B, Hq, T) fp32) when
    return_lse. `config` and `num_splits` override the choice (tests use them to cover every shipped config and
    the split / no-split paths). window_right matters only when not causal."""
    rest = (v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left, softcap)
    options = dict(window_right=window_right, causal=causal, cache_batch_idx=cache_batch_idx,
                   cache_leftpad=cache_leftpad, return_lse=return_lse)
    cfg = config or _choose(q, k_cache, block_table, rest, options)
    return _launch(q, k_cache, *rest, cfg=cfg, num_splits=num_splits, **options)
