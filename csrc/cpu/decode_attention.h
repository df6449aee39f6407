// turbokernels._C.attention_rows: attention_fwd's `cpu` backend, decode_attention's kernel on a few query rows per
// sequence over all of its keys (decode_attention.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace turbokernels {
namespace decode_cpu {

// q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) when not bhsd, else (B, Hq, Sq, D) and (B, Hkv, Sk, D); CPU, one float
// dtype, k/v's head dims contiguous, Hq a multiple of Hkv, 1 <= D <= 256. attention_fwd's spec
// (reference/attention.py): row i sits at p = Sk - Sq + i and attends the keys j in [p - window_left, p] when causal,
// [p - window_left, p + window_right] otherwise (a negative window: unbounded on that side), scores
// softmax_scale * q.k, softcap * tanh(s / softcap) when softcap > 0, minus slope * |p - j| with ALiBi slopes float32
// (Hq,) or (B, Hq). Returns out in q's layout (a view of a contiguous (B, Sq, Hq, D) tensor) and when want_lse the
// fp32 lse (B, Hq, Sq); a row without keys gets out 0 and lse -inf.
std::tuple<at::Tensor, std::optional<at::Tensor>> attention_rows(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& alibi_slopes,
    double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap, bool bhsd,
    bool want_lse);

}  // namespace decode_cpu
}  // namespace turbokernels
