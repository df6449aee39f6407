// decode_attention on tensor cores: out (B, T, Hq, D) from q (B, T, Hq, D) and a KV cache, fp16/bf16 operands, fp32
// accumulation, one rounding of the output. The kernel of the "cuda" backend (csrc/cuda/decode_attention.cu launches
// it on a GPU, csrc/emu/decode_attention.cpp runs the same source on the CPU emulator). The semantics are the spec's
// (python/turbokernels/reference/decode_attention.py), causal: new token t of sequence b sits at
// qpos = L_b - T + t (L_b = cache_seqlens[b], clamped to the capacity) and attends keys j < L_b with j <= qpos, and
// j >= qpos - window_left when window_left >= 0; scores s = scale q.k, softcapped, minus slope * (qpos - j) (ALiBi).
//
// Strategy (kernels/attention_decode.py's, on mma.sync):
//  * One CTA (4 warps) per (batch, kv head, block of query rows, KV split). The query rows of a kv head are the
//    group * T rows r = g * T + t of its GQA group (query head kvh * group + g, token t), up to ROWS = 16 * WARPS_M
//    = 16/32/64 per CTA, so that each K/V tile crosses HBM once per kv head; more rows take more row blocks.
//  * Warps: WARPS_M (1, 2, 4) m16 tiles of rows x WARPS_N = 4 / WARPS_M slices of the 64-key tile (KW = 64 / WARPS_N
//    keys each). Each warp runs its own online softmax over its key slices (FlashAttention-2's inner loop) and the
//    warps' states are merged once, at the end, through shared memory (flash-decoding inside the CTA). A warp whose
//    keys in a tile are all outside [window start, stop) skips the tile.
//  * q.K^T: q's A fragments are loaded once (ldmatrix.x4 from shared memory) and kept in registers; the K tile
//    (keys x d, row-major in shared memory) is the n-major B operand of mma.m16n8k16, read by ldmatrix.x4.
//  * Softmax in base 2: the scale (times log2 e) folded into one multiply of the fp32 scores, exp2 by ex2.approx;
//    the row max reduced over the 4 lanes of a quad by shuffles, the row sum kept per lane and reduced at the end.
//  * P V: the probabilities are converted to fp16/bf16 in registers, the S accumulator fragments of two n8 tiles
//    being exactly the A fragment of one k16 step (FlashAttention-2), and V (keys x d, row-major) is the B operand
//    through ldmatrix.x4.trans.
//  * K/V tiles: 64 keys, rows padded to D + 8 halves (ldmatrix without bank conflicts), loaded by a cp.async
//    pipeline of STAGES stages (4 at d=64, 2 at d=128: ~70 KB per CTA, two CTAs per SM on an A100, and within the
//    99 KB of sm_86/89); q waits in the last stage's buffer until its fragments are in registers. Paged caches: each
//    key's page is read from the block table (any page size), for the next tile before the wait for the current
//    one. Slots no row attends (past the length, or before the first row's window) are never read: cp.async
//    zero-fills them (they may hold NaN).
//  * Split-KV: grid y cuts the KV capacity into splits of kv_per_split keys (a multiple of 64); a split whose start
//    is at or past its sequence's length exits at once (split 0 always runs, so an empty sequence still gets its
//    zero output). With one split the CTA writes the output; else unnormalized fp32 partials (acc, row max m in
//    base 2, row sum l) that decode_attention_combine_kernel merges: out = sum_s 2^(m_s - M) acc_s /
//    sum_s 2^(m_s - M) l_s over the splits that ran. The grid is sized from the capacity, never from the values of
//    cache_seqlens (no host sync: CUDA graphs).
#pragma once

#include "cuda/arch.cuh"
#include "cuda/decode_attention_params.h"

namespace tk_decode {
inline namespace TK_BUILD {  // the GPU's and the emulator's instantiations must not share mangled names (arch.cuh)

using namespace tk_arch;

constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Tile {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static constexpr int STAGES = D == 64 ? 4 : 2;
  static constexpr int LD = D + 8;                   // halves per shared row: 8 rows hit 8 different bank groups
  static constexpr int KV_BYTES = kBlockN * LD * 2;  // one K (or V) tile
  static constexpr int STAGE_BYTES = 2 * KV_BYTES;
  static constexpr int BYTES = STAGES * STAGE_BYTES;
  // the epilogue's merge of the warps, in the same memory once the pipeline is drained: every warp's acc (64 rows
  // of D fp32 over all warps), its m and l, and the merged max per row
  static constexpr int RED_BYTES = kWarps * 16 * D * 4 + 3 * kWarps * 16 * 4;
  static_assert(RED_BYTES <= BYTES, "the epilogue's merge must fit in the pipeline's shared memory");
  static_assert(STAGES >= 2, "q waits in the last stage's buffer until the first tile lands");
};

TK_DEVICE float neg_inf() { return as_float(0xFF800000u); }
TK_DEVICE float fmax2(float a, float b) { return a > b ? a : b; }

// Where this thread's rows of a K/V tile live: the page (a contiguous cache: the sequence's batch row) and the
// position in it; page -1 for a slot no row attends (zero-filled, never read). A thread copies one 16-byte column
// chunk of every RPP-th row of the tile, the same rows in K and V.
template <int D>
struct TileRows {
  static constexpr int CPR = D / 8;              // 16-byte chunks per row
  static constexpr int RPP = kThreads / CPR;     // rows per pass of all threads
  static constexpr int PASSES = kBlockN / RPP;
  int page[PASSES], pos[PASSES];
};

// The rows of keys [n0, n0 + 64) of sequence b: the block-table reads, issued together and before the wait for the
// tile in flight, so that their latency is not added to the next tile's copies. Keys outside [key_lo, stop): -1.
template <int D>
TK_DEVICE void locate_rows(const Params& p, int b, int n0, int stop, int key_lo, TileRows<D>& rows) {
  using R = TileRows<D>;
  const int r0 = static_cast<int>(tk_arch::tid()) / R::CPR;
#pragma unroll
  for (int i = 0; i < R::PASSES; ++i) {
    const int n = n0 + r0 + i * R::RPP;
    rows.page[i] = -1;
    rows.pos[i] = 0;
    if (n < stop && n >= key_lo) {
      if (p.block_table != nullptr) {
        rows.page[i] = load(p.block_table + b * p.bt_sb + n / p.page_size);
        rows.pos[i] = n % p.page_size;
      } else {
        rows.page[i] = b;
        rows.pos[i] = n;
      }
    }
  }
}

// Issue (not commit) the cp.async copies of one tile of kv head kvh into a stage (K, then V).
template <int D>
TK_DEVICE void load_tile(const Params& p, char* stage, int kvh, const TileRows<D>& rows) {
  using S = Tile<D>;
  using R = TileRows<D>;
  const int tid = static_cast<int>(tk_arch::tid());
  const int col = tid % R::CPR, r0 = tid / R::CPR;
  uint16_t* sk = reinterpret_cast<uint16_t*>(stage);
  uint16_t* sv = reinterpret_cast<uint16_t*>(stage + S::KV_BYTES);
#pragma unroll
  for (int i = 0; i < R::PASSES; ++i) {
    const int row = r0 + i * R::RPP;
    const bool ok = rows.page[i] >= 0;
    long long kofs = 0, vofs = 0;
    if (ok) {
      kofs = rows.page[i] * p.k_sb + rows.pos[i] * p.k_sn + kvh * p.k_sh + col * 8;
      vofs = rows.page[i] * p.v_sb + rows.pos[i] * p.v_sn + kvh * p.v_sh + col * 8;
    }
    cp_async16(sk + row * S::LD + col * 8, p.k + kofs, ok ? 16 : 0);
    cp_async16(sv + row * S::LD + col * 8, p.v + vofs, ok ? 16 : 0);
  }
}

// grid (B * Hkv * row_blocks, splits), kThreads threads, Tile<D>::BYTES dynamic shared memory. Two CTAs per SM (what
// an A100's shared memory holds): up to 255 registers, which ptxas needs for 64 rows at d=128 (221 on sm_90a); left
// to itself it spilled a few bytes to fit three.
template <typename T, int D, int WARPS_M>
TK_GLOBAL void TK_LAUNCH_BOUNDS_MIN(kThreads, 2) decode_attention_kernel(const Params p) {
  using S = Tile<D>;
  constexpr int WARPS_N = kWarps / WARPS_M;
  constexpr int ROWS = 16 * WARPS_M;       // query rows per CTA
  constexpr int KW = kBlockN / WARPS_N;    // keys per warp per tile
  constexpr int NS = KW / 8;               // n8 tiles of a warp's scores
  constexpr int KS = KW / 16;              // k16 steps of its P V
  constexpr int DK = D / 16;               // k16 steps of q.K^T
  constexpr int DN = D / 8;                // n8 tiles of the output
  static_assert(WARPS_M * WARPS_N == kWarps && KS >= 1, "4 warps, at least 16 keys each");

  char* smem = shared_memory();
  const int pid = static_cast<int>(block_x()), split = static_cast<int>(block_y());
  const int mb = pid % p.row_blocks, bh = pid / p.row_blocks;
  const int kvh = bh % p.Hkv, b = bh / p.Hkv;
  int seqlen = load(p.seqlens + b);
  seqlen = seqlen < 0 ? 0 : (seqlen > p.capacity ? p.capacity : seqlen);
  const int start = split * p.kv_per_split;
  if (split > 0 && start >= seqlen) return;  // the combine kernel reads only the splits that ran
  const int stop = start + p.kv_per_split < seqlen ? start + p.kv_per_split : seqlen;
  // the first slot any row may attend: token 0's window start (every later token's starts later)
  int key_lo = 0;
  if (p.window_left >= 0) key_lo = seqlen - p.T - p.window_left > 0 ? seqlen - p.T - p.window_left : 0;
  const int lo = start > key_lo / kBlockN * kBlockN ? start : key_lo / kBlockN * kBlockN;
  const int ntiles = stop > lo ? (stop - lo + kBlockN - 1) / kBlockN : 0;

  const int tid = static_cast<int>(tk_arch::tid());
  const int lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int g = lane >> 2, t4 = lane & 3;

  // q rows into the last stage's buffer (free until the first refill), with tile 0 as one group
  {
    constexpr int CPR = D / 8;
    uint16_t* sq = reinterpret_cast<uint16_t*>(smem + (S::STAGES - 1) * S::STAGE_BYTES);
    for (int c = tid; c < ROWS * CPR; c += kThreads) {
      const int r = c / CPR, col = c % CPR;
      const int gr = mb * ROWS + r;
      const bool ok = gr < p.rows;
      long long off = 0;
      if (ok) off = b * p.q_sb + (gr % p.T) * p.q_st + (kvh * p.group + gr / p.T) * p.q_sh + col * 8;
      cp_async16(sq + r * S::LD + col * 8, p.q + off, ok ? 16 : 0);
    }
  }
#pragma unroll
  for (int st = 0; st < S::STAGES - 1; ++st) {
    if (st < ntiles) {
      TileRows<D> rows;
      locate_rows<D>(p, b, lo + st * kBlockN, stop, key_lo, rows);
      load_tile<D>(p, smem + st * S::STAGE_BYTES, kvh, rows);
    }
    cp_async_commit();
  }
  cp_async_wait<S::STAGES - 2>();  // q (and tile 0) landed
  syncthreads();
  uint32_t qa[DK][4];
  {
    const uint16_t* sq = reinterpret_cast<const uint16_t*>(smem + (S::STAGES - 1) * S::STAGE_BYTES);
#pragma unroll
    for (int ks = 0; ks < DK; ++ks) {
      ldmatrix_x4(qa[ks], sq + (wm * 16 + (lane & 15)) * S::LD + ks * 16 + (lane >> 4) * 8);
    }
  }

  // this lane's two rows (C fragment rows g and g + 8 of the warp's m tile): position and ALiBi slope (base 2)
  int qpos[2];
  float slope[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int gr = mb * ROWS + wm * 16 + g + 8 * ri;
    qpos[ri] = seqlen - p.T + gr % p.T;
    slope[ri] = 0.f;
    if (p.alibi != nullptr && gr < p.rows) {
      slope[ri] = load(p.alibi + b * p.alibi_sb + kvh * p.group + gr / p.T) * kLog2e;
    }
  }
  const bool softcap = p.softcap_log2 > 0.f;

  float m_i[2] = {neg_inf(), neg_inf()}, l_i[2] = {0.f, 0.f};
  float acc[DN][4];
#pragma unroll
  for (int j = 0; j < DN; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[j][r] = 0.f;

  for (int it = 0; it < ntiles; ++it) {
    const int nxt = it + S::STAGES - 1;
    TileRows<D> rows;  // live from here to the copies only, not through the tile's math
    if (nxt < ntiles) locate_rows<D>(p, b, lo + nxt * kBlockN, stop, key_lo, rows);
    cp_async_wait<S::STAGES - 2>();  // tile `it` has landed (this thread's copies) ...
    syncthreads();                   // ... everyone's, and every warp is done with the stage refilled next (and q)
    if (nxt < ntiles) load_tile<D>(p, smem + (nxt % S::STAGES) * S::STAGE_BYTES, kvh, rows);
    cp_async_commit();

    const int kw0 = lo + it * kBlockN + wn * KW;  // this warp's first key
    if (kw0 >= stop || kw0 + KW <= key_lo) continue;  // none of its keys is attended by any row
    const uint16_t* sk = reinterpret_cast<const uint16_t*>(smem + (it % S::STAGES) * S::STAGE_BYTES) + wn * KW * S::LD;
    const uint16_t* sv = sk + kBlockN * S::LD;

    float s[NS][4];
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[j][r] = 0.f;
#pragma unroll
    for (int ks = 0; ks < DK; ++ks) {
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        // matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15) of 16 keys: the
        // B fragments (b0b1 | b2b3) of two n8 tiles
        uint32_t kb[4];
        ldmatrix_x4(kb, sk + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * S::LD + ks * 16 + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_16816<T>(s[2 * np], qa[ks], b0);
        mma_16816<T>(s[2 * np + 1], qa[ks], b1);
      }
    }

    // s[j][r]: row g + 8 (r >> 1), key kw0 + 8 j + 2 t4 + (r & 1)
    float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int key = kw0 + 8 * j + 2 * t4 + (r & 1), ri = r >> 1;
        float x = s[j][r];
        if (softcap) {  // softcap tanh(x scale / softcap) in base 2, tanh(y) = 1 - 2 / (e^2y + 1): saturates at +-inf
          x = p.softcap_log2 * (1.f - 2.f / (exp2_approx(x * p.qk_scale) + 1.f));
        } else {
          x *= p.qk_scale;
        }
        const int dist = qpos[ri] - key;
        x -= slope[ri] * static_cast<float>(dist);
        const bool ok = key < stop && dist >= 0 && (p.window_left < 0 || dist <= p.window_left);
        x = ok ? x : neg_inf();
        s[j][r] = x;
        mx[ri] = fmax2(mx[ri], x);
      }
    float alpha[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      mx[ri] = fmax2(mx[ri], shfl_xor(mx[ri], 1));
      mx[ri] = fmax2(mx[ri], shfl_xor(mx[ri], 2));
      const float m_new = fmax2(m_i[ri], mx[ri]);
      const float m_safe = m_new == neg_inf() ? 0.f : m_new;
      alpha[ri] = exp2_approx(m_i[ri] - m_safe);  // 0 while nothing was attended (m_i = -inf)
      l_i[ri] *= alpha[ri];
      m_i[ri] = m_new;
      mx[ri] = m_safe;
    }
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        s[j][r] = exp2_approx(s[j][r] - mx[r >> 1]);
        l_i[r >> 1] += s[j][r];
      }
#pragma unroll
    for (int j = 0; j < DN; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[j][r] *= alpha[r >> 1];

#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      // the C fragments of n8 tiles 2 kk, 2 kk + 1 are the A fragment (a0a1 | a2a3 | a4a5 | a6a7) of keys 16 kk..
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < DN / 2; ++dp) {
        // transposed matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15)
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * S::LD + dp * 16 + (lane >> 4) * 8);
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        mma_16816<T>(acc[2 * dp], pa, b0);
        mma_16816<T>(acc[2 * dp + 1], pa, b1);
      }
    }
  }
  cp_async_wait<0>();
  syncthreads();  // every warp is done with the stages: their memory holds the merge from here on

#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    l_i[ri] += shfl_xor(l_i[ri], 1);
    l_i[ri] += shfl_xor(l_i[ri], 2);
  }
  // merge the WARPS_N warps of each m tile: rescale each to the rows' common max, sum in warp order
  float* red_acc = reinterpret_cast<float*>(smem);  // [WARPS_N][ROWS][D]
  float* red_m = red_acc + kWarps * 16 * D;         // [WARPS_N][ROWS]
  float* red_l = red_m + kWarps * 16;               // [WARPS_N][ROWS]
  float* row_m = red_l + kWarps * 16;               // [ROWS]
  if (t4 == 0) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) sts(red_m + wn * ROWS + wm * 16 + g + 8 * ri, m_i[ri]);
  }
  syncthreads();
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int r = wm * 16 + g + 8 * ri;
    float mall = neg_inf();
    for (int w = 0; w < WARPS_N; ++w) mall = fmax2(mall, lds(red_m + w * ROWS + r));
    const float sc = exp2_approx(m_i[ri] - (mall == neg_inf() ? 0.f : mall));
#pragma unroll
    for (int j = 0; j < DN; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) sts(red_acc + (wn * ROWS + r) * D + 8 * j + 2 * t4 + h, acc[j][2 * ri + h] * sc);
    if (t4 == 0) {
      sts(red_l + wn * ROWS + r, l_i[ri] * sc);
      if (wn == 0) sts(row_m + r, mall);
    }
  }
  syncthreads();

  // the CTA's rows: two adjacent d per thread and step
  for (int idx = tid; idx < ROWS * D / 2; idx += kThreads) {
    const int r = idx / (D / 2), d = 2 * (idx % (D / 2));
    const int gr = mb * ROWS + r;
    if (gr >= p.rows) break;  // rows are in order: the rest are padding too
    float a0 = 0.f, a1 = 0.f, sum = 0.f;
    for (int w = 0; w < WARPS_N; ++w) {
      a0 += lds(red_acc + (w * ROWS + r) * D + d);
      a1 += lds(red_acc + (w * ROWS + r) * D + d + 1);
      sum += lds(red_l + w * ROWS + r);
    }
    const long long row = (static_cast<long long>(b) * p.T + gr % p.T) * p.Hq + kvh * p.group + gr / p.T;
    if (p.splits == 1) {
      const float denom = sum == 0.f ? 1.f : sum;  // a row with no key to attend: 0
      store(reinterpret_cast<uint32_t*>(p.out + row * D + d), pack2<T>(a0 / denom, a1 / denom));
    } else {
      const long long prow = static_cast<long long>(split) * p.B * p.T * p.Hq + row;
      store(p.part + prow * D + d, a0);
      store(p.part + prow * D + d + 1, a1);
      if (d == 0) {
        store(p.m + prow, lds(row_m + r));
        store(p.l + prow, sum);
      }
    }
  }
}

// grid (ceil(B * T * Hq / kCombineRows)), kThreads threads, no shared memory: the partials of the splits that ran
// (those starting below the sequence's length), weighted by 2^(m_s - M), over their weighted row sums.
template <typename T, int D>
TK_GLOBAL void TK_LAUNCH_BOUNDS(kThreads) decode_attention_combine_kernel(const Params p) {
  constexpr int PER_LANE = D / 32;  // adjacent d per lane: 2 or 4
  const int tid = static_cast<int>(tk_arch::tid());
  const long long row = static_cast<long long>(block_x()) * kCombineRows + (tid >> 5);  // (b, t, h), h fastest
  const long long nrows = static_cast<long long>(p.B) * p.T * p.Hq;
  if (row >= nrows) return;
  const int b = static_cast<int>(row / (static_cast<long long>(p.T) * p.Hq));
  int seqlen = load(p.seqlens + b);
  seqlen = seqlen < 0 ? 0 : (seqlen > p.capacity ? p.capacity : seqlen);
  int ran = (seqlen + p.kv_per_split - 1) / p.kv_per_split;
  ran = ran < p.splits ? ran : p.splits;
  float mall = neg_inf();
  for (int s = 0; s < ran; ++s) mall = fmax2(mall, load(p.m + s * nrows + row));
  const float msafe = mall == neg_inf() ? 0.f : mall;
  const int d0 = (tid & 31) * PER_LANE;
  float acc[PER_LANE], denom = 0.f;
#pragma unroll
  for (int e = 0; e < PER_LANE; ++e) acc[e] = 0.f;
  for (int s = 0; s < ran; ++s) {
    const float w = exp2_approx(load(p.m + s * nrows + row) - msafe);  // 0 for a split without keys (m = -inf)
    denom += w * load(p.l + s * nrows + row);
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) acc[e] += w * load(p.part + (s * nrows + row) * D + d0 + e);
  }
  const float inv = 1.f / (denom == 0.f ? 1.f : denom);
#pragma unroll
  for (int e = 0; e < PER_LANE; e += 2) {
    store(reinterpret_cast<uint32_t*>(p.out + row * D + d0 + e), pack2<T>(acc[e] * inv, acc[e + 1] * inv));
  }
}

// Calls fn.template run<T, D, WARPS_M>() for an instance: 2 dtypes x 2 head dims x 3 row tiles, shared by the GPU
// launcher and the emulator's (each runs the split kernel, then the combine kernel of its T and D when split).
template <typename T, int D, typename Fn>
void dispatch_rows(const Instance& in, Fn& fn) {
  if (in.warps_m == 1) fn.template run<T, D, 1>();
  else if (in.warps_m == 2) fn.template run<T, D, 2>();
  else fn.template run<T, D, 4>();
}

template <typename Fn>
void dispatch(const Instance& in, Fn& fn) {
  if (in.bf16) {
    if (in.d == 64) dispatch_rows<BF16, 64>(in, fn);
    else dispatch_rows<BF16, 128>(in, fn);
  } else {
    if (in.d == 64) dispatch_rows<F16, 64>(in, fn);
    else dispatch_rows<F16, 128>(in, fn);
  }
}

}  // inline namespace TK_BUILD
}  // namespace tk_decode
