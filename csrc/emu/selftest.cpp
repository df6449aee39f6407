// The emulator's own tests (tests/test_cuda_emulator.py): its fragment tables, a plain GEMM through the emulated
// ldmatrix + mma, and kernels with a planted bug that the emulator must report.
//   turbokernels_C::emu_fragment_tables() -> int32 (5, 32, 8, 2): [kind][lane][element] = (row, col), -1 unused;
//       kind 0: mma.m16n8k16 A, 1: B (k32 for mma.sp; k16 uses elements 0..3), 2: f32 C, 3: ldmatrix,
//       4: ldmatrix .trans
//   turbokernels_C::emu_mma_gemm(a (16, 16), bt (16, 16), b_kmajor=False) -> fp32 (16, 16) = a @ bt.T, fp16/bf16
//       operands: the standard tensor-core tile code (cp.async to shared memory, ldmatrix.x4 of A and of B stored
//       n-major, two mma.m16n8k16) on the emulator; b_kmajor: `bt` is B itself (k-major, as attention's V) and is
//       read with ldmatrix .trans, the result a @ bt
//   turbokernels_C::emu_sparse_fragment_tables() -> int32 (2, 32, 8, 2): mma.sp m16n8k32 .f16/.bf16 (sparsity
//       selector 0), [kind][lane][element] = (row, first column of the 4-wide chunk), -1 unused; kind 0: A element
//       i (nonzero number i & 1 of the chunk), 1: metadata nibble i (bits 4i .. 4i + 3) of the lane's register
//   turbokernels_C::emu_mma_sp(a int32 (32, 4), b int32 (32, 4), e int32 (32,), c fp32 (32, 4), bool bf16) -> fp32
//       (32, 4): one emulated mma.sp::ordered_metadata m16n8k32 (selector 0) on per-lane registers given as they
//       are (a[lane][i], the 16-bit elements' bits), returning each lane's d registers
//   turbokernels_C::emu_planted_bug(str bug) -> Tensor: a small kernel with `bug` planted ("none",
//       "missing_wait", "missing_barrier" (another warp's copies read without __syncthreads), "divergent_warp",
//       "out_of_bounds", "deadlock", "misaligned_ldmatrix")
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>

#define TK_EMULATE 1
#include "cuda/arch.cuh"

namespace tk_emu_selftest {
namespace {

using namespace tk_arch;

at::Tensor fragment_tables() {
  at::Tensor t = at::full({5, 32, 8, 2}, -1, at::kInt);
  auto a = t.accessor<int, 4>();
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const tk_emu::Coord ca = tk_emu::mma_a(lane, i), cb = tk_emu::mma_b(lane, i);
      a[0][lane][i][0] = ca.row, a[0][lane][i][1] = ca.col;
      a[1][lane][i][0] = cb.row, a[1][lane][i][1] = cb.col;
    }
    for (int i = 0; i < 4; ++i) {
      const tk_emu::Coord c = tk_emu::mma_c(lane, i);
      a[2][lane][i][0] = c.row, a[2][lane][i][1] = c.col;
    }
    for (int h = 0; h < 2; ++h) {
      const tk_emu::Coord c = tk_emu::ldmatrix(lane, h), ct = tk_emu::ldmatrix_trans(lane, h);
      a[3][lane][h][0] = c.row, a[3][lane][h][1] = c.col;
      a[4][lane][h][0] = ct.row, a[4][lane][h][1] = ct.col;
    }
  }
  return t;
}

// one warp; shared: A 16 x 16 then Bt 16 x 16, rows of 16 halves (32 bytes)
template <typename T>
void gemm_kernel(const uint16_t* a, const uint16_t* bt, float* c, bool b_kmajor) {
  const int lane = static_cast<int>(tid());
  uint16_t* sa = reinterpret_cast<uint16_t*>(shared_memory());
  uint16_t* sb = sa + 256;
  for (int chunk = lane; chunk < 64; chunk += 32) {  // 2 x 256 halves = 64 chunks of 8
    const int which = chunk / 32, off = (chunk % 32) * 8;
    cp_async16((which ? sb : sa) + off, (which ? bt : a) + off, 16);
  }
  cp_async_commit();
  cp_async_wait<0>();
  syncthreads();
  uint32_t fa[4], fb[4];
  ldmatrix_x4(fa, sa + (lane & 15) * 16 + (lane >> 4) * 8);  // rows 0-15, k 0-7 / 8-15
  if (b_kmajor) {
    // B stored k-major (as attention's V: rows k, columns n), transposed by ldmatrix .trans; matrices
    // (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
    ldmatrix_x4_trans(fb, sb + (((lane >> 3) & 1) * 8 + (lane & 7)) * 16 + (lane >> 4) * 8);
  } else {
    // B stored n-major: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    ldmatrix_x4(fb, sb + ((lane >> 4) * 8 + (lane & 7)) * 16 + ((lane >> 3) & 1) * 8);
  }
  float acc[2][4] = {};
  const uint32_t b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
  mma_16816<T>(acc[0], fa, b0);
  mma_16816<T>(acc[1], fa, b1);
  const int g = lane >> 2, t = lane & 3;
  for (int j = 0; j < 2; ++j)
    for (int r = 0; r < 4; ++r) store(c + (g + 8 * (r >> 1)) * 16 + j * 8 + 2 * t + (r & 1), acc[j][r]);
}

at::Tensor mma_gemm(const at::Tensor& a, const at::Tensor& bt, bool b_kmajor) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && bt.sizes() == at::IntArrayRef({16, 16}) &&
                  a.scalar_type() == bt.scalar_type() &&
                  (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16) && a.device().is_cpu(),
              "emu_mma_gemm: a and bt must be CPU (16, 16) float16/bfloat16 tensors of one dtype");
  const at::Tensor ac = a.contiguous(), bc = bt.contiguous();
  at::Tensor c = at::empty({16, 16}, a.options().dtype(at::kFloat));
  tk_emu::LaunchConfig config;
  config.block = tk_emu::Dim3{32, 1, 1};
  config.shared_bytes = 1024;
  config.buffers = {{ac.data_ptr(), 512, false, "a"}, {bc.data_ptr(), 512, false, "bt"},
                    {c.data_ptr(), 1024, true, "c"}};
  const auto* pa = static_cast<const uint16_t*>(ac.data_ptr());
  const auto* pb = static_cast<const uint16_t*>(bc.data_ptr());
  float* pc = c.data_ptr<float>();
  if (a.scalar_type() == at::kHalf) tk_emu::launch(config, [&] { gemm_kernel<F16>(pa, pb, pc, b_kmajor); });
  else tk_emu::launch(config, [&] { gemm_kernel<BF16>(pa, pb, pc, b_kmajor); });
  return c;
}

at::Tensor sparse_fragment_tables() {
  at::Tensor t = at::full({2, 32, 8, 2}, -1, at::kInt);
  auto a = t.accessor<int, 4>();
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 8; ++i) {
      const tk_emu::Coord ca = tk_emu::mma_sp_a(lane, i), cm = tk_emu::mma_sp_meta_cell(lane, i, 0);
      a[0][lane][i][0] = ca.row, a[0][lane][i][1] = ca.col;
      a[1][lane][i][0] = cm.row, a[1][lane][i][1] = cm.col;
      if (cm.row >= 0) {  // the two directions of the metadata map agree
        const tk_emu::MetaField f = tk_emu::mma_sp_meta(cm.row, cm.col / 4, 0);
        TORCH_CHECK(f.lane == lane && f.bit == 4 * i, "emu_sparse_fragment_tables: mma_sp_meta and "
                    "mma_sp_meta_cell disagree at lane ", lane, ", nibble ", i);
      }
    }
  return t;
}

at::Tensor mma_sp(const at::Tensor& a, const at::Tensor& b, const at::Tensor& e, const at::Tensor& c, bool bf16) {
  const bool ok = a.sizes() == at::IntArrayRef({32, 4}) && b.sizes() == at::IntArrayRef({32, 4}) &&
                  e.sizes() == at::IntArrayRef({32}) && c.sizes() == at::IntArrayRef({32, 4}) &&
                  a.scalar_type() == at::kInt && b.scalar_type() == at::kInt && e.scalar_type() == at::kInt &&
                  c.scalar_type() == at::kFloat && a.device().is_cpu();
  TORCH_CHECK(ok, "emu_mma_sp: a, b int32 (32, 4), e int32 (32,), c float32 (32, 4), CPU tensors");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous(), ec = e.contiguous(), cc = c.contiguous();
  at::Tensor d = at::empty({32, 4}, at::kFloat);
  const auto* pa = reinterpret_cast<const uint32_t*>(ac.data_ptr<int>());
  const auto* pb = reinterpret_cast<const uint32_t*>(bc.data_ptr<int>());
  const auto* pe = reinterpret_cast<const uint32_t*>(ec.data_ptr<int>());
  const float* pc = cc.data_ptr<float>();
  float* pd = d.data_ptr<float>();
  tk_emu::LaunchConfig config;
  config.block = tk_emu::Dim3{32, 1, 1};
  auto kernel = [&](auto tag) {
    using T = decltype(tag);
    const int l = static_cast<int>(tid());
    uint32_t ra[4], rb[4];
    float rd[4];
    for (int i = 0; i < 4; ++i) ra[i] = pa[4 * l + i], rb[i] = pb[4 * l + i], rd[i] = pc[4 * l + i];
    mma_sp_16832<T>(rd, ra, rb, pe[l]);
    for (int i = 0; i < 4; ++i) pd[4 * l + i] = rd[i];
  };
  try {
    if (bf16) tk_emu::launch(config, [&] { kernel(BF16{}); });
    else tk_emu::launch(config, [&] { kernel(F16{}); });
  } catch (const std::runtime_error& err) {
    TORCH_CHECK(false, "emu_mma_sp: ", err.what());
  }
  return d;
}

// 64 threads (2 warps), 256 bytes of shared memory, a 64-float input buffer; returns what thread 0 read back.
at::Tensor planted_bug(const std::string& bug) {
  at::Tensor in = at::arange(64, at::kFloat);
  at::Tensor out = at::zeros({4}, at::kFloat);
  tk_emu::LaunchConfig config;
  config.block = tk_emu::Dim3{64, 1, 1};
  config.shared_bytes = 256;
  config.buffers = {{in.data_ptr(), 256, false, "in"}, {out.data_ptr(), 16, true, "out"}};
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const bool known = bug == "none" || bug == "missing_wait" || bug == "missing_barrier" || bug == "divergent_warp" ||
                     bug == "out_of_bounds" || bug == "deadlock" || bug == "misaligned_ldmatrix";
  TORCH_CHECK(known, "emu_planted_bug: unknown bug ", bug);
  try {
    tk_emu::launch(config, [&] {
      const int t = static_cast<int>(tid());
      float* s = reinterpret_cast<float*>(shared_memory());
      // 16 threads copy 16 chunks: threads 0-15, or 32-47 (the second warp) for missing_barrier
      const int c = bug == "missing_barrier" ? t - 32 : t;
      if (c >= 0 && c < 16) {
        const int chunk = (bug == "out_of_bounds" && c == 15) ? 16 : c;  // 16 * 16 bytes: one past the buffer
        cp_async16(s + 4 * c, src + 4 * chunk, 16);
      }
      cp_async_commit();
      if (bug != "missing_wait") cp_async_wait<0>();
      if (!(bug == "deadlock" && t == 40) && bug != "missing_barrier") syncthreads();
      if (bug == "divergent_warp" || bug == "misaligned_ldmatrix") {
        uint32_t r[4];
        const char* base = shared_memory() + (bug == "misaligned_ldmatrix" && t == 3 ? 4 : 0);
        if (bug == "divergent_warp" && t == 7) {
          float d[4] = {};
          const uint32_t a[4] = {}, b[2] = {};
          mma_16816<F16>(d, a, b);
        } else {
          ldmatrix_x4(r, base + 16 * (t % 8));
        }
      }
      if (t == 0) for (int i = 0; i < 4; ++i) store(dst + i, lds(s + 4 * 5 + i));  // chunk 5: 20, 21, 22, 23
    });
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "emu_planted_bug(", bug, "): ", e.what());
  }
  return out;
}

}  // namespace
}  // namespace tk_emu_selftest

TORCH_LIBRARY_FRAGMENT(turbokernels_C, m) {
  m.def("emu_fragment_tables() -> Tensor", &tk_emu_selftest::fragment_tables);
  m.def("emu_mma_gemm(Tensor a, Tensor bt, bool b_kmajor=False) -> Tensor", &tk_emu_selftest::mma_gemm);
  m.def("emu_planted_bug(str bug) -> Tensor", &tk_emu_selftest::planted_bug);
  m.def("emu_sparse_fragment_tables() -> Tensor", &tk_emu_selftest::sparse_fragment_tables);
  m.def("emu_mma_sp(Tensor a, Tensor b, Tensor e, Tensor c, bool bf16) -> Tensor", &tk_emu_selftest::mma_sp);
}
