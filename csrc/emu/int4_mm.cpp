// int4_mm's mma kernel (csrc/cuda/int4_mm.cuh) on the CPU emulator, and the repack into its layout.
//   turbokernels_C::int4_mm_mma          CPU tensors: the CUDA kernel's source run thread by thread (tk_emu), for the
//                                        tests (tests/test_int4_mm_cuda.py); slow, never a backend
//   turbokernels_C::int4_mm_mma_repack   any device (ATen ops): Int4Weight.qweight -> the mma layout, from
//                                        tk_int4::nibble_source, the function the kernel's layout is defined by
#include <torch/library.h>

#include <vector>

#define TK_EMULATE 1
#include "cuda/int4_mm.cuh"
#include "cuda/int4_mm_launch.h"

namespace tk_int4 {
namespace {

std::vector<tk_emu::Buffer> buffers(const Plan& plan, const at::Tensor& qweight, const at::Tensor& scales,
                                    const at::Tensor& offsets, const at::Tensor& counters) {
  auto span = [](const at::Tensor& t, bool writable, const char* name) {
    // from the first element to one past the last, whatever the strides
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return tk_emu::Buffer{t.data_ptr(), static_cast<size_t>((last + 1) * t.element_size()), writable, name};
  };
  std::vector<tk_emu::Buffer> b = {span(plan.x, false, "x"), span(qweight, false, "qweight"),
                                   span(scales, false, "scales"), span(offsets, false, "offsets"),
                                   span(plan.out, true, "out")};
  if (plan.bias.defined()) b.push_back(span(plan.bias, false, "bias"));
  if (plan.workspace.defined()) b.push_back(span(plan.workspace, true, "workspace"));
  if (counters.defined()) b.push_back(span(counters, true, "counters"));
  return b;
}

struct Emulate {
  const Params& p;
  const Plan& plan;
  std::vector<tk_emu::Buffer> buffers;

  template <typename T, int DQ, int BM, int BN, int WARPS_M, int WARPS_N>
  void run() const {
    tk_emu::LaunchConfig config;
    config.grid = tk_emu::Dim3{static_cast<unsigned>((p.N + BN - 1) / BN), static_cast<unsigned>((p.M + BM - 1) / BM),
                               static_cast<unsigned>(plan.in.splits)};
    config.block = tk_emu::Dim3{kThreads, 1, 1};
    config.shared_bytes = Smem<BM, BN, DQ>::BYTES;
    config.buffers = buffers;
    const Params params = p;
    tk_emu::launch(config, [&params] { int4_mm_kernel<T, DQ, BM, BN, WARPS_M, WARPS_N>(params); });
  }
};

at::Tensor int4_mm_mma_emulated(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& offsets, int64_t group_size, int64_t out_features,
                                const std::optional<at::Tensor>& bias, int64_t splits, int64_t sms,
                                bool zero_points) {
  // sms: the GPU the split-K choice is made for (default: an H100 SXM's 132)
  Plan plan = tk_int4::plan("int4_mm_mma (emulated)", x, qweight, scales, offsets, group_size, out_features, bias,
                            splits, sms > 0 ? sms : 132, zero_points);
  at::Tensor counters;
  if (plan.in.splits > 1) {
    counters = at::zeros({plan.tiles}, x.options().dtype(at::kInt));
    plan.p.counters = counters.data_ptr<int>();
  }
  Emulate run{plan.p, plan, buffers(plan, qweight, scales, offsets, counters)};
  try {
    dispatch(plan.in, run);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "int4_mm_mma (emulated): the kernel failed: ", e.what());
  }
  if (counters.defined()) {
    TORCH_CHECK(counters.eq(0).all().item<bool>(), "int4_mm_mma (emulated): split-K counters not reset to zero");
  }
  return plan.out;
}

at::Tensor int4_mm_mma_repack(const at::Tensor& qweight, int64_t in_features) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt,
              "int4_mm_mma_repack: qweight must be int32 (ceil(K/8), N), got ", qweight.scalar_type(), " of shape ",
              qweight.sizes());
  const int64_t K = in_features, N = qweight.size(1);
  TORCH_CHECK(K >= 1 && qweight.size(0) == (K + 7) / 8, "int4_mm_mma_repack: qweight has ", qweight.size(0),
              " rows but in_features=", K, " needs ceil(K/8)=", (K + 7) / 8);
  const int64_t KB = (K + 15) / 16, NB = (N + 15) / 16;
  const auto opts = qweight.options().dtype(at::kLong);
  // unpack to q (K, N), pad with zeros to (KB * 16, NB * 16)
  const at::Tensor shifts = at::arange(0, 32, 4, opts).view({1, 8, 1});
  at::Tensor q = qweight.to(at::kLong).unsqueeze(1).bitwise_right_shift(shifts).bitwise_and(0xF);
  q = q.reshape({-1, N}).narrow(0, 0, K);
  q = at::constant_pad_nd(q, {0, NB * 16 - N, 0, KB * 16 - K}, 0);
  // blocks (KB, NB, 256): element dk * 16 + dn of each 16 x 16 block
  const at::Tensor blocks = q.view({KB, 16, NB, 16}).permute({0, 2, 1, 3}).reshape({KB, NB, 256});
  std::vector<int64_t> src(kWordsPerBlock * 8), weight(kWordsPerBlock * 8);
  for (int lane = 0; lane < kWordsPerBlock; ++lane)
    for (int slot = 0; slot < 8; ++slot) {
      int dk, dn;
      nibble_source(lane, slot, dk, dn);
      src[lane * 8 + slot] = dk * 16 + dn;
      weight[lane * 8 + slot] = int64_t{1} << (4 * slot);
    }
  const at::Tensor index = at::tensor(src, at::TensorOptions().dtype(at::kLong)).to(qweight.device());
  const at::Tensor place = at::tensor(weight, at::TensorOptions().dtype(at::kLong)).to(qweight.device());
  const at::Tensor nibbles = blocks.index_select(2, index).view({KB, NB, kWordsPerBlock, 8});
  at::Tensor words = (nibbles * place.view({kWordsPerBlock, 8})).sum(-1);          // 0 .. 2^32 - 1
  words = at::where(words >= (int64_t{1} << 31), words - (int64_t{1} << 32), words);  // as int32 bits
  return words.to(at::kInt).reshape({KB, NB * kWordsPerBlock}).contiguous();
}

// The dynamic shared memory a launch asks for (the static checks compare it with each architecture's limit; the
// emulator confines every shared access to it).
int64_t int4_mm_mma_shared_bytes(int64_t rows, bool float_dequant) {
  if (rows <= 16) return float_dequant ? Smem<16, 128, kDqFloat>::BYTES : Smem<16, 128, kDqHalf>::BYTES;
  return float_dequant ? Smem<64, 128, kDqFloat>::BYTES : Smem<64, 128, kDqHalf>::BYTES;
}

}  // namespace
}  // namespace tk_int4

TORCH_LIBRARY_FRAGMENT(turbokernels_C, m) {
  m.def("int4_mm_mma_shared_bytes(int rows, bool float_dequant) -> int", &tk_int4::int4_mm_mma_shared_bytes);
}
TORCH_LIBRARY_IMPL(turbokernels_C, CPU, m) { m.impl("int4_mm_mma", &tk_int4::int4_mm_mma_emulated); }
TORCH_LIBRARY_IMPL(turbokernels_C, CompositeExplicitAutograd, m) {
  m.impl("int4_mm_mma_repack", &tk_int4::int4_mm_mma_repack);
}
