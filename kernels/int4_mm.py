"""int4 weight-only matmul in Triton: out (M, N) = x (M, K) @ dequant(qweight) (K, N) [+ bias (N,)].

The weight is turbokernels.Int4Weight (python/turbokernels/formats/int4.py): qweight int32 (ceil(K/8), N) with 8
consecutive k in one word, and (G, N) scales and offsets, W[k, n] = q * scale[k // group_size, n] + offset[...].

One kernel serves both regimes; the launcher picks the config by M:
  * decode (M <= 16): the run time is the time to stream the weight once, so tiles are 16 rows tall (the smallest
    tensor-core M) and K is split across programs (SPLIT_K) to put enough loads in flight on every SM; the
    partial sums (fp32) are added by the launcher.
  * GEMM (M > 16): classic tiles with tl.dot; the int4 tile is unpacked and scaled in registers, so the weight
    still crosses HBM as 4 bits per element.
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
# Every shipped config is compiled by tests/test_codegen.py: no register spills (the fp32 dequantized tile costs
# registers, which is why the 128x128 Ampere tile uses BLOCK_K=32; 128x256 tiles spill with triton 3.6, the GPU
# image's version), shared memory within the part's limit, wgmma on sm_90 for the 64+ row tiles, mma.sync elsewhere.
# ---------------------------------------------------------------------------------------------------------------
Config = GemmConfig

CONFIGS = {
    # Hopper (H100/H200): 228 KB shared memory per SM, wgmma for the 64+ row tiles.
    90: {
        "decode": [Config(16, 64, 128, 4, 4, 4), Config(16, 128, 128, 2, 4, 4), Config(16, 64, 256, 8, 4, 3),
                   Config(16, 32, 128, 8, 4, 4)],
        "gemm": [Config(128, 128, 64, 1, 8, 3), Config(64, 128, 64, 1, 4, 4), Config(128, 128, 32, 1, 8, 4),
                 Config(64, 64, 64, 1, 4, 4)],
    },
    # Ampere datacenter (A100): 164 KB shared memory, mma.sync.
    80: {
        "decode": [Config(16, 64, 128, 4, 4, 4), Config(16, 128, 64, 2, 4, 4), Config(16, 32, 128, 8, 4, 4)],
        "gemm": [Config(128, 128, 32, 1, 8, 3), Config(64, 128, 32, 1, 4, 4), Config(64, 64, 64, 1, 4, 4)],
    },
    # Ampere/Ada consumer (sm_86, sm_89): ~100 KB shared memory: fewer stages.
    86: {
        "decode": [Config(16, 64, 128, 4, 4, 3), Config(16, 32, 128, 8, 4, 3)],
        "gemm": [Config(64, 128, 32, 1, 4, 3), Config(128, 128, 32, 1, 8, 2), Config(64, 64, 64, 1, 4, 3)],
    },
}
# Shared memory per block that each architecture allows (bytes), for the static checks.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def configs_for(cap: int, decode: bool) -> list[Config]:
    return CONFIGS[nearest_arch(CONFIGS, cap)]["decode" if decode else "gemm"]


# ---------------------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def int4_mm_kernel(
    x_ptr,          # (M, K) activations, fp16/bf16/fp32, any strides
    qweight_ptr,    # (ceil(K/8), N) int32, contiguous: nibble k%8 of word [k//8, n] is q[k, n]
    scales_ptr,     # (G, N) contiguous, any float dtype
    offsets_ptr,    # (G, N) contiguous, any float dtype
    bias_ptr,       # (N,) contiguous, any float dtype; never read without HAS_BIAS (the launcher then passes x)
    out_ptr,        # (M, N) in x's dtype when SPLIT_K == 1, else (SPLIT_K, M, N) fp32 partial sums
    M, N, K,
    group_size,     # rows of K per scale/offset row (the last group may be shorter)
    stride_xm, stride_xk,
    stride_os, stride_om, stride_on,  # out strides: split, row, column
    k_per_split,    # K rows handled by one program along grid axis 1 (a multiple of BLOCK_K)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,             # tiles along M that share weight tiles in L2 (swizzled launch order)
    ONE_GROUP_PER_TILE: tl.constexpr,  # BLOCK_K divides group_size: one scale row per K tile; else a tile spans
                                       # two groups (the launcher keeps BLOCK_K <= group_size)
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,            # add bias[n] to the fp32 accumulator before the store (SPLIT_K == 1 only:
                                       # with partial sums the launcher adds it to their sum, once)
    UPCAST: tl.constexpr,              # dot in fp32 ("ieee": torch does not use tf32 for fp32 matmul either) for
                                       # fp32 activations, and for bf16 under the interpreter, whose bf16
                                       # arithmetic is wrong (numpy works on the raw uint16 bits)
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
    K8 = (K + 7) // 8
    G = tl.cdiv(K, group_size)
    # Nibble i of a word is k = 8*word + i: shifting a (BLOCK_K/8, 1, BLOCK_N) tile of words by (1, 8, 1) shifts
    # and reshaping gives the (BLOCK_K, BLOCK_N) tile in k order, with each word loaded once.
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    offs_w = tl.arange(0, BLOCK_K // 8)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_stop = min(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        rows = k0 // 8 + offs_w
        words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=(rows[:, None] < K8) & mask_n[None, :], other=0)
        q = tl.reshape((words[:, None, :] >> shifts) & 0xF, (BLOCK_K, BLOCK_N)).to(tl.float32)
        g = k0 // group_size
        s = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        o = tl.load(offsets_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if not ONE_GROUP_PER_TILE:
            # BLOCK_K <= group_size, so the tile reaches at most into the next group (which exists when any
            # k of the tile is in it, since k < K).
            g_next = min(g + 1, G - 1)
            s_next = tl.load(scales_ptr + g_next * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            o_next = tl.load(offsets_ptr + g_next * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            in_next = (offs_k >= (g + 1) * group_size)[:, None]
            s = tl.where(in_next, s_next, s)
            o = tl.where(in_next, o_next, o)
        w = q * s + o
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
def _largest_pow2_divisor(n: int) -> int:
    return n & -n


MIN_GROUP_SIZE = 16  # tl.dot needs K tiles of 16; a tile may span at most two groups


def _fit_block_k(cfg: Config, group_size: int) -> tuple[int, bool]:
    """(BLOCK_K, one group per tile): a divisor of group_size when one >= 16 exists, else the largest power of
    two <= group_size, so that a tile spans at most two groups."""
    if group_size % cfg.BLOCK_K == 0:
        return cfg.BLOCK_K, True
    bk = min(cfg.BLOCK_K, _largest_pow2_divisor(group_size))
    if bk >= 16:
        return bk, True
    return min(cfg.BLOCK_K, 1 << (group_size.bit_length() - 1)), False


# Every output buffer comes from here, so tests can poison it (fill with NaN) and catch unwritten elements.
_empty = torch.empty


def _launch(x, qweight, scales, offsets, group_size, bias, cfg: Config):
    M, K = x.shape
    N = qweight.shape[1]
    block_k, one_group = _fit_block_k(cfg, group_size)
    split_k, k_per_split = split_k_plan(K, block_k, cfg.SPLIT_K)
    out, strides = split_k_output(_empty, M, N, split_k, x)
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N), split_k)
    int4_mm_kernel[grid](
        x, qweight, scales, offsets, x if bias is None else bias, out, M, N, K, group_size,
        x.stride(0), x.stride(1), *strides, k_per_split,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=block_k, GROUP_M=cfg.GROUP_M,
        ONE_GROUP_PER_TILE=one_group, SPLIT_K=split_k, HAS_BIAS=bias is not None, UPCAST=upcast_dots(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return split_k_result(out, split_k, x.dtype, bias)


_tuner = Autotuner()


def _choose(x, qweight, scales, offsets, group_size, bias) -> Config:
    """The architecture's candidates for this M regime, timed once per (dtype, M bucket, N, K, group size)."""
    M, K = x.shape
    candidates = configs_for(capability(x.device), M <= DECODE_MAX_M)
    key = (x.dtype, pow2_bucket(M, 4096), qweight.shape[1], K, group_size)
    return _tuner.choose(x.device, candidates, key,
                         lambda cand: _launch(x, qweight, scales, offsets, group_size, bias, cand))


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
            bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """Launch: x (M, K) float, qweight (ceil(K/8), N) int32, scales/offsets (G, N), optional bias (N,) -> (M, N) in
    x's dtype. `config` overrides the choice (tests use it to cover every shipped config)."""
    bias = None if bias is None else bias.contiguous()
    cfg = config or _choose(x, qweight, scales, offsets, group_size, bias)
    return _launch(x, qweight, scales, offsets, group_size, bias, cfg)
