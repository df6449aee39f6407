// turbokernels._C: the schemas of the private op namespace `turbokernels_C`.
//
// Every kernel in csrc/ registers itself as torch.ops.turbokernels_C.<op> (TORCH_LIBRARY_IMPL next to the kernel,
// e.g. csrc/cpu/int4_mm.cpp for CPU); the schemas live here, once, so a CPU-only and a CUDA build define the same
// ops. The public ops (namespace `turbokernels`, python/turbokernels/ops/) reach these through backends.py, which
// asks the dispatcher whether a kernel exists for the device before choosing the "cpu"/"cuda" backend.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(turbokernels_C, m) {
  // The optional bias (N) is in x's dtype and is added to the fp32 sum before its one rounding to x's dtype.
  // x (M, K) fp16/bf16/fp32 @ dequant(qweight int32 (ceil(K/8), N), scales/offsets (G, N)) [+ bias] -> (M, N) in x's
  // dtype
  m.def("int4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size, Tensor? bias=None) "
        "-> Tensor");
  // x (M, K) fp16/bf16/fp32 @ W.T [+ bias], W (N, K) 2:4-sparse as values (N, K/2) in x's dtype + meta int16
  // (N, ceil(K/16))
  m.def("sparse24_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor");
  // x (M, K) fp16/bf16/fp32 @ W.T [+ bias], W (N, K) 2:4-sparse with int4 kept values: qweight int32 (ceil(K/16), N),
  // scales/offsets (G, N) per group_size KEPT values, meta int16 (N, ceil(K/16))
  m.def("sparse24_int4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, Tensor meta, int group_size, "
        "Tensor? bias=None) -> Tensor");
}

// Nothing is bound through pybind11: importing the module only runs the static registrations above (and the
// TORCH_LIBRARY_IMPL blocks in the other translation units).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "turbokernels C++/CUDA kernels, registered as torch.ops.turbokernels_C.*";
}
