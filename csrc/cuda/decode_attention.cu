// decode_attention's mma kernels (csrc/cuda/decode_attention.cuh) instantiated for the GPU and launched:
// tk_decode::launch_on_gpu. No torch headers here: nvcc compiles this file once per architecture; the torch side
// (checks, plan, registration) is csrc/cuda/decode_attention_launch.cpp, compiled once. No host sync: the grid comes
// from the capacity, so a CUDA graph can capture the launch.
#include <cuda_runtime.h>

#include "cuda/decode_attention.cuh"

namespace tk_decode {
namespace {

struct GpuLaunch {
  const Params& p;
  const Instance& in;
  cudaStream_t stream;
  int device;
  cudaError_t error = cudaSuccess;

  template <typename T, int D, int WARPS_M>
  void run() {
    constexpr int bytes = Tile<D>::BYTES;
    if ((error = allow_dynamic_shared<decode_attention_kernel<T, D, WARPS_M>>(bytes, device)) != cudaSuccess) return;
    const dim3 grid(static_cast<unsigned>(in.programs), static_cast<unsigned>(in.splits), 1);
    decode_attention_kernel<T, D, WARPS_M><<<grid, kThreads, bytes, stream>>>(p);
    if ((error = cudaGetLastError()) != cudaSuccess || in.splits == 1) return;
    decode_attention_combine_kernel<T, D><<<static_cast<unsigned>(in.combine_blocks), kThreads, 0, stream>>>(p);
    error = cudaGetLastError();
  }
};

}  // namespace

int launch_on_gpu(const Params& p, const Instance& in, void* stream, int device) {
  GpuLaunch launch{p, in, static_cast<cudaStream_t>(stream), device};
  dispatch(in, launch);
  return static_cast<int>(launch.error);
}

}  // namespace tk_decode
