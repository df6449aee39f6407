// sparse24_int4_mm on sparse tensor cores: out (M, N) = x (M, K) @ W.T [+ bias (N)], W (N, K) 2:4-sparse along K
// with int4 kept values (Sparse24Int4Weight, python/turbokernels/formats/sparse24_int4.py), x fp16/bf16, fp32
// accumulation, one rounding of the output (Sparse-Marlin's idea: mma.sp on int4-dequantized values). The kernel
// of the "cuda" backend: csrc/cuda/sparse24_int4_mm.cu launches it on a GPU (torch side:
// csrc/cuda/sparse24_int4_mm_launch.cpp), csrc/emu/sparse24_int4_mm.cpp runs the same source on the CPU emulator,
// both from the plan of csrc/cuda/sparse24_int4_mm_launch.h.
//
// Operands (as csrc/cuda/sparse24_mm.cuh: only A of mma.sp may be sparse, so the kernel computes out^T (N, M) =
// W (N, K) @ x^T (K, M) and stores the transposed tile):
//  * A: the kept values, repacked once (Sparse24Int4Weight.mma_layout, csrc/cuda/sparse24_int4_mm_layout.h) so
//    that a lane's 4 A registers of one m16 tile and k32 step are one 32-bit word of 8 nibbles, dequantized in
//    registers straight into the fragment (no shared-memory round trip of dequantized weights).
//  * Dequantization (int4_mm.cuh's): lop3 moves two nibbles into the mantissas of a 16-bit pair with the exponent
//    of a magic number M (fp16 1024, bf16 128: one ulp is 1 there), an fma with -M gives q exactly, and one fma2
//    q * scale + offset gives the pair, rounded once to x's dtype ("half" mode: scales and offsets exact in x's
//    dtype). "Float" mode: the same lop3 with fp32's 2^23, fp32 fma, one cvt to the pair. The scale varies with the
//    fragment's ROW n: registers 0 and 2 are row g, 1 and 3 row g + 8, each with its own (scale, scale) pair; the
//    two halves of a register share a row and a group.
//  * Metadata: our int16 meta (N, K/16) read as it is, sparse24_mm.cuh's register: meta[n0 + g][ks*2 + t%2] |
//    meta[n0 + g + 8][...] << 16 (threads t = 0, 1 of each quad with sparsity selector 0).
//  * B: x, one ldmatrix.x4 (non-transposed) of an 8 (m) x 32 (k) tile as it sits in memory.
//
// Strategy
//  * Block tile BN (n) x BM (m): 128 x 16 for M <= 16 (decode; 4 warps along N, warp 32 x 16), else 64 x 64 (2 x 2
//    warps, warp 32 x 32); a warp issues (32 / 16) x (warp m / 8) mma.sp per k32 step. BK = 64 dense k (two k32
//    steps) per stage, 4-stage cp.async pipeline. A stage holds x (rows padded to 144 B: ldmatrix without bank
//    conflicts), the weight words (BN / 16 blocks of 128 B per step), the meta rows (8 B per n) and one row of
//    scales and offsets per step (its group's).
//  * Tails: x rows past M and k past K are zero-filled (cp.async src-size 0); the repack pads q with zeros and the
//    plan pads scales/offsets with zeros to Np = ceil(N/16) * 16, so a padded weight row is 0; meta rows past N are
//    clamped to the last row (a valid encoding; the results are discarded by the masked store). K % 32 == 0, steps
//    past K/32 (a last stage of one step) are skipped.
//  * Split-K for small grids (int4_mm.cuh's): grid z cuts K; each part writes fp32 partials to a workspace, and the
//    last part to finish a tile (an atomic counter per tile) sums all parts in part order, adds the bias and writes
//    the output: one launch, deterministic, the counters left at zero.
//  * Bias: fp32, added to the fp32 sum before the output's one rounding.
#pragma once

#include "cuda/arch.cuh"
#include "cuda/int4_dequant.cuh"
#include "cuda/sparse24_int4_mm_layout.h"
#include "cuda/split_k.cuh"

namespace tk_s24i4 {
inline namespace TK_BUILD {  // the GPU's and the emulator's instantiations must not share mangled names (arch.cuh)

using namespace tk_arch;

template <int BN, int BM, bool FLOAT_DQ>
struct Smem {
  static constexpr int XS = kBK + 8;  // halves per shared x row: 144 bytes, 8 rows hit 8 different bank groups
  static constexpr int MS = kBK / 16;  // int16 meta per shared row
  static constexpr int X_BYTES = BM * XS * 2;
  static constexpr int W_WORDS_PER_STEP = BN / 16 * kWordsPerBlock;
  static constexpr int W_BYTES = kSteps * W_WORDS_PER_STEP * 4;
  static constexpr int M_BYTES = BN * MS * 2;
  static constexpr int S_ELEM = FLOAT_DQ ? 4 : 2;
  static constexpr int S_BYTES = kSteps * BN * S_ELEM;  // one group row of BN scales per k32 step
  static constexpr int STAGE_BYTES = X_BYTES + W_BYTES + M_BYTES + 2 * S_BYTES;
  static constexpr int BYTES = kStages * STAGE_BYTES + 16;  // + the split-K "last part" flag
  static_assert(X_BYTES % 16 == 0 && W_BYTES % 16 == 0 && M_BYTES % 16 == 0 && S_BYTES % 16 == 0,
                "16-byte aligned regions");

  static TK_DEVICE uint16_t* x(char* base, int stage) {
    return reinterpret_cast<uint16_t*>(base + stage * STAGE_BYTES);
  }
  static TK_DEVICE uint32_t* w(char* base, int stage) {
    return reinterpret_cast<uint32_t*>(base + stage * STAGE_BYTES + X_BYTES);
  }
  static TK_DEVICE uint16_t* m(char* base, int stage) {
    return reinterpret_cast<uint16_t*>(base + stage * STAGE_BYTES + X_BYTES + W_BYTES);
  }
  static TK_DEVICE char* s(char* base, int stage) { return base + stage * STAGE_BYTES + X_BYTES + W_BYTES + M_BYTES; }
  static TK_DEVICE char* o(char* base, int stage) { return s(base, stage) + S_BYTES; }
  static TK_DEVICE int* flag(char* base) { return reinterpret_cast<int*>(base + kStages * STAGE_BYTES); }
};

// Issue the cp.async copies of k tile kt into `stage` (not committed).
template <int BN, int BM, bool FLOAT_DQ>
TK_DEVICE void load_stage(const Params& p, char* smem, int stage, int kt, int n0, int m0) {
  using S = Smem<BN, BM, FLOAT_DQ>;
  const int tid = static_cast<int>(tk_arch::tid());
  const int k0 = kt * kBK;
  // x: BM rows x 8 chunks of 8 halves
  uint16_t* sx = S::x(smem, stage);
  for (int c = tid; c < BM * (kBK / 8); c += kThreads) {
    const int row = c / (kBK / 8), col = c % (kBK / 8);
    const int m = m0 + row, k = k0 + col * 8;
    const bool ok = m < p.M && k < p.K;
    cp_async16(sx + row * S::XS + col * 8, ok ? p.x + static_cast<long long>(m) * p.K + k : p.x, ok ? 16 : 0);
  }
  // weight: kSteps x (BN / 16 blocks of 128 bytes = 8 chunks)
  uint32_t* sw = S::w(smem, stage);
  constexpr int W_CHUNKS = S::W_WORDS_PER_STEP / 4;
  const int nb0 = n0 / 16;
  for (int c = tid; c < kSteps * W_CHUNKS; c += kThreads) {
    const int step = c / W_CHUNKS, col = c % W_CHUNKS;
    const int ks = kt * kSteps + step;
    const bool ok = ks < p.KS && nb0 + col / 8 < p.NB;
    const uint32_t* src =
        p.qweight + static_cast<long long>(ks) * p.NB * kWordsPerBlock + nb0 * kWordsPerBlock + col * 4;
    cp_async16(sw + step * S::W_WORDS_PER_STEP + col * 4, ok ? src : p.qweight, ok ? 16 : 0);
  }
  // meta: BN rows x 8 bytes; a row of global meta is only 4-byte aligned (K/16 int16), so 4-byte copies, each one
  // k32 step of one row; rows past N clamped to the last (a valid encoding)
  uint16_t* sm = S::m(smem, stage);
  for (int c = tid; c < BN * kSteps; c += kThreads) {
    const int row = c / kSteps, step = c % kSteps;
    const int n = n0 + row < p.N ? n0 + row : p.N - 1;
    const bool ok = k0 + step * 32 < p.K;
    const uint16_t* src = p.meta + static_cast<long long>(n) * (p.K / 16) + (ok ? k0 / 16 + step * 2 : 0);
    cp_async4(sm + row * S::MS + step * 2, src, ok ? 4 : 0);
  }
  // scales and offsets: per k32 step the row of its group
  constexpr int PER_CHUNK = 16 / S::S_ELEM;  // elements per 16-byte chunk
  constexpr int S_CHUNKS = BN / PER_CHUNK;   // chunks per row
  const char* gs = static_cast<const char*>(p.scales);
  const char* go = static_cast<const char*>(p.offsets);
  for (int c = tid; c < 2 * kSteps * S_CHUNKS; c += kThreads) {
    const int which = c / (kSteps * S_CHUNKS), step = (c / S_CHUNKS) % kSteps, col = c % S_CHUNKS;
    const int ks = kt * kSteps + step;
    if (ks >= p.KS) continue;
    const int n = n0 + col * PER_CHUNK;
    const bool ok = n < p.Np;
    const int group = group_of_step(ks, p.group_size, p.groups);
    const long long off = (static_cast<long long>(group) * p.Np + n) * S::S_ELEM;
    char* dst = (which ? S::o(smem, stage) : S::s(smem, stage)) + (step * BN + col * PER_CHUNK) * S::S_ELEM;
    const char* base = which ? go : gs;
    cp_async16(dst, ok ? base + off : base, ok ? 16 : 0);
  }
}

// The 4 A registers of one m16 tile and k32 step from a lane's word (int4_dequant.cuh): register r is row
// g + 8 (r & 1). Half mode: sc/of[h] the pair (scale, scale) / (offset, offset) of row g + 8h, in T; float mode: the
// fp32 scale and offset of row g + 8h.
template <typename T, bool FLOAT_DQ, typename S>
TK_DEVICE void dequantize(uint32_t word, const S (&sc)[2], const S (&of)[2], uint32_t (&a)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    if constexpr (FLOAT_DQ) a[r] = tk_int4_dequant::pair_float<T>(word, r, sc[r & 1], of[r & 1]);
    else a[r] = tk_int4_dequant::pair_half<T>(word, r, sc[r & 1], of[r & 1]);
  }
}

// f(value, n, m) for each of a lane's accumulators inside the (M, N) output. acc[i][j][r] is row n_lane + 16 i +
// 8 (r >> 1) of out^T, column m_lane + 8 j + (r & 1); n_lane / m_lane hold the warp's origin plus g / 2 t.
template <int MI, int NJ, typename F>
TK_DEVICE void for_each_output(const float (&acc)[MI][NJ][4], int n_lane, int m_lane, int N, int M, F&& f) {
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int n = n_lane + i * 16 + (r >> 1) * 8, m = m_lane + j * 8 + (r & 1);
        if (n < N && m < M) f(acc[i][j][r], n, m);
      }
}

// grid (ceil(N / BN), ceil(M / BM), splits), kThreads threads, Smem<BN, BM, FLOAT_DQ>::BYTES dynamic shared memory.
template <typename T, bool FLOAT_DQ, int BN, int BM, int WARPS_N, int WARPS_M>
TK_GLOBAL void TK_LAUNCH_BOUNDS(kThreads) sparse24_int4_mm_kernel(const Params p) {
  static_assert(WARPS_N * WARPS_M * 32 == kThreads, "4 warps");
  using S = Smem<BN, BM, FLOAT_DQ>;
  constexpr int WN = BN / WARPS_N, WM = BM / WARPS_M;  // warp tile
  constexpr int MI = WN / 16, NJ = WM / 8;             // mma.sp tiles per warp: MI along N (m16), NJ along M (n8)
  static_assert(MI * 16 == WN && NJ * 8 == WM, "warp tile must be whole m16 x n8 tiles");

  char* smem = shared_memory();
  const int n0 = static_cast<int>(block_x()) * BN, m0 = static_cast<int>(block_y()) * BM;
  const int z = static_cast<int>(block_z());
  const int kt_begin = z * p.tiles_per_split;
  const int kt_end = (kt_begin + p.tiles_per_split < p.ktiles) ? kt_begin + p.tiles_per_split : p.ktiles;
  const int nkt = kt_end - kt_begin;

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
    if (st < nkt) load_stage<BN, BM, FLOAT_DQ>(p, smem, st, kt_begin + st, n0, m0);
    cp_async_commit();
  }

  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<kStages - 2>();  // k tile `it` has landed (this thread's copies) ...
    syncthreads();                 // ... everyone's, and every warp is done with the stage refilled next
    const int nxt = it + kStages - 1;
    if (nxt < nkt) load_stage<BN, BM, FLOAT_DQ>(p, smem, nxt % kStages, kt_begin + nxt, n0, m0);
    cp_async_commit();

    const int stage = it % kStages, kt = kt_begin + it;
    const uint16_t* sx = S::x(smem, stage);
    const uint32_t* sw = S::w(smem, stage);
    const uint16_t* sm = S::m(smem, stage);
    const char* ss = S::s(smem, stage);
    const char* so = S::o(smem, stage);
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      if (kt * kSteps + step >= p.KS) break;
      uint32_t a[MI][4], b[NJ][4], e[MI];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        const int row = wn + i * 16 + g;  // this lane's rows n: row (registers 0, 2) and row + 8 (1, 3)
        const uint32_t word = lds(sw + step * S::W_WORDS_PER_STEP + (wn / 16 + i) * kWordsPerBlock + lane);
        if constexpr (FLOAT_DQ) {
          const float* fs = reinterpret_cast<const float*>(ss) + step * BN;
          const float* fo = reinterpret_cast<const float*>(so) + step * BN;
          const float sc[2] = {lds(fs + row), lds(fs + row + 8)};
          const float of[2] = {lds(fo + row), lds(fo + row + 8)};
          dequantize<T, FLOAT_DQ>(word, sc, of, a[i]);
        } else {
          const uint16_t* hs = reinterpret_cast<const uint16_t*>(ss) + step * BN;
          const uint16_t* ho = reinterpret_cast<const uint16_t*>(so) + step * BN;
          uint32_t sc[2], of[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t s1 = lds(hs + row + 8 * h), o1 = lds(ho + row + 8 * h);
            sc[h] = s1 | (s1 << 16);
            of[h] = o1 | (o1 << 16);
          }
          dequantize<T, FLOAT_DQ>(word, sc, of, a[i]);
        }
        const uint32_t lo = lds(sm + row * S::MS + step * 2 + (t & 1));
        const uint32_t hi = lds(sm + (row + 8) * S::MS + step * 2 + (t & 1));
        e[i] = lo | (hi << 16);  // threads t = 2, 3 load a copy that selector 0 ignores
      }
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        // matrices: m rows 0-7 x k 0-7, 8-15, 16-23, 24-31 of this k32 step
        ldmatrix_x4(b[j], sx + (wm + j * 8 + (lane & 7)) * S::XS + step * 32 + (lane >> 3) * 8);
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) mma_sp_16832<T>(acc[i][j], a[i], b[j], e[i]);
    }
  }
  cp_async_wait<0>();

  const int n_lane = n0 + wn + g, m_lane = m0 + wm + 2 * t;
  const int tile = static_cast<int>(block_y()) * ((p.N + BN - 1) / BN) + static_cast<int>(block_x());
  tk_split_k::write_output<T>(
      [&](auto&& f) { for_each_output(acc, n_lane, m_lane, p.N, p.M, [&](float v, int n, int m) { f(v, m, n); }); },
      tk_split_k::Output{p.bias, p.out, p.workspace, p.counters, p.M, p.N}, S::flag(smem), tile);
}

// Calls fn.template run<T, FLOAT_DQ, BN, BM, WARPS_N, WARPS_M>() for an instance: 2 dtypes x 2 dequantization
// modes x 2 tiles, shared by the GPU launcher and the emulator's.
template <typename T, bool FQ, typename Fn>
void dispatch_tile(const Instance& in, Fn& fn) {
  if (in.decode) fn.template run<T, FQ, 128, 16, 4, 1>();
  else fn.template run<T, FQ, 64, 64, 2, 2>();
}

template <typename Fn>
void dispatch(const Instance& in, Fn& fn) {
  if (in.bf16) {
    if (in.float_dq) dispatch_tile<BF16, true>(in, fn);
    else dispatch_tile<BF16, false>(in, fn);
  } else {
    if (in.float_dq) dispatch_tile<F16, true>(in, fn);
    else dispatch_tile<F16, false>(in, fn);
  }
}

}  // inline namespace TK_BUILD
}  // namespace tk_s24i4
