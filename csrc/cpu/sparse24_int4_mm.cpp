// sparse24_int4_mm on CPU: out (M, N) = x (M, K) @ W.T [+ bias (N)], W (N, K) 2:4-sparse along K with its kept values
// int4-quantized (python/turbokernels/formats/sparse24_int4.py): qweight int32 (ceil(K/16), N), word [j][n] holding
// kept values 8j..8j+7 of row n (nibble i = kept value 8j + i); scales, offsets (G, N) per group of `group_size`
// KEPT values (kept value c of row n is q * scales[c / gs][n] + offsets[c / gs][n]); meta int16 (N, ceil(K/16)),
// element [n][j] describing the same 16 dense k as word [j][n]: nibble p = idx0 | idx1 << 2 of dense group 4j + p,
// so kept value 8j + i sits at dense k = 16j + 4 (i / 2) + ((meta >> 2i) & 3).
//
// Strategy
//  * Decode (M = 1) is bound by the bytes of weight read: 0.25 (int4 over K/2) + 0.125 (meta) + the group's
//    scales per dense element, ~10x fewer than fp32. So every byte is read once, in long runs: qweight's rows run
//    along N, so lanes run over W adjacent output columns (as csrc/cpu/int4_mm.cpp) and a thread walks the word
//    rows of a wide unit of columns in order (a row's piece of the unit is cw * 4 contiguous bytes). meta is
//    stored per column; a chunk of 32 word rows of it (one 64-byte line per column) is transposed into an L1/L2
//    buffer, so it too is read from memory once and the hot loop loads W selectors with one instruction.
//  * Per word row, column vector and nibble i: w = q_i * s + o (unpack: shift, mask, convert; dequantize: one
//    FMA), then each row of x: x_i = the 4 x values of the kept value's dense group, broadcast to every 128-bit
//    lane, permuted by the meta bits (vpermilps reads the low 2 bits of each lane: the selector is the meta
//    element shifted right by 2i, no mask), and one FMA. The dequantized vector serves up to RMAX = 4 rows of x,
//    so for M > 1 the unpack is amortized. Accumulators live in a per-unit fp32 buffer (M x cw, L1/L2): each
//    output sums its kept values in k order, in one chain, whatever the thread count.
//  * Threads take units of columns from a shared counter (a descheduled thread on a shared machine does not hold
//    the call up); a unit computes its columns over all of K, so a result never depends on the thread count.
//    Columns past the last whole vector (N % W) run the plain C++ copy (W = 1).
//  * Word rows that span two groups (group sizes not a multiple of 8) or the last, partial word row (K % 16 != 0)
//    run their nibbles in runs that share a group; nibbles past K/2 are never used. x is converted to fp32 once per
//    call and padded with zeros to whole word rows.
//  * Large M (Kernels::max_m, measured per ISA): column chunks are expanded to dense fp32 and handed to at::addmm.
//  * A NaN/Inf in x: the spec's dense product multiplies it by the pruned zeros too (NaN); propagate_nonfinite_x
//    sets those outputs to NaN after the kernels, so outputs are non-finite exactly where the reference's are.
//  Accumulation is fp32; the bias joins the fp32 sum and the result is converted to x's dtype once at the end, so
//  that conversion is the output's only rounding, as in F.linear. The dequantized weight q s + o is rounded once
//  (FMA) on the SIMD paths, twice (product, sum) in plain C++ and the expand path, as in the reference:
//  testing.int4_dequant_magnitudes(weight, "cpu") allows (|q s|, |w|) for a Sparse24Int4Weight.
//
// ISAs: sparse24_int4_mm_simd.h is compiled three times (AVX-512F+BW, AVX2+FMA+F16C, plain C++) with function-level
// target attributes, and the best one the CPU supports is picked at run time, so the build stays portable (no
// -march). TURBOKERNELS_CPU_ISA=scalar|avx2|avx512 caps the choice (the tests use it to cover every path).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>


namespace turbokernels {
namespace sparse24_int4_cpu {
namespace {  // internal linkage: the per-ISA copies must never be merged with (or called through) anything else

using cpu::Dt;
using cpu::scalar_to_f32;


constexpr int64_t kChunkRows = 32;  // word rows per transposed meta chunk: one 64-byte line of meta per column

struct Problem {
  const float* x;       // (M, ldx) fp32, zero-padded to ldx = 16 * K16
  int64_t ldx;
  const int32_t* q;     // (K16, N), contiguous
  const int16_t* meta;  // (N, K16), contiguous
  const void* s;        // (G, N), dtype sdt, contiguous
  const void* o;        // (G, N), dtype odt, contiguous
  Dt sdt, odt;
  const float* bias;    // (N) fp32, or nullptr
  float* out;           // (M, N) fp32
  int64_t M, N, K, K16, gs;
};

// ---- plain C++ (any CPU): one column per "vector" ---------------------------------------------------------------
namespace scalar {
#define TK_ATTR
#define TK_VEC static inline
struct Vec {
  static constexpr int W = 1, RMAX = 4;
  using F = float;
  using I = uint32_t;
  using Q = const float*;
  TK_VEC I loadw(const int32_t* p) { return static_cast<uint32_t>(*p); }
  TK_VEC I loadm(const uint16_t* p) { return *p; }
  TK_VEC F nib(I w, int i) { return static_cast<float>((w >> (4 * i)) & 15u); }
  TK_VEC I idx(I m, int i) { return m >> (2 * i); }
  TK_VEC Q quad(const float* p) { return p; }
  TK_VEC F pick(Q x, I id) { return x[id & 3u]; }
  TK_VEC F fma(F a, F b, F c) { return a * b + c; }
  TK_VEC F loadu(const float* p) { return *p; }
  TK_VEC void storeu(float* p, F v) { *p = v; }
  TK_VEC F load_f16(const uint16_t* p) { return scalar_to_f32(Dt::F16, p, 0); }
  TK_VEC F load_bf16(const uint16_t* p) { return scalar_to_f32(Dt::BF16, p, 0); }
  // dst[jj * cw + n] = src[n * ld + jj], jj < nj, n < cw
  TK_VEC void transpose_meta(const int16_t* src, int64_t ld, int64_t nj, int64_t cw, uint16_t* dst) {
    for (int64_t n = 0; n < cw; ++n)
      for (int64_t jj = 0; jj < nj; ++jj) dst[jj * cw + n] = static_cast<uint16_t>(src[n * ld + jj]);
  }
};
#include "sparse24_int4_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace scalar

#if TK_X86_SIMD
// 8x8 int16 blocks with SSE2 unpacks (plain C++ at the edges): dst[jj * cw + n] = src[n * ld + jj]
#define TK_TRANSPOSE_META                                                                                        \
  TK_VEC void transpose_meta(const int16_t* src, int64_t ld, int64_t nj, int64_t cw, uint16_t* dst) {            \
    const int64_t nj8 = nj / 8 * 8;                                                                               \
    for (int64_t n0 = 0; n0 + 8 <= cw; n0 += 8) {                                                                 \
      for (int64_t j0 = 0; j0 < nj8; j0 += 8) {                                                                   \
        __m128i a[8];                                                                                             \
        for (int r = 0; r < 8; ++r)                                                                               \
          a[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (n0 + r) * ld + j0));                      \
        const __m128i t0 = _mm_unpacklo_epi16(a[0], a[1]), t1 = _mm_unpackhi_epi16(a[0], a[1]);                   \
        const __m128i t2 = _mm_unpacklo_epi16(a[2], a[3]), t3 = _mm_unpackhi_epi16(a[2], a[3]);                   \
        const __m128i t4 = _mm_unpacklo_epi16(a[4], a[5]), t5 = _mm_unpackhi_epi16(a[4], a[5]);                   \
        const __m128i t6 = _mm_unpacklo_epi16(a[6], a[7]), t7 = _mm_unpackhi_epi16(a[6], a[7]);                   \
        const __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);                           \
        const __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);                           \
        const __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);                           \
        const __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);                           \
        const __m128i r[8] = {_mm_unpacklo_epi64(u0, u4), _mm_unpackhi_epi64(u0, u4), _mm_unpacklo_epi64(u1, u5),  \
                              _mm_unpackhi_epi64(u1, u5), _mm_unpacklo_epi64(u2, u6), _mm_unpackhi_epi64(u2, u6),  \
                              _mm_unpacklo_epi64(u3, u7), _mm_unpackhi_epi64(u3, u7)};                             \
        for (int c = 0; c < 8; ++c) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j0 + c) * cw + n0), r[c]); \
      }                                                                                                           \
      for (int64_t n = n0; n < n0 + 8; ++n)                                                                       \
        for (int64_t jj = nj8; jj < nj; ++jj) dst[jj * cw + n] = static_cast<uint16_t>(src[n * ld + jj]);        \
    }                                                                                                             \
  }

// ---- AVX2 + FMA + F16C: 8 columns per vector --------------------------------------------------------------------
namespace avx2 {
#define TK_ATTR __attribute__((target("avx2,fma,f16c")))
#define TK_VEC TK_ATTR __attribute__((always_inline)) static inline
struct Vec {
  static constexpr int W = 8, RMAX = 4;
  using F = __m256;
  using I = __m256i;
  using Q = __m256;
  TK_VEC I loadw(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  TK_VEC I loadm(const uint16_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  TK_VEC F nib(I w, int i) {  // i is a constant once the nibble loop is unrolled (but need not be)
    const __m256i v = i == 7 ? _mm256_srli_epi32(w, 28)
                             : _mm256_and_si256(i ? _mm256_srli_epi32(w, 4 * i) : w, _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(v);
  }
  TK_VEC I idx(I m, int i) { return i ? _mm256_srli_epi32(m, 2 * i) : m; }
  TK_VEC Q quad(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
  TK_VEC F pick(Q x, I id) { return _mm256_permutevar_ps(x, id); }
  TK_VEC F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  TK_VEC F loadu(const float* p) { return _mm256_loadu_ps(p); }
  TK_VEC void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  TK_VEC F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  TK_VEC F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  TK_TRANSPOSE_META
};
#include "sparse24_int4_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace avx2

// ---- AVX-512F + BW: 16 columns per vector -----------------------------------------------------------------------
namespace avx512 {
#define TK_ATTR __attribute__((target("avx512f,avx512bw,fma,f16c")))
#define TK_VEC TK_ATTR __attribute__((always_inline)) static inline
struct Vec {
  static constexpr int W = 16, RMAX = 4;
  using F = __m512;
  using I = __m512i;
  using Q = __m512;
  TK_VEC I loadw(const int32_t* p) { return _mm512_loadu_si512(p); }
  TK_VEC I loadm(const uint16_t* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // a 16-entry table lookup reads the low 4 bits of each lane only: mask and convert in one instruction
  TK_VEC F nib(I w, int i) {
    return _mm512_permutexvar_ps(i ? _mm512_srli_epi32(w, 4 * i) : w,
                                 _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f,
                                                13.f, 14.f, 15.f));
  }
  TK_VEC I idx(I m, int i) { return i ? _mm512_srli_epi32(m, 2 * i) : m; }
  TK_VEC Q quad(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
  TK_VEC F pick(Q x, I id) { return _mm512_permutevar_ps(x, id); }
  TK_VEC F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  TK_VEC F loadu(const float* p) { return _mm512_loadu_ps(p); }
  TK_VEC void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  TK_VEC F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  TK_VEC F load_bf16(const uint16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  TK_TRANSPOSE_META
};
#include "sparse24_int4_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace avx512
#undef TK_TRANSPOSE_META
#endif  // TK_X86_SIMD

// ---- run-time choice ---------------------------------------------------------------------------------------------
struct Kernels {
  int64_t w;      // columns per vector
  int64_t max_m;  // above this many rows, expand + BLAS instead
  void (*run_unit)(const Problem&, int64_t, int64_t, float*, uint16_t*);
  void (*expand)(const Problem&, int64_t, int64_t, float*);
};

// max_m, AVX2: measured on the shared 2-core AMD EPYC (4096 x 4096 g128, one thread, interleaved medians): the fused
// path is 1.6x faster than fp32 F.linear at M = 64 and even with it at M = 256 (256 vs 273 ms under heavy load),
// where expand + BLAS took 327 ms; past 256 the expand is amortized and MKL's sgemm pulls ahead. AVX-512: the same
// limit, not measured (no AVX-512 CPU here; its fused loop does twice the work per instruction). Plain C++: the
// int4 kernel's choice.
const Kernels kScalar{scalar::W, 8, scalar::run_unit, scalar::expand_rows};
#if TK_X86_SIMD
const Kernels kAvx2{avx2::W, 256, avx2::run_unit, avx2::expand_rows};
// Cores that split 256-bit operations (cpu::cpu_splits_256bit: Zen 1), 2-core EPYC 7001, 2 threads: fused vs
// expand + BLAS at M = 128: 127 vs 120 ms (4096 x 4096 g128), 7.2 vs 6.7 ms (576 x 1536 g32); at M = 256 the fused
// loop took 1.51x fp32 F.linear's time (bench/results/cpu-zen1-2026-12-03/sparse24_cpu.csv), expand + BLAS 1.10x
// (ad-hoc, interleaved; M = 64: fused 64.6 ms, expand + BLAS ~91).
const Kernels kAvx2HalfWidth{avx2::W, 128, avx2::run_unit, avx2::expand_rows};
const Kernels kAvx512{avx512::W, 256, avx512::run_unit, avx512::expand_rows};
#endif

const Kernels& select_kernels() {
  const int level = cpu::isa_level();
#if TK_X86_SIMD
  if (level >= cpu::kAvx512Isa) return kAvx512;
  if (level >= cpu::kAvx2Isa) return cpu::cpu_splits_256bit() ? kAvx2HalfWidth : kAvx2;
#endif
  (void)level;
  return kScalar;
}

Dt dt_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kHalf: return Dt::F16;
    case at::kBFloat16: return Dt::BF16;
    default: TORCH_CHECK(false, "sparse24_int4_mm(", name, "): dtype must be float16, bfloat16 or float32, got ",
                         t.scalar_type());
  }
  return Dt::F32;
}

void run_fused(const Kernels& kern, const Problem& P) {
  // SIMD columns [0, nvec) in units of cw columns, then the last N % W columns (plain C++) as one more unit.
  const int64_t nvec = P.N / kern.w * kern.w, tail = P.N - nvec;
  const int64_t threads_max = at::get_num_threads();
  // ~4 units per thread (a descheduled thread leaves a small share behind), wide enough for long contiguous runs
  // of each word row, small enough that the M x cw accumulators stay in L2
  int64_t cw = (nvec + 4 * threads_max - 1) / (4 * threads_max);
  cw = std::min<int64_t>({cw, 1024, std::max<int64_t>(64, (int64_t(32) << 10) / P.M)});
  cw = std::max<int64_t>(kern.w, (cw + kern.w - 1) / kern.w * kern.w);
  const int64_t vec_units = (nvec + cw - 1) / cw;
  const int64_t units = vec_units + (tail ? 1 : 0);
  const int64_t width = std::max(cw, tail);
  auto work = [&](int64_t u, std::vector<float>& scratch, std::vector<uint16_t>& mt) {
    if (scratch.empty()) {
      scratch.resize((P.M + 2) * width);
      mt.resize(kChunkRows * width);
    }
    if (u < vec_units) {
      const int64_t c0 = u * cw;
      kern.run_unit(P, c0, std::min(cw, nvec - c0), scratch.data(), mt.data());
    } else {
      scalar::run_unit(P, nvec, tail, scratch.data(), mt.data());
    }
  };
  // don't wake a second thread for less than ~256k multiply-adds
  const int64_t threads = std::min<int64_t>(threads_max,
                                            std::max<int64_t>(1, P.N * (P.K / 2) * P.M / (int64_t(1) << 18)));
  if (threads <= 1 || units <= 1) {
    std::vector<float> scratch;
    std::vector<uint16_t> mt;
    for (int64_t u = 0; u < units; ++u) work(u, scratch, mt);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch;
    std::vector<uint16_t> mt;
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) work(u, scratch, mt);
  });
}

void run_expand_mm(const Kernels& kern, const Problem& P, const at::Tensor& x32, const at::Tensor& bias32,
                   at::Tensor& out32) {
  // ~4 MiB of fp32 weight per chunk: big enough for an efficient GEMM, small enough to stay cache-sized and to
  // bound the memory of huge layers.
  int64_t nb = std::max<int64_t>(64, ((int64_t(1) << 20) / std::max<int64_t>(1, P.K)) / 64 * 64);
  nb = std::min(nb, P.N);
  at::Tensor wbuf = at::empty({nb, P.K}, x32.options());
  for (int64_t n0 = 0; n0 < P.N; n0 += nb) {
    const int64_t nc = std::min(nb, P.N - n0);
    float* w = wbuf.data_ptr<float>();
    at::parallel_for(0, nc, 16, [&](int64_t i0, int64_t i1) { kern.expand(P, n0 + i0, i1 - i0, w + i0 * P.K); });
    at::Tensor o = out32.narrow(1, n0, nc);
    const at::Tensor wc = wbuf.narrow(0, 0, nc).t();
    if (bias32.defined()) {
      at::addmm_out(o, bias32.narrow(0, n0, nc), x32, wc);  // bias + x @ w, in fp32
    } else {
      at::mm_out(o, x32, wc);
    }
  }
}

// The spec is the dense product (F.linear on the dequantized 2:4 weight), where a non-finite x[m][k] times a pruned
// 0 makes out[m][n] NaN; the kernels skip the pruned zeros. So rows of x with a NaN/Inf get those outputs set to NaN
// here: a scan of x per call (M x K compares, nothing next to the weight's bytes) and work only where x is not
// finite.
void propagate_nonfinite_x(const float* x, int64_t ldx, const Problem& P) {
  for (int64_t m = 0; m < P.M; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t k = 0; k < P.K; ++k) {
      if (std::isfinite(xr[k])) continue;
      const int64_t j = k / 16, shift = 4 * ((k / 4) % 4);
      const unsigned pos = static_cast<unsigned>(k % 4);
      for (int64_t n = 0; n < P.N; ++n) {
        const unsigned nib = (static_cast<uint16_t>(P.meta[n * P.K16 + j]) >> shift) & 15u;
        if (pos != (nib & 3u) && pos != (nib >> 2)) P.out[m * P.N + n] = std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
}

// TURBOKERNELS_CPU_POISON=1 (tests): the fp32 output starts as NaN, so an element no path writes shows.
bool poison_outputs() {
  const char* p = std::getenv("TURBOKERNELS_CPU_POISON");
  return p != nullptr && std::strcmp(p, "1") == 0;
}

at::Tensor sparse24_int4_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& offsets, const at::Tensor& meta, int64_t group_size,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "sparse24_int4_mm(x): expected a 2-D (M, K) tensor, got shape ", x.sizes());
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt,
              "sparse24_int4_mm(qweight): expected a 2-D int32 (ceil(K/16), N) tensor, got ", qweight.scalar_type(),
              " of shape ", qweight.sizes());
  TORCH_CHECK(scales.dim() == 2, "sparse24_int4_mm(scales): expected a 2-D (G, N) tensor, got shape ",
              scales.sizes());
  TORCH_CHECK(offsets.dim() == 2, "sparse24_int4_mm(offsets): expected a 2-D (G, N) tensor, got shape ",
              offsets.sizes());
  TORCH_CHECK(meta.dim() == 2 && meta.scalar_type() == at::kShort,
              "sparse24_int4_mm(meta): expected a 2-D int16 (N, ceil(K/16)) tensor, got ", meta.scalar_type(),
              " of shape ", meta.sizes());
  TORCH_CHECK(group_size > 0, "sparse24_int4_mm(group_size): must be positive (kept values per group), got ",
              group_size);
  for (const at::Tensor* t : {&x, &qweight, &scales, &offsets, &meta})
    TORCH_CHECK(t->device().is_cpu(), "sparse24_int4_mm: all tensors must be on the CPU, got one on ", t->device());
  dt_of(x, "x");
  const Dt sdt = dt_of(scales, "scales"), odt = dt_of(offsets, "offsets");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(1), K16 = (K + 15) / 16;
  TORCH_CHECK(K % 4 == 0, "sparse24_int4_mm(x): K = ", K, " must be a multiple of 4 (groups of 4 columns)");
  const int64_t G = std::max<int64_t>(1, (K / 2 + group_size - 1) / group_size);
  TORCH_CHECK(qweight.size(0) == K16, "sparse24_int4_mm(qweight): expected ceil(K/16) = ", K16, " rows for K = ",
              K, ", got ", qweight.size(0));
  TORCH_CHECK(scales.size(0) == G && scales.size(1) == N, "sparse24_int4_mm(scales): expected shape (", G, ", ", N,
              ") for K = ", K, ", group_size = ", group_size, " kept values, got ", scales.sizes());
  TORCH_CHECK(offsets.size(0) == G && offsets.size(1) == N, "sparse24_int4_mm(offsets): expected shape (", G, ", ",
              N, ") for K = ", K, ", group_size = ", group_size, " kept values, got ", offsets.sizes());
  TORCH_CHECK(meta.size(0) == N && meta.size(1) == K16, "sparse24_int4_mm(meta): expected shape (", N, ", ", K16,
              ") for qweight of shape ", qweight.sizes(), ", got ", meta.sizes());
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "sparse24_int4_mm(bias): expected a 1-D tensor of N = ", N,
                " elements, got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "sparse24_int4_mm(bias): dtype ", b.scalar_type(),
                " differs from x's ", x.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "sparse24_int4_mm(bias): bias is on ", b.device(), " but x is on ",
                x.device());
    bias32 = b.to(at::kFloat).contiguous();
  }
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  if (K == 0)  // a fresh tensor either way: never a view of the caller's bias
    return bias32.defined() ? bias->expand({M, N}).clone(at::MemoryFormat::Contiguous) : at::zeros({M, N}, x.options());

  const Kernels& kern = select_kernels();
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous(), o = offsets.contiguous(),
                   mt = meta.contiguous();
  at::Tensor out32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (poison_outputs()) out32.fill_(std::numeric_limits<float>::quiet_NaN());
  Problem P{};
  P.q = q.data_ptr<int32_t>();
  P.meta = mt.data_ptr<int16_t>();
  P.s = s.data_ptr();
  P.o = o.data_ptr();
  P.sdt = sdt;
  P.odt = odt;
  P.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  P.out = out32.data_ptr<float>();
  P.M = M;
  P.N = N;
  P.K = K;
  P.K16 = K16;
  P.gs = group_size;
  if (M <= kern.max_m) {
    // x in fp32, zero-padded to whole word rows (the last row's x quads may reach past K)
    const at::Tensor xp = cpu::x_f32_padded(x, 16 * K16);
    P.x = xp.data_ptr<float>();
    P.ldx = 16 * K16;
    run_fused(kern, P);
    propagate_nonfinite_x(P.x, P.ldx, P);
  } else {
    const at::Tensor x32 = x.scalar_type() == at::kFloat ? x.contiguous() : x.contiguous().to(at::kFloat);
    run_expand_mm(kern, P, x32, bias32, out32);
    propagate_nonfinite_x(x32.data_ptr<float>(), K, P);  // the BLAS's 0 * Inf need not be NaN
  }
  return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
}

}  // namespace
}  // namespace sparse24_int4_cpu
}  // namespace turbokernels

TORCH_LIBRARY_IMPL(turbokernels_C, CPU, m) {
  m.impl("sparse24_int4_mm", &turbokernels::sparse24_int4_cpu::sparse24_int4_mm_cpu);
}
