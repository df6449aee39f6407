// int4_mm's "mma layout": how csrc/cuda/int4_mm.cuh reads an Int4Weight, and the host/device arithmetic both the
// kernel and its repack (csrc/emu/int4_mm.cpp: int4_mm_mma_repack) share. Plain C++ (no CUDA, no torch), so the
// repack, the kernel and the CPU emulator compile the same functions.
//
// The weight (K, N) is cut into 16 (k) x 16 (n) blocks; block (kb, nb) is 32 uint32 words, one per lane of a warp,
// and word `lane` holds the 8 nibbles that lane needs as the B operands of two mma.m16n8k16 (n8 tiles nb*16 and
// nb*16 + 8) for the k16 step kb. Nibble slot s (bits 4s..4s+3):
//     register j = s % 4 of the four B registers (tile j / 2, B register j % 2), half s / 4 (lower, upper)
// so that (word >> 4j) & 0x000F000F holds both halves of B register j in place: one lop3 puts them into the
// mantissas of a 16-bit float pair (csrc/cuda/int4_mm.cuh, dequantize). The B fragment (PTX ISA, m16n8k16, .col):
// register r of lane (g = lane / 4, t = lane % 4) holds k = 2t + 8r and 2t + 8r + 1 of column n = g.
// In memory: qweight_mma int32 (ceil(K/16), ceil(N/16) * 32), row kb = the blocks of one k16 step, N-major:
// a block tile of the kernel is a rectangle of whole 128-byte rows, read with 16-byte cp.async.
#pragma once

#include <cstdint>

#include "cuda/split_k.h"

#if defined(__CUDACC__)
#define TK_LAYOUT_FN __host__ __device__ __forceinline__
#else
#define TK_LAYOUT_FN inline
#endif

namespace tk_int4 {

// The kernel's arguments (csrc/cuda/int4_mm.cuh), filled by the host plan (int4_mm_launch.h).
struct Params {
  const uint16_t* x;        // (M, Kx) in T, row stride ldx elements; Kx % 8 == 0, 16-byte aligned rows
  const uint32_t* qweight;  // (KB, NB * 32) mma layout
  const void* scales;       // (G, Np) in T (half and zero modes) or fp32 (float mode)
  const void* offsets;      // (G, Np), same dtype as scales (zero mode: -(M + z), see Dequant)
  const float* bias;        // (N,) fp32, or nullptr
  uint16_t* out;            // (M, N) in T, contiguous
  float* workspace;         // (splits, M, N) fp32 partials when gridDim.z > 1
  int* counters;            // one per output tile, zero on entry and on exit, when gridDim.z > 1
  int M, N, Kx, ldx;
  int KB, NB, Np;           // k16 steps (ceil(K/16)), n16 blocks (Np / 16), padded N
  int groups, group_size;   // group_size: a multiple of 16, or >= K (one group)
  int ktiles, tiles_per_split;
};

// The dequantization modes (csrc/cuda/int4_mm.cuh, dequantize): what the scales/offsets tensors of the layout hold.
enum Dequant : int {
  kDqHalf = 0,   // scale, offset in x's dtype: w = q s + o in one fp16/bf16 fma
  kDqFloat = 1,  // scale, offset in fp32: fp32 fma, one rounding to x's dtype
  kDqZero = 2,   // scale in x's dtype, "offset" = -(M + z) in x's dtype for an integer zero point z (o = -z s, GPTQ /
                 // AWQ): (q - z) exact, then one rounding of (q - z) s
};

// Which instantiation runs, and the grid's split-K depth.
struct Instance {
  bool bf16 = false, decode = false;  // x's dtype, tile (M <= 16)
  int dequant = kDqHalf;
  int splits = 1;
};

// Launches the kernel on the current device (csrc/cuda/int4_mm.cu: the only translation unit that holds device
// code; CUDA builds only). stream: a cudaStream_t. Returns a cudaError_t (0: launched).
int launch_on_gpu(const Params& p, const Instance& in, void* stream, int device);

constexpr int kWordsPerBlock = 32;  // one per lane
constexpr int kStepsPerTile = 4;    // k16 steps per k tile (a pipeline stage of 64 k)

// (dk, dn) inside the 16 x 16 block of nibble slot `slot` (0..7) of lane `lane`'s word
TK_LAYOUT_FN void nibble_source(int lane, int slot, int& dk, int& dn) {
  const int g = lane >> 2, t = lane & 3;
  const int reg = slot & 3, upper = slot >> 2;
  dk = 2 * t + 8 * (reg & 1) + upper;
  dn = g + 8 * (reg >> 1);
}

// The group of the k16 step kb (whole steps lie in one group: group_size % 16 == 0, or one group spans K; padded
// steps past K belong to the last group).
TK_LAYOUT_FN int group_of_step(int kb, int group_size, int groups) {
  const long long g = static_cast<long long>(kb) * 16 / group_size;
  return g < groups - 1 ? static_cast<int>(g) : groups - 1;
}

}  // namespace tk_int4
