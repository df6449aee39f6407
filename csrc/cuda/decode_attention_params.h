// What the host plan (decode_attention_launch.h, ATen) and the kernels (decode_attention.cuh) share: the kernels'
// arguments, the instantiation, the tile constants the grid is sized by. Plain C++ (no CUDA, no torch), so that
// nvcc compiles the device code without torch's headers and the C++ compiler the plan without CUDA's.
#pragma once

#include <cstdint>

namespace tk_decode {

constexpr int kThreads = 128;     // 4 warps per CTA
constexpr int kBlockN = 64;       // keys per K/V tile; kv_per_split is a multiple
constexpr int kCombineRows = kThreads / 32;  // output rows per CTA of the combine kernel (a warp each)
constexpr int kMaxSplits = 128;
constexpr int kWaves = 2;         // target CTAs = kWaves * SM count, as kernels/attention_decode.py

// The kernels' arguments, filled by the host plan.
struct Params {
  const uint16_t* q;        // (B, T, Hq, D) in T: unit stride in d, the other strides multiples of 8 (16-byte rows)
  const uint16_t* k;        // (B, S, Hkv, D) or paged (num_pages, page_size, Hkv, D); unit stride in d, 16-byte rows
  const uint16_t* v;        // same layout as k (its own strides)
  const int* seqlens;       // (B,) int32
  const int* block_table;   // (B, max_pages) int32, unit column stride; nullptr for a contiguous cache
  const float* alibi;       // (Hq,) or (B, Hq) fp32 slopes (alibi_sb: 0 or Hq), or nullptr
  uint16_t* out;            // (B, T, Hq, D) contiguous, in T
  float* part;              // (splits, B, T, Hq, D) fp32 partials when splits > 1
  float* m;                 // (splits, B, T, Hq) fp32 row max (base 2), when splits > 1
  float* l;                 // (splits, B, T, Hq) fp32 row sum of 2^(s - m), when splits > 1
  long long q_sb, q_st, q_sh;
  long long k_sb, k_sn, k_sh;  // batch (or page), position (in the sequence or page), kv head
  long long v_sb, v_sn, v_sh;
  long long bt_sb, alibi_sb;
  int B, T, Hq, Hkv, group, rows, row_blocks;
  int capacity, page_size, kv_per_split, splits;
  float qk_scale;     // without softcap: softmax_scale * log2 e; with: 2 log2 e * softmax_scale / softcap
  float softcap_log2; // softcap * log2 e, 0 without softcap
  int window_left;    // -1: none
};

// Which instantiation runs and its grids: the split kernel's (programs, splits), the combine kernel's blocks.
struct Instance {
  bool bf16 = false;
  int d = 64, warps_m = 1, splits = 1;
  long long programs = 0, combine_blocks = 0;
};

// Launches the kernels on the current device (csrc/cuda/decode_attention.cu: the only translation unit that holds
// their device code; CUDA builds only). stream: a cudaStream_t. Returns a cudaError_t (0: launched).
int launch_on_gpu(const Params& p, const Instance& in, void* stream, int device);

}  // namespace tk_decode
