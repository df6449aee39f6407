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

#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

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

// ---- the masks of windows, the bottom-right causal edge and ALiBi: _torch_attention._call_args in C++ -----------
// The same steps on the same torch ops (so the same mask bits; tested against the Python ones), cached as there:
// an LRU of at most kMaskEntries masks and kMaskBytes bytes, ALiBi keyed by the slopes' values.
namespace {

constexpr size_t kMaskEntries = 32;
constexpr int64_t kBakeCausalMaxSk = 512;  // keep in step with _torch_attention.BAKE_CAUSAL_MAX_SK
constexpr int64_t kMaskBytes = int64_t(64) << 20;

struct MaskKey {
  int64_t sq, sk, wl, wr;
  bool causal;
  at::ScalarType dtype;
  std::vector<int64_t> slope_shape;  // empty: no ALiBi
  std::vector<float> slopes;
  bool operator==(const MaskKey& o) const {
    return sq == o.sq && sk == o.sk && wl == o.wl && wr == o.wr && causal == o.causal && dtype == o.dtype &&
           slope_shape == o.slope_shape && slopes == o.slopes;
  }
};

struct MaskCache {
  std::mutex lock;
  std::list<std::pair<MaskKey, CallArgs>> entries;  // most recent first (a few dozen: a linear scan)
};

MaskCache& mask_cache() {
  static MaskCache* cache = new MaskCache();  // never destroyed: tensors freed at exit would outlive torch
  return *cache;
}

// _edges: the window relative to each row's aligned diagonal; nullopt where it excludes no key of any row
void edges(int64_t sq, int64_t sk, bool causal, int64_t wl, int64_t wr, std::optional<int64_t>& left,
           std::optional<int64_t>& right, int64_t& off) {
  off = sk - sq;
  const int64_t r = causal ? 0 : wr;
  left = (0 <= wl && wl < sk - 1) ? std::optional<int64_t>(wl) : std::nullopt;
  right = (0 <= r && r < sq - 1) ? std::optional<int64_t>(r) : std::nullopt;
}

// _mask: -inf outside the window (where is_causal does not already exclude it), -slope |j - i - off| with ALiBi
std::optional<at::Tensor> make_mask(int64_t sq, int64_t sk, std::optional<int64_t> left, std::optional<int64_t> right,
                                    int64_t off, bool is_causal, const std::optional<at::Tensor>& slopes,
                                    at::ScalarType dtype) {
  const bool need_right = right.has_value() && !(is_causal && off + *right == 0);
  if (!slopes.has_value() && !left.has_value() && !need_right) return std::nullopt;
  const auto opts = at::TensorOptions().dtype(dtype);
  if (slopes.has_value()) {
    const at::Tensor rel = at::arange(sk, opts) - at::arange(off, sq + off, opts).unsqueeze(1);
    const at::Tensor neg = slopes->to(dtype).neg();
    at::Tensor mask = neg.unsqueeze(-1).unsqueeze(-1) * rel.abs();
    if (mask.dim() == 3) mask = mask.unsqueeze(0);
    const std::optional<at::Tensor> window = make_mask(sq, sk, left, right, off, is_causal, std::nullopt, dtype);
    return window.has_value() ? mask.add_(*window) : mask;
  }
  at::Tensor mask = at::zeros({sq, sk}, opts);
  const double ninf = -std::numeric_limits<double>::infinity();
  const auto bools = at::TensorOptions().dtype(at::kBool);
  if (need_right) mask.masked_fill_(at::ones({sq, sk}, bools).triu_(off + *right + 1), ninf);
  if (left.has_value()) mask.masked_fill_(at::ones({sq, sk}, bools).tril_(off - *left - 1), ninf);
  return mask;
}

CallArgs build_call_args(int64_t sq, int64_t sk, const std::optional<at::Tensor>& slopes, bool causal, int64_t wl,
                         int64_t wr, at::ScalarType dtype) {
  std::optional<int64_t> left, right;
  int64_t off = 0;
  edges(sq, sk, causal, wl, wr, left, right, off);
  CallArgs args;
  args.is_causal = right.has_value() && off + *right <= 0;
  // a 0/-inf mask is exact in q's dtype; an ALiBi bias is computed and added in fp32 (float64 for float64 inputs)
  const at::ScalarType mdtype = !slopes.has_value() ? dtype : (dtype == at::kDouble ? at::kDouble : at::kFloat);
  {
    c10::InferenceMode not_inference(false);  // a cached mask may serve later calls outside inference mode
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    args.mask = make_mask(sq, sk, left, right, off, args.is_causal, slopes, mdtype);
    // torch's kernel applies is_causal element by element on top of a mask: up to kBakeCausalMaxSk keys that costs
    // more than the key blocks it skips, so the edge goes into the mask instead (2-core Sapphire Rapids, 8 heads,
    // d 64, causal ALiBi: 256 keys 1.84 vs 1.80 ms fp32, 0.69 vs 0.65 bf16; 1024 keys 24.5 vs 29.8, 8.0 vs 10.5)
    if (args.is_causal && args.mask.has_value() && sk <= kBakeCausalMaxSk) {
      args.mask->masked_fill_(at::ones({sq, sk}, at::TensorOptions().dtype(at::kBool)).triu_(off + *right + 1),
                              -std::numeric_limits<double>::infinity());
      args.is_causal = false;
    }
  }
  // _empty_rows: rows [0, a) and [b, sq) have no allowed key
  const int64_t a = right.has_value() ? std::min(sq, std::max<int64_t>(0, -(off + *right))) : 0;
  const int64_t b = left.has_value() ? std::max(a, std::min(sq, sk - off + *left)) : sq;
  args.row_begin = a;
  args.row_end = b;
  return args;
}

}  // namespace

CallArgs torch_attention_call_args(int64_t sq, int64_t sk, const std::optional<at::Tensor>& slopes, bool causal,
                                   int64_t window_left, int64_t window_right, at::ScalarType dtype) {
  CallArgs plain;
  plain.row_end = sq;
  if (!slopes.has_value() && window_left < 0 && (causal || window_right < 0)) {
    if (!causal || (sq <= 1 && 1 <= sk)) return plain;
    if (sq == sk) {
      plain.is_causal = true;
      return plain;
    }
  }
  MaskKey key{sq, sk, window_left, window_right, causal, dtype, {}, {}};
  if (slopes.has_value()) {
    const at::Tensor s = slopes->to(at::kFloat).contiguous();
    key.slope_shape.assign(s.sizes().begin(), s.sizes().end());
    key.slopes.assign(s.data_ptr<float>(), s.data_ptr<float>() + s.numel());
  }
  MaskCache& cache = mask_cache();
  {
    std::lock_guard<std::mutex> guard(cache.lock);
    for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it)
      if (it->first == key) {
        cache.entries.splice(cache.entries.begin(), cache.entries, it);
        return it->second;
      }
  }
  CallArgs args = build_call_args(sq, sk, slopes, causal, window_left, window_right, dtype);
  const int64_t nbytes = args.mask.has_value() ? args.mask->numel() * args.mask->element_size() : 0;
  if (nbytes <= kMaskBytes) {
    std::lock_guard<std::mutex> guard(cache.lock);
    cache.entries.emplace_front(std::move(key), args);
    int64_t total = 0;
    for (const auto& e : cache.entries)
      total += e.second.mask.has_value() ? e.second.mask->numel() * e.second.mask->element_size() : 0;
    while (cache.entries.size() > kMaskEntries || total > kMaskBytes) {
      const auto& last = cache.entries.back().second;
      total -= last.mask.has_value() ? last.mask->numel() * last.mask->element_size() : 0;
      cache.entries.pop_back();
    }
  }
  return args;
}

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

namespace {

// The usual call with autograd (eager, nothing watching): the torch backend's forward and backward called as the
// ops' autograd formula calls them (ops/attention._backward -> _torch_attention._dense_bwd: the same kernels and
// arguments, so the same bits), as a C++ autograd node instead of torch.library's Python one and two more trips
// through the dispatcher (~0.8 ms of a 2.9 ms forward + backward at S = 128 on the 2-core Xeon). q/k/v (B, S, H, D),
// head dims contiguous, torch's kernels reading GQA natively.
struct TorchAttentionFn : public torch::autograd::Function<TorchAttentionFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale, bool is_causal, int64_t row_begin, int64_t row_end,
                            const std::optional<at::Tensor>& mask) {
    auto [out, lse] = torch_attention_fwd(q, k, v, mask, scale, is_causal, true, row_begin, row_end, true);
    if (!out.is_contiguous()) out = out.contiguous();
    ctx->save_for_backward({q, k, v, out, *lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["row_begin"] = row_begin;
    ctx->saved_data["row_end"] = row_end;
    ctx->saved_data["mask"] = mask.has_value() ? c10::IValue(*mask) : c10::IValue();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3];
    at::Tensor lse = saved[4];
    const int64_t sq = q.size(1), a = ctx->saved_data["row_begin"].toInt(), b = ctx->saved_data["row_end"].toInt();
    at::Tensor dout = grads[0];
    if (dout.size(-1) > 1 && dout.stride(-1) != 1) dout = dout.contiguous();
    if (a > 0 || b < sq) {  // rows without keys: lse -inf in the spec, 0 as the kernel wants it (no gradient)
      lse = lse.clone();
      if (a > 0) lse.narrow(2, 0, a).zero_();
      if (b < sq) lse.narrow(2, b, sq - b).zero_();
    }
    const std::optional<at::Tensor> mask = ctx->saved_data["mask"].toOptional<at::Tensor>();
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2), lse, 0.0,
        ctx->saved_data["is_causal"].toBool(), mask, ctx->saved_data["scale"].toDouble());
    return {dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::optional<at::Tensor> attention_usual(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                          std::optional<double> softmax_scale, int64_t window_left,
                                          int64_t window_right, double softcap, bool native_gqa, bool cpu_rows,
                                          bool sdpa, bool enable_gqa, const std::optional<at::Tensor>& alibi_slopes) {
  if (watched_cxx()) return std::nullopt;
  const bool grad = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  // with autograd: attention's call only, not float64 (the op's backward runs the reference there: the kernel's P
  // from an fp32 lse), not slopes that require grad
  if (grad && (sdpa || q.scalar_type() == at::kDouble || (alibi_slopes.has_value() && alibi_slopes->requires_grad())))
    return std::nullopt;
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
  if (alibi_slopes.has_value()) {  // attention._checked's tests of the slopes; its .contiguous() copy is not served
    const at::Tensor& s = *alibi_slopes;
    if (sdpa || s.scalar_type() != at::kFloat || !s.is_cpu() || !s.is_contiguous() || s.requires_grad() ||
        !((s.dim() == 1 && s.size(0) == hq) || (s.dim() == 2 && s.size(0) == B && s.size(1) == hq)))
      return std::nullopt;
  }
  if (sq == 1 && cpu_rows) {  // attention_fwd's cpu backend (decode_attention's kernel), out in q's layout
    if (grad) return std::nullopt;  // its gradient: the op's autograd (Python)
    return std::get<0>(decode_cpu::attention_rows(q, k, v, alibi_slopes, scale, causal, window_left, window_right,
                                                  0.0, sdpa, false));
  }
  if (sdpa && !(window_left < 0 && window_right < 0)) return std::nullopt;
  if (hq != hkv && !native_gqa) return std::nullopt;
  // windows, the bottom-right causal edge, ALiBi: the cached mask (and the rows without keys) of the torch backend
  const CallArgs args = torch_attention_call_args(sq, sk, alibi_slopes, causal, window_left, window_right, dt);
  if (grad) return TorchAttentionFn::apply(q, k, v, scale, args.is_causal, args.row_begin, args.row_end, args.mask);
  // out in q's layout, a view of a contiguous (B, Sq, Hq, D) tensor (contiguous as is in FlashAttention's; the
  // guard, for a torch whose kernel would allocate otherwise)
  at::Tensor out = std::get<0>(torch_attention_fwd(q, k, v, args.mask, scale, args.is_causal, !sdpa, args.row_begin,
                                                   args.row_end, false));
  if (!sdpa && !out.is_contiguous()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = out.contiguous();
  }
  return out;
}

}  // namespace turbokernels
