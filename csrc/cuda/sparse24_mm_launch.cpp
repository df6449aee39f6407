// sparse24_mm's mma.sp kernels on a GPU: the CUDA kernel of turbokernels_C::sparse24_mm. The plan (checks, tile,
// split-K) is csrc/cuda/sparse24_mm_launch.h, shared with the CPU emulator's launcher (csrc/emu/sparse24_mm.cpp,
// turbokernels_C::sparse24_mm_emulated); the device code is csrc/cuda/sparse24_mm.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/sparse24_mm_launch.h"

namespace tk_sparse24 {
namespace {

at::Tensor sparse24_mm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && values.is_cuda() && meta.is_cuda(),
              "sparse24_mm (cuda): x, values and meta must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  Plan plan = tk_sparse24::plan("sparse24_mm (cuda)", x, values, meta, bias, 0, sms);
  if (!plan.launch) return plan.out;
  const int error = launch_on_gpu(plan.p, plan.in, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == 0, "sparse24_mm (cuda): launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(error)));
  return plan.out;
}

}  // namespace
}  // namespace tk_sparse24

TORCH_LIBRARY_IMPL(turbokernels_C, CUDA, m) { m.impl("sparse24_mm", &tk_sparse24::sparse24_mm_cuda); }
