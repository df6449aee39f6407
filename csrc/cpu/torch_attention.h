// turbokernels._C.torch_attention_fwd: the `torch` attention backend's forward in one call (torch_attention.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace turbokernels {

// q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) when bshd, else (B, H, S, D); head dims contiguous, Sk > 0, CPU, no input
// requiring grad. attn_mask, scale, is_causal: the aten kernel's. Rows [row_begin, row_end) of every (batch, head)
// have keys; the others get lse -inf. Returns out in q's layout (a view of a contiguous (B, Sq, Hq, D) tensor) and,
// when want_lse, lse fp32 (B, Hq, Sq) contiguous. A NaN query row gives a NaN out row (and lse).
std::tuple<at::Tensor, std::optional<at::Tensor>> torch_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    double scale, bool is_causal, bool bshd, int64_t row_begin, int64_t row_end, bool want_lse);

// decode_attention's torch-backend call on one span of a contiguous cache (_torch_attention._decode_block): q
// (B, T, Hq, D), k_cache/v_cache (B, L, Hkv, D); slots [lo, hi) of every sequence; grouped: the g = Hq / Hkv query
// heads of a kv head go to the kernel as g * T rows of it (then rows are [0, g * T)). Returns (B, T, Hq, D)
// contiguous.
at::Tensor torch_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  int64_t lo, int64_t hi, const std::optional<at::Tensor>& attn_mask, double scale,
                                  bool is_causal, bool grouped, int64_t row_begin, int64_t row_end);

// _torch_attention._call_args for one dense block (no decode grouping): whether to pass is_causal, the additive mask
// (windows, the spec's bottom-right causal edge, ALiBi slopes (H,) or (B, H) fp32), and the rows [row_begin,
// row_end) that have keys. Masks are cached (an LRU bounded in entries and bytes; ALiBi keyed by the slopes' values).
struct CallArgs {
  bool is_causal = false;
  std::optional<at::Tensor> mask;
  int64_t row_begin = 0, row_end = 0;
};
CallArgs torch_attention_call_args(int64_t sq, int64_t sk, const std::optional<at::Tensor>& slopes, bool causal,
                                   int64_t window_left, int64_t window_right, at::ScalarType dtype);

// turbokernels.attention's usual CPU call (no varlen or lse; nothing watching, no forced backend: the caller tests
// torch.compile, forward AD, the backend and the Python arguments' kinds) in one C++ call: every check of the Python
// path that the call can fail returns nullopt instead of raising (the Python path then runs and raises what the call
// deserves), as do the calls it does not serve (softcap, GQA on a torch without native GQA, slopes that are not fp32
// contiguous (H,) or (B, H)). Windows, the bottom-right causal edge and ALiBi get torch_attention_call_args' cached
// mask. With autograd too (not one query row, not float64): a C++ autograd node running the torch backend's forward
// and backward, the op's kernels and arguments. One query row with cpu_rows: the cpu backend (decode_attention.cpp);
// else the torch backend's torch_attention_fwd. Returns out (B, Sq, Hq, D) contiguous. sdpa:
// scaled_dot_product_attention's call instead (no autograd, no window, no ALiBi): (B, H, S, D) tensors, out
// (B, Hq, Sq, D) (a view of a contiguous (B, Sq, Hq, D) tensor), is_causal only with Sq == Sk (SDPA aligns it
// top-left), no float64, Hq != Hkv only with enable_gqa.
std::optional<at::Tensor> attention_usual(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                          std::optional<double> softmax_scale, int64_t window_left,
                                          int64_t window_right, double softcap, bool native_gqa, bool cpu_rows,
                                          bool sdpa, bool enable_gqa,
                                          const std::optional<at::Tensor>& alibi_slopes = std::nullopt);

}  // namespace turbokernels
