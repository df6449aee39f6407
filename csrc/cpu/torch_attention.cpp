// The `torch` backend of the attention ops (python/turbokernels/ops/_torch_attention.py) in one C++ call: torch's
// fused CPU attention kernel (aten::_scaled_dot_product_flash_attention_for_cpu) plus the few steps around it that
// make its result our spec's, done on the tensors' data instead of as Python tensor ops.
//
// Why C++: at decode and small prefill sizes the kernel costs ~15 us, and each Python tensor op around it (three
// transposes in, one out, the scan of lse for exact zeros) ~3 us: the wrapper cost as much as the kernel
// (bench/overhead.py). Here the views cost ~0.3 us each and the lse scan a few ns per row. The rules (which rows
// have keys, the NaN-row repair, the lse copy) are the Python path's, documented there; this file only moves them.
#include "cpu/torch_attention.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <limits>

namespace turbokernels {
namespace {

// true when some lse[b][h][i], i in [row_begin, row_end), is exactly 0: the kernel's mark of a row it saw no key
// for, which a NaN query row can imitate (see _torch_attention._bhsd); lse (B, H, S) float or double, any strides
template <typename T>
bool some_zero(const at::Tensor& lse, int64_t row_begin, int64_t row_end) {
  const T* p = lse.data_ptr<T>();
  const int64_t B = lse.size(0), H = lse.size(1), s0 = lse.stride(0), s1 = lse.stride(1), s2 = lse.stride(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const T* row = p + b * s0 + h * s1;
      for (int64_t i = row_begin; i < row_end; ++i)
        if (row[i * s2] == T(0)) return true;
    }
  return false;
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>> torch_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    double scale, bool is_causal, bool bshd, int64_t row_begin, int64_t row_end, bool want_lse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "torch_attention_fwd: q, k, v must be 4-D");
  TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(), "torch_attention_fwd: CPU tensors only");
  // the callers run this only for inputs that need no autograd graph (_library.direct)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor qt = bshd ? q.transpose(1, 2) : q;
  const at::Tensor kt = bshd ? k.transpose(1, 2) : k;
  const at::Tensor vt = bshd ? v.transpose(1, 2) : v;
  const int64_t sq = qt.size(2);
  TORCH_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= sq,
              "torch_attention_fwd: rows [", row_begin, ", ", row_end, ") outside [0, ", sq, ")");
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, is_causal, attn_mask, scale);
  const bool fix_rows = row_begin > 0 || row_end < sq;
  // lse: a (B, H, S) view of (B, S, H) storage, fp32 (float64 for float64 inputs); the op returns a contiguous fp32
  // tensor, copied only when it is returned or rows must be set
  if (want_lse || fix_rows) {
    lse = lse.to(at::kFloat).contiguous();
    const double ninf = -std::numeric_limits<double>::infinity();
    if (row_begin > 0) lse.narrow(2, 0, row_begin).fill_(ninf);
    if (row_end < sq) lse.narrow(2, row_end, sq - row_end).fill_(ninf);
  }
  const bool zero = lse.scalar_type() == at::kDouble ? some_zero<double>(lse, row_begin, row_end)
                                                     : some_zero<float>(lse, row_begin, row_end);
  if (zero) {  // a NaN query row: NaN out (and lse), as the spec (the kernel's scalar max may have skipped it)
    const at::Tensor nan_rows = qt.isnan().any(-1);
    out.masked_fill_(nan_rows.unsqueeze(-1), std::numeric_limits<double>::quiet_NaN());
    if (want_lse) lse.masked_fill_(nan_rows, std::numeric_limits<double>::quiet_NaN());
  }
  // out: (B, H, S, D) view of a contiguous (B, S, H, D) tensor; in q's layout back
  return {bshd ? out.transpose(1, 2) : out, want_lse ? std::optional<at::Tensor>(lse) : std::nullopt};
}

at::Tensor torch_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  int64_t lo, int64_t hi, const std::optional<at::Tensor>& attn_mask, double scale,
                                  bool is_causal, bool grouped, int64_t row_begin, int64_t row_end) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "torch_attention_decode: 4-D tensors only");
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= k_cache.size(1) && v_cache.sizes() == k_cache.sizes(),
              "torch_attention_decode: slots [", lo, ", ", hi, ") outside the cache's ", k_cache.size(1));
  const int64_t B = q.size(0), T = q.size(1), hq = q.size(2), D = q.size(3), hkv = k_cache.size(2);
  if (hi == lo) return at::zeros_like(q, at::MemoryFormat::Contiguous);
  const at::Tensor ks = k_cache.narrow(1, lo, hi - lo), vs = v_cache.narrow(1, lo, hi - lo);
  if (!grouped)  // MHA, or only the new tokens' own slots: attention_fwd's dense path, without its lse
    return std::get<0>(torch_attention_fwd(q, ks, vs, attn_mask, scale, is_causal, true, row_begin, row_end, false))
        .contiguous();
  // _decode_grouped: the g query heads of a kv head as g * T query rows of it (row gi * T + t)
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "torch_attention_decode: heads_q ", hq, " not a multiple of ", hkv);
  const int64_t g = hq / hkv;
  at::Tensor qg;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    qg = T == 1 ? q.reshape({B, hkv, g, D})
                : q.view({B, T, hkv, g, D}).permute({0, 2, 3, 1, 4}).reshape({B, hkv, g * T, D});
  }
  at::Tensor out = std::get<0>(torch_attention_fwd(qg, ks.transpose(1, 2), vs.transpose(1, 2), attn_mask, scale,
                                                   is_causal, false, row_begin, row_end, false));
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (T == 1) return out.reshape({B, 1, hq, D});  // the few output rows in head order: one copy
  // (a strided view when reshape can make one: with one kv head it can)
  return out.reshape({B, hkv, g, T, D}).permute({0, 3, 1, 2, 4}).reshape({B, T, hq, D}).contiguous();
}

}  // namespace turbokernels
