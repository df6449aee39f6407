// Split-K with an in-kernel reduction, the device's half (int4_mm.cuh, sparse24_int4_mm.cuh): grid z cuts K; each
// part writes fp32 partials to a workspace, and the last part to finish a tile (an atomic counter per tile) sums all
// parts in part order, adds the bias and writes the output: one launch, deterministic (the order does not depend on
// which part finishes last), the counters left at zero for the next launch.
#pragma once

#include "cuda/arch.cuh"

namespace tk_split_k {
inline namespace TK_BUILD {  // as the kernels (arch.cuh)

using namespace tk_arch;

struct Output {
  const float* bias;  // (N,) fp32, or nullptr
  uint16_t* out;      // (M, N) in T, contiguous
  float* workspace;   // (splits, M, N) when gridDim.z > 1
  int* counters;      // one per output tile, when gridDim.z > 1
  int M, N;
};

// The block's epilogue. for_each(f) calls f(value, m, n) for each of this thread's accumulators inside the (M, N)
// output; flag: one int of the block's shared memory; tile: the block's output tile (its counter).
template <typename T, typename ForEach>
TK_DEVICE void write_output(ForEach&& for_each, const Output& o, int* flag, int tile) {
  const int z = static_cast<int>(block_z()), splits = static_cast<int>(grid_z());
  if (splits == 1) {
    for_each([&](float v, int m, int n) {
      const float b = o.bias != nullptr ? load(o.bias + n) : 0.f;
      tk_arch::store(o.out + static_cast<long long>(m) * o.N + n, from_float<T>(v + b));  // the one rounding
    });
    return;
  }
  const long long mn = static_cast<long long>(o.M) * o.N;
  for_each([&](float v, int m, int n) {
    tk_arch::store(o.workspace + z * mn + static_cast<long long>(m) * o.N + n, v);
  });
  threadfence();  // the partials are visible device-wide before the counter says so
  syncthreads();
  const bool first_thread = tid() == 0;
  if (first_thread) sts(flag, atomic_add(o.counters + tile, 1) == splits - 1 ? 1 : 0);
  syncthreads();
  if (lds(flag) == 0) return;
  // the last part: every part's partial, in part order, then the bias; one rounding
  for_each([&](float, int m, int n) {
    const long long off = static_cast<long long>(m) * o.N + n;
    float sum = 0.f;
    for (int part = 0; part < splits; ++part) sum += load_cg(o.workspace + part * mn + off);
    if (o.bias != nullptr) sum += load(o.bias + n);
    tk_arch::store(o.out + off, from_float<T>(sum));
  });
  if (first_thread) tk_arch::store(o.counters + tile, 0);  // ready for the next launch
}

}  // inline namespace TK_BUILD
}  // namespace tk_split_k
