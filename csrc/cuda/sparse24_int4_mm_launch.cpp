// sparse24_int4_mm's mma.sp kernel on a GPU: turbokernels_C::sparse24_int4_mm_mma for CUDA tensors. The plan
// (checks, tile, split-K) is csrc/cuda/sparse24_int4_mm_launch.h, shared with the CPU emulator's launcher
// (csrc/emu/sparse24_int4_mm.cpp); the device code is csrc/cuda/sparse24_int4_mm.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/sparse24_int4_mm_launch.h"
#include "cuda/split_k_counters.h"

namespace tk_s24i4 {
namespace {

at::Tensor sparse24_int4_mm_mma_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                     const at::Tensor& offsets, const at::Tensor& meta, int64_t group_size,
                                     int64_t out_features, const std::optional<at::Tensor>& bias, int64_t splits,
                                     int64_t sms) {
  TORCH_CHECK(x.is_cuda(), "sparse24_int4_mm_mma (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "sparse24_int4_mm_mma (cuda): needs sm_80 or newer (mma.sp, cp.async), this GPU is "
              "sm_", props->major, props->minor);
  Plan plan = tk_s24i4::plan("sparse24_int4_mm_mma (cuda)", x, qweight, scales, offsets, meta, group_size,
                             out_features, bias, splits, sms > 0 ? sms : props->multiProcessorCount);
  if (!plan.launch) return plan.out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (plan.in.splits > 1) plan.p.counters = tk_split_k::counters(x.get_device(), stream, plan.tiles, x.options());
  const int error = launch_on_gpu(plan.p, plan.in, stream, x.get_device());
  TORCH_CHECK(error == 0, "sparse24_int4_mm_mma (cuda): launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(error)));
  return plan.out;
}

}  // namespace
}  // namespace tk_s24i4

TORCH_LIBRARY_IMPL(turbokernels_C, CUDA, m) { m.impl("sparse24_int4_mm_mma", &tk_s24i4::sparse24_int4_mm_mma_cuda); }
