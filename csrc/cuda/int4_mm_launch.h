// The host side both launchers of int4_mm's mma kernel share: argument checks, the padded copy of x when its rows
// are not 16-byte chunks, the tile and split-K choice, Params. Device-agnostic ATen code, no device code (so the
// torch headers are compiled once, by the C++ compiler, not once per GPU architecture by nvcc):
// csrc/cuda/int4_mm_launch.cpp launches on a GPU through csrc/cuda/int4_mm.cu, csrc/emu/int4_mm.cpp on the CPU
// emulator, from the same plan.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cuda/int4_mm_layout.h"

namespace tk_int4 {

struct Plan {
  Params p;
  Instance in;                            // the instantiation and the split-K depth
  int bm = 0, bn = 0, tiles = 0;          // block tile, output tiles
  at::Tensor x, bias, out, workspace;     // kept alive for the launch
};

// What the op's schema says (ops.cpp: int4_mm_mma); `where` prefixes the messages ("int4_mm_mma (cuda)").
inline Plan plan(const char* where, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const at::Tensor& offsets, int64_t group_size, int64_t out_features,
                 const std::optional<at::Tensor>& bias, int64_t splits, int64_t sms, bool zero_points) {
  TORCH_CHECK(x.dim() == 2, where, ": x must be 2-D (M, K), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, where,
              ": x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2, where,
              ": qweight must be the int32 mma layout (ceil(K/16), ceil(N/16) * 32), got ", qweight.scalar_type(),
              " of shape ", qweight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(K >= 1 && N >= 1, where, ": in_features (x.shape[1]) and out_features must be positive, got ", K,
              " and ", N);
  const int64_t KB = (K + 15) / 16, NB = (N + 15) / 16, Np = NB * 16;
  TORCH_CHECK(qweight.size(0) == KB && qweight.size(1) == NB * 32, where, ": qweight must have shape (ceil(K/16), "
              "ceil(N/16) * 32) = (", KB, ", ", NB * 32, ") for K=", K, ", N=", N, ", got ", qweight.sizes());
  TORCH_CHECK(group_size >= 1 && (group_size % 16 == 0 || group_size >= K), where,
              ": group_size must be a multiple of 16 or span K (per-channel), got ", group_size, " for K=", K);
  const int64_t G = (K + group_size - 1) / group_size;
  for (const at::Tensor* t : {&scales, &offsets}) {
    const char* name = t == &scales ? "scales" : "offsets";
    TORCH_CHECK(t->dim() == 2 && t->size(0) == G && t->size(1) == Np, where, ": ", name,
                " must have shape (num_groups, ceil(N/16) * 16) = (", G, ", ", Np, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, where, ": ", name,
                " must be in x's dtype (", x.scalar_type(), ") or float32, got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), where, ": ", name, " is on ", t->device(), " but x is on ", x.device());
    TORCH_CHECK(t->is_contiguous(), where, ": ", name, " must be contiguous");
  }
  // cp.async reads 16-byte chunks of the weight and of the scale rows: their storage must start 16-byte aligned
  // (any fresh allocation does; a view into another tensor may not)
  for (const at::Tensor* t : {&qweight, &scales, &offsets}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, where, ": ",
                t == &qweight ? "qweight" : t == &scales ? "scales" : "offsets",
                " must start at a 16-byte aligned address (a view at an odd offset is not: pass a copy)");
  }
  TORCH_CHECK(scales.scalar_type() == offsets.scalar_type(), where, ": scales (", scales.scalar_type(),
              ") and offsets (", offsets.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(!zero_points || scales.scalar_type() == x.scalar_type(), where,
              ": zero_points=True takes scales and offsets (-(M + z)) in x's dtype, got ", scales.scalar_type());
  TORCH_CHECK(qweight.device() == x.device() && qweight.is_contiguous(), where,
              ": qweight must be contiguous and on x's device");
  TORCH_CHECK(M < (int64_t{1} << 31) / 2 && KB * NB * 32 < (int64_t{1} << 31) && M * N < (int64_t{1} << 31), where,
              ": sizes must keep every offset within 32 bits");
  TORCH_CHECK(splits >= 0 && splits <= 64, where, ": splits must be 0 (automatic) or 1..64, got ", splits);

  Plan plan;
  // cp.async moves x in 16-byte chunks: rows must start 16-byte aligned and hold whole chunks (K % 8 == 0).
  const bool aligned = x.stride(1) == 1 && x.stride(0) % 8 == 0 && K % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  if (aligned) {
    plan.x = x;
  } else {
    plan.x = at::zeros({M, (K + 7) / 8 * 8}, x.options());
    plan.x.narrow(1, 0, K).copy_(x);
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, where, ": bias must have shape (N,) = (", N, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), where, ": bias is on ", bias->device(), " but x is on ", x.device());
    plan.bias = bias->to(at::kFloat).contiguous();
  }
  plan.out = at::empty({M, N}, x.options());
  plan.in.bf16 = x.scalar_type() == at::kBFloat16;
  plan.in.dequant = zero_points ? kDqZero : scales.scalar_type() == at::kFloat ? kDqFloat : kDqHalf;
  plan.in.decode = M <= 16;
  plan.bm = plan.in.decode ? 16 : 64;
  plan.bn = 128;

  Params& p = plan.p;
  p.x = static_cast<const uint16_t*>(plan.x.data_ptr());
  p.qweight = static_cast<const uint32_t*>(qweight.data_ptr());
  p.scales = scales.data_ptr();
  p.offsets = offsets.data_ptr();
  p.bias = plan.bias.defined() ? plan.bias.data_ptr<float>() : nullptr;
  p.out = static_cast<uint16_t*>(plan.out.data_ptr());
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.Kx = static_cast<int>(plan.x.size(1));
  p.ldx = static_cast<int>(plan.x.stride(0));
  p.KB = static_cast<int>(KB);
  p.NB = static_cast<int>(NB);
  p.Np = static_cast<int>(Np);
  p.groups = static_cast<int>(G);
  p.group_size = static_cast<int>(group_size);
  p.ktiles = static_cast<int>((KB + kStepsPerTile - 1) / kStepsPerTile);
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

}  // namespace tk_int4
