"""2:4 sparse matmul in Triton: out (M, N) = x (M, K) @ W.T [+ bias (N,)], W (N, K) 2:4-sparse, read compressed.

The weight is turbokernels.Sparse24Weight (python/turbokernels/formats/sparse24.py): values (N, K/2) hold the two
kept values of every group of 4 columns, meta int16 (N, ceil(K/16)) holds per group the nibble idx0 | idx1 << 2
(group g of an element at bits 4*g). Triton has no sparse MMA (mma.sp), so each program expands its weight tile
to dense in registers and uses tl.dot: the FLOPs are dense, the bytes read from HBM are ~0.56 of dense (fp16).

One kernel serves both regimes; the launcher picks the config by M:
  * decode (M <= 16): the run time is the time to stream the weight once, so tiles are 16 rows tall (the smallest
    tensor-core M) and K is split across programs (SPLIT_K); the fp32 partial sums are added by the launcher.
  * GEMM (M > 16): classic tiles; the expansion is extra ALU work per weight tile, amortized over BLOCK_M rows.
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
# Every shipped config is compiled by tests/test_sparse24_mm.py (codegen): no register spills with triton 3.8 and
# 3.6, shared memory within the part's limit, wgmma on sm_90 for the 64+ row tiles, mma.sync elsewhere.
# BLOCK_K is a multiple of 16 (one meta element covers 16 columns). Registers are the tight resource: the expansion
# holds the compressed tile, the indices and the dense tile at once, and several configs sit at 254-255 registers
# with no spills (re-run the codegen test after any change to the kernel). Shared memory is the same for any
# num_stages: the weight loads feed register code, so Triton's pipeliner does not stage them through shared memory.
# ---------------------------------------------------------------------------------------------------------------
Config = GemmConfig

CONFIGS = {
    # Hopper (H100/H200): 228 KB shared memory per SM, wgmma for the 64+ row tiles.
    90: {
        "decode": [Config(16, 64, 128, 4, 4, 4), Config(16, 128, 128, 2, 8, 3), Config(16, 64, 256, 8, 4, 3),
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
def sparse24_mm_kernel(
    x_ptr,          # (M, K) activations, fp16/bf16/fp32, any strides
    values_ptr,     # (N, K/2) kept values, x's dtype, row stride stride_vn, unit column stride
    meta_ptr,       # (N, ceil(K/16)) int16, row stride stride_mn: nibble g of element [n, j] = idx0 | idx1 << 2 of
                    # the group of columns 16*j + 4*g .. +3
    bias_ptr,       # (N,) contiguous, any float dtype; never read without HAS_BIAS (the launcher then passes x)
    out_ptr,        # (M, N) in x's dtype when SPLIT_K == 1, else (SPLIT_K, M, N) fp32 partial sums
    M, N, K,
    stride_xm, stride_xk,
    stride_vn, stride_mn,
    stride_os, stride_om, stride_on,  # out strides: split, row, column
    k_per_split,    # K columns handled by one program along grid axis 1 (a multiple of BLOCK_K)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K: a multiple of 16
    GROUP_M: tl.constexpr,             # tiles along M that share weight tiles in L2 (swizzled launch order)
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
    half_k = K // 2
    meta_cols = (K + 15) // 16
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_e = tl.arange(0, BLOCK_K // 16)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_stop = min(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        cols_v = k0 // 2 + offs_v
        v = tl.load(values_ptr + offs_n[:, None] * stride_vn + cols_v[None, :],
                    mask=mask_n[:, None] & (cols_v[None, :] < half_k), other=0.0)
        cols_e = k0 // 16 + offs_e
        e = tl.load(meta_ptr + offs_n[:, None] * stride_mn + cols_e[None, :],
                    mask=mask_n[:, None] & (cols_e[None, :] < meta_cols), other=0)
        # Nibble g of meta element j describes group 4*j + g. join(a, b) appends a last axis of 2 (a at 0, b at 1),
        # so join(join(n0, n2), join(n1, n3)) holds nibble 2*i + i' at [.., j, i, i']: reshaped row-major to
        # (BLOCK_N, BLOCK_K/4), group 4*j + g gets nibble g.
        e = e.to(tl.int32)
        nib = tl.reshape(tl.join(tl.join(e & 0xF, (e >> 8) & 0xF), tl.join((e >> 4) & 0xF, (e >> 12) & 0xF)),
                         (BLOCK_N, BLOCK_K // 4))
        idx0 = nib & 0x3
        idx1 = nib >> 2
        if UPCAST:
            v = v.to(tl.float32)
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
        # Scatter each kept value to its column: w[n, 4g + p] = v0 if idx0 == p else (v1 if idx1 == p else 0),
        # one (BLOCK_N, BLOCK_K/4) tile per position p, interleaved back the same way as the nibbles.
        zero = tl.zeros_like(v0)
        w0 = tl.where(idx0 == 0, v0, zero)                              # idx1 > idx0 >= 0: never 0
        w1 = tl.where(idx0 == 1, v0, tl.where(idx1 == 1, v1, zero))
        w2 = tl.where(idx0 == 2, v0, tl.where(idx1 == 2, v1, zero))
        w3 = tl.where(idx1 == 3, v1, zero)                              # idx0 < idx1 <= 3: never 3
        w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, BLOCK_K))
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))

    if HAS_BIAS:
        if SPLIT_K == 1:  # in fp32, so that the store is the output's only rounding
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
# Every output buffer comes from here, so tests can poison it (fill with NaN) and catch unwritten elements.
_empty = torch.empty


def _launch(x, values, meta, bias, cfg: Config):
    M, K = x.shape
    N = values.shape[0]
    split_k, k_per_split = split_k_plan(K, cfg.BLOCK_K, cfg.SPLIT_K)
    out, strides = split_k_output(_empty, M, N, split_k, x)
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N), split_k)
    sparse24_mm_kernel[grid](
        x, values, meta, x if bias is None else bias, out, M, N, K,
        x.stride(0), x.stride(1), values.stride(0), meta.stride(0), *strides, k_per_split,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, UPCAST=upcast_dots(x.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return split_k_result(out, split_k, x.dtype, bias)


_tuner = Autotuner()


def _choose(x, values, meta, bias) -> Config:
    """The architecture's candidates for this M regime, timed once per (dtype, M bucket, N, K)."""
    M, K = x.shape
    candidates = configs_for(capability(x.device), M <= DECODE_MAX_M)
    return _tuner.choose(x.device, candidates, (x.dtype, pow2_bucket(M, 4096), values.shape[0], K),
                         lambda cand: _launch(x, values, meta, bias, cand))


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                config: Config | None = None) -> torch.Tensor:
    """Launch: x (M, K) float, values (N, K/2) in x's dtype, meta (N, ceil(K/16)) int16, optional bias (N,)
    -> (M, N) in x's dtype. `config` overrides the choice (tests use it to cover every shipped config)."""
    bias = None if bias is None else bias.contiguous()
    cfg = config or _choose(x, values, meta, bias)
    return _launch(x, values, meta, bias, cfg)
