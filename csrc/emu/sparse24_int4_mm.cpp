// sparse24_int4_mm's mma.sp kernel (csrc/cuda/sparse24_int4_mm.cuh) on the CPU emulator, and the repack into its
// layout.
//   turbokernels_C::sparse24_int4_mm_mma          CPU tensors: the CUDA kernel's source run thread by thread
//                                                 (tk_emu), for the tests (tests/test_sparse24_int4_mm_cuda.py);
//                                                 slow, never a backend
//   turbokernels_C::sparse24_int4_mm_mma_repack   any device (ATen ops): the kept values' Int4Weight.qweight -> the
//                                                 mma layout, from tk_s24i4::nibble_source, the function the
//                                                 kernel's layout is defined by
//   turbokernels_C::sparse24_int4_mm_mma_shared_bytes   the dynamic shared memory a launch asks for
#include <torch/library.h>

#include <limits>
#include <vector>

#define TK_EMULATE 1
#include "cuda/sparse24_int4_mm.cuh"
#include "cuda/sparse24_int4_mm_launch.h"

namespace tk_s24i4 {
namespace {

tk_emu::Buffer span(const at::Tensor& t, bool writable, const char* name) {
  // from the first element to one past the last (contiguous tensors): a read past any of them is reported
  return tk_emu::Buffer{t.data_ptr(), static_cast<size_t>(t.numel() * t.element_size()), writable, name};
}

struct Emulate {
  const Plan& plan;
  std::vector<tk_emu::Buffer> buffers;

  template <typename T, bool FQ, int BN, int BM, int WARPS_N, int WARPS_M>
  void run() const {
    const Params& p = plan.p;
    tk_emu::LaunchConfig config;
    config.grid = tk_emu::Dim3{static_cast<unsigned>((p.N + BN - 1) / BN), static_cast<unsigned>((p.M + BM - 1) / BM),
                               static_cast<unsigned>(plan.in.splits)};
    config.block = tk_emu::Dim3{kThreads, 1, 1};
    config.shared_bytes = Smem<BN, BM, FQ>::BYTES;
    config.buffers = buffers;
    const Params params = p;
    tk_emu::launch(config, [&params] { sparse24_int4_mm_kernel<T, FQ, BN, BM, WARPS_N, WARPS_M>(params); });
  }
};

at::Tensor sparse24_int4_mm_mma_emulated(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                         const at::Tensor& offsets, const at::Tensor& meta, int64_t group_size,
                                         int64_t out_features, const std::optional<at::Tensor>& bias, int64_t splits,
                                         int64_t sms) {
  // sms: the GPU the split-K choice is made for (default: an H100 SXM's 132)
  Plan plan = tk_s24i4::plan("sparse24_int4_mm_mma (emulated)", x, qweight, scales, offsets, meta, group_size,
                             out_features, bias, splits, sms > 0 ? sms : 132);
  if (!plan.launch) return plan.out;
  // NaN where nothing has been written: an element the kernel forgets (or a partial never stored) shows
  plan.out.fill_(std::numeric_limits<float>::quiet_NaN());
  at::Tensor counters;
  if (plan.in.splits > 1) {
    plan.workspace.fill_(std::numeric_limits<float>::quiet_NaN());
    counters = at::zeros({plan.tiles}, x.options().dtype(at::kInt));
    plan.p.counters = counters.data_ptr<int>();
  }
  std::vector<tk_emu::Buffer> b = {span(plan.x, false, "x"),           span(qweight, false, "qweight"),
                                   span(plan.meta, false, "meta"),     span(scales, false, "scales"),
                                   span(offsets, false, "offsets"),    span(plan.out, true, "out")};
  if (plan.bias.defined()) b.push_back(span(plan.bias, false, "bias"));
  if (plan.workspace.defined()) b.push_back(span(plan.workspace, true, "workspace"));
  if (counters.defined()) b.push_back(span(counters, true, "counters"));
  try {
    const Emulate run{plan, b};
    dispatch(plan.in, run);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "sparse24_int4_mm_mma (emulated): the kernel failed: ", e.what());
  }
  if (counters.defined()) {
    TORCH_CHECK(counters.eq(0).all().item<bool>(),
                "sparse24_int4_mm_mma (emulated): split-K counters not reset to zero");
  }
  return plan.out;
}

// Int4Weight.qweight of the kept values, int32 (K/16, N) (8 kept values per word, the kept values of 16 dense
// columns), with in_features the dense K (a multiple of 32) -> int32 (K/32, ceil(N/16) * 32).
at::Tensor sparse24_int4_mm_mma_repack(const at::Tensor& qweight, int64_t in_features) {
  const int64_t K = in_features;
  TORCH_CHECK(K >= 32 && K % 32 == 0, "sparse24_int4_mm_mma_repack: in_features (the dense K) must be a positive "
              "multiple of 32 (the k of mma.sp), got ", K);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt && qweight.size(0) == K / 16,
              "sparse24_int4_mm_mma_repack: qweight must be int32 (K/16, N) = (", K / 16, ", N) (the kept values' "
              "Int4Weight.qweight), got ", qweight.scalar_type(), " of shape ", qweight.sizes());
  const int64_t N = qweight.size(1), KS = K / 32, NB = (N + 15) / 16;
  TORCH_CHECK(N >= 1, "sparse24_int4_mm_mma_repack: qweight has no columns (out_features)");
  const auto opts = qweight.options().dtype(at::kLong);
  // unpack to q (K/2, N), then (N, K/2) padded with zeros to NB * 16 rows
  const at::Tensor shifts = at::arange(0, 32, 4, opts).view({1, 8, 1});
  at::Tensor q = qweight.to(at::kLong).unsqueeze(1).bitwise_right_shift(shifts).bitwise_and(0xF);
  q = q.reshape({K / 2, N}).t();
  q = at::constant_pad_nd(q, {0, 0, 0, NB * 16 - N}, 0);
  // blocks (KS, NB, 256): element dn * 16 + dc of each 16 (n) x 16 (kept column) block
  const at::Tensor blocks = q.reshape({NB, 16, KS, 16}).permute({2, 0, 1, 3}).reshape({KS, NB, 256});
  std::vector<int64_t> src(kWordsPerBlock * 8), weight(kWordsPerBlock * 8);
  for (int lane = 0; lane < kWordsPerBlock; ++lane)
    for (int slot = 0; slot < 8; ++slot) {
      int dn, dc;
      nibble_source(lane, slot, dn, dc);
      src[lane * 8 + slot] = dn * 16 + dc;
      weight[lane * 8 + slot] = int64_t{1} << (4 * slot);
    }
  const at::Tensor index = at::tensor(src, at::TensorOptions().dtype(at::kLong)).to(qweight.device());
  const at::Tensor place = at::tensor(weight, at::TensorOptions().dtype(at::kLong)).to(qweight.device());
  const at::Tensor nibbles = blocks.index_select(2, index).view({KS, NB, kWordsPerBlock, 8});
  at::Tensor words = (nibbles * place.view({kWordsPerBlock, 8})).sum(-1);             // 0 .. 2^32 - 1
  words = at::where(words >= (int64_t{1} << 31), words - (int64_t{1} << 32), words);  // as int32 bits
  return words.to(at::kInt).reshape({KS, NB * kWordsPerBlock}).contiguous();
}

// The dynamic shared memory a launch asks for (the static checks compare it with each architecture's limit; the
// emulator confines every shared access to it).
int64_t sparse24_int4_mm_mma_shared_bytes(int64_t rows, bool float_dequant) {
  if (rows <= 16) return float_dequant ? Smem<128, 16, true>::BYTES : Smem<128, 16, false>::BYTES;
  return float_dequant ? Smem<64, 64, true>::BYTES : Smem<64, 64, false>::BYTES;
}

}  // namespace
}  // namespace tk_s24i4

TORCH_LIBRARY_FRAGMENT(turbokernels_C, m) {
  m.def("sparse24_int4_mm_mma_shared_bytes(int rows, bool float_dequant) -> int",
        &tk_s24i4::sparse24_int4_mm_mma_shared_bytes);
}
TORCH_LIBRARY_IMPL(turbokernels_C, CPU, m) {
  m.impl("sparse24_int4_mm_mma", &tk_s24i4::sparse24_int4_mm_mma_emulated);
}
TORCH_LIBRARY_IMPL(turbokernels_C, CompositeExplicitAutograd, m) {
  m.impl("sparse24_int4_mm_mma_repack", &tk_s24i4::sparse24_int4_mm_mma_repack);
}
