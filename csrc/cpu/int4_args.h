// The arguments int4_mm and w4a8_mm share (one schema: x (M, K) fp16/bf16/fp32, qweight int32 (ceil(K/8), N),
// scales/offsets (G, N), group_size, bias (N) in x's dtype), checked once for both CPU kernels (csrc/cpu/int4_mm.cpp,
// csrc/cpu/w4a8_mm.cpp) with errors that name the op and the argument.
#pragma once

#include "cpu/cpu_isa.h"

#include <optional>

namespace turbokernels {
namespace cpu {

// t's dtype as the kernels read it; op(name) in the error otherwise
inline Dt dt_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kHalf: return Dt::F16;
    case at::kBFloat16: return Dt::BF16;
    default: TORCH_CHECK(false, op, "(", name, "): dtype must be float16, bfloat16 or float32, got ",
                         t.scalar_type());
  }
  return Dt::F32;
}

struct Int4Args {
  int64_t M, K, N, G;
  Dt sdt, odt;
  at::Tensor bias32;  // the bias as the epilogue reads it: (N) fp32, contiguous; undefined when there is none
};

inline Int4Args check_int4_args(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                                const at::Tensor& scales, const at::Tensor& offsets, int64_t group_size,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, op, "(x): expected a 2-D (M, K) tensor, got shape ", x.sizes());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, op,
              "(qweight): expected a 2-D int32 tensor, got ", qweight.scalar_type(), " of shape ", qweight.sizes());
  TORCH_CHECK(scales.dim() == 2, op, "(scales): expected a 2-D (G, N) tensor, got shape ", scales.sizes());
  TORCH_CHECK(offsets.dim() == 2, op, "(offsets): expected a 2-D (G, N) tensor, got shape ", offsets.sizes());
  TORCH_CHECK(group_size > 0, op, "(group_size): must be positive, got ", group_size);
  for (const at::Tensor* t : {&x, &qweight, &scales, &offsets})
    TORCH_CHECK(t->device().is_cpu(), op, ": all tensors must be on the CPU, got one on ", t->device());
  dt_of(x, op, "x");
  Int4Args a;
  a.sdt = dt_of(scales, op, "scales");
  a.odt = dt_of(offsets, op, "offsets");
  a.M = x.size(0);
  a.K = x.size(1);
  a.N = qweight.size(1);
  a.G = std::max<int64_t>(1, (a.K + group_size - 1) / group_size);  // as formats/int4.py num_groups
  const int64_t K = a.K, N = a.N, G = a.G;
  TORCH_CHECK(qweight.size(0) == (K + 7) / 8, op, "(qweight): expected ceil(K/8) = ", (K + 7) / 8, " rows for K = ",
              K, ", got ", qweight.size(0));
  TORCH_CHECK(scales.size(0) == G && scales.size(1) == N, op, "(scales): expected shape (", G, ", ", N, ") for K = ",
              K, ", group_size = ", group_size, ", got ", scales.sizes());
  TORCH_CHECK(offsets.size(0) == G && offsets.size(1) == N, op, "(offsets): expected shape (", G, ", ", N,
              ") for K = ", K, ", group_size = ", group_size, ", got ", offsets.sizes());
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, op, "(bias): expected a 1-D tensor of N = ", N,
                " elements, got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, "(bias): dtype ", b.scalar_type(), " differs from x's ",
                x.scalar_type());
    TORCH_CHECK(b.device() == x.device(), op, "(bias): bias is on ", b.device(), " but x is on ", x.device());
    a.bias32 = b.to(at::kFloat).contiguous();
  }
  return a;
}

}  // namespace cpu
}  // namespace turbokernels
