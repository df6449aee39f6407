// The host side both launchers of sparse24_int4_mm's mma.sp kernel share: argument checks, the 16-byte aligned
// copies, the tile and split-K choice, Params. Device-agnostic ATen code, no device code (so the torch headers are
// compiled once, by the C++ compiler, not once per GPU architecture by nvcc): csrc/cuda/sparse24_int4_mm_launch.cpp
// launches on a GPU through csrc/cuda/sparse24_int4_mm.cu, csrc/emu/sparse24_int4_mm.cpp on the CPU emulator, from
// the same plan.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "cuda/sparse24_int4_mm_layout.h"

namespace tk_s24i4 {

struct Plan {
  Params p{};
  Instance in;                                 // the instantiation and the split-K depth
  bool launch = false;                         // false: the output is complete already (M == 0)
  int bn = 0, bm = 0, tiles = 0;               // block tile, output tiles
  at::Tensor x, meta, bias, out, workspace;    // kept alive for the launch
};

// What the op's schema says (ops.cpp: sparse24_int4_mm_mma); `where` prefixes the messages
// ("sparse24_int4_mm_mma (cuda)"). group_size counts KEPT values.
inline Plan plan(const char* where, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const at::Tensor& offsets, const at::Tensor& meta, int64_t group_size, int64_t out_features,
                 const std::optional<at::Tensor>& bias, int64_t splits, int64_t sms) {
  TORCH_CHECK(x.dim() == 2, where, ": x must be 2-D (M, K), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, where,
              ": x must be float16 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(K >= 32 && K % 32 == 0, where, ": x.shape[1] (in_features K) must be a positive multiple of 32 (the k "
              "of mma.sp), got ", K);
  TORCH_CHECK(N >= 1, where, ": out_features must be positive, got ", N);
  const int64_t KS = K / 32, NB = (N + 15) / 16, Np = NB * 16, kept = K / 2;
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.size(0) == KS &&
              qweight.size(1) == NB * 32, where, ": qweight must be the int32 mma layout (K/32, ceil(N/16) * 32) = (",
              KS, ", ", NB * 32, ") for K=", K, ", N=", N, ", got ", qweight.scalar_type(), " of shape ",
              qweight.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kShort && meta.dim() == 2 && meta.size(0) == N && meta.size(1) == K / 16,
              where, ": meta must be int16 (N, K/16) = (", N, ", ", K / 16, "), got ", meta.scalar_type(),
              " of shape ", meta.sizes());
  TORCH_CHECK(group_size >= 1 && (group_size % 16 == 0 || group_size >= kept), where,
              ": group_size (kept values) must be a multiple of 16 or span K/2 (per-channel), got ", group_size,
              " for K/2=", kept);
  const int64_t G = (kept + group_size - 1) / group_size;
  for (const at::Tensor* t : {&scales, &offsets}) {
    const char* name = t == &scales ? "scales" : "offsets";
    TORCH_CHECK(t->dim() == 2 && t->size(0) == G && t->size(1) == Np, where, ": ", name,
                " must have shape (num_groups, ceil(N/16) * 16) = (", G, ", ", Np, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, where, ": ", name,
                " must be in x's dtype (", x.scalar_type(), ") or float32, got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), where, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(scales.scalar_type() == offsets.scalar_type(), where, ": scales (", scales.scalar_type(),
              ") and offsets (", offsets.scalar_type(), ") must have the same dtype");
  for (const at::Tensor* t : {&qweight, &scales, &offsets, &meta}) {
    TORCH_CHECK(t->device() == x.device(), where, ": qweight, scales, offsets and meta must be on x's device (",
                x.device(), "), got ", t->device());
  }
  // cp.async reads 16-byte chunks of the weight and of the scale rows: their storage must start 16-byte aligned
  for (const at::Tensor* t : {&qweight, &scales, &offsets}) {
    TORCH_CHECK(t->is_contiguous() && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, where, ": ",
                t == &qweight ? "qweight" : t == &scales ? "scales" : "offsets",
                " must be contiguous and start at a 16-byte aligned address (a view at an odd offset is not: pass a "
                "copy)");
  }
  TORCH_CHECK(M < (int64_t{1} << 31) / 2 && KS * NB * 32 < (int64_t{1} << 31) && M * N < (int64_t{1} << 31) &&
              M * K < (int64_t{1} << 31), where, ": sizes must keep every offset within 32 bits");
  TORCH_CHECK(splits >= 0 && splits <= 64, where, ": splits must be 0 (automatic) or 1..64, got ", splits);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, where, ": bias must have shape (N,) = (", N, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), where, ": bias is on ", bias->device(), " but x is on ", x.device());
  }

  Plan plan;
  plan.out = at::empty({M, N}, x.options());
  if (M == 0) return plan;
  plan.launch = true;
  // cp.async moves x in 16-byte chunks and meta in 4-byte ones: 16-byte aligned contiguous copies
  auto aligned16 = [](const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
  };
  plan.x = aligned16(x);
  plan.meta = aligned16(meta);
  if (has_bias) plan.bias = bias->to(at::kFloat).contiguous();
  plan.in.bf16 = x.scalar_type() == at::kBFloat16;
  plan.in.float_dq = scales.scalar_type() == at::kFloat;
  plan.in.decode = M <= 16;
  plan.bn = plan.in.decode ? 128 : 64;
  plan.bm = plan.in.decode ? 16 : 64;

  Params& p = plan.p;
  p.x = static_cast<const uint16_t*>(plan.x.data_ptr());
  p.qweight = static_cast<const uint32_t*>(qweight.data_ptr());
  p.meta = static_cast<const uint16_t*>(plan.meta.data_ptr());
  p.scales = scales.data_ptr();
  p.offsets = offsets.data_ptr();
  p.bias = plan.bias.defined() ? plan.bias.data_ptr<float>() : nullptr;
  p.out = static_cast<uint16_t*>(plan.out.data_ptr());
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.KS = static_cast<int>(KS);
  p.NB = static_cast<int>(NB);
  p.Np = static_cast<int>(Np);
  p.groups = static_cast<int>(G);
  p.group_size = static_cast<int>(group_size);
  p.ktiles = static_cast<int>((KS + kSteps - 1) / kSteps);
  plan.tiles = static_cast<int>(((N + plan.bn - 1) / plan.bn) * ((M + plan.bm - 1) / plan.bm));
  const tk_split_k::Plan parts = tk_split_k::plan(plan.tiles, p.ktiles, splits, static_cast<int>(sms));
  p.tiles_per_split = parts.tiles_per_split;
  plan.in.splits = parts.splits;
  if (plan.in.splits > 1) {
    plan.workspace = at::empty({plan.in.splits, M, N}, x.options().dtype(at::kFloat));
    p.workspace = plan.workspace.data_ptr<float>();
  }
  return plan;
}

}  // namespace tk_s24i4
