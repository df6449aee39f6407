// The host side both launchers of sparse24_mm's mma.sp kernels share: argument checks, the 16-byte aligned copies,
// the tile and split-K choice, Params. Device-agnostic ATen code, no device code (so the torch headers are compiled
// once, by the C++ compiler, not once per GPU architecture by nvcc): csrc/cuda/sparse24_mm_launch.cpp launches on a
// GPU through csrc/cuda/sparse24_mm.cu, csrc/emu/sparse24_mm.cpp on the CPU emulator, from the same plan.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cuda/sparse24_mm_params.h"

namespace tk_sparse24 {

struct Plan {
  Params p{};
  Instance in;          // the instantiation, the split-K depth, the reduction's grid
  bool launch = false;  // false: the output is complete already (an empty product, or K == 0)
  int bn = 0, bm = 0;   // block tile
  at::Tensor x, values, meta, bias, out, workspace;  // kept alive for the launch
};

// cp.async copies 16-byte chunks: the base pointers must be 16-byte aligned (row strides are, given K % 32 == 0).
inline at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// Split K only while the output tiles leave SMs idle: aim at ~2 blocks per SM, keep >= 4 k tiles (256 k) per split
// so the pipeline still fills, at most 16 splits, and a workspace of at most 64 Mi floats.
inline int auto_splits(int tiles, int ktiles, int sms, int64_t mn) {
  int splits = 1;
  if (tiles < sms) {
    splits = std::min({(2 * sms + tiles - 1) / tiles, ktiles / 4, 16});
    while (splits > 1 && splits * mn > (int64_t{64} << 20)) --splits;
    splits = std::max(splits, 1);
  }
  return splits;
}

// What the op's schema says (ops.cpp: sparse24_mm, sparse24_mm_emulated); `where` prefixes the messages
// ("sparse24_mm (cuda)"). splits: 0 automatic for `sms` SMs, else that many parts (at most one per k tile); the
// device checks (CUDA or CPU tensors) are the launcher's. sms also caps the reduction's grid (8 blocks per SM).
inline Plan plan(const char* where, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                 const std::optional<at::Tensor>& bias, int64_t splits, int64_t sms) {
  TORCH_CHECK(x.device() == values.device() && x.device() == meta.device(), where,
              ": x, values and meta must be on the same device");
  TORCH_CHECK(x.dim() == 2, where, ": x must be 2-D (M, K), got ", x.dim(), "-D");
  TORCH_CHECK(values.dim() == 2, where, ": values must be 2-D (N, K/2), got ", values.dim(), "-D");
  TORCH_CHECK(meta.dim() == 2, where, ": meta must be 2-D (N, K/16), got ", meta.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, where,
              ": x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), where, ": values dtype ", values.scalar_type(),
              " differs from x's ", x.scalar_type());
  TORCH_CHECK(meta.scalar_type() == at::kShort, where, ": meta must be int16, got ", meta.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  TORCH_CHECK(K % 32 == 0, where, ": x.shape[1] (in_features K) must be a multiple of 32 (the k of mma.sp), got ", K);
  TORCH_CHECK(values.size(1) * 2 == K, where, ": values must have shape (N, K/2) = (", N, ", ", K / 2, "), got ",
              values.sizes());
  TORCH_CHECK(meta.size(0) == N && meta.size(1) == K / 16, where, ": meta must have shape (N, K/16) = (", N, ", ",
              K / 16, "), got ", meta.sizes());
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, where, ": dimensions must fit in int32");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == x.device(), where, ": bias is on ", b.device(), " but x is on ", x.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, where, ": bias must have shape (N,) = (", N, ",), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), where, ": bias dtype ", b.scalar_type(), " differs from x's ",
                x.scalar_type());
  }
  TORCH_CHECK(splits >= 0 && splits <= 64, where, ": splits must be 0 (automatic) or 1..64, got ", splits);

  Plan plan;
  plan.out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return plan;
  if (K == 0) {
    if (has_bias) plan.out.copy_(bias->expand({M, N}));
    else plan.out.zero_();
    return plan;
  }
  plan.launch = true;
  plan.x = aligned16(x);
  plan.values = aligned16(values);
  plan.meta = aligned16(meta);
  if (has_bias) plan.bias = bias->contiguous();  // read one element at a time: no alignment
  plan.in.bf16 = x.scalar_type() == at::kBFloat16;
  // M <= 16 (decode, small batches): 128 x 16 tiles, so a block does not load and multiply 48 padding rows of x;
  // otherwise 64 x 64.
  plan.in.decode = M <= 16;
  plan.bn = plan.in.decode ? 128 : 64;
  plan.bm = plan.in.decode ? 16 : 64;

  const int ktiles = static_cast<int>((K + kBK - 1) / kBK);
  const int tiles = static_cast<int>(((N + plan.bn - 1) / plan.bn) * ((M + plan.bm - 1) / plan.bm));
  int parts = splits > 0 ? static_cast<int>(std::min<int64_t>(splits, ktiles))
                         : auto_splits(tiles, ktiles, static_cast<int>(sms), M * N);
  const int tiles_per_split = (ktiles + parts - 1) / parts;
  plan.in.splits = (ktiles + tiles_per_split - 1) / tiles_per_split;  // no empty split

  Params& p = plan.p;
  p.x = static_cast<const uint16_t*>(plan.x.data_ptr());
  p.values = static_cast<const uint16_t*>(plan.values.data_ptr());
  p.meta = static_cast<const uint16_t*>(plan.meta.data_ptr());
  p.bias = has_bias ? static_cast<const uint16_t*>(plan.bias.data_ptr()) : nullptr;
  p.out = static_cast<uint16_t*>(plan.out.data_ptr());
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.tiles_per_split = tiles_per_split;
  p.splits = plan.in.splits;
  if (plan.in.splits > 1) {
    plan.workspace = at::empty({plan.in.splits, M, N}, x.options().dtype(at::kFloat));
    p.ws = plan.workspace.data_ptr<float>();
    // enough blocks for one element per thread, at most 8 per SM (grid-stride beyond)
    plan.in.reduce_blocks = static_cast<int>(
        std::min<int64_t>((M * N + kReduceThreads - 1) / kReduceThreads, int64_t{8} * std::max<int64_t>(sms, 1)));
  }
  return plan;
}

}  // namespace tk_sparse24
