// turbokernels._C: the schemas of the private op namespace `turbokernels_C`.
//
// Every kernel in csrc/ registers itself as torch.ops.turbokernels_C.<op> (TORCH_LIBRARY_IMPL next to the kernel,
// e.g. csrc/cpu/int4_mm.cpp for CPU); the schemas live here, once, so a CPU-only and a CUDA build define the same
// ops. The public ops (namespace `turbokernels`, python/turbokernels/ops/) reach these through backends.py, which
// asks the dispatcher whether a kernel exists for the device before choosing the "cpu"/"cuda" backend.
#include <torch/extension.h>
#include <torch/version.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu/decode_attention.h"
#include "cpu/torch_attention.h"
#include "watched.h"

#include <string>

namespace turbokernels::w4a8_cpu {
std::string w4a8_mm_isa();  // csrc/cpu/w4a8_mm.cpp
}

TORCH_LIBRARY(turbokernels_C, m) {
  // The optional bias (N) is in x's dtype and is added to the fp32 sum before its one rounding to x's dtype.
  // x (M, K) fp16/bf16/fp32 @ dequant(qweight int32 (ceil(K/8), N), scales/offsets (G, N)) [+ bias] -> (M, N) in x's
  // dtype
  m.def("int4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, Tensor? bias=None) "
        "-> Tensor");
  // x (M, K) fp16/bf16/fp32 @ W.T [+ bias], W (N, K) 2:4-sparse as values (N, K/2) in x's dtype + meta int16
  // (N, ceil(K/16))
  m.def("sparse24_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor");
  // int4_mm's arguments; x quantized to int8 per block of 32 k first (python/turbokernels/reference/w4a8_mm.py)
  m.def("w4a8_mm(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, Tensor? bias=None) "
        "-> Tensor");
  // x (M, K) fp16/bf16/fp32 @ W.T [+ bias], W (N, K) 2:4-sparse with int4 kept values: qweight int32 (ceil(K/16), N),
  // scales/offsets (G, N) per group_size KEPT values, meta int16 (N, ceil(K/16))
  m.def("sparse24_int4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, Tensor meta, int group_size, "
        "Tensor? bias=None) -> Tensor");
  // torch.ops.turbokernels.decode_attention's arguments (python/turbokernels/ops/decode_attention.py): q (B, T, Hq, D),
  // caches (B, S, Hkv, D) or paged (num_pages, page_size, Hkv, D) with block_table int32 (B, pages), cache_seqlens
  // int32 (B,) -> (B, T, Hq, D) contiguous in q's dtype
  // int4_mm on tensor cores (csrc/cuda/int4_mm.cuh): x (M, K) fp16/bf16 @ the weight in the mma layout
  // (int4_mm_mma_repack; scales/offsets (G, ceil(N/16)*16) in x's dtype or fp32; zero_points: offsets hold
  // -(M + z) for integer zero points z, formats/int4.py mma_layout) -> (M, N). splits 0: automatic
  // split-K for `sms` SMs (0: the device's). CUDA: csrc/cuda/int4_mm.cu; CPU: the CUDA source on the emulator
  // (csrc/emu/int4_mm.cpp), for tests.
  m.def("int4_mm_mma(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, int out_features, "
        "Tensor? bias=None, int splits=0, int sms=0, bool zero_points=False) -> Tensor");
  // Int4Weight.qweight int32 (ceil(K/8), N) -> int32 (ceil(K/16), ceil(N/16) * 32), csrc/cuda/int4_mm_layout.h
  m.def("int4_mm_mma_repack(Tensor qweight, int in_features) -> Tensor");
  // sparse24_int4_mm on sparse tensor cores (csrc/cuda/sparse24_int4_mm.cuh): x (M, K) fp16/bf16, K % 32 == 0, @ W.T,
  // the kept values in the mma.sp layout (sparse24_int4_mm_mma_repack; scales/offsets (G, ceil(N/16)*16) in x's
  // dtype or fp32, group_size in kept values), meta int16 (N, K/16) -> (M, N). splits 0: automatic split-K for `sms`
  // SMs (0: the device's). CUDA: csrc/cuda/sparse24_int4_mm.cu; CPU: the CUDA source on the emulator
  // (csrc/emu/sparse24_int4_mm.cpp), for tests.
  m.def("sparse24_int4_mm_mma(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, Tensor meta, int group_size, "
        "int out_features, Tensor? bias=None, int splits=0, int sms=0) -> Tensor");
  // the kept values' Int4Weight.qweight int32 (K/16, N) -> int32 (K/32, ceil(N/16) * 32),
  // csrc/cuda/sparse24_int4_mm_layout.h
  m.def("sparse24_int4_mm_mma_repack(Tensor qweight, int in_features) -> Tensor");
  // sparse24_mm's CUDA kernels (csrc/cuda/sparse24_mm.cuh) on the CPU emulator (csrc/emu/sparse24_mm.cpp), for tests:
  // CPU tensors, sparse24_mm's arguments; splits 0: the CUDA launcher's split-K choice for `sms` SMs (0: 132), else
  // that many parts (at most one per k tile of 64).
  m.def("sparse24_mm_emulated(Tensor x, Tensor values, Tensor meta, Tensor? bias=None, int splits=0, int sms=0) "
        "-> Tensor");
  // decode_attention on tensor cores (csrc/cuda/decode_attention.cuh), causal, fp16/bf16, head_dim 64/128: the
  // decode_attention op's arguments minus the declined options -> out (B, T, Hq, D). splits 0: automatic split-KV
  // for `sms` SMs (0: the device's). CUDA: csrc/cuda/decode_attention.cu; CPU: the CUDA source on the emulator
  // (csrc/emu/decode_attention.cpp), for tests.
  m.def("decode_attention_mma(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
        "Tensor? alibi_slopes, float softmax_scale, int window_left, float softcap, int splits=0, int sms=0) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
        "Tensor? alibi_slopes, float softmax_scale, int window_left, int window_right, float softcap) -> Tensor");
}

// The same ops as plain Python functions, turbokernels._C.<op>: a typed call into the dispatcher (the kernel
// registered for the tensors' device, as torch.ops.turbokernels_C.<op> runs it) without torch.ops' boxed Python
// path, which costs ~3 us a call (bench/overhead.py: the int4 kernel at one token was 9.5 us through torch.ops, most
// of it that path). The GIL is released around the kernel, as torch.ops does, so other Python threads run meanwhile.
// The kernels have no autograd formula (the public ops in python/turbokernels/ops/ register theirs): the call goes
// below the autograd keys, as the public op's own kernel does, instead of through torch's boxed
// "autograd not implemented" fallback (~1 us). The Python callers reach these only with no input requiring grad.
namespace {

template <typename Fn>
c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets,
                   int64_t group_size, const std::optional<at::Tensor>& bias) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, int64_t, const std::optional<at::Tensor>&)>(
      "turbokernels_C::int4_mm");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, qweight, scales, offsets, group_size, bias);
}

at::Tensor w4a8_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets,
                   int64_t group_size, const std::optional<at::Tensor>& bias) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, int64_t, const std::optional<at::Tensor>&)>(
      "turbokernels_C::w4a8_mm");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, qweight, scales, offsets, group_size, bias);
}

at::Tensor sparse24_mm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                       const std::optional<at::Tensor>& bias) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const std::optional<at::Tensor>&)>("turbokernels_C::sparse24_mm");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, values, meta, bias);
}

at::Tensor sparse24_int4_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& offsets, const at::Tensor& meta, int64_t group_size,
                            const std::optional<at::Tensor>& bias) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, int64_t,
                                             const std::optional<at::Tensor>&)>("turbokernels_C::sparse24_int4_mm");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, qweight, scales, offsets, meta, group_size, bias);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                            const std::optional<at::Tensor>& alibi_slopes, double softmax_scale, int64_t window_left,
                            int64_t window_right, double softcap) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const std::optional<at::Tensor>&,
                                             const std::optional<at::Tensor>&, double, int64_t, int64_t, double)>(
      "turbokernels_C::decode_attention");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, softmax_scale, window_left,
                 window_right, softcap);
}

// The linear entries' usual CPU call (python/turbokernels/ops/_linear.planned, for a plan whose weights are plain
// CPU tensors without an act-order permutation; the caller tests torch.compile, forward AD, the forced backend and
// that x and the bias are torch.Tensor exactly): planned's checks of x and the bias, the reshape to 2-D and the CPU
// kernel in one call. nullopt for every call it does not serve (then the Python path runs and raises what a bad
// call deserves). op: 0 int4_mm (a qweight, b scales, c offsets), 1 sparse24_mm (a values, b meta: x's dtype must
// be the values'), 2 sparse24_int4_mm (a qweight, b scales, c offsets, d meta), 3 w4a8_mm (as int4_mm; group sizes
// the CPU kernel declines, not multiples of 32, are left to the Python path, which sends them to the reference).
std::optional<at::Tensor> linear_usual(int64_t op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                       const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c,
                                       const std::optional<at::Tensor>& d, int64_t group_size, int64_t in_features,
                                       int64_t out_features) {
  if (turbokernels::watched_cxx()) return std::nullopt;
  const bool grad = at::GradMode::is_enabled();
  if (grad && (x.requires_grad() || (bias.has_value() && bias->requires_grad()))) return std::nullopt;
  const auto dt = x.scalar_type();
  if (!x.is_cpu() || (dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16) || x.dim() == 0 ||
      x.size(-1) != in_features || x.numel() == 0 || (op == 1 && a.scalar_type() != dt))
    return std::nullopt;
  if (bias.has_value() && (bias->scalar_type() != dt || bias->dim() != 1 || bias->size(0) != out_features ||
                           !bias->is_cpu()))
    return std::nullopt;
  if (op == 3 && group_size > 0 && group_size < in_features && group_size % 32 != 0) return std::nullopt;
  const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, in_features});
  at::Tensor out;
  switch (op) {
    case 0: out = int4_mm(x2, a, b, *c, group_size, bias); break;
    case 1: out = sparse24_mm(x2, a, b, bias); break;
    case 3: out = w4a8_mm(x2, a, b, *c, group_size, bias); break;
    default: out = sparse24_int4_mm(x2, a, b, *c, *d, group_size, bias); break;
  }
  if (x.dim() == 2) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(out_features);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return out.view(shape);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "turbokernels C++/CUDA kernels, registered as torch.ops.turbokernels_C.*, and the same ops as functions";
  // _C is tied to the torch it was compiled against (torch's C++ ABI: headers, libtorch's symbols); _ext.py refuses
  // to use it under another torch (warns once, falls back) instead of risking a crash
  m.attr("built_for_torch") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                              std::to_string(TORCH_VERSION_PATCH);
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("int4_mm", &int4_mm, "torch.ops.turbokernels_C.int4_mm without the boxed path", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("group_size"), py::arg("bias") = py::none(),
        no_gil);
  m.def("w4a8_mm", &w4a8_mm, "torch.ops.turbokernels_C.w4a8_mm without the boxed path", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("group_size"), py::arg("bias") = py::none(),
        no_gil);
  m.def("w4a8_mm_isa", &turbokernels::w4a8_cpu::w4a8_mm_isa,
        "the instruction set w4a8_mm's CPU kernel runs here: avx512vnni, avx2 or scalar (csrc/cpu/w4a8_mm.cpp)");
  m.def("sparse24_mm", &sparse24_mm, "torch.ops.turbokernels_C.sparse24_mm without the boxed path", py::arg("x"),
        py::arg("values"), py::arg("meta"), py::arg("bias") = py::none(), no_gil);
  m.def("sparse24_int4_mm", &sparse24_int4_mm, "torch.ops.turbokernels_C.sparse24_int4_mm without the boxed path",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("meta"),
        py::arg("group_size"), py::arg("bias") = py::none(), no_gil);
  m.def("torch_attention_fwd", &turbokernels::torch_attention_fwd,
        "the torch attention backend's forward in one call (csrc/cpu/torch_attention.cpp)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("attn_mask"), py::arg("scale"), py::arg("is_causal"), py::arg("bshd"),
        py::arg("row_begin"), py::arg("row_end"), py::arg("want_lse"), no_gil);
  m.def("torch_attention_decode", &turbokernels::torch_attention_decode,
        "decode_attention's torch backend on one span of a contiguous cache (csrc/cpu/torch_attention.cpp)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("lo"), py::arg("hi"), py::arg("attn_mask"),
        py::arg("scale"), py::arg("is_causal"), py::arg("grouped"), py::arg("row_begin"), py::arg("row_end"), no_gil);
  m.def("decode_attention", &decode_attention, "torch.ops.turbokernels_C.decode_attention without the boxed path",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("block_table"),
        py::arg("alibi_slopes"), py::arg("softmax_scale"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), no_gil);
  m.def("linear_usual", &linear_usual,
        "the linear entries' usual CPU call in one C++ call, or None (csrc/ops.cpp)", py::arg("op"), py::arg("x"),
        py::arg("bias"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"), py::arg("group_size"),
        py::arg("in_features"), py::arg("out_features"), no_gil);
  m.def("attention_usual", &turbokernels::attention_usual,
        "turbokernels.attention's usual CPU call in one C++ call, or None (csrc/cpu/torch_attention.cpp)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("causal"), py::arg("softmax_scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("native_gqa"), py::arg("cpu_rows"), py::arg("sdpa"),
        py::arg("enable_gqa"), py::arg("alibi_slopes") = py::none(), no_gil);
  m.def(
      "torch_attention_call_args",
      [](int64_t sq, int64_t sk, const std::optional<at::Tensor>& slopes, bool causal, int64_t window_left,
         int64_t window_right, at::ScalarType dtype) {
        const turbokernels::CallArgs a =
            turbokernels::torch_attention_call_args(sq, sk, slopes, causal, window_left, window_right, dtype);
        return std::make_tuple(a.is_causal, a.mask, a.row_begin, a.row_end);
      },
      "the torch attention backend's (is_causal, mask, row_begin, row_end) for one dense block, masks cached "
      "(csrc/cpu/torch_attention.cpp)",
      py::arg("sq"), py::arg("sk"), py::arg("slopes"), py::arg("causal"), py::arg("window_left"),
      py::arg("window_right"), py::arg("dtype"));
  m.def("attention_rows", &turbokernels::decode_cpu::attention_rows,
        "attention_fwd's cpu backend: a few query rows per sequence, decode_attention's kernel (decode_attention.cpp)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("alibi_slopes"), py::arg("softmax_scale"), py::arg("causal"),
        py::arg("window_left"), py::arg("window_right"), py::arg("softcap"), py::arg("bhsd"), py::arg("want_lse"),
        no_gil);
}
