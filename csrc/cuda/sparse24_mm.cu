// sparse24_mm's mma.sp kernels (csrc/cuda/sparse24_mm.cuh: layout, operands, strategy) instantiated for the GPU and
// launched: tk_sparse24::launch_on_gpu. No torch headers here: nvcc compiles this file once per architecture, and
// torch's headers would cost each pass half a minute; the torch side (checks, plan, the CUDA kernel of
// turbokernels_C::sparse24_mm) is csrc/cuda/sparse24_mm_launch.cpp, compiled once.
#include <cuda_runtime.h>

#include "cuda/sparse24_mm.cuh"

namespace tk_sparse24 {
namespace {

struct GpuLaunch {
  const Params& p;
  const Instance& in;
  cudaStream_t stream;
  cudaError_t error = cudaSuccess;

  template <typename T, int BN, int BM, int WARPS_N, int WARPS_M>
  void run() {
    const dim3 grid((p.N + BN - 1) / BN, (p.M + BM - 1) / BM, in.splits);
    sparse24_mm_kernel<T, BN, BM, WARPS_N, WARPS_M><<<grid, kThreads, Smem<BN, BM>::BYTES, stream>>>(p);
    if ((error = cudaGetLastError()) != cudaSuccess || in.splits == 1) return;
    splitk_reduce_kernel<T><<<in.reduce_blocks, kReduceThreads, 0, stream>>>(p);
    error = cudaGetLastError();
  }
};

}  // namespace

int launch_on_gpu(const Params& p, const Instance& in, void* stream) {
  GpuLaunch launch{p, in, static_cast<cudaStream_t>(stream)};
  dispatch(in, launch);
  return static_cast<int>(launch.error);
}

}  // namespace tk_sparse24
