// Split-K with an in-kernel reduction, the host's half (plain C++: the layout headers and the ATen plans include it):
// how many parts K is cut into. The device's half is csrc/cuda/split_k.cuh; the counters csrc/cuda/split_k_counters.h.
// Used by int4_mm and sparse24_int4_mm.
#pragma once

#if defined(__CUDACC__)
#define TK_SPLIT_K_FN __host__ __device__ __forceinline__
#else
#define TK_SPLIT_K_FN inline
#endif

namespace tk_split_k {

// For a grid of `tiles` output tiles and `ktiles` k tiles on `sms` SMs: only while the output tiles leave SMs idle,
// aim at 2 blocks per SM, keep >= 4 k tiles per part (the pipeline must fill), at most 16 parts.
TK_SPLIT_K_FN int parts(int tiles, int ktiles, int sms) {
  if (tiles >= sms) return 1;
  int splits = (2 * sms + tiles - 1) / tiles;
  if (splits > ktiles / 4) splits = ktiles / 4;
  if (splits > 16) splits = 16;
  return splits < 1 ? 1 : splits;
}

struct Plan {
  int tiles_per_split = 1;  // k tiles per part (grid z)
  int splits = 1;           // parts, none of them empty
};

// `forced` > 0: that many parts (at most one per k tile); 0: parts() for `sms` SMs.
inline Plan plan(int tiles, int ktiles, long long forced, int sms) {
  int n = forced > 0 ? static_cast<int>(forced) : parts(tiles, ktiles, sms);
  if (n > ktiles) n = ktiles;
  if (n < 1) n = 1;
  Plan p;
  p.tiles_per_split = (ktiles + n - 1) / n;
  p.splits = (ktiles + p.tiles_per_split - 1) / p.tiles_per_split;
  return p;
}

}  // namespace tk_split_k
