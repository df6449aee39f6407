// What the host plan (sparse24_mm_launch.h, ATen) and the kernels (sparse24_mm.cuh) share: the kernels' arguments,
// the instantiation, the tile constants the grid is sized by. Plain C++ (no CUDA, no torch), so that nvcc compiles
// the device code without torch's headers and the C++ compiler the plan without CUDA's.
#pragma once

#include <cstdint>

namespace tk_sparse24 {

constexpr int kBK = 64;                  // dense k per pipeline stage (two mma k32 steps)
constexpr int kStages = 3;
constexpr int kThreads = 128;            // 4 warps
constexpr int kAStride = kBK / 2 + 8;    // halves per shared row of values: 32 + 8 padding = 80 bytes
constexpr int kBStride = kBK + 8;        // halves per shared row of x: 64 + 8 padding = 144 bytes
constexpr int kMStride = kBK / 16;       // int16 meta elements per shared row: 4
constexpr int kReduceThreads = 256;

// The kernels' arguments, filled by the host plan.
struct Params {
  const uint16_t* x;       // (M, K) in T, contiguous, 16-byte aligned (K % 32 == 0: every row is)
  const uint16_t* values;  // (N, K/2) in T, contiguous, 16-byte aligned
  const uint16_t* meta;    // (N, K/16) int16, contiguous, 16-byte aligned (rows: 4-byte)
  const uint16_t* bias;    // (N,) in T, or nullptr
  uint16_t* out;           // (M, N) in T, contiguous
  float* ws;               // (splits, M, N) fp32 partials, or nullptr when splits == 1
  int M, N, K;
  int tiles_per_split;     // k tiles of kBK per grid-z part
  int splits;              // grid z of the GEMM kernel, read by the reduction
};

// Which instantiation runs (dtype; tile: M <= 16 -> 128 x 16, else 64 x 64) and the grids' depths.
struct Instance {
  bool bf16 = false, decode = false;
  int splits = 1;         // > 1: the GEMM writes partials to ws, the reduction kernel sums them
  int reduce_blocks = 0;  // of kReduceThreads threads (grid-stride loop)
};

// Launches the kernels on the current device (csrc/cuda/sparse24_mm.cu: the only translation unit that holds their
// device code; CUDA builds only). stream: a cudaStream_t. Returns a cudaError_t (0: launched).
int launch_on_gpu(const Params& p, const Instance& in, void* stream);

}  // namespace tk_sparse24
