// sparse24_int4_mm's mma.sp kernel (csrc/cuda/sparse24_int4_mm.cuh) instantiated for the GPU and launched:
// tk_s24i4::launch_on_gpu. No torch headers here: nvcc compiles this file once per architecture, and torch's headers
// would cost each pass half a minute; the torch side (checks, plan, registration) is
// csrc/cuda/sparse24_int4_mm_launch.cpp, compiled once.
#include <cuda_runtime.h>

#include "cuda/sparse24_int4_mm.cuh"

namespace tk_s24i4 {
namespace {

struct GpuLaunch {
  const Params& p;
  const Instance& in;
  cudaStream_t stream;
  int device;
  cudaError_t error = cudaSuccess;

  template <typename T, bool FQ, int BN, int BM, int WARPS_N, int WARPS_M>
  void run() {
    constexpr int bytes = Smem<BN, BM, FQ>::BYTES;
    constexpr auto kernel = sparse24_int4_mm_kernel<T, FQ, BN, BM, WARPS_N, WARPS_M>;
    if ((error = allow_dynamic_shared<kernel>(bytes, device)) != cudaSuccess) return;
    const dim3 grid((p.N + BN - 1) / BN, (p.M + BM - 1) / BM, in.splits);
    kernel<<<grid, kThreads, bytes, stream>>>(p);
    error = cudaGetLastError();
  }
};

}  // namespace

int launch_on_gpu(const Params& p, const Instance& in, void* stream, int device) {
  GpuLaunch launch{p, in, static_cast<cudaStream_t>(stream), device};
  dispatch(in, launch);
  return static_cast<int>(launch.error);
}

}  // namespace tk_s24i4
