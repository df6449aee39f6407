// decode_attention's mma kernels on a GPU: turbokernels_C::decode_attention_mma for CUDA tensors. The plan (checks,
// row tile, split-KV) is csrc/cuda/decode_attention_launch.h, shared with the CPU emulator's launcher; the device
// code is csrc/cuda/decode_attention.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/decode_attention_launch.h"

namespace tk_decode {
namespace {

at::Tensor decode_attention_mma_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                     const std::optional<at::Tensor>& alibi_slopes, double softmax_scale,
                                     int64_t window_left, double softcap, int64_t splits, int64_t sms) {
  TORCH_CHECK(q.is_cuda(), "decode_attention_mma (cuda): q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major >= 8, "decode_attention_mma (cuda): needs sm_80 or newer (mma.sync bf16, cp.async), this "
              "GPU is sm_", props->major, props->minor);
  Plan plan = tk_decode::plan("decode_attention_mma (cuda)", q, k_cache, v_cache, cache_seqlens, block_table,
                              alibi_slopes, softmax_scale, window_left, softcap, splits,
                              sms > 0 ? sms : props->multiProcessorCount);
  if (plan.out.numel() == 0) return plan.out;
  const int error = launch_on_gpu(plan.p, plan.in, at::cuda::getCurrentCUDAStream(), q.get_device());
  TORCH_CHECK(error == 0, "decode_attention_mma (cuda): launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(error)));
  return plan.out;
}

}  // namespace
}  // namespace tk_decode

TORCH_LIBRARY_IMPL(turbokernels_C, CUDA, m) { m.impl("decode_attention_mma", &tk_decode::decode_attention_mma_cuda); }
