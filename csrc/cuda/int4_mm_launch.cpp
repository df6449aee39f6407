// int4_mm's mma kernel on a GPU: turbokernels_C::int4_mm_mma for CUDA tensors. The plan (checks, tile, split-K)
// is csrc/cuda/int4_mm_launch.h, shared with the CPU emulator's launcher; the device code is csrc/cuda/int4_mm.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/int4_mm_launch.h"
#include "cuda/split_k_counters.h"

namespace tk_int4 {
namespace {

at::Tensor int4_mm_mma_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& offsets, int64_t group_size, int64_t out_features,
                            const std::optional<at::Tensor>& bias, int64_t splits, int64_t sms,
                            bool zero_points) {
  TORCH_CHECK(x.is_cuda(), "int4_mm_mma (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "int4_mm_mma (cuda): needs sm_80 or newer (mma.sync bf16, cp.async), this GPU is sm_",
              props->major, props->minor);
  Plan plan = tk_int4::plan("int4_mm_mma (cuda)", x, qweight, scales, offsets, group_size, out_features, bias, splits,
                            sms > 0 ? sms : props->multiProcessorCount, zero_points);
  if (x.size(0) == 0) return plan.out;  // a grid of 0 blocks is a launch error
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (plan.in.splits > 1) plan.p.counters = tk_split_k::counters(x.get_device(), stream, plan.tiles, x.options());
  const int error = launch_on_gpu(plan.p, plan.in, stream, x.get_device());
  TORCH_CHECK(error == 0, "int4_mm_mma (cuda): launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(error)));
  return plan.out;
}

}  // namespace
}  // namespace tk_int4

TORCH_LIBRARY_IMPL(turbokernels_C, CUDA, m) { m.impl("int4_mm_mma", &tk_int4::int4_mm_mma_cuda); }
