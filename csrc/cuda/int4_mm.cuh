// int4_mm on tensor cores: out (M, N) = x (M, K) @ dequant(W) (K, N) [+ bias (N)], x fp16/bf16, fp32 accumulation,
// one rounding of the output. The kernel of the "cuda" backend (csrc/cuda/int4_mm.cu launches it on a GPU,
// csrc/emu/int4_mm.cpp runs the same source on the CPU emulator).
//
// Weight: Int4Weight (python/turbokernels/formats/int4.py) repacked once, at load time, into the mma layout of
// csrc/cuda/int4_mm_layout.h (Int4Weight.mma_layout()): qweight_mma int32 (ceil(K/16), ceil(N/16) * 32) and scales /
// offsets (G, Np = N rounded up to 16) in x's dtype when both are exact there ("half" dequantization), the scales in
// x's dtype and -(M + z) for integer zero points z ("zero"), else fp32 ("float"). W[k, n] = q * scale + offset.
//
// Strategy (Marlin's ideas, our layout):
//  * mma.sync.m16n8k16 with x as A (ldmatrix.x4 from shared memory) and the weight as B, dequantized in registers
//    straight into B fragments: a lane's 32-bit word holds the 8 nibbles of its 4 B registers, so there is no
//    shuffle and no shared-memory round trip of dequantized weights.
//  * Dequantization: lop3 moves two nibbles into the mantissas of a 16-bit float pair with the exponent of a magic
//    number M (fp16: 1024, bf16: 128; one ulp there is 1, so the pair reads M + q exactly); an fma with -M gives q
//    exactly, and one fma2 q * scale + offset gives the weight, rounded once to x's dtype (the offset folded into
//    that fma). "Zero" mode, for integer zero points (o = -z s: GPTQ, AWQ): the fma with -(M + z) gives q - z
//    exactly, one fma2 (q - z) * s. "Float" mode (other offsets not exact in x's dtype): the same lop3 with fp32's
//    magic 2^23, fp32 fma, one cvt to a pair. Each rounds the exact q * s + o (half, zero) or the fp32
//    dequantization (float) to x's dtype once: what tl.dot's operand rounding does in the Triton kernel
//    (csrc/cuda/int4_dequant.cuh, shared with sparse24_int4_mm.cuh).
//  * Tiles: BM x BN = 16 x 128 for M <= 16 (decode: 4 warps side by side along N) or 64 x 128 (2 x 2 warps),
//    BK = 64 (4 k16 steps) per stage, 4-stage cp.async pipeline; x rows padded to 144 bytes (ldmatrix without bank
//    conflicts). A stage also holds the rows of scales and offsets of the groups its k tile touches (<= 4).
//  * Split-K for small grids: grid z cuts K; each part writes fp32 partials to a workspace, and the last part to
//    finish a tile (an atomic counter per tile) sums all parts in part order, adds the bias and writes the output:
//    one launch, deterministic (the order does not depend on which part finishes last), the counters left at zero
//    (csrc/cuda/split_k.cuh, shared with sparse24_int4_mm.cuh).
//  * Tails: rows past M and k past K are zero-filled by cp.async (src-size 0); the repack pads q with zeros, so a
//    padded weight is the finite offset and meets x = 0. Steps past ceil(K/16) are skipped. The store is masked.
#pragma once

#include "cuda/arch.cuh"
#include "cuda/int4_dequant.cuh"
#include "cuda/int4_mm_layout.h"
#include "cuda/split_k.cuh"

namespace tk_int4 {
inline namespace TK_BUILD {  // the GPU's and the emulator's instantiations must not share mangled names (arch.cuh)

using namespace tk_arch;


constexpr int kThreads = 128;
constexpr int kSteps = kStepsPerTile;  // k16 steps per stage
constexpr int kBK = 16 * kSteps;       // k per stage: 64
constexpr int kStages = 4;

template <int BM, int BN, int DQ>
struct Smem {
  static constexpr int XS = kBK + 8;  // halves per shared x row: 144 bytes, 8 rows hit 8 different bank groups
  static constexpr int X_BYTES = BM * XS * 2;
  static constexpr int W_WORDS_PER_STEP = BN / 16 * kWordsPerBlock;
  static constexpr int W_BYTES = kSteps * W_WORDS_PER_STEP * 4;
  static constexpr int S_ELEM = DQ == kDqFloat ? 4 : 2;
  static constexpr int S_BYTES = kSteps * BN * S_ELEM;  // up to 4 group rows of BN scales
  static constexpr int STAGE_BYTES = X_BYTES + W_BYTES + 2 * S_BYTES;
  static constexpr int BYTES = kStages * STAGE_BYTES + 16;  // + the split-K "last part" flag
  static_assert(X_BYTES % 16 == 0 && W_BYTES % 16 == 0 && S_BYTES % 16 == 0, "16-byte aligned regions");

  static TK_DEVICE uint16_t* x(char* base, int stage) {
    return reinterpret_cast<uint16_t*>(base + stage * STAGE_BYTES);
  }
  static TK_DEVICE uint32_t* w(char* base, int stage) {
    return reinterpret_cast<uint32_t*>(base + stage * STAGE_BYTES + X_BYTES);
  }
  static TK_DEVICE char* s(char* base, int stage) { return base + stage * STAGE_BYTES + X_BYTES + W_BYTES; }
  static TK_DEVICE char* o(char* base, int stage) { return s(base, stage) + S_BYTES; }
  static TK_DEVICE int* flag(char* base) { return reinterpret_cast<int*>(base + kStages * STAGE_BYTES); }
};

// The first group a k tile touches and how many (1..4).
TK_DEVICE void tile_groups(const Params& p, int kt, int& first, int& count) {
  const int kb0 = kt * kSteps;
  const int kb1 = (kb0 + kSteps - 1 < p.KB - 1) ? kb0 + kSteps - 1 : p.KB - 1;
  first = group_of_step(kb0, p.group_size, p.groups);
  count = group_of_step(kb1, p.group_size, p.groups) - first + 1;
}

// Issue the cp.async copies of k tile kt into `stage` (not committed).
template <int BM, int BN, int DQ>
TK_DEVICE void load_stage(const Params& p, char* smem, int stage, int kt, int m0, int n0) {
  using S = Smem<BM, BN, DQ>;
  const int tid = static_cast<int>(tk_arch::tid());
  // x: BM rows x 8 chunks of 8 halves
  uint16_t* sx = S::x(smem, stage);
  for (int c = tid; c < BM * (kBK / 8); c += kThreads) {
    const int row = c / (kBK / 8), col = c % (kBK / 8);
    const int m = m0 + row, k = kt * kBK + col * 8;
    const bool ok = m < p.M && k < p.Kx;
    cp_async16(sx + row * S::XS + col * 8, ok ? p.x + static_cast<long long>(m) * p.ldx + k : p.x, ok ? 16 : 0);
  }
  // weight: 4 steps x (BN / 16 blocks of 128 bytes = 8 chunks)
  uint32_t* sw = S::w(smem, stage);
  constexpr int W_CHUNKS = S::W_WORDS_PER_STEP / 4;
  const int nb0 = n0 / 16;
  for (int c = tid; c < kSteps * W_CHUNKS; c += kThreads) {
    const int step = c / W_CHUNKS, col = c % W_CHUNKS;
    const int kb = kt * kSteps + step;
    const bool ok = kb < p.KB && nb0 + col / 8 < p.NB;
    const uint32_t* src = p.qweight + static_cast<long long>(kb) * p.NB * kWordsPerBlock + nb0 * kWordsPerBlock + col * 4;
    cp_async16(sw + step * S::W_WORDS_PER_STEP + col * 4, ok ? src : p.qweight, ok ? 16 : 0);
  }
  // scales and offsets: the rows of the groups this k tile touches
  int first, count;
  tile_groups(p, kt, first, count);
  constexpr int PER_CHUNK = 16 / S::S_ELEM;  // elements per 16-byte chunk
  constexpr int S_CHUNKS = BN / PER_CHUNK;   // chunks per row
  const char* gs = static_cast<const char*>(p.scales);
  const char* go = static_cast<const char*>(p.offsets);
  for (int c = tid; c < 2 * kSteps * S_CHUNKS; c += kThreads) {
    const int which = c / (kSteps * S_CHUNKS), r = (c / S_CHUNKS) % kSteps, col = c % S_CHUNKS;
    if (r >= count) continue;
    const int n = n0 + col * PER_CHUNK;
    const bool ok = n < p.Np;
    const long long off = (static_cast<long long>(first + r) * p.Np + n) * S::S_ELEM;
    char* dst = (which ? S::o(smem, stage) : S::s(smem, stage)) + (r * BN + col * PER_CHUNK) * S::S_ELEM;
    const char* base = which ? go : gs;
    cp_async16(dst, ok ? base + off : base, ok ? 16 : 0);
  }
}

// The 4 B registers of one 16 x 16 block (b[tile][register]) from a lane's word (int4_dequant.cuh): pair j is
// tile j / 2's register j % 2. Half and zero modes: sc/of are the pairs (scale, scale) / (offset, offset) of each
// tile's column, in T (zero mode: of = -(M + z)); float mode: the fp32 scale and offset per tile.
template <typename T, int DQ, typename S>
TK_DEVICE void dequantize(uint32_t word, const S (&sc)[2], const S (&of)[2], uint32_t (&b)[2][2]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (DQ == kDqFloat) b[j >> 1][j & 1] = tk_int4_dequant::pair_float<T>(word, j, sc[j >> 1], of[j >> 1]);
    else if constexpr (DQ == kDqZero) b[j >> 1][j & 1] = tk_int4_dequant::pair_zero<T>(word, j, sc[j >> 1], of[j >> 1]);
    else b[j >> 1][j & 1] = tk_int4_dequant::pair_half<T>(word, j, sc[j >> 1], of[j >> 1]);
  }
}

// f(value, m, n) for each of a lane's accumulators inside the (M, N) output. The C fragment: acc[i][j][r] is row
// m_lane + 16 i + 8 (r >> 1), column n_lane + 8 j + (r & 1), where m_lane / n_lane hold the warp's origin plus the
// lane's g / 2 t.
template <int MI, int NJ, typename F>
TK_DEVICE void for_each_output(const float (&acc)[MI][NJ][4], int m_lane, int n_lane, int M, int N, F&& f) {
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int m = m_lane + i * 16 + (r >> 1) * 8, n = n_lane + j * 8 + (r & 1);
        if (m < M && n < N) f(acc[i][j][r], m, n);
      }
}

// grid (ceil(N / BN), ceil(M / BM), splits), kThreads threads, Smem<BM, BN, DQ>::BYTES dynamic shared memory.
template <typename T, int DQ, int BM, int BN, int WARPS_M, int WARPS_N>
TK_GLOBAL void TK_LAUNCH_BOUNDS(kThreads) int4_mm_kernel(const Params p) {
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "4 warps");
  using S = Smem<BM, BN, DQ>;
  constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  constexpr int MI = WTM / 16, NBW = WTN / 16, NJ = WTN / 8;
  static_assert(MI * 16 == WTM && NBW * 16 == WTN, "warp tile must be whole 16 x 16 blocks");

  char* smem = shared_memory();
  const int n0 = static_cast<int>(block_x()) * BN, m0 = static_cast<int>(block_y()) * BM;
  const int z = static_cast<int>(block_z());
  const int kt_begin = z * p.tiles_per_split;
  const int kt_end = (kt_begin + p.tiles_per_split < p.ktiles) ? kt_begin + p.tiles_per_split : p.ktiles;
  const int nkt = kt_end - kt_begin;

  const int tid = static_cast<int>(tk_arch::tid());
  const int lane = tid & 31, warp = tid >> 5;
  const int wm = (warp % WARPS_M) * WTM, wn = (warp / WARPS_M) * WTN;
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
    if (st < nkt) load_stage<BM, BN, DQ>(p, smem, st, kt_begin + st, m0, n0);
    cp_async_commit();
  }

  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<kStages - 2>();  // k tile `it` has landed (this thread's copies) ...
    syncthreads();                 // ... everyone's, and every warp is done with the stage refilled next
    const int nxt = it + kStages - 1;
    if (nxt < nkt) load_stage<BM, BN, DQ>(p, smem, nxt % kStages, kt_begin + nxt, m0, n0);
    cp_async_commit();

    const int stage = it % kStages, kt = kt_begin + it;
    const uint16_t* sx = S::x(smem, stage);
    const uint32_t* sw = S::w(smem, stage);
    const char* ss = S::s(smem, stage);
    const char* so = S::o(smem, stage);
    int first, count;
    tile_groups(p, kt, first, count);
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int kb = kt * kSteps + step;
      if (kb >= p.KB) break;
      const int r = group_of_step(kb, p.group_size, p.groups) - first;
      uint32_t a[MI][4];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        // matrices: rows 0-7 / 8-15 x k 0-7, then the same rows x k 8-15 (a0a1 | a2a3 | a4a5 | a6a7)
        ldmatrix_x4(a[i], sx + (wm + i * 16 + (lane & 15)) * S::XS + step * 16 + (lane >> 4) * 8);
      }
#pragma unroll
      for (int nb = 0; nb < NBW; ++nb) {
        const int block = (wn / 16) + nb;
        const uint32_t word = lds(sw + step * S::W_WORDS_PER_STEP + block * kWordsPerBlock + lane);
        const int c0 = wn + nb * 16 + g;  // this lane's columns: c0 (tile 0) and c0 + 8 (tile 1)
        uint32_t b[2][2];
        if constexpr (DQ == kDqFloat) {
          const float* fs = reinterpret_cast<const float*>(ss) + r * BN;
          const float* fo = reinterpret_cast<const float*>(so) + r * BN;
          const float sc[2] = {lds(fs + c0), lds(fs + c0 + 8)};
          const float of[2] = {lds(fo + c0), lds(fo + c0 + 8)};
          dequantize<T, DQ>(word, sc, of, b);
        } else {
          const uint16_t* hs = reinterpret_cast<const uint16_t*>(ss) + r * BN;
          const uint16_t* ho = reinterpret_cast<const uint16_t*>(so) + r * BN;
          uint32_t sc[2], of[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t s1 = lds(hs + c0 + 8 * h), o1 = lds(ho + c0 + 8 * h);
            sc[h] = s1 | (s1 << 16);
            of[h] = o1 | (o1 << 16);
          }
          dequantize<T, DQ>(word, sc, of, b);
        }
#pragma unroll
        for (int i = 0; i < MI; ++i) {
          mma_16816<T>(acc[i][2 * nb], a[i], b[0]);
          mma_16816<T>(acc[i][2 * nb + 1], a[i], b[1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  const int m_lane = m0 + wm + g, n_lane = n0 + wn + 2 * t;
  const int tile = static_cast<int>(block_y()) * ((p.N + BN - 1) / BN) + static_cast<int>(block_x());
  tk_split_k::write_output<T>([&](auto&& f) { for_each_output(acc, m_lane, n_lane, p.M, p.N, f); },
                              tk_split_k::Output{p.bias, p.out, p.workspace, p.counters, p.M, p.N}, S::flag(smem),
                              tile);
}

// Calls fn.template run<T, DQ, BM, BN, WARPS_M, WARPS_N>() for an instance: the handful every build holds
// (2 dtypes x 3 dequantization modes x 2 tiles), shared by the GPU launcher and the emulator's.
template <typename T, int DQ, typename Fn>
void dispatch_tile(const Instance& in, Fn& fn) {
  if (in.decode) fn.template run<T, DQ, 16, 128, 1, 4>();
  else fn.template run<T, DQ, 64, 128, 2, 2>();
}

template <typename T, typename Fn>
void dispatch_mode(const Instance& in, Fn& fn) {
  if (in.dequant == kDqFloat) dispatch_tile<T, kDqFloat>(in, fn);
  else if (in.dequant == kDqZero) dispatch_tile<T, kDqZero>(in, fn);
  else dispatch_tile<T, kDqHalf>(in, fn);
}

template <typename Fn>
void dispatch(const Instance& in, Fn& fn) {
  if (in.bf16) dispatch_mode<BF16>(in, fn);
  else dispatch_mode<F16>(in, fn);
}

}  // inline namespace TK_BUILD
}  // namespace tk_int4
