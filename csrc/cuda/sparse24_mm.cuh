// sparse24_mm on CUDA: out (M, N) = x (M, K) @ W.T [+ bias (N)], W (N, K) 2:4-sparse along K, fp16/bf16, on sparse
// tensor cores (mma.sp, sm_80+). The kernels of the "cuda" backend: csrc/cuda/sparse24_mm.cu launches them on a GPU
// (its torch side: csrc/cuda/sparse24_mm_launch.cpp), csrc/emu/sparse24_mm.cpp runs the same source on the CPU
// emulator (csrc/emu/), both from the plan of csrc/cuda/sparse24_mm_launch.h.
//
// Layout (python/turbokernels/formats/sparse24.py): values (N, K/2) = the two kept values of every group of 4
// consecutive k, increasing column; meta int16 (N, K/16), per group a nibble idx0 | idx1 << 2, group j of an element
// at bits 4*j. The kernel reads both as they are (no re-layout pass, no second op): the format was chosen so that
// the mma.sp operands are plain 32-bit loads of it, see "Operands" below.
//
// Why the weight is operand A: only A of mma.sp may be sparse. So the kernel computes out^T (N, M) = W (N, K) @ x^T
// (K, M) with W as the row-major sparse A and x as the "col" B (B's k runs along x's rows, which are contiguous),
// and stores the transposed tile.
//
// Operands of mma.sp.sync.aligned.m16n8k32.row.col.f32.{f16,bf16} (PTX ISA, "Matrix multiply-accumulate operation
// using mma.sp instruction with sparse matrix A": "Sparse matrix storage" and "Matrix fragments for sparse
// mma.m16n8k32 with .f16/.bf16"; transcribed in csrc/emu/ptx_fragments.h); g = lane / 4, t = lane % 4:
//  * A, 16 x 32 dense = 16 x 16 compressed: laid out like the dense m16n8k16 A fragment over the compressed
//    columns, so register i holds compressed columns (2t, 2t+1) [+8] of row g [+8] = the kept pair of group t [+4]:
//    exactly 2 adjacent halves of `values`, so one ldmatrix.x4 of a 16 x 16 values tile gives the fragment.
//  * B, 32 x 8 (k x m): register i holds k = 2t + 8i, 2t + 8i + 1 of column m = g, i.e. x[m][k..k+1]: one
//    ldmatrix.x4 (non-transposed) of an 8 (m) x 32 (k) tile of x as it sits in memory.
//  * metadata, one 32-bit register: with sparsity selector 0 the threads t = 0 and t = 1 of every quad supply it
//    (f16/bf16 m16n8k32 uses a thread pair). Thread t = 0 holds the 8 nibbles of k 0..15 (4 groups) of row g in
//    bits 0..15 and of row g + 8 in bits 16..31; thread t = 1 the same for k 16..31. The nibble encoding (two 2-bit
//    indices, the lower one in the low bits, 0b0100 = columns 0 and 1) is ours. So the register is
//        meta[n0 + g][k0/16 + t] | meta[n0 + g + 8][k0/16 + t] << 16
//    two int16 loads from shared memory, no bit shuffling. Cross-check: PyTorch's CUTLASS reorder (the
//    cutlass_meta_offsets docstring in formats/sparse24.py: rows g, g+8 interleaved, then 2x2 transposes) puts
//    exactly these two int16 next to each other as one 32-bit word, in the order t = 0, t = 1.
//    Our indices are always increasing (Sparse24Weight validates idx0 < idx1), so the ::ordered_metadata form that
//    nvcc 13 recommends applies.
//
// Strategy
//  * Block tile 64 (N) x 64 (M), 4 warps as 2 x 2, each warp 32 x 32 = 2 (m16 along N) x 4 (n8 along M) mma.sp per
//    k32 step, fp32 accumulators (32 per thread). BK = 64 (two k32 steps) per stage. For M <= 16 (decode) a
//    128 (N) x 16 (M) tile, 4 warps along N (warp 32 x 16): the weight is what costs there, and a 64-row x tile
//    would load and multiply 48 rows of padding per block.
//  * 3-stage cp.async pipeline (64 x 64: values 4 KiB + x 8 KiB + meta 0.5 KiB per stage; 43.5 KiB of shared
//    memory with the padding; 128 x 16: 39.75 KiB, both under the 48 KiB a launch gets without opting in). Rows are
//    padded by 16 bytes (values 80 B, x 144 B): the 8 row addresses of each ldmatrix phase then fall in 8 distinct
//    16-byte bank groups (no conflicts), and every cp.async stays 16-byte aligned.
//  * Tails: rows past N or M are clamped to the last valid row when loading (finite data, results discarded at the
//    masked store) so the metadata never holds the invalid all-zero nibble of a zero-filled row. K must be a
//    multiple of 32 (the mma's k); a last BK tile of 32 skips its second k32 step, and its zero-filled columns are
//    never fed to an mma.
//  * Small M (decode): few output tiles cannot fill the GPU, so grid z splits K; each split writes fp32 partials to a
//    workspace (splits, M, N) and a second kernel sums them in a fixed order (deterministic, no atomics).
//  * The output is stored straight from the accumulators, transposed: lanes with the same t write 8 consecutive n.
//    An smem-staged, vectorized epilogue is a possible later gain (it matters only when M is large).
//  * Bias: added to the fp32 accumulator before the one conversion to T (by the GEMM kernel, or by the split-K
//    reduction to the sum of the partials), so the output is rounded once, as in torch's F.linear.
#pragma once

#include "cuda/arch.cuh"
#include "cuda/sparse24_mm_params.h"

namespace tk_sparse24 {

inline namespace TK_BUILD {

using namespace tk_arch;

// The block's dynamic shared memory: values, x and meta tiles of every stage, in that order.
template <int BN, int BM>
struct Smem {
  static constexpr int A_BYTES = kStages * BN * kAStride * 2;
  static constexpr int B_BYTES = kStages * BM * kBStride * 2;
  static constexpr int M_BYTES = kStages * BN * kMStride * 2;
  static constexpr int BYTES = A_BYTES + B_BYTES + M_BYTES;
  static_assert(A_BYTES % 16 == 0 && B_BYTES % 16 == 0, "16-byte aligned regions");
  static_assert(BYTES <= 48 * 1024, "more than 48 KiB of shared memory needs an opt-in at launch");

  static TK_DEVICE uint16_t* a(char* base, int stage) {
    return reinterpret_cast<uint16_t*>(base) + stage * BN * kAStride;
  }
  static TK_DEVICE uint16_t* b(char* base, int stage) {
    return reinterpret_cast<uint16_t*>(base + A_BYTES) + stage * BM * kBStride;
  }
  static TK_DEVICE uint16_t* m(char* base, int stage) {
    return reinterpret_cast<uint16_t*>(base + A_BYTES + B_BYTES) + stage * BN * kMStride;
  }
};

// One stage: the values, x and meta tiles of k tile `kt` (dense columns kt*BK ..). Rows past N / M are clamped;
// columns past K are zero-filled (and never used: see the k32 step count in the main loop).
template <int BN, int BM>
TK_DEVICE void load_stage(const Params& p, char* smem, int stage, int n0, int m0, int kt) {
  using S = Smem<BN, BM>;
  const int tid = static_cast<int>(tk_arch::tid());
  const int k0 = kt * kBK;
  static_assert((BN * 4) % kThreads == 0 && (BM * 8) % kThreads == 0 && (BN * 2) % kThreads == 0,
                "tile vs threads");
  // values: BN rows x 64 bytes = 4 chunks of 16 B (8 kept values = 16 dense k) per row.
  uint16_t* sa = S::a(smem, stage);
#pragma unroll
  for (int i = 0; i < (BN * 4) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c >> 2, col = c & 3;
    const int n = n0 + row < p.N ? n0 + row : p.N - 1;
    const bool ok = k0 + col * 16 < p.K;
    const uint16_t* src = p.values + static_cast<long long>(n) * (p.K / 2) + (ok ? k0 / 2 + col * 8 : 0);
    cp_async16(sa + row * kAStride + col * 8, src, ok ? 16 : 0);
  }
  // x: BM rows x 128 bytes = 8 chunks of 16 B per row.
  uint16_t* sb = S::b(smem, stage);
#pragma unroll
  for (int i = 0; i < (BM * 8) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c >> 3, col = c & 7;
    const int m = m0 + row < p.M ? m0 + row : p.M - 1;
    const bool ok = k0 + col * 8 < p.K;
    const uint16_t* src = p.x + static_cast<long long>(m) * p.K + (ok ? k0 + col * 8 : 0);
    cp_async16(sb + row * kBStride + col * 8, src, ok ? 16 : 0);
  }
  // meta: BN rows x 8 bytes; a row of global meta is only 4-byte aligned (K/16 int16, K % 32 == 0), so 4-byte
  // copies, each covering one k32 step of one row.
  uint16_t* sm = S::m(smem, stage);
#pragma unroll
  for (int i = 0; i < (BN * 2) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c >> 1, half = c & 1;
    const int n = n0 + row < p.N ? n0 + row : p.N - 1;
    const bool ok = k0 + half * 32 < p.K;
    const uint16_t* src = p.meta + static_cast<long long>(n) * (p.K / 16) + (ok ? k0 / 16 + half * 2 : 0);
    cp_async4(sm + row * kMStride + half * 2, src, ok ? 4 : 0);
  }
}

// grid (ceil(N / BN), ceil(M / BM), splits), kThreads threads, Smem<BN, BM>::BYTES of dynamic shared memory; warp
// tile (BN / WARPS_N) x (BM / WARPS_M). Part z covers k tiles [z * tiles_per_split, ...). With splits == 1 it writes
// `out` (M, N) in T, the bias (or none) added to the fp32 accumulator first; otherwise fp32 partials to ws
// (splits, M, N), without the bias (the reduction adds it once).
template <typename T, int BN, int BM, int WARPS_N, int WARPS_M>
TK_GLOBAL void TK_LAUNCH_BOUNDS(kThreads) sparse24_mm_kernel(const Params p) {
  static_assert(WARPS_N * WARPS_M * 32 == kThreads, "4 warps");
  using S = Smem<BN, BM>;
  constexpr int WN = BN / WARPS_N, WM = BM / WARPS_M;  // warp tile
  constexpr int MI = WN / 16, NJ = WM / 8;             // mma.sp tiles per warp: MI along N (m16), NJ along M (n8)
  static_assert(MI * 16 == WN && NJ * 8 == WM, "warp tile must be whole m16 x n8 tiles");
  char* smem = shared_memory();
  const int n0 = static_cast<int>(block_x()) * BN, m0 = static_cast<int>(block_y()) * BM;
  const int z = static_cast<int>(block_z());
  const int ktiles = (p.K + kBK - 1) / kBK;
  const int kt_begin = z * p.tiles_per_split;
  const int nkt = (ktiles < kt_begin + p.tiles_per_split ? ktiles : kt_begin + p.tiles_per_split) - kt_begin;

  const int tid = static_cast<int>(tk_arch::tid());
  const int lane = tid & 31, warp = tid >> 5;
  const int wn = (warp / WARPS_M) * WN, wm = (warp % WARPS_M) * WM;  // warp's offsets inside the block tile
  const int g = lane >> 2, t = lane & 3;

  float acc[MI][NJ][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nkt) load_stage<BN, BM>(p, smem, st, n0, m0, kt_begin + st);
    cp_async_commit();
  }

  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<kStages - 2>();  // tile `it` has landed (for this thread) ...
    syncthreads();                 // ... for all threads, and everyone is done with the stage refilled next
    const int nxt = it + kStages - 1;
    if (nxt < nkt) load_stage<BN, BM>(p, smem, nxt % kStages, n0, m0, kt_begin + nxt);
    cp_async_commit();

    const int stage = it % kStages;
    const uint16_t* sa = S::a(smem, stage);
    const uint16_t* sb = S::b(smem, stage);
    const uint16_t* sm = S::m(smem, stage);
    const int ksteps = ((kt_begin + it) * kBK + 32 < p.K) ? 2 : 1;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      if (ks < ksteps) {
        uint32_t a[MI][4], b[NJ][4], e[MI];
#pragma unroll
        for (int i = 0; i < MI; ++i) {
          // matrices: rows 0-7 / 8-15 x compressed columns 0-7 / 8-15 of this k32 step
          ldmatrix_x4(a[i], sa + (wn + i * 16 + (lane & 15)) * kAStride + ks * 16 + (lane >> 4) * 8);
          const int row = wn + i * 16 + g;
          const uint32_t lo = lds(sm + row * kMStride + ks * 2 + (t & 1));
          const uint32_t hi = lds(sm + (row + 8) * kMStride + ks * 2 + (t & 1));
          e[i] = lo | (hi << 16);  // threads t = 2, 3 load a copy that selector 0 ignores
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          // matrices: m rows 0-7 x k 0-7, 8-15, 16-23, 24-31 of this k32 step
          ldmatrix_x4(b[j], sb + (wm + j * 8 + (lane & 7)) * kBStride + ks * 32 + (lane >> 3) * 8);
        }
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
          for (int j = 0; j < NJ; ++j) mma_sp_16832<T>(acc[i][j], a[i], b[j], e[i]);
      }
    }
  }
  cp_async_wait<0>();

  // The bias of this thread's two rows n per m16 tile (g and g + 8), in fp32; 0 when there is none or the partial
  // sums go to ws.
  float bn[MI][2];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + wn + i * 16 + g + h * 8;
      bn[i][h] = (p.bias != nullptr && p.ws == nullptr && n < p.N) ? to_float<T>(load(p.bias + n)) : 0.f;
    }

  // acc[i][j][r]: n = n0 + wn + 16 i + g + 8 (r >> 1), m = m0 + wm + 8 j + 2 t + (r & 1)
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int n = n0 + wn + i * 16 + g + (r >> 1) * 8;
        const int m = m0 + wm + j * 8 + 2 * t + (r & 1);
        if (n < p.N && m < p.M) {
          const long long off = static_cast<long long>(m) * p.N + n;
          if (p.ws != nullptr) {
            store(p.ws + static_cast<long long>(z) * p.M * p.N + off, acc[i][j][r]);
          } else {
            store(p.out + off, from_float<T>(acc[i][j][r] + bn[i][r >> 1]));  // the output's one rounding
          }
        }
      }
}

// After the GEMM kernel's parts: out[idx] = the sum over the parts of ws[z][idx], in part order (deterministic),
// plus bias[idx % N] (unless nullptr), in fp32: the one rounding of the output is the final conversion. Any grid of
// kReduceThreads-thread blocks (grid-stride loop).
template <typename T>
TK_GLOBAL void TK_LAUNCH_BOUNDS(kReduceThreads) splitk_reduce_kernel(const Params p) {
  const long long total = static_cast<long long>(p.M) * p.N;
  const long long stride = static_cast<long long>(grid_x()) * kReduceThreads;
  for (long long idx = static_cast<long long>(block_x()) * kReduceThreads + tk_arch::tid(); idx < total;
       idx += stride) {
    float s = 0.f;
    for (int z = 0; z < p.splits; ++z) s += load(p.ws + z * total + idx);
    if (p.bias != nullptr) s += to_float<T>(load(p.bias + idx % p.N));
    store(p.out + idx, from_float<T>(s));
  }
}

}  // inline namespace TK_BUILD

// Calls fn.template run<T, BN, BM, WARPS_N, WARPS_M>() for the instantiation (2 dtypes x 2 tiles), shared by the GPU
// launcher and the emulator's.
template <typename T, typename Fn>
void dispatch_tile(const Instance& in, Fn& fn) {
  if (in.decode) fn.template run<T, 128, 16, 4, 1>();
  else fn.template run<T, 64, 64, 2, 2>();
}

template <typename Fn>
void dispatch(const Instance& in, Fn& fn) {
  if (in.bf16) dispatch_tile<tk_arch::BF16>(in, fn);
  else dispatch_tile<tk_arch::F16>(in, fn);
}

}  // namespace tk_sparse24
