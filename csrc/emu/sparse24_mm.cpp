// sparse24_mm's mma.sp kernels (csrc/cuda/sparse24_mm.cuh) on the CPU emulator:
//   turbokernels_C::sparse24_mm_emulated   CPU tensors: the CUDA source run thread by thread (tk_emu), both launches
//                                          (the GEMM and, with split-K, the reduction), from the plan the CUDA
//                                          launcher uses; for the tests (tests/test_sparse24_mm_cuda_emulated.py),
//                                          slow, never a backend
#include <torch/library.h>

#include <limits>
#include <vector>

#define TK_EMULATE 1
#include "cuda/sparse24_mm.cuh"
#include "cuda/sparse24_mm_launch.h"

namespace tk_sparse24 {
namespace {

tk_emu::Buffer span(const at::Tensor& t, bool writable, const char* name) {
  return tk_emu::Buffer{t.data_ptr(), static_cast<size_t>(t.numel() * t.element_size()), writable, name};
}

struct Emulate {
  const Plan& plan;

  template <typename T, int BN, int BM, int WARPS_N, int WARPS_M>
  void run() const {
    // every buffer exactly as large as the tensor: a read one element past any of them is reported
    std::vector<tk_emu::Buffer> buffers = {span(plan.x, false, "x"), span(plan.values, false, "values"),
                                           span(plan.meta, false, "meta"), span(plan.out, true, "out")};
    if (plan.bias.defined()) buffers.push_back(span(plan.bias, false, "bias"));
    if (plan.workspace.defined()) buffers.push_back(span(plan.workspace, true, "workspace"));
    const Params params = plan.p;

    tk_emu::LaunchConfig gemm;
    gemm.grid = tk_emu::Dim3{static_cast<unsigned>((params.N + BN - 1) / BN),
                             static_cast<unsigned>((params.M + BM - 1) / BM), static_cast<unsigned>(plan.in.splits)};
    gemm.block = tk_emu::Dim3{kThreads, 1, 1};
    gemm.shared_bytes = Smem<BN, BM>::BYTES;
    gemm.buffers = buffers;
    tk_emu::launch(gemm, [&params] { sparse24_mm_kernel<T, BN, BM, WARPS_N, WARPS_M>(params); });
    if (plan.in.splits == 1) return;

    tk_emu::LaunchConfig reduce;
    reduce.grid = tk_emu::Dim3{static_cast<unsigned>(plan.in.reduce_blocks), 1, 1};
    reduce.block = tk_emu::Dim3{kReduceThreads, 1, 1};
    reduce.buffers = buffers;
    tk_emu::launch(reduce, [&params] { splitk_reduce_kernel<T>(params); });
  }
};

at::Tensor sparse24_mm_emulated(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                const std::optional<at::Tensor>& bias, int64_t splits, int64_t sms) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && meta.device().is_cpu(),
              "sparse24_mm_emulated: x, values and meta must be CPU tensors (the CUDA kernel on the CPU emulator)");
  // sms: the GPU the split-K choice is made for (default: an H100 SXM's 132)
  Plan plan = tk_sparse24::plan("sparse24_mm_emulated", x, values, meta, bias, splits, sms > 0 ? sms : 132);
  if (!plan.launch) return plan.out;
  // NaN where nothing has been written: an element the kernels forget (or a partial never stored) shows in the result
  plan.out.fill_(std::numeric_limits<float>::quiet_NaN());
  if (plan.workspace.defined()) plan.workspace.fill_(std::numeric_limits<float>::quiet_NaN());
  try {
    const Emulate run{plan};
    dispatch(plan.in, run);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "sparse24_mm_emulated: the kernel failed: ", e.what());
  }
  return plan.out;
}

}  // namespace
}  // namespace tk_sparse24

TORCH_LIBRARY_IMPL(turbokernels_C, CPU, m) { m.impl("sparse24_mm_emulated", &tk_sparse24::sparse24_mm_emulated); }
