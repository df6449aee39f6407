// The `torch` backend of the attention ops (python/turbokernels/ops/_torch_attention.py) in one C++ call: torch's
// fused CPU attention kernel (aten::_scaled_dot_product_flash_attention_for_cpu) plus the few steps around it that
// make its result our spec's, done on the tensors' data instead of as Python tensor ops.
//
// Why C++: at decode and small prefill sizes the kernel costs ~15 us, and each Python tensor op around it (three
// transposes in, one out, the scan of lse for exact zeros) ~3 us: the wrapper cost as much as the kernel
// (bench/overhead.py). Here the views cost ~0.3 us each and the lse scan a few ns per row. The rules (which rows
// have keys, the NaN-row repair, the lse copy) are the Python path's, documented there; this file only moves them.
#include "cpu/torch_attention.h"

#include "cpu/decode_attention.h"
#include "watched.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
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

std::optional<at::Tensor> attention_usual(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                          std::optional<double> softmax_scale, int64_t window_left,
                                          int64_t window_right, double softcap, bool native_gqa, bool cpu_rows,
                                          bool sdpa, bool enable_gqa) {
  if (watched_cxx()) return std::nullopt;
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) return std::nullopt;
  // attention._usual's checks, the torch backend's (_torch_attention.check_fwd) and _call_args' plain cases; sizes
  // read in either layout (s, h: the sequence and head dims), no views made for the checks
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || !q.is_cpu() || !k.is_cpu() || !v.is_cpu()) return std::nullopt;
  const auto dt = q.scalar_type();
  if ((dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16 && (dt != at::kDouble || sdpa)) ||
      k.scalar_type() != dt || v.scalar_type() != dt)
    return std::nullopt;
  const int s = sdpa ? 2 : 1, h = sdpa ? 1 : 2;
  const int64_t B = q.size(0), sq = q.size(s), hq = q.size(h), D = q.size(3), sk = k.size(s), hkv = k.size(h);
  if (v.sizes() != k.sizes() || k.size(0) != B || D < 1 || D > 256 || k.size(3) != D || hkv == 0 || hq % hkv != 0 ||
      sk == 0 || q.numel() == 0 || (hq != hkv && !enable_gqa))
    return std::nullopt;
  if (sdpa && causal && sq != sk) return std::nullopt;  // SDPA's is_causal is top-left aligned: not the spec's edge
  if (D > 1 && (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1)) return std::nullopt;
  const double scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(D));
  if (!std::isfinite(scale) || softcap != 0.0 || window_left < -1 || window_right < -1) return std::nullopt;
  if (sq == 1 && cpu_rows)  // attention_fwd's cpu backend (decode_attention's kernel), out in q's layout
    return std::get<0>(decode_cpu::attention_rows(q, k, v, std::nullopt, scale, causal, window_left, window_right,
                                                  0.0, sdpa, false));
  if (!(window_left < 0 && (causal || window_right < 0))) return std::nullopt;  // a window: a mask (Python)
  bool is_causal = false;
  if (causal && sq > 1) {
    if (sq != sk) return std::nullopt;  // the spec's bottom-right edge: a mask (Python)
    is_causal = true;
  }
  if (hq != hkv && !native_gqa) return std::nullopt;
  // out in q's layout, a view of a contiguous (B, Sq, Hq, D) tensor (contiguous as is in FlashAttention's; the
  // guard, for a torch whose kernel would allocate otherwise)
  at::Tensor out = std::get<0>(torch_attention_fwd(q, k, v, std::nullopt, scale, is_causal, !sdpa, 0, sq, false));
  if (!sdpa && !out.is_contiguous()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = out.contiguous();
  }
  return out;
}

}  // namespace turbokernels
