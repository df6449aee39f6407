// decode_attention on CPU: a few new tokens' queries over a KV cache (contiguous or paged), the spec of
// python/turbokernels/reference/decode_attention.py: new token t of sequence b sits at qpos = L_b - T + t and attends
// the keys j <= qpos (and j >= qpos - window_left), scores scale * q.k, softcap * tanh(s / softcap), minus
// slope * |qpos - j| with ALiBi; a token with no key gets zeros. The same kernel is attention_fwd's `cpu` backend
// for a few query rows (attention_rows: row i of Sq over Sk keys is token i at L = Sk, T = Sq, and when not causal
// attends up to window_right past its position).
//
// Why our own kernel and not torch's flash attention (the `torch` backend): a decode step is bound by reading the
// cache once, and torch's kernel reads each key and value once per QUERY head (GQA: g times), allocates and zeroes
// per-thread buffers on every call (~8 us at one token over 16 keys, as much as the rest of the step) and cannot
// do softcap, ALiBi without a materialized bias, or a paged cache without gathering its pages first. Here:
//  * one task = (sequence b, a block of kv heads, a chunk of keys): the g * T query rows of each kv head are scored
//    against each key as it is read, so K and V are read once per kv head (FlashDecoding's grouping), from the
//    cache's own layout (any strides with a unit head-dim stride; paged: through block_table); the block is all
//    kv heads when a key's heads are adjacent in memory (then a task reads its keys in address order; a per-head
//    walk jumped a whole key row per key, past what the prefetchers follow: 2-3x slower), else one;
//  * a chunk is scored whole (rows x keys in L1/L2 scratch: four rows with two keys at a time, lane sums four at a
//    time), its softmax taken (a vectorized exp), then V read once (four rows at a time, DB vectors of the head dim
//    in registers while the keys pass); sequences with few head blocks are split into chunks so both cores work
//    (split-KV), the chunks merged by their max and sum;
//  * keys outside a row's range are never read for it (an unwritten slot may hold NaN: a mask cannot hide it);
//  * fp32 arithmetic for fp16/bf16/fp32 caches (float64 for float64), one rounding at the output, as the reference.
// The loops use GCC/Clang vector extensions (64-byte vectors; 32-byte in the AVX2 copy, see Vec) and are compiled
// once per ISA with function-level target attributes (AVX-512, AVX2, baseline), the best the CPU has picked per call
// (cpu_isa.h, TURBOKERNELS_CPU_ISA caps it). Tried and dropped: software prefetch of the next keys (slower on the Xeon).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/decode_attention.h"

// 64-byte vector arguments of inlined helpers: no ABI is crossed
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace turbokernels {
namespace decode_cpu {
namespace {

// Everything one task reads, in element strides; pointers to the first element of each tensor.
struct Problem {
  const void* q;  // (B, T, Hq, D), unit stride along D
  int64_t qs0, qs1, qs2;
  const void* k;  // (B, S, Hkv, D) or paged (num_pages, page_size, Hkv, D), unit stride along D
  const void* v;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
  const int32_t* block_table;  // (B, pages per sequence) or null
  int64_t bts0, bts1, page_size;
  const float* slopes;  // ALiBi slopes (Hq,) or (B, Hq), or null
  int64_t sls0, sls1;
  void* out;  // (B, T, Hq, D) contiguous
  float* lse;  // (B, Hq, T) contiguous, or null: log(sum_j exp(s_j)) of each row, -inf for a row without keys
  int64_t B, T, Hq, Hkv, D, g, window_left;
  int64_t right;  // keys a row attends past its own position: 0 causal, else window_right (-1: all the rest)
  int64_t hb;  // kv heads per task: all of them when a key's heads are adjacent in memory (a (B, S, H, D) cache: a
               // task then reads its keys in address order), else one (a (B, H, S, D) view: one head's keys are)
  double scale, softcap;
  const int64_t* lens;     // (B,) valid lengths, new tokens included
  const int64_t* first;    // (B + 1,) the first task of each sequence; its tasks are (Hkv / hb) * nchunk[b],
                           // head-block-major
  const int64_t* nchunk;   // (B,)
  int64_t chunk;           // keys per chunk
  // split sequences' partial results per task and row: max, sum, the unnormalized output (D), and whether the row
  // had any key in the chunk
  void* part_m;
  void* part_l;
  void* part_acc;
  uint8_t* part_has;
};

// Inlined into each ISA's copy (tasks_avx512...): a function that is not would be compiled once, for the baseline.
#define TK_INLINE inline __attribute__((always_inline))

inline int64_t span_lo(const Problem& P, int64_t L) {
  return P.window_left >= 0 ? std::max<int64_t>(0, L - P.T - P.window_left) : 0;
}

template <typename E, typename A>
TK_INLINE A to_acc(E x) {
  return static_cast<A>(static_cast<float>(x));
}
template <>
TK_INLINE double to_acc<double, double>(double x) {
  return x;
}

// row of n elements of type E -> A (a plain loop the compiler vectorizes in each ISA's copy; bf16 as the bit shift
// it is, which c10's conversion hides from the vectorizer)
template <typename E, typename A>
TK_INLINE void load_row(const E* src, int64_t n, A* dst) {
  if constexpr (std::is_same<E, c10::BFloat16>::value) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst);
    for (int64_t d = 0; d < n; ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = to_acc<E, A>(src[d]);
  }
}

// One VB-byte vector of A (GCC/Clang vector extensions), the same source for each ISA's copy: VB = 64 is a zmm
// register in the AVX-512 copy and four xmm in the baseline one; the AVX2 copy uses VB = 32, one ymm. (With 64 there,
// GCC kept the two-ymm accumulators of pv_block on the stack and moved their halves through general registers:
// on a Zen 1 EPYC, decode at B = 1, S = 512, 32/8 heads, d 128 took 1.8 ms against SDPA's 0.9, and the baseline copy
// was faster than the AVX2 one; with 32: 0.56-0.68 ms, and 7.2-7.4 ms against 30.9-35.4 at B = 4, S = 2048.) One
// ymm per pass of pv_block (DB = 1) there: two were slower at B = 4, S = 2048 (11.2-11.6 ms).
template <typename A, int VB>
struct Vec;
template <int VB>
struct Vec<float, VB> {
  typedef float type __attribute__((vector_size(VB)));
  typedef int32_t itype __attribute__((vector_size(VB)));
  static constexpr int L = VB / 4;
};
template <int VB>
struct Vec<double, VB> {
  typedef double type __attribute__((vector_size(VB)));
  static constexpr int L = VB / 8;
};

template <typename V>
TK_INLINE V vload(const void* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
TK_INLINE void vstore(void* p, V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
// a VB-byte vector's worth of bf16 values (VB / 2 bytes) and their fp32 bit patterns (explicit sizes: GCC does not
// take a vector_size that depends on a function template's parameter)
template <int VB>
struct Bf16Bits;
template <>
struct Bf16Bits<64> {
  typedef uint16_t half __attribute__((vector_size(32)));
  typedef uint32_t word __attribute__((vector_size(64)));
};
template <>
struct Bf16Bits<32> {
  typedef uint16_t half __attribute__((vector_size(16)));
  typedef uint32_t word __attribute__((vector_size(32)));
};

// L elements of a cache row (E) as one vector of A: a plain load, or bf16 widened in registers (a shift: the bits
// are fp32's top half), so a bf16 cache is read straight, with no converted copy in scratch
template <typename V, typename A, typename E>
TK_INLINE V vload_as(const E* p) {
  if constexpr (std::is_same<E, A>::value) {
    return vload<V>(p);
  } else {
    static_assert(std::is_same<E, c10::BFloat16>::value && std::is_same<A, float>::value, "bf16 -> fp32 only");
    using U16 = typename Bf16Bits<sizeof(V)>::half;
    using U32 = typename Bf16Bits<sizeof(V)>::word;
    U16 h;
    __builtin_memcpy(&h, p, sizeof(h));
    const U32 w = __builtin_convertvector(h, U32) << 16;
    V f;
    __builtin_memcpy(&f, &w, sizeof(f));
    return f;
  }
}

// the lanes' sum as a tree of halves in registers (log2(L) dependent adds, not L; through memory, a wide store read
// back in halves stalls store forwarding)
TK_INLINE float hsum(Vec<float, 64>::type v) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
  const V8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}
TK_INLINE double hsum(Vec<double, 64>::type v) {
  typedef double V4 __attribute__((vector_size(32)));
  const V4 h4 = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}
TK_INLINE float hsum(Vec<float, 32>::type v) {
  typedef float V4 __attribute__((vector_size(16)));
  const V4 h4 = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// the lane sums of four vectors at once, as a transpose: each level halves the lanes of two vectors into one
TK_INLINE void hsum4(Vec<float, 64>::type a, Vec<float, 64>::type b, Vec<float, 64>::type c, Vec<float, 64>::type d,
                     float* out) {
  using V = Vec<float, 64>::type;
  // x: a's halves summed (lanes 0-7), b's (8-15); y: c's, d's
  const V x = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const V y = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // z: four lanes each of a, b, c, d
  const V z = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
              __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const V w = z + __builtin_shufflevector(z, z, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const V u = w + __builtin_shufflevector(w, w, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  out[0] = u[0], out[1] = u[4], out[2] = u[8], out[3] = u[12];
}

// s[b * lds + n] = q_b . k_n for NB query rows (q, rows D apart) and NK keys (kp): NB * NK independent vector sums,
// so the FMA latency is hidden (NB * NK >= 3) and each key vector serves NB rows.
template <typename A, typename KE, int NB, int NK, int VB>
TK_INLINE void dots(const A* q, int64_t D, const KE* const* kp, A* s, int64_t lds) {
  using V = typename Vec<A, VB>::type;
  constexpr int L = Vec<A, VB>::L;
  V acc[NB][NK];
  for (int b = 0; b < NB; ++b)
    for (int n = 0; n < NK; ++n) acc[b][n] = V{};
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    V kv[NK];
    for (int n = 0; n < NK; ++n) kv[n] = vload_as<V, A>(kp[n] + d);
    for (int b = 0; b < NB; ++b) {
      const V qv = vload<V>(q + b * D + d);
      for (int n = 0; n < NK; ++n) acc[b][n] += qv * kv[n];
    }
  }
  // the lane sums, four vectors at a time where there are four (a transpose: ~3 shuffles per sum instead of ~7)
  A x[NB * NK];
  const V* flat = &acc[0][0];
  int i = 0;
  if constexpr (std::is_same<A, float>::value && VB == 64)
    for (; i + 4 <= NB * NK; i += 4) hsum4(flat[i], flat[i + 1], flat[i + 2], flat[i + 3], x + i);
  for (; i < NB * NK; ++i) x[i] = hsum(flat[i]);
  for (int b = 0; b < NB; ++b)
    for (int n = 0; n < NK; ++n) {
      A y = x[b * NK + n];
      for (int64_t dd = d; dd < D; ++dd) y += q[b * D + dd] * to_acc<KE, A>(kp[n][dd]);
      s[b * lds + n] = y;
    }
}

// exp(x) for x <= 0 or NaN (a score minus its row's max), lane by lane in any Vec width: Cephes' expf (range
// reduction by ln 2 in two parts, a degree-6 polynomial; within 2 ulp of the true value), below -87.3 (where the
// result would be subnormal) exactly 0; NaN stays NaN. libm's expf per score cost as much as the products at D = 64.
template <typename V>
TK_INLINE V vexp(V x) {
  using I = typename Vec<float, sizeof(V)>::itype;
  const auto tiny = x < -87.3f;  // lanes that become 0 (NaN compares false: kept)
  const V xc = tiny ? V{} - 87.3f : x;
  const V t = xc * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23: rounds x / ln 2 to an integer n
  const V n = t - 12582912.0f;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I ni = __builtin_convertvector(n, I);
  const I bits = (ni + 127) << 23;
  V two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  const V e = p * two_n;
  return tiny ? V{} : e;
}

template <typename E>
TK_INLINE const E* key_row(const Problem& P, const void* base, int64_t s0, int64_t s1, int64_t s2, int64_t b,
                        int64_t j, int64_t h) {
  const E* p = static_cast<const E*>(base);
  if (P.block_table == nullptr) return p + b * s0 + j * s1 + h * s2;
  const int64_t page = P.block_table[b * P.bts0 + (j / P.page_size) * P.bts1];
  return p + page * s0 + (j % P.page_size) * s1 + h * s2;
}

// Scratch of one thread: q rows, scores (rows x chunk), row ranges, accumulators, converted key/value rows.
constexpr int64_t kTile = 32;  // keys whose value rows one pass of the accumulators reads
template <typename A>
struct Scratch {
  std::vector<A> q, s, acc, tile, m, l;
  std::vector<int64_t> a, e, qpos;
  void reserve(int64_t R, int64_t C, int64_t D) {
    q.resize(R * D), s.resize(R * std::max<int64_t>(C, 1)), acc.resize(R * D), tile.resize(kTile * D),
        m.resize(R), l.resize(R), a.resize(R), e.resize(R), qpos.resize(R);
  }
};

// G rows (q, D apart) against NK keys: blocks of four rows, then the one-to-three left one at a time (fewer
// instantiations: each costs build time in every ISA copy)
template <typename A, typename KE, int NK, int VB>
TK_INLINE void score_rows(const A* q, int64_t G, int64_t D, const KE* const* kp, A* s, int64_t lds) {
  int64_t r = 0;
  for (; r + 4 <= G; r += 4) dots<A, KE, 4, NK, VB>(q + r * D, D, kp, s + r * lds, lds);
  for (; r < G; ++r) dots<A, KE, 1, NK, VB>(q + r * D, D, kp, s + r * lds, lds);
}

// The rows of one head against keys [j, j + nk): four rows with two keys at a time (each q vector serves two keys,
// each key vector four rows), or (fewer than 4 rows) one row with up to four keys, so at least three independent
// sums run in every case.
template <typename A, typename KE, int VB>
TK_INLINE void score_keys(const A* q, int64_t G, int64_t D, const KE* const* kp, int64_t nk, A* s, int64_t lds) {
  if (G >= 4 || nk == 1) {
    int64_t n = 0;
    for (; n + 2 <= nk; n += 2) score_rows<A, KE, 2, VB>(q, G, D, kp + n, s + n, lds);
    for (; n < nk; ++n) score_rows<A, KE, 1, VB>(q, G, D, kp + n, s + n, lds);
    return;
  }
  for (int64_t r = 0; r < G; ++r) {
    switch (nk) {
      case 4: dots<A, KE, 1, 4, VB>(q + r * D, D, kp, s + r * lds, lds); break;
      case 3: dots<A, KE, 1, 3, VB>(q + r * D, D, kp, s + r * lds, lds); break;
      default: dots<A, KE, 1, 2, VB>(q + r * D, D, kp, s + r * lds, lds); break;
    }
  }
}

// acc_b[d, d + DB * L) += sum_j p_b[j] v_j[d, d + DB * L) for NB rows over keys [j0, j1) (p_b indexed by j; vp[j -
// j0] the value rows; accumulators D apart); keys outside row b's range [a_b, e_b) are skipped for it (an unattended
// slot may hold anything; 0 * inf is NaN). The DB vectors of each row stay in registers while the keys pass.
template <typename A, typename VE, int NB, int DB, int VB>
TK_INLINE void pv_block(const A* const* p, const int64_t* a, const int64_t* e, int64_t ilo, int64_t ihi,
                        const VE* const* vp, int64_t j0, int64_t j1, int64_t D, A* acc, int64_t d) {
  using V = typename Vec<A, VB>::type;
  constexpr int L = Vec<A, VB>::L;
  V o[NB][DB];
  for (int b = 0; b < NB; ++b)
    for (int i = 0; i < DB; ++i) o[b][i] = vload<V>(acc + b * D + d + i * L);
  for (int64_t j = j0; j < j1; ++j) {
    V vv[DB];
    for (int i = 0; i < DB; ++i) vv[i] = vload_as<V, A>(vp[j - j0] + d + i * L);
    if (j >= ilo && j < ihi) {
      for (int b = 0; b < NB; ++b)
        for (int i = 0; i < DB; ++i) o[b][i] += p[b][j] * vv[i];
    } else {
      for (int b = 0; b < NB; ++b)
        if (j >= a[b] && j < e[b])
          for (int i = 0; i < DB; ++i) o[b][i] += p[b][j] * vv[i];
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int i = 0; i < DB; ++i) vstore(acc + b * D + d + i * L, o[b][i]);
}

// pv_block over the whole head dim: DB vectors per pass (each value row read DB * 64 bytes at a time, in address
// order), then single vectors, then the scalar tail.
template <typename A, typename VE, int NB, int DB, int VB>
TK_INLINE void pv_rows(const A* const* p, const int64_t* a, const int64_t* e, const VE* const* vp, int64_t j0,
                       int64_t j1, int64_t D, A* acc) {
  constexpr int L = Vec<A, VB>::L;
  int64_t ilo = j0, ihi = j1;  // the keys every row attends
  for (int b = 0; b < NB; ++b) ilo = std::max(ilo, a[b]), ihi = std::min(ihi, e[b]);
  int64_t d = 0;
  for (; d + DB * L <= D; d += DB * L) pv_block<A, VE, NB, DB, VB>(p, a, e, ilo, ihi, vp, j0, j1, D, acc, d);
  if constexpr (DB > 1)
    for (; d + L <= D; d += L) pv_block<A, VE, NB, 1, VB>(p, a, e, ilo, ihi, vp, j0, j1, D, acc, d);
  for (; d < D; ++d)
    for (int b = 0; b < NB; ++b)
      for (int64_t j = std::max(j0, a[b]); j < std::min(j1, e[b]); ++j) acc[b * D + d] += p[b][j] * to_acc<VE, A>(vp[j - j0][d]);
}

// One task: sequence b, kv heads [h0, h0 + hb), keys of chunk c; its rows r = (hh * T + t) * g + gi are query head
// (h0 + hh) * g + gi's token t. Writes the output rows when the sequence is one chunk, else the chunk's partials.
template <typename E, typename A, int DB, int VB>
TK_INLINE void run_task(const Problem& P, int64_t task, Scratch<A>& W) {
  const int64_t b = std::upper_bound(P.first, P.first + P.B + 1, task) - P.first - 1;
  const int64_t local = task - P.first[b], nch = P.nchunk[b];
  const int64_t hb = P.hb, h0 = (local / nch) * hb, c = local % nch;
  const int64_t L = P.lens[b], lo = span_lo(P, L);
  const int64_t c0 = lo + c * P.chunk, c1 = std::min(L, c0 + P.chunk);
  const int64_t T = P.T, g = P.g, D = P.D, R = hb * T * g;
  const A scale = static_cast<A>(P.scale), cap = static_cast<A>(P.softcap);
  const A ninf = -std::numeric_limits<A>::infinity();
  int64_t any_lo = c1, any_hi = c0;  // the keys some row attends in this chunk
  for (int64_t hh = 0; hh < hb; ++hh)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t qpos = L - T + t;
      const int64_t rlo = P.window_left >= 0 ? std::max<int64_t>(0, qpos - P.window_left) : 0;
      const int64_t rhi = P.right < 0 ? L : std::min(L, qpos + 1 + P.right);  // qpos + 1 + right may be < 0
      const int64_t a = std::max(c0, rlo), e = std::max(a, std::min(c1, rhi));
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t r = (hh * T + t) * g + gi;
        W.a[r] = a, W.e[r] = e, W.qpos[r] = qpos;
        const E* qrow = static_cast<const E*>(P.q) + b * P.qs0 + t * P.qs1 + ((h0 + hh) * g + gi) * P.qs2;
        load_row<E, A>(qrow, D, W.q.data() + r * D);
      }
      if (a < e) any_lo = std::min(any_lo, a), any_hi = std::max(any_hi, e);
    }
  const int64_t C = std::max<int64_t>(c1 - c0, 0), G = T * g;
  // raw scores q.k of every row of a head with the keys some row of the task attends (a row's keys outside its own
  // range are computed and never used), the task's heads of a key read together (adjacent in a (B, S, H, D) cache),
  // up to four keys at a time
  // cache rows read in place (fp32/fp64, and bf16 widened in registers); fp16 rows converted to scratch first
  using KE = typename std::conditional<std::is_same<E, c10::Half>::value, A, E>::type;
  const KE* kp[4];
  for (int64_t j = any_lo; j < any_hi; j += 4) {
    const int64_t nk = std::min<int64_t>(4, any_hi - j);
    for (int64_t hh = 0; hh < hb; ++hh) {
      for (int64_t n = 0; n < nk; ++n) {
        const E* kr = key_row<E>(P, P.k, P.ks0, P.ks1, P.ks2, b, j + n, h0 + hh);
        if constexpr (std::is_same<E, KE>::value) kp[n] = kr;
        else load_row<E, A>(kr, D, W.tile.data() + n * D), kp[n] = W.tile.data() + n * D;
      }
      score_keys<A, KE, VB>(W.q.data() + hh * G * D, G, D, kp, nk, W.s.data() + hh * G * C + (j - c0), C);
    }
  }
  // scores finished (scale, softcap, ALiBi), then softmax numerators: m = the largest score (NaN scores skipped by the
  // compare: they make the sum NaN below, as the spec's softmax does), p = exp(s - m) in place
  for (int64_t r = 0; r < R; ++r) {
    A* s = W.s.data() + r * C - c0;  // s[j]: key j's score
    const int64_t a = W.a[r], e = W.e[r];
    A m = ninf, l = 0;
    const A slope = P.slopes ? static_cast<A>(P.slopes[b * P.sls0 + ((h0 + r / G) * g + r % g) * P.sls1]) : A(0);
    int64_t j = a;
    if constexpr (std::is_same<A, float>::value) {
      if (cap == 0 && P.slopes == nullptr) {  // the usual scores: scale and max, a vector at a time
        using V = typename Vec<float, VB>::type;
        constexpr int LF = Vec<float, VB>::L;
        V mv = V{} + ninf;
        for (; j + LF <= e; j += LF) {
          const V x = vload<V>(s + j) * scale;
          vstore(s + j, x);
          mv = x > mv ? x : mv;  // a NaN lane keeps the max so far, as the scalar compare below
        }
        for (int i = 0; i < LF; ++i) m = mv[i] > m ? mv[i] : m;
      }
    }
    for (; j < e; ++j) {
      A x = s[j] * scale;
      if (cap > 0) x = cap * std::tanh(x / cap);
      if (P.slopes) x -= slope * static_cast<A>(std::abs(W.qpos[r] - j));
      s[j] = x;
      m = x > m ? x : m;
    }
    j = a;
    if constexpr (std::is_same<A, float>::value) {
      using V = typename Vec<float, VB>::type;
      constexpr int LF = Vec<float, VB>::L;
      V lv{};
      for (; j + LF <= e; j += LF) {
        const V pv = vexp(vload<V>(s + j) - m);
        vstore(s + j, pv);
        lv += pv;
      }
      l = hsum(lv);
    }
    for (; j < e; ++j) {
      const A p = std::exp(s[j] - m);
      s[j] = p, l += p;
    }
    W.m[r] = m, W.l[r] = l;
  }
  // acc = p V, a tile of keys' value rows (all the task's heads) at a time, rows four at a time per head
  std::fill(W.acc.begin(), W.acc.begin() + R * D, A(0));
  const KE* vp[kTile];
  const A* prow[4];
  for (int64_t j0 = any_lo; j0 < any_hi; j0 += kTile) {
    const int64_t j1 = std::min(any_hi, j0 + kTile);
    for (int64_t hh = 0; hh < hb; ++hh) {
      for (int64_t j = j0; j < j1; ++j) {
        const E* vr = key_row<E>(P, P.v, P.vs0, P.vs1, P.vs2, b, j, h0 + hh);
        if constexpr (std::is_same<E, KE>::value) vp[j - j0] = vr;
        else load_row<E, A>(vr, D, W.tile.data() + (j - j0) * D), vp[j - j0] = W.tile.data() + (j - j0) * D;
      }
      for (int64_t r = hh * G; r < (hh + 1) * G; r += 4) {
        const int nb = static_cast<int>(std::min<int64_t>(4, (hh + 1) * G - r));
        for (int i = 0; i < nb; ++i) prow[i] = W.s.data() + (r + i) * C - c0;
        A* acc = W.acc.data() + r * D;
        switch (nb) {
          case 4: pv_rows<A, KE, 4, DB, VB>(prow, &W.a[r], &W.e[r], vp, j0, j1, D, acc); break;
          case 3: pv_rows<A, KE, 3, DB, VB>(prow, &W.a[r], &W.e[r], vp, j0, j1, D, acc); break;
          case 2: pv_rows<A, KE, 2, DB, VB>(prow, &W.a[r], &W.e[r], vp, j0, j1, D, acc); break;
          default: pv_rows<A, KE, 1, DB, VB>(prow, &W.a[r], &W.e[r], vp, j0, j1, D, acc); break;
        }
      }
    }
  }
  if (nch == 1) {  // the whole sequence: normalize and write
    for (int64_t r = 0; r < R; ++r) {
      const int64_t hh = r / (T * g), t = (r / g) % T, hq = (h0 + hh) * g + r % g;
      E* o = static_cast<E*>(P.out) + ((b * T + t) * P.Hq + hq) * D;
      const A* acc = W.acc.data() + r * D;
      if (W.a[r] >= W.e[r]) {
        for (int64_t d = 0; d < D; ++d) o[d] = E(0);
      } else {
        const A inv = A(1) / W.l[r];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<E>(acc[d] * inv);
      }
      if (P.lse)
        P.lse[(b * P.Hq + hq) * T + t] =
            W.a[r] >= W.e[r] ? -std::numeric_limits<float>::infinity() : static_cast<float>(W.m[r] + std::log(W.l[r]));
    }
    return;
  }
  A* pm = static_cast<A*>(P.part_m) + task * R;
  A* pl = static_cast<A*>(P.part_l) + task * R;
  A* pacc = static_cast<A*>(P.part_acc) + task * R * D;
  for (int64_t r = 0; r < R; ++r) {
    pm[r] = W.m[r], pl[r] = W.l[r], P.part_has[task * R + r] = W.a[r] < W.e[r];
  }
  std::copy(W.acc.begin(), W.acc.begin() + R * D, pacc);
}

// The split sequences' chunks merged, per (sequence, head block): out = sum_c w_c acc_c / sum_c w_c l_c with
// w_c = exp(m_c - max_c m_c) over the chunks where the row had keys; none: zeros.
template <typename E, typename A>
inline void merge_block(const Problem& P, int64_t b, int64_t blk, A* acc) {
  const int64_t nch = P.nchunk[b], T = P.T, g = P.g, R = P.hb * T * g, D = P.D;
  if (nch == 1) return;
  const A* pm = static_cast<const A*>(P.part_m);
  const A* pl = static_cast<const A*>(P.part_l);
  const A* pacc = static_cast<const A*>(P.part_acc);
  const int64_t t0 = P.first[b] + blk * nch;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t hh = r / (T * g), t = (r / g) % T, hq = (blk * P.hb + hh) * g + r % g;
    E* o = static_cast<E*>(P.out) + ((b * T + t) * P.Hq + hq) * D;
    A M = -std::numeric_limits<A>::infinity();
    bool any = false;
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t i = (t0 + c) * R + r;
      if (!P.part_has[i]) continue;
      any = true;
      M = pm[i] > M ? pm[i] : M;
    }
    if (!any) {
      for (int64_t d = 0; d < D; ++d) o[d] = E(0);
      if (P.lse) P.lse[(b * P.Hq + hq) * T + t] = -std::numeric_limits<float>::infinity();
      continue;
    }
    A l = 0;
    std::fill(acc, acc + D, A(0));
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t i = (t0 + c) * R + r;
      if (!P.part_has[i]) continue;
      const A w = pm[i] == M ? A(1) : std::exp(pm[i] - M);  // == first: a chunk whose max is -inf (all -inf) is 1
      l += w * pl[i];
      const A* src = pacc + i * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += w * src[d];
    }
    const A inv = A(1) / l;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<E>(acc[d] * inv);
    if (P.lse) P.lse[(b * P.Hq + hq) * T + t] = static_cast<float>(M + std::log(l));
  }
}

// The per-ISA copies: the loops above inlined into a function compiled for that ISA.
template <typename E, typename A>
void tasks_generic(const Problem& P, int64_t t0, int64_t t1, int64_t C) {
  Scratch<A> W;
  W.reserve(P.hb * P.T * P.g, C, P.D);
  for (int64_t t = t0; t < t1; ++t) run_task<E, A, 1, 64>(P, t, W);
}
template <typename E, typename A>
void merge_generic(const Problem& P, int64_t p0, int64_t p1) {
  std::vector<A> acc(P.D);
  const int64_t blocks = P.Hkv / P.hb;
  for (int64_t p = p0; p < p1; ++p) merge_block<E, A>(P, p / blocks, p % blocks, acc.data());
}
#if TK_X86_SIMD
template <typename E, typename A>
__attribute__((target("avx2,fma,f16c"))) void tasks_avx2(const Problem& P, int64_t t0, int64_t t1, int64_t C) {
  Scratch<A> W;
  W.reserve(P.hb * P.T * P.g, C, P.D);
  for (int64_t t = t0; t < t1; ++t) run_task<E, A, 1, 32>(P, t, W);
}
template <typename E, typename A>
__attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c"))) void tasks_avx512(const Problem& P, int64_t t0,
                                                                                  int64_t t1, int64_t C) {
  Scratch<A> W;
  W.reserve(P.hb * P.T * P.g, C, P.D);
  for (int64_t t = t0; t < t1; ++t) run_task<E, A, 4, 64>(P, t, W);
}
#endif

template <typename E, typename A>
void run(const Problem& P, int64_t ntasks, int64_t work_per_task) {
  using Fn = void (*)(const Problem&, int64_t, int64_t, int64_t);
  Fn fn = &tasks_generic<E, A>;
#if TK_X86_SIMD
  // float64 (a correctness dtype, not a fast one) keeps the baseline copy only: each copy costs build time
  if constexpr (!std::is_same<A, double>::value) {
    const int level = cpu::isa_level();
    if (level >= cpu::kAvx512Isa) fn = &tasks_avx512<E, A>;
    else if (level >= cpu::kAvx2Isa) fn = &tasks_avx2<E, A>;
  }
#endif
  // a task below ~64K multiply-adds runs on the calling thread: waking the pool costs more (tiny decode steps)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_task));
  const int64_t C = P.chunk;
  at::parallel_for(0, ntasks, grain, [&](int64_t t0, int64_t t1) { fn(P, t0, t1, C); });
  if (P.part_m != nullptr)
    at::parallel_for(0, P.B * (P.Hkv / P.hb), 1, [&](int64_t p0, int64_t p1) { merge_generic<E, A>(P, p0, p1); });
}

// Head blocks, chunks (split-KV) and the run, for a Problem whose tensors, sizes and lengths are set.
void plan_and_run(Problem& P, at::ScalarType dt, std::vector<int64_t>& lens) {
  const int64_t B = P.B, T = P.T, Hkv = P.Hkv, D = P.D;
  std::vector<int64_t> first(B + 1), nchunk(B);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lens[b] - span_lo(P, lens[b]));
  // kv heads per task: all when a key's heads are adjacent in memory (each task then streams its keys in address
  // order; a per-head walk would jump a whole key row per key, past what the prefetchers follow), else one
  P.hb = (Hkv == 1 || std::abs(P.ks2) < std::abs(P.ks1)) ? Hkv : 1;
  // split-KV: when the (sequence, head block) pairs are fewer than two per thread, long spans are cut into chunks
  // of at least 256 keys; a chunk's scores (rows x keys) stay within 256 KB either way
  const int64_t threads = at::get_num_threads(), pairs = B * (Hkv / P.hb), R = P.hb * T * P.g;
  int64_t chunk = std::max<int64_t>(longest, 1);
  if (pairs < 2 * threads) {
    const int64_t want = (2 * threads + pairs - 1) / pairs;
    chunk = std::max<int64_t>(256, (longest + want - 1) / want);
  }
  chunk = std::min<int64_t>(chunk, std::max<int64_t>(256, (int64_t(1) << 16) / R));
  bool split = false;
  first[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t span = lens[b] - span_lo(P, lens[b]);
    nchunk[b] = std::max<int64_t>(1, (span + chunk - 1) / chunk);
    split = split || nchunk[b] > 1;
    first[b + 1] = first[b] + (Hkv / P.hb) * nchunk[b];
  }
  P.lens = lens.data(), P.first = first.data(), P.nchunk = nchunk.data(), P.chunk = chunk;
  const int64_t ntasks = first[B];
  const int64_t asize = dt == at::kDouble ? 8 : 4;
  std::vector<uint8_t> part, has;
  if (split) {
    part.resize(ntasks * R * (D + 2) * asize);
    has.resize(ntasks * R);
    P.part_m = part.data(), P.part_l = part.data() + ntasks * R * asize;
    P.part_acc = part.data() + 2 * ntasks * R * asize, P.part_has = has.data();
  }
  const int64_t work = std::min(chunk, longest) * R * D * 2;
  switch (dt) {
    case at::kFloat: run<float, float>(P, ntasks, work); break;
    case at::kHalf: run<c10::Half, float>(P, ntasks, work); break;
    case at::kBFloat16: run<c10::BFloat16, float>(P, ntasks, work); break;
    default: run<double, double>(P, ntasks, work); break;
  }
}

// The checks both entries share: q (B, T, Hq, D), k/v (B or pages, S, Hkv, D) CPU tensors of one float dtype, head
// dims contiguous in k/v; fills P's tensor fields (q made contiguous in its head dim when it is not: `qc` keeps it).
void set_tensors(Problem& P, const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 at::Tensor& qc, const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, fn, ": q, k and v must be 4-D");
  TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(), fn, " (cpu): CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              fn, " (cpu): q must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, fn, ": k/v dtypes must be q's");
  TORCH_CHECK(k.sizes() == v.sizes(), fn, ": k and v shapes differ");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k.size(2);
  TORCH_CHECK(k.size(3) == D && 1 <= D && D <= 256 && Hkv > 0 && Hq % Hkv == 0, fn, ": head dims / head counts");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, fn, ": k/v's head dim must be contiguous");
  qc = (D <= 1 || q.stride(3) == 1) ? q : q.contiguous();
  P.q = qc.data_ptr(), P.qs0 = qc.stride(0), P.qs1 = qc.stride(1), P.qs2 = qc.stride(2);
  P.k = k.data_ptr(), P.v = v.data_ptr();
  P.ks0 = k.stride(0), P.ks1 = k.stride(1), P.ks2 = k.stride(2);
  P.vs0 = v.stride(0), P.vs1 = v.stride(1), P.vs2 = v.stride(2);
  if (alibi_slopes.has_value()) {
    const at::Tensor& sl = *alibi_slopes;
    TORCH_CHECK(sl.is_cpu() && sl.scalar_type() == at::kFloat &&
                    (sl.sizes() == at::IntArrayRef{Hq} || sl.sizes() == at::IntArrayRef{B, Hq}),
                fn, ": alibi_slopes must be float32 (Hq,) or (B, Hq) on the CPU");
    P.slopes = sl.data_ptr<float>();
    P.sls0 = sl.dim() == 2 ? sl.stride(0) : 0, P.sls1 = sl.stride(sl.dim() - 1);
  }
  P.B = B, P.T = T, P.Hq = Hq, P.Hkv = Hkv, P.D = D, P.g = Hq / Hkv;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                            const std::optional<at::Tensor>& alibi_slopes, double softmax_scale, int64_t window_left,
                            int64_t window_right, double softcap) {
  (void)window_right;  // implied by causality: a new token never sees a later key
  Problem P{};
  at::Tensor qc;
  set_tensors(P, "decode_attention", q, k_cache, v_cache, qc, alibi_slopes);
  const int64_t B = P.B;
  TORCH_CHECK(cache_seqlens.is_cpu() && cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == B,
              "decode_attention: cache_seqlens must be int32 (B,) on the CPU");
  int64_t capacity = k_cache.size(1);
  if (block_table.has_value()) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.is_cpu() && bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == B,
                "decode_attention: block_table must be int32 (B, pages per sequence) on the CPU");
    P.block_table = bt.data_ptr<int32_t>(), P.bts0 = bt.stride(0), P.bts1 = bt.stride(1);
    P.page_size = k_cache.size(1);
    capacity = bt.size(1) * P.page_size;
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "decode_attention: the cache's batch must be q's");
  }
  at::Tensor out = at::empty({B, P.T, P.Hq, P.D}, q.options());
  if (out.numel() == 0) return out;
  P.out = out.data_ptr();
  P.window_left = window_left, P.right = 0, P.scale = softmax_scale, P.softcap = softcap;
  std::vector<int64_t> lens(B);
  const int32_t* lp = cache_seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lp[b * cache_seqlens.stride(0)];
    TORCH_CHECK(0 <= L && L <= capacity, "decode_attention: cache_seqlens[", b, "] = ", L, " outside [0, ", capacity,
                "]");
    lens[b] = L;
  }
  if (P.block_table != nullptr) {  // every page a sequence's span reads must be a page of the cache
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = span_lo(P, lens[b]) / P.page_size; j * P.page_size < lens[b]; ++j) {
        const int64_t page = P.block_table[b * P.bts0 + j * P.bts1];
        TORCH_CHECK(0 <= page && page < k_cache.size(0), "decode_attention: block_table[", b, ", ", j, "] = ", page,
                    " outside [0, ", k_cache.size(0), ")");
      }
  }
  plan_and_run(P, q.scalar_type(), lens);
  return out;
}

std::tuple<at::Tensor, std::optional<at::Tensor>> attention_rows(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& alibi_slopes,
    double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap, bool bhsd,
    bool want_lse) {
  // attention_fwd's rows are decode's new tokens over all Sk keys: row i sits at Sk - Sq + i (bottom-right
  // alignment) and attends up to its own position when causal, up to window_right past it otherwise
  const at::Tensor qv = bhsd ? q.transpose(1, 2) : q;
  const at::Tensor kv = bhsd ? k.transpose(1, 2) : k;
  const at::Tensor vv = bhsd ? v.transpose(1, 2) : v;
  Problem P{};
  at::Tensor qc;
  set_tensors(P, "attention (cpu)", qv, kv, vv, qc, alibi_slopes);
  TORCH_CHECK(kv.size(0) == P.B, "attention (cpu): k/v's batch must be q's");
  at::Tensor out = at::empty({P.B, P.T, P.Hq, P.D}, q.options());
  std::optional<at::Tensor> lse;
  if (want_lse) lse = at::empty({P.B, P.Hq, P.T}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    P.out = out.data_ptr();
    P.lse = want_lse ? lse->data_ptr<float>() : nullptr;
    P.window_left = window_left, P.right = causal ? 0 : window_right;
    P.scale = softmax_scale, P.softcap = softcap;
    std::vector<int64_t> lens(P.B, kv.size(1));
    plan_and_run(P, q.scalar_type(), lens);
  }
  return {bhsd ? out.transpose(1, 2) : out, lse};
}

}  // namespace decode_cpu
}  // namespace turbokernels

TORCH_LIBRARY_IMPL(turbokernels_C, CPU, m) {
  m.impl("decode_attention", &turbokernels::decode_cpu::decode_attention);
}
