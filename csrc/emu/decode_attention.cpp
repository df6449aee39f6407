// decode_attention's mma kernel (csrc/cuda/decode_attention.cuh) on the CPU emulator:
//   turbokernels_C::decode_attention_mma   CPU tensors: the CUDA kernels' source run thread by thread (tk_emu), split
//                                          kernel then combine, for the tests (tests/test_decode_attention_cuda.py);
//                                          slow, never a backend
#include <torch/library.h>

#include <limits>
#include <vector>

#define TK_EMULATE 1
#include "cuda/decode_attention.cuh"
#include "cuda/decode_attention_launch.h"

namespace tk_decode {
namespace {

tk_emu::Buffer span(const at::Tensor& t, bool writable, const char* name) {
  // from the first element to one past the last, whatever the strides (nothing for an empty tensor)
  if (t.numel() == 0) return tk_emu::Buffer{t.data_ptr(), 0, writable, name};
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return tk_emu::Buffer{t.data_ptr(), static_cast<size_t>((last + 1) * t.element_size()), writable, name};
}

struct Emulate {
  const Plan& plan;
  std::vector<tk_emu::Buffer> buffers;

  template <typename T, int D, int WARPS_M>
  void run() const {
    const Params params = plan.p;
    tk_emu::LaunchConfig split;
    split.grid = tk_emu::Dim3{static_cast<unsigned>(plan.in.programs), static_cast<unsigned>(plan.in.splits), 1};
    split.block = tk_emu::Dim3{kThreads, 1, 1};
    split.shared_bytes = Tile<D>::BYTES;
    split.buffers = buffers;
    tk_emu::launch(split, [&params] { decode_attention_kernel<T, D, WARPS_M>(params); });
    if (plan.in.splits == 1) return;
    tk_emu::LaunchConfig combine;
    combine.grid = tk_emu::Dim3{static_cast<unsigned>(plan.in.combine_blocks), 1, 1};
    combine.block = tk_emu::Dim3{kThreads, 1, 1};
    combine.buffers = buffers;
    tk_emu::launch(combine, [&params] { decode_attention_combine_kernel<T, D>(params); });
  }
};

at::Tensor decode_attention_mma_emulated(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                         const std::optional<at::Tensor>& alibi_slopes, double softmax_scale,
                                         int64_t window_left, double softcap, int64_t splits, int64_t sms) {
  // sms: the GPU the split-KV choice is made for (default: an H100 SXM's 132)
  Plan plan = tk_decode::plan("decode_attention_mma (emulated)", q, k_cache, v_cache, cache_seqlens, block_table,
                              alibi_slopes, softmax_scale, window_left, softcap, splits, sms > 0 ? sms : 132);
  if (plan.out.numel() == 0) return plan.out;
  std::vector<tk_emu::Buffer> b = {span(plan.q, false, "q"), span(k_cache, false, "k_cache"),
                                   span(v_cache, false, "v_cache"), span(cache_seqlens, false, "cache_seqlens"),
                                   span(plan.out, true, "out")};
  if (block_table.has_value() && block_table->defined() && block_table->numel() > 0) {
    b.push_back(span(*block_table, false, "block_table"));
  }
  if (plan.alibi.defined()) b.push_back(span(plan.alibi, false, "alibi_slopes"));
  // poisoned: an element no thread writes (a row the kernel skips) stays NaN, and so does a partial read before it
  // was written (a split the combine should skip)
  plan.out.fill_(std::numeric_limits<float>::quiet_NaN());
  if (plan.in.splits > 1) {
    plan.part.fill_(std::numeric_limits<float>::quiet_NaN());
    plan.m.fill_(std::numeric_limits<float>::quiet_NaN());
    plan.l.fill_(std::numeric_limits<float>::quiet_NaN());
    b.push_back(span(plan.part, true, "partials"));
    b.push_back(span(plan.m, true, "row max"));
    b.push_back(span(plan.l, true, "row sum"));
  }
  const Emulate emulate{plan, b};
  try {
    dispatch(plan.in, emulate);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "decode_attention_mma (emulated): the kernel failed: ", e.what());
  }
  return plan.out;
}

// The dynamic shared memory a launch asks for (the static checks compare it with each architecture's limit; the
// emulator confines every shared access to it).
int64_t decode_attention_mma_shared_bytes(int64_t head_dim) {
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "decode_attention_mma_shared_bytes: head_dim 64 or 128");
  return head_dim == 64 ? Tile<64>::BYTES : Tile<128>::BYTES;
}

}  // namespace
}  // namespace tk_decode

TORCH_LIBRARY_FRAGMENT(turbokernels_C, m) {
  m.def("decode_attention_mma_shared_bytes(int head_dim) -> int", &tk_decode::decode_attention_mma_shared_bytes);
}
TORCH_LIBRARY_IMPL(turbokernels_C, CPU, m) {
  m.impl("decode_attention_mma", &tk_decode::decode_attention_mma_emulated);
}
