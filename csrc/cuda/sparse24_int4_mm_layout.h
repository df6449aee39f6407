// sparse24_int4_mm's "mma layout": how csrc/cuda/sparse24_int4_mm.cuh reads the int4 kept values of a
// Sparse24Int4Weight, the kernel's arguments, and the host/device arithmetic the kernel, its repack
// (csrc/emu/sparse24_int4_mm.cpp: sparse24_int4_mm_mma_repack) and the host plan share. Plain C++ (no CUDA, no
// torch), so the repack, the kernel and the CPU emulator compile the same functions.
//
// The kept values form the compressed (N, K/2) matrix; the weight is mma.sp's sparse operand A (rows n, compressed
// columns c). It is cut into 16 (n) x 16 (c) blocks, one per (m16 tile of n, k32 step of the dense K); block
// (ks, nb) is 32 uint32 words, one per lane of a warp, and word `lane` holds the 8 kept values that lane's 4 A
// registers of mma.sp.m16n8k32 need. The sparse A fragment (PTX ISA, "Matrix fragments for sparse mma.m16n8k32
// with .f16/.bf16", csrc/emu/ptx_fragments.h mma_sp_a): register r of lane (g = lane / 4, t = lane % 4) holds the
// kept values of row g + 8 (r & 1), compressed columns 2t + 8 (r >> 1) (lower half) and + 1 (upper half). Nibble
// slot s (bits 4s .. 4s + 3): register s % 4, half s / 4, so (word >> 4r) & 0x000F000F holds both halves of register
// r in place (one lop3 puts them into the mantissas of a 16-bit pair). Both halves of a register are one row n and
// two adjacent kept values of one group (groups are multiples of 16 kept values = whole k32 steps, or one group over
// K/2), so one scale/offset pair per register: that of row g (r even) or g + 8 (r odd).
// In memory: qweight_mma int32 (K/32, ceil(N/16) * 32), row ks = the blocks of one k32 step, N-major: a block
// tile of the kernel is a run of whole 128-byte blocks, read with 16-byte cp.async.
#pragma once

#include <cstdint>

#include "cuda/split_k.h"

#if defined(__CUDACC__)
#define TK_S24I4_FN __host__ __device__ __forceinline__
#else
#define TK_S24I4_FN inline
#endif

namespace tk_s24i4 {

constexpr int kWordsPerBlock = 32;  // one per lane
constexpr int kSteps = 2;           // k32 steps per pipeline stage
constexpr int kBK = 32 * kSteps;    // dense k per stage: 64
constexpr int kStages = 4;
constexpr int kThreads = 128;       // 4 warps

// The kernel's arguments, filled by the host plan (sparse24_int4_mm_launch.h).
struct Params {
  const uint16_t* x;        // (M, K) in T, contiguous, 16-byte aligned (K % 32 == 0: every row is)
  const uint32_t* qweight;  // (K/32, NB * 32) mma layout
  const uint16_t* meta;     // (N, K/16) int16, contiguous, 16-byte aligned (rows: 4-byte)
  const void* scales;       // (G, Np) in T (half mode) or fp32 (float mode); G over K/2 kept values
  const void* offsets;      // (G, Np), same dtype as scales
  const float* bias;        // (N,) fp32, or nullptr
  uint16_t* out;            // (M, N) in T, contiguous
  float* workspace;         // (splits, M, N) fp32 partials when gridDim.z > 1
  int* counters;            // one per output tile, zero on entry and on exit, when gridDim.z > 1
  int M, N, K;
  int KS, NB, Np;           // k32 steps (K/32), n16 blocks (Np / 16), padded N
  int groups, group_size;   // group_size in KEPT values: a multiple of 16, or >= K/2 (one group)
  int ktiles, tiles_per_split;
};

// Which instantiation runs, and the grid's split-K depth.
struct Instance {
  bool bf16 = false, float_dq = false, decode = false;  // x's dtype, dequantization mode, tile (M <= 16)
  int splits = 1;
};

// Launches the kernel on the current device (csrc/cuda/sparse24_int4_mm.cu; CUDA builds only). stream: a
// cudaStream_t. Returns a cudaError_t (0: launched).
int launch_on_gpu(const Params& p, const Instance& in, void* stream, int device);

// (dn, dc) inside the 16 (n) x 16 (compressed column) block of nibble slot `slot` (0..7) of lane `lane`'s word
TK_S24I4_FN void nibble_source(int lane, int slot, int& dn, int& dc) {
  const int g = lane >> 2, t = lane & 3;
  const int reg = slot & 3, upper = slot >> 2;
  dn = g + 8 * (reg & 1);
  dc = 2 * t + 8 * (reg >> 1) + upper;
}

// The scale group of the k32 step ks (its 16 kept values lie in one group: group_size % 16 == 0, or one group).
TK_S24I4_FN int group_of_step(int ks, int group_size, int groups) {
  const long long g = static_cast<long long>(ks) * 16 / group_size;
  return g < groups - 1 ? static_cast<int>(g) : groups - 1;
}

}  // namespace tk_s24i4
