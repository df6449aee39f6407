// The host side both launchers of decode_attention's mma kernels share: argument checks, the row-block and split-KV
// choice, Params, the outputs and partials. Device-agnostic ATen code, no device code (torch's headers compiled once,
// by the C++ compiler, not once per GPU architecture by nvcc): csrc/cuda/decode_attention_launch.cpp launches on a
// GPU through csrc/cuda/decode_attention.cu, csrc/emu/decode_attention.cpp on the CPU emulator, from the same plan.
// Nothing here reads the values of cache_seqlens or block_table (no host sync): the grid comes from the capacity.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cuda/decode_attention_params.h"

namespace tk_decode {

struct Plan {
  Params p;
  Instance in;
  at::Tensor q, out, part, m, l, alibi;  // kept alive for the launch
};

inline bool rows_aligned(const at::Tensor& t) {
  return t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// What the op's schema says (ops.cpp: decode_attention_mma); `where` prefixes the messages.
inline Plan plan(const char* where, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                 const std::optional<at::Tensor>& alibi_slopes, double softmax_scale, int64_t window_left,
                 double softcap, int64_t splits, int64_t sms) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, where,
              ": q (B, T, Hq, D) and the caches must be 4-D");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, where,
              ": q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), where,
              ": the caches must have q's dtype");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), where, ": k_cache and v_cache shapes differ");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(D == 64 || D == 128, where, ": head_dim must be 64 or 128, got ", D);
  TORCH_CHECK(k_cache.size(3) == D, where, ": the caches' head_dim must be q's");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, where, ": heads_q (", Hq, ") must be a multiple of heads_kv (", Hkv, ")");
  TORCH_CHECK(rows_aligned(k_cache) && rows_aligned(v_cache), where,
              ": the caches must be contiguous in head_dim with 16-byte aligned rows (strides multiples of 8)");
  for (const at::Tensor* t : {&k_cache, &v_cache, &cache_seqlens}) {
    TORCH_CHECK(t->device() == q.device(), where, ": every tensor must be on q's device");
  }
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  cache_seqlens.is_contiguous(),
              where, ": cache_seqlens must be a contiguous int32 (B,)");
  const bool paged = block_table.has_value() && block_table->defined();
  if (paged) {
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2 && block_table->size(0) == B &&
                    block_table->stride(1) == 1 && block_table->device() == q.device(),
                where, ": block_table must be int32 (B, max_pages) with unit column stride, on q's device");
    TORCH_CHECK(k_cache.size(1) >= 1, where, ": page_size must be positive");
  } else {
    TORCH_CHECK(k_cache.size(0) == B, where, ": a contiguous cache's batch must be q's");
  }
  TORCH_CHECK(window_left >= -1, where, ": window_left must be >= -1");
  TORCH_CHECK(softcap >= 0, where, ": softcap must be >= 0");
  TORCH_CHECK(splits >= 0 && splits <= kMaxSplits, where, ": splits must be 0 (automatic) or 1..", kMaxSplits);
  const int64_t page_size = k_cache.size(1);
  const int64_t capacity = paged ? block_table->size(1) * page_size : k_cache.size(1);
  TORCH_CHECK(capacity < (int64_t{1} << 31) - kBlockN && B * T * Hq < (int64_t{1} << 31), where,
              ": sizes must keep positions and rows within 32 bits");

  Plan plan;
  plan.in.bf16 = q.scalar_type() == at::kBFloat16;
  plan.in.d = static_cast<int>(D);
  // cp.async moves q in 16-byte chunks: a view without them is copied (one small tensor)
  plan.q = rows_aligned(q) ? q : q.contiguous();
  if (!rows_aligned(plan.q)) plan.q = plan.q.clone();
  plan.out = at::empty({B, T, Hq, D}, q.options());
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.device() == q.device() &&
                    ((a.dim() == 1 && a.size(0) == Hq) || (a.dim() == 2 && a.size(0) == B && a.size(1) == Hq)),
                where, ": alibi_slopes must be float32 (Hq,) or (B, Hq) on q's device");
    plan.alibi = a.contiguous();
  }
  const int64_t group = Hq / Hkv, rows = group * T;
  plan.in.warps_m = rows <= 16 ? 1 : (rows <= 32 ? 2 : 4);
  const int64_t row_blocks = (rows + 16 * plan.in.warps_m - 1) / (16 * plan.in.warps_m);
  plan.in.programs = B * Hkv * row_blocks;
  TORCH_CHECK(plan.in.programs < (int64_t{1} << 31), where, ": too many (batch, kv head, row block) programs");

  // split-KV from the capacity: enough CTAs for kWaves per SM, at most one 64-key tile per split
  const int64_t cap_tiles = (capacity + kBlockN - 1) / kBlockN;
  int64_t parts = splits;
  if (parts == 0) {
    const int64_t want = (kWaves * (sms > 0 ? sms : 1) + std::max<int64_t>(plan.in.programs, 1) - 1) /
                         std::max<int64_t>(plan.in.programs, 1);
    parts = std::min<int64_t>(want, kMaxSplits);
  }
  parts = std::max<int64_t>(1, std::min<int64_t>(parts, cap_tiles));
  int64_t kv_per_split = kBlockN;
  if (capacity > 0) {
    kv_per_split = ((capacity + parts - 1) / parts + kBlockN - 1) / kBlockN * kBlockN;
    parts = (capacity + kv_per_split - 1) / kv_per_split;  // no split entirely past the capacity
  }
  plan.in.splits = static_cast<int>(parts);
  if (plan.in.splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    plan.part = at::empty({parts, B, T, Hq, D}, f32);
    plan.m = at::empty({parts, B, T, Hq}, f32);
    plan.l = at::empty({parts, B, T, Hq}, f32);
  }
  plan.in.combine_blocks = (B * T * Hq + kCombineRows - 1) / kCombineRows;

  Params& p = plan.p;
  p.q = static_cast<const uint16_t*>(plan.q.data_ptr());
  p.k = static_cast<const uint16_t*>(k_cache.data_ptr());
  p.v = static_cast<const uint16_t*>(v_cache.data_ptr());
  p.seqlens = cache_seqlens.data_ptr<int>();
  p.block_table = paged ? block_table->data_ptr<int>() : nullptr;
  p.alibi = plan.alibi.defined() ? plan.alibi.data_ptr<float>() : nullptr;
  p.out = static_cast<uint16_t*>(plan.out.data_ptr());
  p.part = plan.part.defined() ? plan.part.data_ptr<float>() : nullptr;
  p.m = plan.m.defined() ? plan.m.data_ptr<float>() : nullptr;
  p.l = plan.l.defined() ? plan.l.data_ptr<float>() : nullptr;
  p.q_sb = plan.q.stride(0), p.q_st = plan.q.stride(1), p.q_sh = plan.q.stride(2);
  p.k_sb = k_cache.stride(0), p.k_sn = k_cache.stride(1), p.k_sh = k_cache.stride(2);
  p.v_sb = v_cache.stride(0), p.v_sn = v_cache.stride(1), p.v_sh = v_cache.stride(2);
  p.bt_sb = paged ? block_table->stride(0) : 0;
  p.alibi_sb = plan.alibi.defined() && plan.alibi.dim() == 2 ? Hq : 0;
  p.B = static_cast<int>(B), p.T = static_cast<int>(T), p.Hq = static_cast<int>(Hq), p.Hkv = static_cast<int>(Hkv);
  p.group = static_cast<int>(group), p.rows = static_cast<int>(rows), p.row_blocks = static_cast<int>(row_blocks);
  p.capacity = static_cast<int>(capacity), p.page_size = static_cast<int>(page_size);
  p.kv_per_split = static_cast<int>(kv_per_split), p.splits = plan.in.splits;
  const double log2e = 1.4426950408889634;
  p.qk_scale = static_cast<float>(softcap > 0 ? 2.0 * log2e * softmax_scale / softcap : softmax_scale * log2e);
  p.softcap_log2 = static_cast<float>(softcap > 0 ? softcap * log2e : 0.0);
  // a window reaching past the capacity is no window (and would not fit an int)
  p.window_left = window_left < 0 || window_left >= capacity ? -1 : static_cast<int>(window_left);
  return plan;
}

}  // namespace tk_decode
