"""KV-cache append in Triton: write k_new, v_new (B, T, Hkv, D) into the caches in place, k_new optionally rotated.

The convention (python/turbokernels/reference/decode_attention.py is the spec, FlashAttention's
flash_attn_with_kvcache the model): new token t of sequence b goes to slot pos = cache_seqlens[b] + t of cache row
cache_batch_idx[b] (default b), or of page block_table[b, pos // page_size] at offset pos % page_size when the cache
is paged. With rotary_cos / rotary_sin (seqlen_ro, rotary_dim / 2), the first rotary_dim dims of the key are
rotated first, at the token's position counted from its left pad, rpos = pos - cache_leftpad[b] (transformers'
position_ids of a left-padded batch; FlashAttention's flash_attn_with_kvcache rotates at the absolute slot, which is
this without cache_leftpad -- integrations/flash_attn.py passes none here):

    out[i] = x[i] * cos[rpos, f(i)] - x[p(i)] * sin[rpos, f(i)]    for the first element i of each rotated pair
    out[i] = x[i] * cos[rpos, f(i)] + x[p(i)] * sin[rpos, f(i)]    for the second
    GPT-NeoX (not interleaved): pairs (i, i + r/2), f(i) = i mod r/2;  GPT-J (interleaved): pairs (2j, 2j+1), f = i/2

computed in fp32 from the inputs' exact values and rounded once to the cache's dtype -- the reference's operations,
without fused multiply-adds (the launcher turns fp fusion off), so the kernel and the reference agree bit for bit.

An append moves a few kilobytes per token and does a few flops per byte: the run time is a launch plus the time to
stream k_new / v_new in and the cache rows out. One kernel, grid (B * T, head blocks): one program per new token and
block of BLOCK_H kv heads, the whole head dim (up to MAX_HEAD_DIM). The grid is sized from the shapes only, never
from the values of cache_seqlens (no host sync: CUDA-graph capturable, torch.compile safe). The partner of a rotated
element is loaded again from k_new (an L1 hit), not shuffled between lanes: either pairing and rotary_dim <
head_dim are then the same code.
Read top to bottom: configs, kernel, launcher.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import int32_tile_offsets


# ---------------------------------------------------------------------------------------------------------------
# Configs. No autotuning: an append is a memory copy of B * T * Hkv * D elements per cache, too small and too
# simple for a timed choice to pay for itself. The tile is BLOCK_H heads x BLOCK_D dims, loaded along the
# contiguous head dim (16-byte vectors); at most TILE_ELEMENTS per program keeps the rotary path (the key, its
# partner, cos and sin in fp32, and their 64-bit addresses) within the registers without spills, as the codegen test
# in tests/test_kv_cache_append.py checks for sm_80 and sm_90.
# ---------------------------------------------------------------------------------------------------------------
MAX_HEAD_DIM = 256      # decode_attention's limit too; the backend's check sends larger head dims to the reference
TILE_ELEMENTS = 2048    # BLOCK_H * BLOCK_D at most (8 kv heads of d = 256 ... 16 of d = 128 ... 32 of d = 64)
ELEMENTS_PER_WARP = 256  # 8 per lane: one 16-byte vector of fp16/bf16 (two of fp32)


def block_sizes(heads_kv: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) for a cache of `heads_kv` heads of `head_dim` (<= MAX_HEAD_DIM)."""
    block_d = triton.next_power_of_2(max(head_dim, 1))
    block_h = min(triton.next_power_of_2(max(heads_kv, 1)), max(1, TILE_ELEMENTS // block_d))
    num_warps = max(1, min(4, block_h * block_d // ELEMENTS_PER_WARP))
    return block_h, block_d, num_warps


# ---------------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def kv_cache_append_kernel(
    k_cache_ptr, v_cache_ptr,  # (B_cache, S, Hkv, D), or (num_pages, page_size, Hkv, D) when PAGED; unit stride in d
    k_new_ptr, v_new_ptr,      # (B, T, Hkv, D) any strides (transposed, expanded...), the caches' dtype
    seqlens_ptr,               # (B,) int32: tokens already in each sequence's cache (new token t goes to slot L_b + t)
    block_table_ptr,           # (B, max_pages) int32, unit column stride, when PAGED (else unused)
    batch_idx_ptr,             # (B,) int32 cache row of each sequence when HAS_BATCH_IDX (contiguous caches only)
    leftpad_ptr,               # (B,) int32 first slot of each sequence's cache when HAS_LEFTPAD (rotary positions)
    cos_ptr, sin_ptr,          # (seqlen_ro, ROT_HALF) contiguous, k_new's dtype, when ROTARY
    T, Hkv, D,                 # new tokens, kv heads, head dim
    capacity,                  # slots a sequence can hold (S, or max_pages * page_size)
    page_size,                 # PAGED: slots per page
    seqlen_ro,                 # ROTARY: rows of cos / sin (positions 0 .. seqlen_ro - 1)
    stride_kcb, stride_kcn, stride_kch,  # k cache: row (or page), slot, head
    stride_vcb, stride_vcn, stride_vch,  # v cache: the same (a cache view of a wider buffer has its own strides)
    stride_knb, stride_knt, stride_knh, stride_knd,  # k_new: batch, token, head, dim
    stride_vnb, stride_vnt, stride_vnh, stride_vnd,  # v_new
    stride_btb,                # block table row stride
    BLOCK_H: tl.constexpr,     # kv heads per program
    BLOCK_D: tl.constexpr,     # head dim padded to a power of two
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    ROTARY: tl.constexpr,
    ROT_HALF: tl.constexpr,    # ROTARY: rotary_dim / 2 (a model has one: a constant keeps the partner offsets
                               # compile-time bounded, so that they scale k_new's head-dim stride in 32 bits)
    INTERLEAVED: tl.constexpr,  # ROTARY: GPT-J pairs (2j, 2j+1); else GPT-NeoX halves (j, j + ROT_HALF)
):
    pid = tl.program_id(0)     # one new token (b, t)
    hb = tl.program_id(1)      # one block of kv heads
    b = pid // T
    t = pid % T
    b64 = b.to(tl.int64)
    pos = tl.load(seqlens_ptr + b) + t
    # The entry checks every length (and page) before the launch; a slot outside the cache is still never written
    # (nor its page read), whoever calls the launcher.
    if (pos < 0) | (pos >= capacity):
        return

    # Address offsets are int64 where they can pass 2^31 elements: row / page, slot and head times their strides
    # (a 2M-slot cache of 8 heads x 128 has 2^31 elements), batch and token of k_new / v_new; only the head-dim part
    # of a tile stays int32 (unit stride in the caches; the launcher keeps k_new's and v_new's below 2^31).
    if PAGED:
        page = tl.load(block_table_ptr + b64 * stride_btb + pos // page_size).to(tl.int64)
        slot = (pos % page_size).to(tl.int64)
        k_row = page * stride_kcb + slot * stride_kcn
        v_row = page * stride_vcb + slot * stride_vcn
    else:
        if HAS_BATCH_IDX:
            row = tl.load(batch_idx_ptr + b).to(tl.int64)
        else:
            row = b64
        slot = pos.to(tl.int64)
        k_row = row * stride_kcb + slot * stride_kcn
        v_row = row * stride_vcb + slot * stride_vcn
    t64 = t.to(tl.int64)
    kn_base = k_new_ptr + b64 * stride_knb + t64 * stride_knt
    vn_base = v_new_ptr + b64 * stride_vnb + t64 * stride_vnt

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h64 = offs_h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < Hkv)[:, None] & (offs_d < D)[None, :]
    kn_heads = kn_base + (h64 * stride_knh)[:, None]
    k = tl.load(kn_heads + (offs_d * stride_knd)[None, :], mask=mask, other=0.0)
    if ROTARY:
        rpos = pos
        if HAS_LEFTPAD:
            rpos = pos - tl.load(leftpad_ptr + b)
        # the entry checked 0 <= rpos < seqlen_ro; cos / sin are still never read outside (the key stays as is)
        in_rot = (offs_d < 2 * ROT_HALF) & (rpos >= 0) & (rpos < seqlen_ro)
        # the partner's index and the cos / sin column by arithmetic on the tile index and constants (no select):
        # compile-time bounded, the partner's offset stays a 32-bit product (testing.int32_stride_products)
        if INTERLEAVED:
            first = (offs_d % 2) == 0                 # x[2j] pairs with x[2j+1]
            partner = offs_d + 1 - 2 * (offs_d % 2)
            freq = offs_d // 2
        else:
            first = offs_d < ROT_HALF                 # x[j] pairs with x[j + r/2]
            partner = (offs_d + ROT_HALF) % (2 * ROT_HALF)
            freq = offs_d % ROT_HALF
        kp = tl.load(kn_heads + (partner * stride_knd)[None, :], mask=mask & in_rot[None, :], other=0.0)
        cs = rpos.to(tl.int64) * ROT_HALF + freq
        c = tl.load(cos_ptr + cs, mask=in_rot, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + cs, mask=in_rot, other=0.0).to(tl.float32)[None, :]
        kf = k.to(tl.float32)
        kpf = kp.to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half = (-partner, partner) for (first, second) of a pair: each
        # product and the sum rounded in fp32 as the reference's (a - b is a + (-b) exactly), then once to the
        # cache dtype. Dims past rotary_dim keep their bits (the where, not a multiply by cos = 1, sin = 0: a NaN or
        # inf partner must not leak in).
        rotated = tl.where(first[None, :], kf * c - kpf * s, kf * c + kpf * s)
        k = tl.where(in_rot[None, :], rotated.to(k.dtype), k)
    tl.store(k_cache_ptr + k_row + (h64 * stride_kch)[:, None] + offs_d[None, :], k, mask=mask)
    v = tl.load(vn_base + (h64 * stride_vnh)[:, None] + (offs_d * stride_vnd)[None, :], mask=mask, other=0.0)
    tl.store(v_cache_ptr + v_row + (h64 * stride_vch)[:, None] + offs_d[None, :], v, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
def kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None, cache_batch_idx=None,
                    cache_leftpad=None, rotary_cos=None, rotary_sin=None,
                    rotary_interleaved: bool = False) -> torch.Tensor:
    """Launch (arguments already checked by turbokernels.kv_cache_append; the caches are written in place) and
    return the new lengths cache_seqlens + T."""
    B, T, Hkv, D = k_new.shape
    if k_new.numel() == 0:
        return cache_seqlens + T
    block_h, block_d, num_warps = block_sizes(Hkv, D)
    # the kernel's int32 offsets along k_new's / v_new's head dim (any stride): a view with a huge one is copied
    k_new = int32_tile_offsets(k_new, (0, 0, 0, block_d))
    v_new = int32_tile_offsets(v_new, (0, 0, 0, block_d))
    # index vectors and cos / sin are read with unit strides: a view that is not is copied (no-op for the usual ones)
    seqlens = cache_seqlens.contiguous()
    paged = block_table is not None
    if paged and block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    rotary = rotary_cos is not None
    if rotary:
        rotary_cos, rotary_sin = rotary_cos.contiguous(), rotary_sin.contiguous()
    has_batch_idx, has_leftpad = cache_batch_idx is not None, cache_leftpad is not None
    batch_idx = cache_batch_idx.contiguous() if has_batch_idx else seqlens  # unused pointers: any tensor
    leftpad = cache_leftpad.contiguous() if has_leftpad else seqlens
    bt = block_table if paged else seqlens
    cos, sin = (rotary_cos, rotary_sin) if rotary else (k_new, k_new)
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    kv_cache_append_kernel[(B * T, triton.cdiv(Hkv, block_h))](
        k_cache, v_cache, k_new, v_new, seqlens, bt, batch_idx, leftpad, cos, sin,
        T, Hkv, D, capacity, page_size, rotary_cos.shape[0] if rotary else 0,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *k_new.stride(), *v_new.stride(),
        bt.stride(0) if paged else 0,
        BLOCK_H=block_h, BLOCK_D=block_d, PAGED=paged, HAS_BATCH_IDX=has_batch_idx, HAS_LEFTPAD=has_leftpad,
        ROTARY=rotary, ROT_HALF=rotary_cos.shape[1] if rotary else 0, INTERLEAVED=bool(rotary_interleaved) and rotary,
        num_warps=num_warps, num_stages=1,
        # the rotation's x * cos -/+ x' * sin as two products and a sum, each rounded, as the reference computes
        # it: a contracted fma would round once less and differ from it in the last bit
        enable_fp_fusion=False,
    )
    return cache_seqlens + T
