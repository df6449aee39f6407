// Split-K counters for the GPU launchers (int4_mm_launch.cpp, sparse24_int4_mm_launch.cpp): one int per output tile,
// zeroed once per (device, stream) and left at zero by every launch (the last part of a tile resets its counter,
// csrc/cuda/split_k.cuh), so a launch needs no memset; a stream of its own keeps concurrent launches apart.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

namespace tk_split_k {

inline int* counters(int device, cudaStream_t stream, int tiles, const at::TensorOptions& options) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> cache;
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& c = cache[{device, stream}];
  if (!c.defined() || c.numel() < tiles) c = at::zeros({std::max(tiles, 1024)}, options.dtype(at::kInt));
  return c.data_ptr<int>();
}

}  // namespace tk_split_k
