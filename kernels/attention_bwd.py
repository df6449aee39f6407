"""Fused attention backward in Triton (FlashAttention-2 style): (dq, dk, dv) from dout, q, k, v, out and lse.

Scores as in FlashAttention 2.x: s_raw = (q . k) * softmax_scale; s = softcap * tanh(s_raw / softcap) when
softcap > 0; plus the ALiBi bias -slope * |i + seqlen_k - seqlen_q - j|; allowed keys bottom-right aligned
(causal: j <= i + sk - sq; window (left, right): i + sk - sq - left <= j <= i + sk - sq + right). P = exp(s - lse)
with the forward's natural-log lse, so the backward never recomputes a row maximum.

Three kernels:
  1. preprocess: delta = rowsum(dout * out) in fp32 (the D term of dS = P * (dP - D)).
  2. dK/dV: one program per (key block, batch, kv head), looping over the query heads of its GQA group and over
     the query blocks that can see the key block; dK, dV accumulate in fp32 registers and are written once, so
     they are deterministic and need no per-q-head partial buffers. With deterministic=False the same loop adds
     dS @ K into an fp32 dQ buffer with atomics (the order of the adds varies from run to run).
  3. dQ (deterministic=True only): one program per (query block, batch, q head) looping over key blocks: dQ is
     written once, in a fixed summation order, so the gradients are bitwise repeatable.
Read top to bottom: configs, kernels, launcher.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._launch import Autotuner, capability, int32_tile_offsets, nearest_arch, pow2_bucket, upcast_dots


# ---------------------------------------------------------------------------------------------------------------
# Configs, per GPU architecture (capability major*10+minor; the nearest lower key applies) and per padded head dim
# (the nearest larger key applies). Every shipped config is compiled by tests/test_attention_bwd.py with triton 3.8
# and 3.6 (the GPU image's), in both dQ modes, causal and with every feature on (varlen, softcap, ALiBi, window):
# no register spills, shared memory within the part's limit. Registers are what bound the tiles: the dK/dV kernel
# keeps two fp32 (BLOCK_N, D) accumulators live across its loop and, with deterministic=False, also builds and
# atomically adds a (BLOCK_M, D) dQ tile per step. Hence 8 warps and BLOCK_M down to 16 as D grows. Its dots have
# BLOCK_N rows, so only BLOCK_N >= 64 can use wgmma; at D=128 every BLOCK_N=64 variant tried (8 warps, 1-5
# stages) spilled 8-300 bytes in one of the modes with one of the two compilers, so Hopper ships 32 keys there
# (mma.sync) until a GPU benchmark says whether the wgmma tile with a small spill is faster. The dQ kernel's dots
# have BLOCK_M rows.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    BLOCK_M1: int    # dK/dV kernel: query rows per inner step
    BLOCK_N1: int    # dK/dV kernel: keys per program
    warps1: int
    stages1: int
    BLOCK_M2: int    # dQ kernel: query rows per program
    BLOCK_N2: int    # dQ kernel: keys per inner step
    warps2: int
    stages2: int


CONFIGS = {
    # Hopper (H100/H200): 227 KB shared memory per block, wgmma for the dots whose tile has 64+ rows.
    90: {
        64: [Config(32, 128, 8, 2, 128, 32, 8, 3), Config(32, 64, 8, 3, 64, 64, 4, 3)],
        128: [Config(16, 32, 8, 2, 64, 32, 8, 3)],
        256: [Config(16, 32, 8, 2, 32, 16, 4, 2)],
    },
    # Ampere (A100): 163 KB shared memory, mma.sync.
    80: {
        64: [Config(32, 64, 8, 2, 128, 32, 8, 3), Config(16, 64, 8, 3, 64, 32, 4, 3)],
        128: [Config(16, 64, 8, 1, 64, 32, 8, 2)],
        256: [Config(16, 16, 8, 2, 32, 16, 4, 2)],
    },
}
# The head dims the configs are keyed by: the padded head dim (a power of two >= 16) rounds up to one of these.
HEAD_DIM_BUCKETS = (64, 128, 256)


def configs_for(cap: int, block_d: int) -> list[Config]:
    return CONFIGS[nearest_arch(CONFIGS, cap)][min(b for b in HEAD_DIM_BUCKETS if b >= block_d)]


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # With exp only: libdevice's tanh does not run under the interpreter. exp2(2x * log2(e)) overflows to inf for
    # large x, which gives exactly 1 (and -1 at the other end), so no clamp is needed.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _scores(qk, i, j, sq, sk, scale, softcap, slope, window_left, window_right,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, WINDOW: tl.constexpr):
    """(s, tanh, allowed) for fp32 q.k products `qk` at query rows i and keys j (broadcastable index tensors).
    tanh is only meaningful with SOFTCAP (it is s otherwise, so that both branches have one type)."""
    s = qk * scale
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    diag = i + (sk - sq)  # bottom-right alignment: the last query sees the last key
    if ALIBI:
        s -= slope * tl.abs(diag - j).to(tl.float32)
    allowed = (j < sk) & (i < sq)
    if WINDOW:
        allowed = allowed & (j <= diag + window_right) & (j >= diag - window_left)
    return s, t, allowed


@triton.jit
def attention_bwd_preprocess_kernel(
    out_ptr, dout_ptr,   # (batch, seqlen_q, heads_q, head_dim) or packed (total_q, heads_q, head_dim)
    delta_ptr,           # fp32, lse's layout: (batch, heads_q, seqlen_q) or (heads_q, total_q)
    cu_q_ptr,            # int32 (batch+1,) when VARLEN
    seqlen_q, head_dim,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_deltab, stride_deltah, stride_deltam,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = 0
    sq = seqlen_q
    if VARLEN:
        q_start = tl.load(cu_q_ptr + b)
        sq = tl.load(cu_q_ptr + b + 1) - q_start
    if pid_m * BLOCK_M >= sq:  # varlen grids are sized by the total, not the (unknown on host) longest sequence
        return
    # 64-bit base of the block (batch, head, first row: products that pass 2^31 elements on large inputs); int32
    # offsets inside it (index in tile * stride, kept below 2^31 by the launcher).
    b64 = tl.cast(b, tl.int64)
    h64 = tl.cast(h, tl.int64)
    row0 = tl.cast(q_start, tl.int64) + pid_m * BLOCK_M
    offs_mb = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_mb
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < sq
    mask = mask_m[:, None] & (offs_d[None, :] < head_dim)
    o = tl.load(out_ptr + b64 * stride_ob + h64 * stride_oh + row0 * stride_om
                + offs_mb[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + b64 * stride_dob + h64 * stride_doh + row0 * stride_dom
                 + offs_mb[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    tl.store(delta_ptr + b64 * stride_deltab + h64 * stride_deltah + row0 * stride_deltam + offs_mb * stride_deltam,
             delta, mask=mask_m)


@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr, dout_ptr,     # (batch, seqlen_q, heads_q, head_dim) or packed (total_q, heads_q, head_dim)
    k_ptr, v_ptr,        # (batch, seqlen_k, heads_kv, head_dim) or packed (total_k, heads_kv, head_dim)
    lse_ptr, delta_ptr,  # fp32 (batch, heads_q, seqlen_q) or (heads_q, total_q); lse = -inf for rows with no key
    dq_ptr,              # fp32 dQ accumulator, q's shape, contiguous, zeroed (used when ATOMIC_DQ)
    dk_ptr, dv_ptr,      # k's shape and dtype, written once per (key block, kv head)
    cu_q_ptr, cu_k_ptr,  # int32 (batch+1,) when VARLEN
    alibi_ptr,           # fp32 (heads_q,) or (batch, heads_q) when ALIBI
    seqlen_q, seqlen_k,  # dense lengths (unused when VARLEN)
    head_dim,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_lseb, stride_lseh, stride_lsem,
    stride_deltab, stride_deltah, stride_deltam,
    stride_dqb, stride_dqm, stride_dqh,       # last dim contiguous
    stride_dkb, stride_dkn, stride_dkh,       # dk and dv share one contiguous layout; last dim contiguous
    stride_ab, stride_ah,                     # alibi: batch stride 0 for (heads_q,) slopes
    scale, softcap,
    window_left, window_right,  # >= 0; the launcher maps unbounded (-1) to a large value, causal to right = 0
    GROUP: tl.constexpr,        # heads_q // heads_kv query heads share each kv head (GQA/MQA)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,    # also accumulate dQ (deterministic=False)
    UPCAST: tl.constexpr,       # dots in fp32 ("ieee") for fp32 inputs, and for bf16 under the interpreter,
                                # whose bf16 arithmetic is wrong (numpy works on the raw uint16 bits)
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start = 0
    k_start = 0
    sq = seqlen_q
    sk = seqlen_k
    if VARLEN:
        q_start = tl.load(cu_q_ptr + b)
        sq = tl.load(cu_q_ptr + b + 1) - q_start
        k_start = tl.load(cu_k_ptr + b)
        sk = tl.load(cu_k_ptr + b + 1) - k_start
    n0 = pid_n * BLOCK_N
    if n0 >= sk:
        return

    # 64-bit bases (batch, head, block start: products that pass 2^31 elements on large inputs, e.g. 1M keys x 32
    # heads x 128), int32 offsets inside a block (index in tile * stride, kept below 2^31 by the launcher).
    b64 = tl.cast(b, tl.int64)
    hk64 = tl.cast(hk, tl.int64)
    q_start64 = tl.cast(q_start, tl.int64)
    key0 = tl.cast(k_start, tl.int64) + n0  # this program's first key
    offs_nb = tl.arange(0, BLOCK_N)
    offs_n = n0 + offs_nb
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_kd = (offs_n[:, None] < sk) & (offs_d[None, :] < head_dim)
    k = tl.load(k_ptr + b64 * stride_kb + hk64 * stride_kh + key0 * stride_kn
                + offs_nb[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_kd, other=0.0)
    v = tl.load(v_ptr + b64 * stride_vb + hk64 * stride_vh + key0 * stride_vn
                + offs_nb[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_kd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    # Only the query blocks that can see a key of this block: the band of the window/causal mask.
    m_lo = 0
    m_hi = sq
    if WINDOW:
        m_lo = tl.maximum(n0 - (sk - sq) - window_right, 0)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
        m_hi = tl.minimum(n0 + BLOCK_N + window_left - (sk - sq), sq)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(GROUP):
        h64 = hk64 * GROUP + g
        slope = 0.0
        if ALIBI:
            slope = tl.load(alibi_ptr + b64 * stride_ab + h64 * stride_ah)
        # the head's row 0; the query rows of each block below are int64 (row * stride passes 2^31 elements on
        # long sequences; computed inside the loop: offsets hoisted out of it would stay live in registers)
        q_head = q_ptr + b64 * stride_qb + q_start64 * stride_qm + h64 * stride_qh
        do_head = dout_ptr + b64 * stride_dob + q_start64 * stride_dom + h64 * stride_doh
        lse_head = lse_ptr + b64 * stride_lseb + q_start64 * stride_lsem + h64 * stride_lseh
        delta_head = delta_ptr + b64 * stride_deltab + q_start64 * stride_deltam + h64 * stride_deltah
        dq_head = dq_ptr + b64 * stride_dqb + q_start64 * stride_dqm + h64 * stride_dqh
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + offs_mb
            rows = offs_m.to(tl.int64)
            mask_m = offs_m < sq
            mask_qd = mask_m[:, None] & (offs_d[None, :] < head_dim)
            q = tl.load(q_head + (rows * stride_qm)[:, None] + offs_d[None, :] * stride_qd, mask=mask_qd, other=0.0)
            do = tl.load(do_head + (rows * stride_dom)[:, None] + offs_d[None, :] * stride_dod, mask=mask_qd,
                         other=0.0)
            # lse and delta: the block's first row in 64 bits, int32 inside it (fewer registers than int64 rows)
            row0 = tl.cast(m0, tl.int64)
            lse = tl.load(lse_head + row0 * stride_lsem + offs_mb * stride_lsem, mask=mask_m, other=float("inf"))
            # A row with no allowed key has lse = -inf: +inf makes its P exactly 0 instead of NaN.
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(delta_head + row0 * stride_deltam + offs_mb * stride_deltam, mask=mask_m, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
                qkT = tl.dot(k, tl.trans(q), input_precision="ieee")
            else:
                qkT = tl.dot(k, tl.trans(q))
            # Transposed tiles (keys x queries) so that every dot here has the BLOCK_N rows of this program.
            sT, tT, allowed = _scores(qkT, offs_m[None, :], offs_n[:, None], sq, sk, scale, softcap, slope,
                                      window_left, window_right, SOFTCAP, ALIBI, WINDOW)
            pT = tl.where(allowed, tl.exp(sT - lse[None, :]), 0.0)
            if UPCAST:
                dv += tl.dot(pT, do, input_precision="ieee")
                dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
            else:
                dv += tl.dot(pT.to(do.dtype), do)
                dpT = tl.dot(v, tl.trans(do))
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            if UPCAST:
                dk += tl.dot(dsT, q, input_precision="ieee")
            else:
                dk += tl.dot(dsT.to(q.dtype), q)
            if ATOMIC_DQ:
                if UPCAST:
                    dq = tl.dot(tl.trans(dsT), k, input_precision="ieee")
                else:
                    dq = tl.dot(tl.trans(dsT.to(k.dtype)), k)
                tl.atomic_add(dq_head + (rows * stride_dqm)[:, None] + offs_d[None, :], dq * scale, mask=mask_qd)

    dk_base = b64 * stride_dkb + hk64 * stride_dkh + key0 * stride_dkn  # int64
    dk_offs = offs_nb[:, None] * stride_dkn + offs_d[None, :]           # int32, inside the block
    tl.store(dk_ptr + dk_base + dk_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask_kd)
    tl.store(dv_ptr + dk_base + dk_offs, dv.to(dv_ptr.dtype.element_ty), mask=mask_kd)


@triton.jit
def attention_bwd_dq_kernel(
    q_ptr, dout_ptr,     # (batch, seqlen_q, heads_q, head_dim) or packed (total_q, heads_q, head_dim)
    k_ptr, v_ptr,        # (batch, seqlen_k, heads_kv, head_dim) or packed (total_k, heads_kv, head_dim)
    lse_ptr, delta_ptr,  # fp32 (batch, heads_q, seqlen_q) or (heads_q, total_q)
    dq_ptr,              # q's shape and dtype, contiguous, written once per (query block, q head)
    cu_q_ptr, cu_k_ptr,  # int32 (batch+1,) when VARLEN
    alibi_ptr,           # fp32 (heads_q,) or (batch, heads_q) when ALIBI
    seqlen_q, seqlen_k,  # dense lengths (unused when VARLEN)
    head_dim,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_lseb, stride_lseh, stride_lsem,
    stride_deltab, stride_deltah, stride_deltam,
    stride_dqb, stride_dqm, stride_dqh,       # last dim contiguous
    stride_ab, stride_ah,
    scale, softcap,
    window_left, window_right,  # as in the dK/dV kernel
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    q_start = 0
    k_start = 0
    sq = seqlen_q
    sk = seqlen_k
    if VARLEN:
        q_start = tl.load(cu_q_ptr + b)
        sq = tl.load(cu_q_ptr + b + 1) - q_start
        k_start = tl.load(cu_k_ptr + b)
        sk = tl.load(cu_k_ptr + b + 1) - k_start
    m0 = pid_m * BLOCK_M
    if m0 >= sq:
        return

    # 64-bit bases (batch, head, block start: products that pass 2^31 elements on large inputs, e.g. 1M tokens x
    # 32 heads x 128), int32 offsets inside a block (index in tile * stride, kept below 2^31 by the launcher).
    b64 = tl.cast(b, tl.int64)
    h64 = tl.cast(h, tl.int64)
    hk64 = tl.cast(hk, tl.int64)
    row0 = tl.cast(q_start, tl.int64) + m0  # this program's first query row
    k_start64 = tl.cast(k_start, tl.int64)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_mb
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < sq
    mask_qd = mask_m[:, None] & (offs_d[None, :] < head_dim)
    q = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + row0 * stride_qm
                + offs_mb[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask_qd, other=0.0)
    do = tl.load(dout_ptr + b64 * stride_dob + h64 * stride_doh + row0 * stride_dom
                 + offs_mb[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask_qd, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + b64 * stride_lseb + h64 * stride_lseh + row0 * stride_lsem + offs_mb * stride_lsem,
                  mask=mask_m, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_ptr + b64 * stride_deltab + h64 * stride_deltah + row0 * stride_deltam
                    + offs_mb * stride_deltam, mask=mask_m, other=0.0)
    slope = 0.0
    if ALIBI:
        slope = tl.load(alibi_ptr + b64 * stride_ab + h64 * stride_ah)

    n_lo = 0
    n_hi = sk
    if WINDOW:
        n_lo = tl.maximum(m0 + (sk - sq) - window_left, 0)
        n_lo = (n_lo // BLOCK_N) * BLOCK_N
        n_hi = tl.minimum(m0 + BLOCK_M + (sk - sq) + window_right, sk)

    # the head's key 0; the keys of each block below are int64 (key * stride passes 2^31 elements on long
    # sequences; computed inside the loop: offsets hoisted out of it would stay live in registers)
    k_head = k_ptr + b64 * stride_kb + k_start64 * stride_kn + hk64 * stride_kh
    v_head = v_ptr + b64 * stride_vb + k_start64 * stride_vn + hk64 * stride_vh
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + offs_nb
        keys = offs_n.to(tl.int64)
        mask_kd = (offs_n[:, None] < sk) & (offs_d[None, :] < head_dim)
        k = tl.load(k_head + (keys * stride_kn)[:, None] + offs_d[None, :] * stride_kd, mask=mask_kd, other=0.0)
        v = tl.load(v_head + (keys * stride_vn)[:, None] + offs_d[None, :] * stride_vd, mask=mask_kd, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        s, t, allowed = _scores(qk, offs_m[:, None], offs_n[None, :], sq, sk, scale, softcap, slope,
                                window_left, window_right, SOFTCAP, ALIBI, WINDOW)
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        if UPCAST:
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        if UPCAST:
            acc += tl.dot(ds, k, input_precision="ieee")
        else:
            acc += tl.dot(ds.to(k.dtype), k)

    tl.store(dq_ptr + b64 * stride_dqb + h64 * stride_dqh + row0 * stride_dqm + offs_mb[:, None] * stride_dqm
             + offs_d[None, :],
             (acc * scale).to(dq_ptr.dtype.element_ty), mask=mask_qd)


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
PREPROCESS_BLOCK_M = 64
# "Unbounded" window side: larger than any sequence, small enough that i + sk - sq +/- it stays in int32.
UNBOUNDED = 1 << 30


# Every output buffer comes from here, so tests can poison it (fill with NaN) and catch unwritten elements.
_empty = torch.empty


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of an lse/delta tensor: (batch, heads, seqlen), or (heads, total) for varlen."""
    if varlen:
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def _seq_strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, row, head, dim) strides of a (batch, seqlen, heads, dim) or packed (total, heads, dim) tensor."""
    if varlen:
        return (0,) + tuple(x.stride())
    return tuple(x.stride())


def _launch(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left,
            window_right, softcap, deterministic, cfg: Config):
    varlen = cu_seqlens_q is not None
    if varlen:
        total_q, heads_q, head_dim = q.shape
        heads_kv = k.shape[1]
        batch = cu_seqlens_q.shape[0] - 1
        seqlen_q, seqlen_k = total_q, k.shape[0]  # grid bounds; each program reads its own lengths
    else:
        batch, seqlen_q, heads_q, head_dim = q.shape
        seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    block_d = _block_d(head_dim)
    upcast = upcast_dots(q.dtype)
    # int32 offsets inside a tile (rows x head dim): a view with a huge row stride is copied first
    rows = max(cfg.BLOCK_M1, cfg.BLOCK_N1, cfg.BLOCK_M2, cfg.BLOCK_N2, PREPROCESS_BLOCK_M)
    tile = ((rows,) if varlen else (0, rows)) + (0, block_d)
    dout, q, k, v, out = (int32_tile_offsets(t, tile) for t in (dout, q, k, v, out))

    # Rows outside every packed sequence (cu_seqlens may end before the total) are never written by the kernels:
    # zeros for varlen. Empty inputs on either side make every gradient zero.
    zeros = varlen or q.numel() == 0 or k.numel() == 0 or batch == 0

    def alloc(shape, dtype):
        return (torch.zeros if zeros else _empty)(shape, device=q.device, dtype=dtype)

    dk = alloc(k.shape, k.dtype)
    dv = alloc(v.shape, v.dtype)
    if q.numel() == 0 or k.numel() == 0 or batch == 0:
        return alloc(q.shape, q.dtype), dk, dv

    delta = torch.empty(lse.shape, device=q.device, dtype=torch.float32)
    if deterministic:
        dq = alloc(q.shape, q.dtype)
        dq_acc = dq  # unused by the dK/dV kernel
    else:
        dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dq_strides = (0,) + tuple(dq_acc.stride()[:2]) if varlen else tuple(dq_acc.stride()[:3])
    dk_strides = (0,) + tuple(dk.stride()[:2]) if varlen else tuple(dk.stride()[:3])

    cu_q = cu_seqlens_q if varlen else q  # dummy pointers when unused (never dereferenced)
    cu_k = cu_seqlens_k if varlen else q
    has_alibi = alibi_slopes is not None
    if has_alibi:
        alibi_strides = (0, alibi_slopes.stride(0)) if alibi_slopes.dim() == 1 else tuple(alibi_slopes.stride())
    else:
        alibi_strides = (0, 0)
    alibi = alibi_slopes if has_alibi else q
    if causal:  # as FlashAttention: causal is the window (left, 0)
        window_right = 0
    windowed = causal or window_left >= 0 or window_right >= 0
    wl = UNBOUNDED if window_left < 0 else window_left
    wr = UNBOUNDED if window_right < 0 else window_right
    has_softcap = softcap > 0.0

    q_s, do_s, k_s, v_s = (_seq_strides(t, varlen) for t in (q, dout, k, v))
    lse_s = _lse_strides(lse, varlen)
    delta_s = _lse_strides(delta, varlen)

    # Grids (blocks, heads, batch): the y and z sizes are limited to 65535 each, x to 2**31 - 1.
    attention_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, PREPROCESS_BLOCK_M), heads_q, batch)](
        out, dout, delta, cu_q, seqlen_q, head_dim,
        *_seq_strides(out, varlen), *do_s, *delta_s,
        BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=block_d, VARLEN=varlen,
    )
    attention_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, cfg.BLOCK_N1), heads_kv, batch)](
        q, dout, k, v, lse, delta, dq_acc, dk, dv, cu_q, cu_k, alibi,
        seqlen_q, seqlen_k, head_dim,
        *q_s, *do_s, *k_s, *v_s, *lse_s, *delta_s, *dq_strides, *dk_strides, *alibi_strides,
        softmax_scale, softcap, wl, wr,
        GROUP=group, BLOCK_M=cfg.BLOCK_M1, BLOCK_N=cfg.BLOCK_N1, BLOCK_D=block_d,
        VARLEN=varlen, WINDOW=windowed, SOFTCAP=has_softcap, ALIBI=has_alibi,
        ATOMIC_DQ=not deterministic, UPCAST=upcast,
        num_warps=cfg.warps1, num_stages=cfg.stages1,
    )
    if deterministic:
        attention_bwd_dq_kernel[(triton.cdiv(seqlen_q, cfg.BLOCK_M2), heads_q, batch)](
            q, dout, k, v, lse, delta, dq, cu_q, cu_k, alibi,
            seqlen_q, seqlen_k, head_dim,
            *q_s, *do_s, *k_s, *v_s, *lse_s, *delta_s, *dq_strides, *alibi_strides,
            softmax_scale, softcap, wl, wr,
            GROUP=group, BLOCK_M=cfg.BLOCK_M2, BLOCK_N=cfg.BLOCK_N2, BLOCK_D=block_d,
            VARLEN=varlen, WINDOW=windowed, SOFTCAP=has_softcap, ALIBI=has_alibi, UPCAST=upcast,
            num_warps=cfg.warps2, num_stages=cfg.stages2,
        )
    else:
        dq = dq_acc.to(q.dtype)
    return dq, dk, dv


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


_tuner = Autotuner()


def _choose(args) -> Config:
    """The candidates for this head dim, timed once per (dtype, head dim, length buckets, masking, dQ mode, GQA
    ratio)."""
    dout, q, k, v, out, lse, cu_q, cu_k, alibi, scale, causal, wl, wr, softcap, deterministic = args
    block_d = _block_d(q.shape[-1])
    lengths = (q.shape[0], k.shape[0]) if cu_q is not None else (q.shape[1], k.shape[1])  # packed totals for varlen
    key = (q.dtype, block_d, *(pow2_bucket(n, 16384) for n in lengths), cu_q is not None,
           causal or wl >= 0 or wr >= 0, deterministic, q.shape[-2] // k.shape[-2])
    return _tuner.choose(q.device, configs_for(capability(q.device), block_d), key, lambda cand: _launch(*args, cand))


def attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale: float,
                  causal: bool, window_left: int, window_right: int, softcap: float, deterministic: bool,
                  config: Config | None = None):
    """Launch the backward; returns (dq, dk, dv) in the dtypes and shapes of q, k, v. Arguments in the order of
    the op torch.ops.turbokernels.attention_bwd (which checks them): q/out/dout (batch, seqlen_q, heads_q, d) and
    k/v (batch, seqlen_k, heads_kv, d), or packed (total, heads, d) with int32 cu_seqlens_q/k (batch+1,); lse fp32
    (batch, heads_q, seqlen_q) or (heads_q, total_q), natural log, -inf for rows with no key; alibi_slopes fp32
    (heads_q,) or (batch, heads_q) or None; window sides -1 for unbounded; softcap 0 for none. `config` overrides
    the choice (tests cover every shipped config with it). No host synchronization: varlen grids are sized by the
    packed totals."""
    args = (dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, softmax_scale, causal, window_left,
            window_right, softcap, deterministic)
    return _launch(*args, config or _choose(args))
