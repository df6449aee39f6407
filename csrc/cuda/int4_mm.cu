// int4_mm's mma kernel (csrc/cuda/int4_mm.cuh) instantiated for the GPU and launched: tk_int4::launch_on_gpu.
// No torch headers here: nvcc compiles this file once per architecture, and torch's headers would cost each pass
// half a minute; the torch side (checks, plan, registration) is csrc/cuda/int4_mm_launch.cpp, compiled once.
#include <cuda_runtime.h>

#include "cuda/int4_mm.cuh"

namespace tk_int4 {
namespace {

struct GpuLaunch {
  const Params& p;
  const Instance& in;
  cudaStream_t stream;
  int device;
  cudaError_t error = cudaSuccess;

  template <typename T, int DQ, int BM, int BN, int WARPS_M, int WARPS_N>
  void run() {
    constexpr int bytes = Smem<BM, BN, DQ>::BYTES;
    constexpr auto kernel = int4_mm_kernel<T, DQ, BM, BN, WARPS_M, WARPS_N>;
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

}  // namespace tk_int4
