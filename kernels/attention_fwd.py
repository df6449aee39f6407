"""Attention forward in Triton, FlashAttention-2 style: out = softmax(q k^T * scale [+ softcap, ALiBi, masks]) v.

The spec is python/turbokernels/reference/attention.py (layouts, masks aligned to the bottom-right, empty rows give
out 0 / lse -inf). One program owns BLOCK_M query rows of one (batch, head) and streams the allowed key blocks
through an online softmax kept in base 2 (scale * log2(e) folded into one multiply; exp2 is the native
instruction), with fp32 accumulators. The key range is split in three loops: blocks before the left window edge
may be partly masked, the middle blocks need no mask at all, and the blocks at the diagonal / right window edge /
end of the sequence are masked again; blocks that every row masks are never visited.

Varlen (packed sequences) needs no host sync: the grid has cdiv(total_q, BLOCK_M) + batch query tiles (an upper
bound of sum_b cdiv(len_b, BLOCK_M)) and each program finds its sequence and tile from cu_seqlens in the kernel
(a chunked prefix sum of per-sequence tile counts); the spare programs exit at once.
Read top to bottom: configs, kernel, launcher.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._launch import Autotuner, capability, int32_tile_offsets, nearest_arch, pow2_bucket, upcast_dots


# ---------------------------------------------------------------------------------------------------------------
# Configs per GPU architecture (compute capability; the nearest lower key applies) and padded head dim (the
# largest bucket <= 64, 128, 256 that holds it). tests/test_attention.py compiles every one: no spills, shared memory
# within the part's limit, wgmma on sm_90, mma.sync on sm_80.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


CONFIGS = {
    # Hopper: 228 KB shared memory per SM. 128-row tiles over 8 warps (two warpgroups of 64 rows, wgmma): the
    # fp32 accumulator, the score tile and the 64-bit pointer tiles of the loads must fit in 255 registers with
    # every feature on (varlen, window, softcap, ALiBi) under triton 3.6 and 3.8. Measured to spill: 128x64 at
    # d=128 with 3 stages or 4 warps, 128x128 at d=128; at d=256 every tile with 32+ keys (64x64, 128x32, 64x32),
    # hence 16-key blocks there.
    90: {
        64: [Config(128, 64, 8, 3), Config(128, 128, 8, 3)],
        128: [Config(128, 64, 8, 2), Config(128, 32, 8, 3)],
        256: [Config(128, 16, 8, 2), Config(64, 16, 4, 2)],
    },
    # Ampere (A100): 164 KB shared memory, mma.sync. Measured to spill with every feature on: 128x64 with 4 warps
    # at d=64, 128x64 with 8 warps at d=128 (triton 3.6), 64x32 with 4 warps at d=256.
    80: {
        64: [Config(128, 64, 8, 3), Config(64, 64, 8, 3)],
        128: [Config(64, 64, 8, 3), Config(64, 32, 4, 3)],
        256: [Config(64, 64, 8, 2), Config(64, 32, 8, 2)],
    },
}
HEAD_DIM_BUCKETS = (64, 128, 256)


def padded_head_dim(head_dim: int) -> int:
    """The tile width along the head dim: the next power of two >= 16 (tl.dot needs K >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def configs_for(cap: int, head_dim: int) -> list[Config]:
    bucket = next(b for b in HEAD_DIM_BUCKETS if padded_head_dim(head_dim) <= b)
    return CONFIGS[nearest_arch(CONFIGS, cap)][bucket]


# ---------------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # libdevice's tanh does not run under the interpreter; this form does not overflow: e = exp(-2|x|) <= 1.
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # 2 * log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, start, stop, offs_m, offs_d, seqlen_k, stride_ks, stride_vs,
                  shift, qk_scale, softcap_scale, softcap_log2, slope_log2, window_left, window_right,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                  RIGHT_BOUNDED: tl.constexpr, LEFT_BOUNDED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over key blocks [start, stop). MASK: apply the window / sequence-end mask (only the edge
    blocks need it). Scores are kept in base 2: s2 = s * log2(e). k_base / v_base point at key 0 of the sequence."""
    offs_nb = tl.arange(0, BLOCK_N)  # key in the block
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_nb   # key in the sequence
        # Key offsets are 64-bit: key * stride passes 2^31 elements past 2M keys of 8 heads x 128. Of the forms
        # tried, this pair compiles without spills for every shipped config: K's key offsets in int64 (a BLOCK_N
        # vector per block); V's block start in int64 plus int32 offsets inside the block (loop-invariant, hoisted
        # out of the loop). The same block-base form for K, or int64 key offsets for V, spill on the 255-register
        # tiles (sm_90 d=128 128x64 and d=256 64x16 with every feature on).
        k_rows = offs_n.to(tl.int64) * stride_ks
        # K^T tile (HEAD_DIM_PAD, BLOCK_N): padded head-dim lanes load 0 and add nothing to q.k
        if MASK:
            kt = tl.load(k_base + offs_d[:, None] + k_rows[None, :],
                         mask=d_ok[:, None] & (offs_n[None, :] < seqlen_k), other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            kt = tl.load(k_base + offs_d[:, None] + k_rows[None, :])
        else:
            kt = tl.load(k_base + offs_d[:, None] + k_rows[None, :], mask=d_ok[:, None], other=0.0)
        if UPCAST:
            qk = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        if HAS_SOFTCAP:
            s2 = softcap_log2 * _tanh(qk * softcap_scale)
        else:
            s2 = qk * qk_scale
        # key position relative to the row's aligned diagonal (i + Sk - Sq)
        rel = offs_n[None, :] - (offs_m[:, None] + shift)
        if HAS_ALIBI:
            s2 -= slope_log2 * tl.abs(rel).to(tl.float32)
        if MASK:
            ok = offs_n[None, :] < seqlen_k
            if RIGHT_BOUNDED:
                ok = ok & (rel <= window_right)
            if LEFT_BOUNDED:
                ok = ok & (rel >= -window_left)
            s2 = tl.where(ok, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        # a row with no allowed key so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s2 - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v_blk = v_base + tl.cast(start_n, tl.int64) * stride_vs  # the block's first key; int32 inside the block
        if MASK:
            v = tl.load(v_blk + offs_nb[:, None] * stride_vs + offs_d[None, :],
                        mask=(offs_n[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            v = tl.load(v_blk + offs_nb[:, None] * stride_vs + offs_d[None, :])
        else:
            v = tl.load(v_blk + offs_nb[:, None] * stride_vs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attention_fwd_kernel(
    q_ptr,          # dense (B, Sq, Hq, D) / varlen (total_q, Hq, D); fp16/bf16/fp32; head dim contiguous
    k_ptr,          # dense (B, Sk, Hkv, D) / varlen (total_k, Hkv, D); head dim contiguous
    v_ptr,          # like k
    out_ptr,        # like q, q's dtype; every element is written (rows without keys get 0)
    lse_ptr,        # fp32 natural-log log-sum-exp: dense (B, Hq, Sq), varlen (Hq, total_q)
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,  # int32 (B+1,) when VARLEN, else unused
    alibi_ptr,      # fp32 slopes (Hq,) or (B, Hq) when HAS_ALIBI, else unused
    stride_qb, stride_qs, stride_qh,    # strides in elements (batch strides are unused when VARLEN)
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    stride_ab,      # alibi batch stride (0 for per-head slopes)
    seqlen_q, seqlen_k,  # dense: the sequence lengths; varlen: unused
    num_seqs,       # varlen: B (number of sequences)
    kv_group,       # Hq // Hkv: q head h reads kv head h // kv_group
    qk_scale,       # softmax_scale * log2(e)
    softcap_scale,  # softmax_scale / softcap (HAS_SOFTCAP)
    softcap_log2,   # softcap * log2(e) (HAS_SOFTCAP)
    window_left, window_right,  # key j allowed iff -left <= j - (i + Sk - Sq) <= right (when bounded)
    HEAD_DIM: tl.constexpr,      # true head dim (1..256)
    HEAD_DIM_PAD: tl.constexpr,  # power of two >= max(16, HEAD_DIM): tile width, padded lanes masked
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RIGHT_BOUNDED: tl.constexpr,  # causal or window_right >= 0
    LEFT_BOUNDED: tl.constexpr,   # window_left >= 0
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
    SEQ_CHUNK: tl.constexpr,      # varlen: sequences scanned per step when finding a program's sequence
    UPCAST: tl.constexpr,         # run both dots in fp32 ("ieee"): fp32 inputs, and bf16 under the interpreter
                                  # whose bf16 arithmetic is wrong (numpy works on the raw uint16 bits)
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if VARLEN:
        # Find the sequence owning query tile `tile` (tiles are numbered sequence after sequence): scan cu_seqlens
        # SEQ_CHUNK sequences at a time with a prefix sum of their tile counts. No host sync, no max_seqlen.
        tiles_before = tile * 0
        pid_m = tile * 0 - 1
        for c0 in range(0, num_seqs, SEQ_CHUNK):
            seq = c0 + tl.arange(0, SEQ_CHUNK)
            valid = seq < num_seqs
            starts = tl.load(cu_seqlens_q_ptr + seq, mask=valid, other=0)
            ends = tl.load(cu_seqlens_q_ptr + seq + 1, mask=valid, other=0)
            n_tiles = tl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
            last = tiles_before + tl.cumsum(n_tiles, 0)  # one past each sequence's last tile
            first = last - n_tiles
            hit = (tile >= first) & (tile < last)
            b = tl.maximum(b, tl.max(tl.where(hit, seq, -1), 0))
            pid_m = tl.maximum(pid_m, tl.max(tl.where(hit, tile - first, -1), 0))
            tiles_before += tl.sum(n_tiles, 0)
        q_start = tl.load(cu_seqlens_q_ptr + b)
        k_start = tl.load(cu_seqlens_k_ptr + b)
        sq = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
        sk = tl.load(cu_seqlens_k_ptr + b + 1) - k_start
    else:
        # causal/windowed rows further down see more keys: start them first so the short ones fill the tail
        pid_m = tl.num_programs(0) - 1 - tile if RIGHT_BOUNDED else tile
        q_start = 0
        k_start = 0
        sq = seqlen_q
        sk = seqlen_k
    if pid_m < 0:  # a spare varlen program
        return

    m0 = pid_m * BLOCK_M
    shift = sk - sq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // kv_group).to(tl.int64)
    # 64-bit offsets: batch, head and position times their strides pass 2^31 elements on large inputs (1M tokens
    # x 32 heads x 128 = 4.3e9). The bases below hold batch, head and the sequence start; query rows are int64 too
    # (a BLOCK_M vector), keys in _attend_block. Only V's offsets inside a key block (key in block * stride, which
    # the launcher keeps below 2^31) and the head-dim offsets stay int32.
    q_base = q_ptr + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qs
    k_base = k_ptr + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = v_ptr + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vs

    row_ok = offs_m < sq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + (offs_m.to(tl.int64) * stride_qs)[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(alibi_ptr + b64 * stride_ab + h).to(tl.float32) * 1.4426950408889634

    # Key range of the tile: rows m0 .. m_last see keys rel in [-left, right] around their diagonal i + shift.
    m_last = tl.minimum(m0 + BLOCK_M, sq) - 1
    lo = 0
    hi = sk
    if RIGHT_BOUNDED:
        hi = tl.maximum(tl.minimum(sk, m_last + shift + window_right + 1), 0)
    if LEFT_BOUNDED:
        lo = tl.minimum(tl.maximum(m0 + shift - window_left, 0) // BLOCK_N * BLOCK_N, hi)
    # Full blocks (no row masks any key): start at or after the last row's left edge, end before the first row's
    # right edge and before sk.
    full_lo = lo
    if LEFT_BOUNDED:
        full_lo = tl.minimum(tl.cdiv(tl.maximum(m_last + shift - window_left, 0), BLOCK_N) * BLOCK_N, hi)
    full_hi = sk // BLOCK_N * BLOCK_N
    if RIGHT_BOUNDED:
        full_hi = tl.maximum(tl.minimum(m0 + shift + window_right + 1, sk), 0) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if LEFT_BOUNDED:
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, lo, full_lo, offs_m, offs_d, sk,
                                      stride_ks, stride_vs, shift, qk_scale, softcap_scale, softcap_log2,
                                      slope_log2, window_left, window_right, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N,
                                      True, RIGHT_BOUNDED, LEFT_BOUNDED, HAS_SOFTCAP, HAS_ALIBI, UPCAST)
    acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, full_lo, full_hi, offs_m, offs_d, sk,
                                  stride_ks, stride_vs, shift, qk_scale, softcap_scale, softcap_log2,
                                  slope_log2, window_left, window_right, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N,
                                  False, RIGHT_BOUNDED, LEFT_BOUNDED, HAS_SOFTCAP, HAS_ALIBI, UPCAST)
    acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, full_hi, hi, offs_m, offs_d, sk,
                                  stride_ks, stride_vs, shift, qk_scale, softcap_scale, softcap_log2,
                                  slope_log2, window_left, window_right, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N,
                                  True, RIGHT_BOUNDED, LEFT_BOUNDED, HAS_SOFTCAP, HAS_ALIBI, UPCAST)

    empty = l_i == 0.0  # no allowed key: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    # output bases computed here, not kept live through the key loop (registers are the limit on the big tiles)
    o_base = out_ptr + b64 * stride_ob + h64 * stride_oh + q_start.to(tl.int64) * stride_os
    l_base = lse_ptr + b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64) * stride_ls
    tl.store(o_base + (offs_m.to(tl.int64) * stride_os)[:, None] + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(l_base + offs_m.to(tl.int64) * stride_ls, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
# Every output buffer comes from here, so tests can poison it (fill with NaN) and catch unwritten elements.
_empty = torch.empty

LOG2E = 1.4426950408889634
SEQ_CHUNK = 64


def _launch(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left, window_right,
            softcap, cfg: Config):
    varlen = cu_seqlens_q is not None
    head_dim = q.shape[-1]
    # the kernel's int32 offsets inside a V tile (keys x head dim): a view with a huge row stride is copied first
    v = int32_tile_offsets(v, ((cfg.BLOCK_N,) if varlen else (0, cfg.BLOCK_N)) + (0, padded_head_dim(head_dim)))
    out = _empty(q.shape, device=q.device, dtype=q.dtype)
    if varlen:
        total_q, heads_q, _ = q.shape
        num_seqs = cu_seqlens_q.shape[0] - 1
        lse = _empty((heads_q, total_q), device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(total_q, cfg.BLOCK_M) + num_seqs, heads_q, 1)
        qs = (0, q.stride(0), q.stride(1))
        ks = (0, k.stride(0), k.stride(1))
        vs = (0, v.stride(0), v.stride(1))
        os_ = (0, out.stride(0), out.stride(1))
        ls = (0, lse.stride(0), lse.stride(1))
        seqlen_q = seqlen_k = 0
        kv_group = heads_q // k.shape[1]
    else:
        batch, seqlen_q, heads_q, _ = q.shape
        seqlen_k = k.shape[1]
        num_seqs = batch
        lse = _empty((batch, heads_q, seqlen_q), device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(seqlen_q, cfg.BLOCK_M), heads_q, batch)
        qs, ks, vs = q.stride()[:3], k.stride()[:3], v.stride()[:3]
        os_ = out.stride()[:3]
        ls = lse.stride()
        kv_group = heads_q // k.shape[2]
    right_bounded = causal or window_right >= 0
    if causal:  # causal is the window (left, 0), as in FlashAttention
        window_right = 0
    has_softcap = softcap > 0
    has_alibi = alibi_slopes is not None
    upcast = upcast_dots(q.dtype)
    dummy = out  # placeholder pointer for unused optional inputs
    attention_fwd_kernel[grid](
        q, k, v, out, lse,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
        alibi_slopes if has_alibi else dummy,
        *qs, *ks, *vs, *os_, *ls,
        (alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0) if has_alibi else 0,
        seqlen_q, seqlen_k, num_seqs, kv_group,
        softmax_scale * LOG2E,
        softmax_scale / softcap if has_softcap else 0.0,
        softcap * LOG2E if has_softcap else 0.0,
        max(window_left, 0), max(window_right, 0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=padded_head_dim(head_dim), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        RIGHT_BOUNDED=right_bounded, LEFT_BOUNDED=window_left >= 0, HAS_SOFTCAP=has_softcap,
        HAS_ALIBI=has_alibi, VARLEN=varlen, SEQ_CHUNK=SEQ_CHUNK, UPCAST=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


_tuner = Autotuner()


def _choose(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left, window_right,
            softcap) -> Config:
    """The candidates for this head dim, timed once per (dtype, head dim, seqlen buckets, masking, varlen)."""
    head_dim = q.shape[-1]
    varlen = cu_seqlens_q is not None
    sq = q.shape[0] if varlen else q.shape[1]
    sk = k.shape[0] if varlen else k.shape[1]
    key = (q.dtype, padded_head_dim(head_dim), pow2_bucket(sq, 16384), pow2_bucket(sk, 16384), causal,
           window_left >= 0 or window_right >= 0, varlen)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left, window_right,
            softcap)
    return _tuner.choose(q.device, configs_for(capability(q.device), head_dim), key,
                         lambda cand: _launch(*args, cand))


def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale: float, causal: bool,
                  window_left: int, window_right: int, softcap: float, config: Config | None = None):
    """Launch with the op's arguments (torch.ops.turbokernels.attention_fwd) -> (out, lse). Inputs are checked by
    turbokernels.attention; the head dim must be contiguous. `config` overrides the choice (tests)."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left, window_right,
            softcap)
    return _launch(*args, config or _choose(*args))
