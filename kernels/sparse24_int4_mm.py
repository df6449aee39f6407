"""int4 + 2:4 sparse matmul in Triton (the Sparse-Marlin idea): out (M, N) = x (M, K) @ W.T [+ bias (N,)], W (N, K)
2:4-sparse with its kept values quantized to int4, read compressed.

The weight is turbokernels.Sparse24Int4Weight (python/turbokernels/formats/sparse24_int4.py): an Int4Weight over the
compressed (N, K/2) values, i.e. qweight int32 (ceil(K/16), N) whose word [j, n] holds the 8 kept values of dense
columns 16j..16j+15 of row n, (G, N) scales/offsets per group of `group_size` KEPT values, and the 2:4 meta int16
(N, ceil(K/16)) whose element [n, j] describes the same 16 columns. So per K tile of BLOCK_K dense columns the
program loads a (BLOCK_K/16, BLOCK_N) tile of words and the matching (BLOCK_K/16, BLOCK_N) tile of meta, unpacks and
dequantizes the int4 values in registers (as kernels/int4_mm.py), scatters them to their dense columns (as
kernels/sparse24_mm.py) and feeds the dense (BLOCK_K, BLOCK_N) tile to tl.dot. The FLOPs are dense; the bytes are
0.25 + 0.125 (meta) per dense element plus scales, ~0.2 of dense fp16.

One kernel serves both regimes; the launcher picks the config by M:
  * decode (M <= 16): tiles 16 rows tall and split-K, the fp32 partial sums added by the launcher.
  * GEMM (M > 16): classic tiles.
The bias is added to the fp32 sum before its one rounding to the output dtype, as torch's F.linear does: by the
kernel in its epilogue, or, when K is split, by the launcher to the sum of the partials.
Read top to bottom: configs, kernel, launcher.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (DECODE_MAX_M, Autotuner, GemmConfig, capability, nearest_arch, pow2_bucket, split_k_output,
                      split_k_plan, split_k_result, upcast_dots)


# ---------------------------------------------------------------------------------------------------------------
# Configs, per GPU architecture (compute capability major*10+minor; the nearest lower key applies).
# Every shipped config is compiled by tests/test_sparse24_int4_mm.py (codegen): no register spills, shared memory
# within the part's limit, wgmma on sm_90 for the 64+ row tiles, mma.sync elsewhere. BLOCK_K is a power of two
# >= 16 (one meta element / one int4 word row covers 16 dense columns).
# ---------------------------------------------------------------------------------------------------------------
Config = GemmConfig

CONFIGS = {
    # Hopper (H100/H200): 228 KB shared memory per SM, wgmma for the 64+ row tiles.
    90: {
        "decode": [Config(16, 64, 128, 4, 4, 4), Config(16, 128, 128, 2, 8, 3), Config(16, 64, 256, 8, 8, 3),
                   Config(16, 32, 128, 8, 4, 4)],
        "gemm": [Config(128, 128, 64, 1, 8, 3), Config(64, 128, 64, 1, 8, 3), Config(128, 64, 64, 1, 8, 3),
                 Config(64, 64, 64, 1, 4, 4)],
    },
    # Ampere datacenter (A100): 164 KB shared memory, mma.sync.
    80: {
        "decode": [Config(16, 64, 128, 4, 4, 4), Config(16, 128, 64, 2, 4, 4), Config(16, 32, 128, 8, 4, 4)],
        "gemm": [Config(128, 128, 32, 1, 8, 3), Config(64, 128, 32, 1, 4, 4), Config(64, 64, 64, 1, 4, 4)],
    },
}


def configs_for(cap: int, decode: bool) -> list[Config]:
    return CONFIGS[nearest_arch(CONFIGS, cap)]["decode" if decode else "gemm"]


# ---------------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def sparse24_int4_mm_kernel(
    x_ptr,          # (M, K) activations, fp16/bf16/fp32, any strides
    qweight_ptr,    # (ceil(K/16), N) int32, contiguous: nibble i of word [j, n] is kept value 8j + i of row n
    scales_ptr,     # (G, N) contiguous, any float dtype
    offsets_ptr,    # (G, N) contiguous, any float dtype
    meta_ptr,       # (N, ceil(K/16)) int16, row stride stride_mn: nibble g of element [n, j] = idx0 | idx1 << 2 of
                    # the group of dense columns 16*j + 4*g .. +3
    bias_ptr,       # (N,) contiguous, any float dtype; never read without HAS_BIAS (the launcher then passes x)
    out_ptr,        # (M, N) in x's dtype when SPLIT_K == 1, else (SPLIT_K, M, N) fp32 partial sums
    M, N, K,
    group_size,     # KEPT values per scale/offset row (the last group may be shorter)
    stride_xm, stride_xk,
    stride_mn,
    stride_os, stride_om, stride_on,  # out strides: split, row, column
    k_per_split,    # dense K columns handled by one program along grid axis 1 (a multiple of BLOCK_K)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K: dense columns, >= 16
    GROUP_M: tl.constexpr,             # tiles along M that share weight tiles in L2 (swizzled launch order)
    ONE_GROUP_PER_TILE: tl.constexpr,  # BLOCK_K/2 divides group_size: one scale row per K tile; else a tile spans
                                       # two groups (the launcher keeps BLOCK_K/2 <= group_size)
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,            # add bias[n] to the fp32 accumulator before the store (SPLIT_K == 1 only:
                                       # with partial sums the launcher adds it to their sum, once)
    UPCAST: tl.constexpr,              # dot in fp32 ("ieee") for fp32 activations, and for bf16 under the
                                       # interpreter, whose bf16 arithmetic is wrong
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    K16 = (K + 15) // 16            # rows of qweight = columns of meta
    G = tl.cdiv(K // 2, group_size)
    offs_j = tl.arange(0, BLOCK_K // 16)
    # Dense column 16*j + t of a word row j: t = 4*g + p, group g (nibble g of meta, nibbles 2g, 2g+1 of the int4
    # word), position p inside the group. (BLOCK_K/16, 16, BLOCK_N) tiles reshape row-major to (BLOCK_K, BLOCK_N).
    t = tl.arange(0, 16)
    g_t = (t // 4)[None, :, None]
    p_t = (t % 4)[None, :, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_stop = min(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        rows = k0 // 16 + offs_j
        wmask = (rows[:, None] < K16) & mask_n[None, :]
        words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=wmask, other=0)
        e = tl.load(meta_ptr + offs_n[None, :] * stride_mn + rows[:, None], mask=wmask, other=0).to(tl.int32)
        nib = (e[:, None, :] >> (4 * g_t)) & 0xF
        sel0 = (nib & 0x3) == p_t
        kept = sel0 | ((nib >> 2) == p_t)
        wd = words[:, None, :]
        q = tl.where(sel0, wd >> (8 * g_t), wd >> (8 * g_t + 4)) & 0xF
        g = (k0 // 2) // group_size
        s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, None, :]
        o = tl.load(offsets_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, None, :]
        if not ONE_GROUP_PER_TILE:
            # BLOCK_K/2 <= group_size: the tile's kept values reach at most into the next group.
            g_next = min(g + 1, G - 1)
            s_next = tl.load(scales_ptr + g_next * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, None, :]
            o_next = tl.load(offsets_ptr + g_next * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, None, :]
            c = k0 // 2 + 8 * offs_j[:, None, None] + 2 * g_t + tl.where(sel0, 0, 1)  # kept-value index
            in_next = c >= (g + 1) * group_size
            s = tl.where(in_next, s_next, s)
            o = tl.where(in_next, o_next, o)
        w = tl.reshape(tl.where(kept, q.to(tl.float32) * s + o, 0.0), (BLOCK_K, BLOCK_N))
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))

    if HAS_BIAS:
        if SPLIT_K == 1:  # in fp32, so that the store is the output's only rounding
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
MIN_GROUP_SIZE = 8  # kept values: a K tile is >= 16 dense columns (8 kept values) and spans at most two groups


def _fit_block_k(cfg: Config, group_size: int) -> tuple[int, bool]:
    """(BLOCK_K in dense columns, one group per tile) for `group_size` kept values per group: BLOCK_K/2 divides
    group_size when a power of two >= 8 does, else BLOCK_K/2 is the largest power of two <= group_size, so a tile
    spans at most two groups."""
    if group_size < MIN_GROUP_SIZE:
        raise ValueError(f"sparse24_int4_mm (triton): group_size={group_size} kept values < {MIN_GROUP_SIZE}")
    if group_size % (cfg.BLOCK_K // 2) == 0:
        return cfg.BLOCK_K, True
    bk = min(cfg.BLOCK_K, 2 * (group_size & -group_size))
    if bk >= 16:
        return bk, True
    return min(cfg.BLOCK_K, 2 * (1 << (group_size.bit_length() - 1))), False


# Every output buffer comes from here, so tests can poison it (fill with NaN) and catch unwritten elements.
_empty = torch.empty


def _launch(x, qweight, scales, offsets, meta, group_size, bias, cfg: Config):
    M, K = x.shape
    N = qweight.shape[1]
    block_k, one_group = _fit_block_k(cfg, group_size)
    split_k, k_per_split = split_k_plan(K, block_k, cfg.SPLIT_K)
    out, strides = split_k_output(_empty, M, N, split_k, x)
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N), split_k)
    sparse24_int4_mm_kernel[grid](
        x, qweight, scales, offsets, meta, x if bias is None else bias, out, M, N, K, group_size,
        x.stride(0), x.stride(1), meta.stride(0), *strides, k_per_split,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=block_k, GROUP_M=cfg.GROUP_M,
        ONE_GROUP_PER_TILE=one_group, SPLIT_K=split_k, HAS_BIAS=bias is not None, UPCAST=upcast_dots(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return split_k_result(out, split_k, x.dtype, bias)


_tuner = Autotuner()


def _choose(x, qweight, scales, offsets, meta, group_size, bias) -> Config:
    """The architecture's candidates for this M regime, timed once per (dtype, M bucket, N, K, group size)."""
    M, K = x.shape
    candidates = configs_for(capability(x.device), M <= DECODE_MAX_M)
    key = (x.dtype, pow2_bucket(M, 4096), qweight.shape[1], K, group_size)
    return _tuner.choose(x.device, candidates, key,
                         lambda cand: _launch(x, qweight, scales, offsets, meta, group_size, bias, cand))


def sparse24_int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                     meta: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                     config: Config | None = None) -> torch.Tensor:
    """Launch: x (M, K) float, qweight (ceil(K/16), N) int32, scales/offsets (G, N), meta (N, ceil(K/16)) int16,
    group_size in kept values, optional bias (N,) -> (M, N) in x's dtype. `config` overrides the choice (tests
    cover every config)."""
    bias = None if bias is None else bias.contiguous()
    cfg = config or _choose(x, qweight, scales, offsets, meta, group_size, bias)
    return _launch(x, qweight, scales, offsets, meta, group_size, bias, cfg)
