// sparse24_mm on CPU: out (M, N) = x (M, K) @ W.T [+ bias (N)], W (N, K) 2:4-sparse along K, given compressed as
// values (N, K/2) in x's dtype and meta int16 (N, ceil(K/16)) (python/turbokernels/formats/sparse24.py).
//
// Layout as the kernel sees it: a row of W is a stream of kept values and a parallel bit stream of meta, 2 bits per
// kept value (idx0 | idx1 << 2 per group of 4 k, 4 groups per int16, group j at bits 4j): kept value i of a row
// sits at dense k = 4 * (i / 2) + ((meta_bits >> 2i) & 3). So a block of W consecutive kept values (one vector)
// covers exactly 2W dense k and 2W meta bits, and its W x operands are a fixed 2W-wide window of x permuted by
// indices that come straight out of the meta bits: the weight is never expanded.
//
// Strategy
//  * Decode (M < Kernels::rowvec_min_m) is bound by the bytes of weight read: values + meta are 0.53 of dense fp32
//    (0.56 of fp16), so the zeros must not be read, and the gather must be cheap enough to leave the loop
//    memory-bound.
//    AVX-512: per block of 16 kept values, broadcast the 32 meta bits, shift lane i right by 2i (one vpsrlvd),
//    mask to 2 bits and add 4 * (i / 2) (one vpternlogd): the 16 indices into the 32 x values, which sit in two
//    zmm registers, and one vpermt2ps gathers them. 4 instructions per 16 multiply-adds besides the FMA.
//    AVX2 (8 lanes): vpermilps permutes within 128-bit halves using the low 2 index bits only, so x is stored
//    per 16 k as A = (x0..3, x8..11), B = (x4..7, x12..15): lanes 0-1 (group 0) and 4-5 (group 2) read A, lanes
//    2-3 and 6-7 read B; the index is the shifted meta itself (no mask, no add) and one constant blend merges.
//  * Register tile: R rows of x x NR rows of W. A block of x is loaded once per x row and serves NR weight rows;
//    the indices of a weight block are built once and serve R x rows (for M > 1 the gather + FMA per x row is
//    all that is left). x is converted to fp32 (and padded with zeros to whole blocks, in the ISA's layout) once
//    per call; fp16/bf16 values are widened in registers as they are loaded, so fp16 weights move half the bytes.
//  * Threads take units of weight rows from a shared counter (a descheduled thread on a shared machine does not
//    hold the call up). Each lane of an accumulator sums one chain of products and is reduced once per tile; K is
//    cut into chunks whose x rows fit in L2 (one chunk up to K = 65536 / M), partial sums add into the fp32
//    output. A row's sum never depends on the thread count.
//  * The last block of a row is partial when K/2 is not a multiple of W: its values and meta words are copied to
//    zero-padded buffers (padding values are 0 and padded x is 0). Groups with 0 or 1 nonzero keep explicit zero
//    values (the format's rule), which multiply whatever x they point at: x inside [0, K), never garbage.
//  * M >= Kernels::rowvec_min_m (16 with AVX-512): the gather costs a shuffle per 16 multiply-adds and x row, which
//    makes it as slow as a dense sgemm by M = 64. The row-vectorized path swaps the roles: x transposed (K, M),
//    lanes over rows of x, each kept value broadcast and multiplied with the vector x[m..m+W)[k] its meta bits
//    select, by address (scalar decoding shared by the tile's vectors of rows, no shuffle): one FMA per W
//    multiply-adds, half the multiply-adds of dense, ~2x a dense sgemm from M = 16 to 256 on this machine. Each
//    lane sums chunks of 64 groups from zero and adds them to the fp32 output (the error grows with the chunk,
//    not with K).
//  * Larger M (Kernels::max_m, measured per ISA): column chunks are expanded to fp32 and handed to at::mm_out.
//  Accumulation is fp32; the result is converted to x's dtype once at the end. The fp32 output starts from the bias
//  (or 0) and every path adds its sums to it, so that conversion is the output's only rounding, as in F.linear.
//
// ISAs: sparse24_mm_simd.h is compiled three times (AVX-512F+BW, AVX2+FMA+F16C, plain C++) with function-level
// target attributes, and the best one the CPU supports is picked at run time, so the build stays portable (no
// -march). TURBOKERNELS_CPU_ISA=scalar|avx2|avx512 caps the choice (the tests use it to cover every path).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>


namespace turbokernels {
namespace sparse24_cpu {
namespace {  // internal linkage: the per-ISA copies must never be merged with (or called through) anything else

using cpu::Dt;
using cpu::scalar_to_f32;


struct Problem {
  const float* x;        // (M, ldx) fp32: x padded with zeros to whole blocks, in the ISA's block layout
  int64_t ldx;
  const void* values;    // (N, K/2), dtype vdt, contiguous
  Dt vdt;
  int64_t vsize, ldv;    // element size, row stride (K/2)
  const int16_t* meta;   // (N, ldm), contiguous
  int64_t ldm;
  float* out;            // (M, N) fp32, initialized to the bias (or 0): tiles add their partial sums
  int64_t M, N, K;
  int64_t nfull;         // blocks whose values and meta words lie entirely inside the tensors
  float value_at(int64_t n, int64_t i) const { return scalar_to_f32(vdt, values, n * ldv + i); }
};

// ---- plain C++ (any CPU): a "vector" is the 2 kept values of one group ------------------------------------------
namespace scalar {
#define TK_ATTR
#define TK_VEC static inline
struct Vec {
  static constexpr int W = 2, RMAX = 2, TNR = 4, TMV = 2;
  static constexpr int nr(int r) { return r == 1 ? 4 : 2; }
  struct F { float a, b; };
  struct I { int a, b; };
  using X = const float*;
  TK_VEC F zero() { return {0.f, 0.f}; }
  TK_VEC X loadx(const float* p) { return p; }
  TK_VEC I index(const int16_t* meta, int64_t g) {
    const unsigned nib = (static_cast<uint16_t>(meta[g >> 2]) >> (4 * (g & 3))) & 15u;
    return {static_cast<int>(nib & 3u), static_cast<int>(nib >> 2)};
  }
  TK_VEC F gather(X x, I i) { return {x[i.a], x[i.b]}; }
  TK_VEC F fma(F a, F b, F c) { return {a.a * b.a + c.a, a.b * b.b + c.b}; }
  TK_VEC F load_f32(const float* p) { return {p[0], p[1]}; }
  TK_VEC F load_f16(const uint16_t* p) {
    return {scalar_to_f32(Dt::F16, p, 0), scalar_to_f32(Dt::F16, p, 1)};
  }
  TK_VEC F load_bf16(const uint16_t* p) {
    return {scalar_to_f32(Dt::BF16, p, 0), scalar_to_f32(Dt::BF16, p, 1)};
  }
  TK_VEC float reduce(F v) { return v.a + v.b; }
  TK_VEC F set1(float v) { return {v, v}; }
  TK_VEC F loadu(const float* p) { return {p[0], p[1]}; }
  TK_VEC void storeu(float* p, F v) { p[0] = v.a, p[1] = v.b; }
  TK_VEC F add(F a, F b) { return {a.a + b.a, a.b + b.b}; }
  TK_VEC float half_to_f32(uint16_t h) { return scalar_to_f32(Dt::F16, &h, 0); }
};
#include "sparse24_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace scalar

#if TK_X86_SIMD
// ---- AVX2 + FMA + F16C: 8 kept values = 16 k per block, 16 registers -------------------------------------------
namespace avx2 {
#define TK_ATTR __attribute__((target("avx2,fma,f16c")))
#define TK_VEC TK_ATTR __attribute__((always_inline)) static inline
struct Vec {
  static constexpr int W = 8, RMAX = 2, TNR = 4, TMV = 2;
  static constexpr int nr(int r) { return r == 1 ? 4 : 2; }
  using F = __m256;
  using I = __m256i;
  struct X { __m256 a, b; };  // A = (x0..3, x8..11), B = (x4..7, x12..15): see the header comment
  TK_VEC F zero() { return _mm256_setzero_ps(); }
  TK_VEC X loadx(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  TK_VEC I index(const int16_t* meta, int64_t b) {  // vpermilps reads bits 0-1 of each lane: no mask needed
    return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<uint16_t>(meta[b])),
                             _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
  }
  TK_VEC F gather(const X& x, I i) {
    return _mm256_blend_ps(_mm256_permutevar_ps(x.a, i), _mm256_permutevar_ps(x.b, i), 0xCC);
  }
  TK_VEC F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  TK_VEC F load_f32(const float* p) { return _mm256_loadu_ps(p); }
  TK_VEC F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  TK_VEC F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  TK_VEC float reduce(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  TK_VEC F set1(float v) { return _mm256_set1_ps(v); }
  TK_VEC F loadu(const float* p) { return _mm256_loadu_ps(p); }
  TK_VEC void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  TK_VEC F add(F a, F b) { return _mm256_add_ps(a, b); }
  TK_VEC float half_to_f32(uint16_t h) { return _cvtsh_ss(h); }
};
#include "sparse24_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace avx2

// ---- AVX-512F + BW: 16 kept values = 32 k per block, 32 registers -----------------------------------------------
namespace avx512 {
#define TK_ATTR __attribute__((target("avx512f,avx512bw,fma,f16c")))
#define TK_VEC TK_ATTR __attribute__((always_inline)) static inline
struct Vec {
  static constexpr int W = 16, RMAX = 4, TNR = 4, TMV = 4;
  static constexpr int nr(int r) { return r == 1 ? 4 : 2; }
  using F = __m512;
  using I = __m512i;
  struct X { __m512 lo, hi; };  // x[32b .. 32b + 31] in natural order
  TK_VEC F zero() { return _mm512_setzero_ps(); }
  TK_VEC X loadx(const float* p) { return {_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)}; }
  TK_VEC I index(const int16_t* meta, int64_t b) {  // lane i: 4 * (i / 2) + ((bits >> 2i) & 3), 0..31
    int32_t bits;
    __builtin_memcpy(&bits, meta + 2 * b, sizeof(bits));
    const __m512i s = _mm512_srlv_epi32(_mm512_set1_epi32(bits), _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16,
                                                                                    18, 20, 22, 24, 26, 28, 30));
    // (s & 3) | base in one vpternlogd (imm 0xEA: A & B | C)
    return _mm512_ternarylogic_epi32(s, _mm512_set1_epi32(3),
                                     _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28),
                                     0xEA);
  }
  TK_VEC F gather(const X& x, I i) { return _mm512_permutex2var_ps(x.lo, i, x.hi); }
  TK_VEC F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  TK_VEC F load_f32(const float* p) { return _mm512_loadu_ps(p); }
  TK_VEC F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  TK_VEC F load_bf16(const uint16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  TK_VEC float reduce(F v) { return _mm512_reduce_add_ps(v); }
  TK_VEC F set1(float v) { return _mm512_set1_ps(v); }
  TK_VEC F loadu(const float* p) { return _mm512_loadu_ps(p); }
  TK_VEC void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  TK_VEC F add(F a, F b) { return _mm512_add_ps(a, b); }
  TK_VEC float half_to_f32(uint16_t h) { return _cvtsh_ss(h); }
};
#include "sparse24_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace avx512
#endif  // TK_X86_SIMD

// ---- run-time choice ---------------------------------------------------------------------------------------------
enum class XLayout { Natural, Avx2Halves };

struct Kernels {
  int64_t kb;          // dense k per block
  XLayout xlayout;
  int64_t rowvec_min_m;  // from this many rows on, the row-vectorized path
  int64_t max_m;       // above this many rows, expand + BLAS instead
  void (*run)(const Problem&, int64_t, int64_t, int64_t, int64_t);
  void (*run_t)(const Problem&, const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t);
  void (*expand)(const Problem&, int64_t, int64_t, float*);
};

// Thresholds measured on the 2-core AMD EPYC machine (4096 x 4096 fp32, one thread, CPU time), against each other
// and against expand + sgemm. AVX-512: gather path 4.25 ms vs row-vectorized 4.80 at M = 8, 7.9 vs 4.8 at M = 16;
// row-vectorized 2.0x faster than dense sgemm at M = 256 (not measured above: expand + BLAS from there on).
// AVX2: gather 4.2 vs 4.9 ms at M = 4, 6.5 vs 4.9 at M = 8; row-vectorized = dense sgemm at M = 64, where expand +
// BLAS is 1.46x slower. Plain C++: not measured (the int4 kernel's choice of 8).
const Kernels kScalar{scalar::KB, XLayout::Natural, 4, 8, scalar::run, scalar::run_t, scalar::expand_rows};
#if TK_X86_SIMD
const Kernels kAvx2{avx2::KB, XLayout::Avx2Halves, 8, 64, avx2::run, avx2::run_t, avx2::expand_rows};
const Kernels kAvx512{avx512::KB, XLayout::Natural, 16, 256, avx512::run, avx512::run_t, avx512::expand_rows};
#endif

const Kernels& select_kernels() {
  const int level = cpu::isa_level();
#if TK_X86_SIMD
  if (level >= cpu::kAvx512Isa) return kAvx512;
  if (level >= cpu::kAvx2Isa) return kAvx2;
#endif
  (void)level;
  return kScalar;
}

Dt dt_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::F32;
    case at::kHalf: return Dt::F16;
    case at::kBFloat16: return Dt::BF16;
    default: TORCH_CHECK(false, "sparse24_mm(", name, "): dtype must be float16, bfloat16 or float32, got ",
                         t.scalar_type());
  }
  return Dt::F32;
}

// x (M, K) -> fp32 (M, nblocks * kb), zero-padded, in the kernels' block layout
at::Tensor pack_x(const at::Tensor& x, int64_t kb, int64_t nblocks, XLayout layout) {
  const int64_t M = x.size(0), Kp = nblocks * kb;
  at::Tensor xp = cpu::x_f32_padded(x, Kp);
  if (layout == XLayout::Avx2Halves)  // per 16 k: [half h][quad s][i] -> [s][h][i]
    xp = xp.view({M, nblocks, 2, 2, 4}).permute({0, 1, 3, 2, 4}).contiguous().view({M, Kp});
  return xp;
}

void run_direct(const Kernels& kern, const Problem& P0, const at::Tensor& xp) {
  Problem P = P0;
  P.x = xp.data_ptr<float>();
  P.ldx = xp.size(1);
  const int64_t nblocks = P.ldx / kern.kb;
  // K chunks whose M rows of x (fp32) take <= 256 KiB: they stay in L2 while a thread runs a unit's weight rows.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(256) << 10) / (4 * kern.kb * P.M));
  // Work units: 16 weight rows (a multiple of every tile's NR), 64 when x is reread per chunk (M > 4). Threads take
  // units from a shared counter rather than a fixed half each: on a shared machine one thread is often
  // descheduled for a while, and a static split would make the whole call wait for it.
  const int64_t unit = P.M > 4 ? 64 : 16;
  const int64_t units = (P.N + unit - 1) / unit;
  auto work = [&](int64_t u) {
    const int64_t n_begin = u * unit, n_end = std::min(P.N, n_begin + unit);
    for (int64_t b0 = 0; b0 < nblocks; b0 += chunk) kern.run(P, n_begin, n_end, b0, std::min(nblocks, b0 + chunk));
  };
  // don't wake a second thread for less than ~256k multiply-adds
  const int64_t threads = std::min<int64_t>(at::get_num_threads(),
                                            std::max<int64_t>(1, P.N * (P.K / 2) * P.M / (int64_t(1) << 18)));
  if (threads <= 1 || units <= 1) {
    for (int64_t u = 0; u < units; ++u) work(u);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) work(u);
  });
}

void run_rowvec(const Kernels& kern, const Problem& P, const at::Tensor& x, at::Tensor& out32) {
  const int64_t lanes = kern.kb / 2, M = P.M, K = P.K, N = P.N;
  const int64_t ldxt = (M + lanes - 1) / lanes * lanes;
  at::Tensor xt = at::zeros({K, ldxt}, x.options().dtype(at::kFloat));
  xt.narrow(1, 0, M).copy_(x.t());
  at::Tensor outt = at::zeros({N, ldxt}, xt.options());
  outt.narrow(1, 0, M).copy_(out32.t());  // starts from out32: the bias (or 0)
  const float* xtp = xt.data_ptr<float>();
  float* outp = outt.data_ptr<float>();
  // Chunks of 64 groups: every lane sums one chain of 128 products from zero (error growing with the chunk, not
  // with K) and adds it to outt. Units of 64 weight rows, taken from a shared counter.
  const int64_t groups = K / 4;
  constexpr int64_t chunk = 64;
  constexpr int64_t unit = 64;
  const int64_t units = (N + unit - 1) / unit;
  auto work = [&](int64_t u) {
    const int64_t n_begin = u * unit, n_end = std::min(N, n_begin + unit);
    for (int64_t g0 = 0; g0 < groups; g0 += chunk)
      kern.run_t(P, xtp, ldxt, outp, n_begin, n_end, g0, std::min(groups, g0 + chunk));
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(),
                                            std::max<int64_t>(1, N * (K / 2) * M / (int64_t(1) << 18)));
  if (threads <= 1 || units <= 1) {
    for (int64_t u = 0; u < units; ++u) work(u);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) work(u);
    });
  }
  out32.copy_(outt.narrow(1, 0, M).t());
}

void run_expand_mm(const Kernels& kern, const Problem& P, const at::Tensor& x32, at::Tensor& out32) {
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
    o.addmm_(x32, wbuf.narrow(0, 0, nc).t());  // o (the bias, or 0) + x @ w, in fp32
  }
}

// The spec is the dense product (F.linear on the 2:4 weight), where a non-finite x[m][k] times a pruned 0 makes
// out[m][n] NaN; the kernels never see the pruned zeros. So the outputs of a row of x with a NaN/Inf are set to NaN
// wherever that k is pruned (as sparse24_int4_mm.cpp does): one scan of x per call (M x K compares), work only where
// x is not finite. A kept value multiplies the non-finite x in the kernels themselves (0 * Inf = NaN there too).
void propagate_nonfinite_x(const at::Tensor& xc, Dt xdt, const Problem& P) {
  const void* data = xc.data_ptr();
  for (int64_t m = 0; m < P.M; ++m) {
    for (int64_t k = 0; k < P.K; ++k) {
      const int64_t i = m * P.K + k;
      const float v = xdt == Dt::F32 ? static_cast<const float*>(data)[i]
                      : xdt == Dt::F16 ? static_cast<float>(static_cast<const c10::Half*>(data)[i])
                                       : static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
      if (std::isfinite(v)) continue;
      const int64_t j = k / 16, shift = 4 * ((k / 4) % 4);
      const unsigned pos = static_cast<unsigned>(k % 4);
      for (int64_t n = 0; n < P.N; ++n) {
        const unsigned nib = (static_cast<uint16_t>(P.meta[n * P.ldm + j]) >> shift) & 15u;
        if (pos != (nib & 3u) && pos != (nib >> 2)) P.out[m * P.N + n] = std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
}

at::Tensor sparse24_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "sparse24_mm(x): expected a 2-D (M, K) tensor, got shape ", x.sizes());
  TORCH_CHECK(values.dim() == 2, "sparse24_mm(values): expected a 2-D (N, K/2) tensor, got shape ", values.sizes());
  TORCH_CHECK(meta.dim() == 2 && meta.scalar_type() == at::kShort,
              "sparse24_mm(meta): expected a 2-D int16 (N, ceil(K/16)) tensor, got ", meta.scalar_type(),
              " of shape ", meta.sizes());
  for (const at::Tensor* t : {&x, &values, &meta})
    TORCH_CHECK(t->device().is_cpu(), "sparse24_mm: all tensors must be on the CPU, got one on ", t->device());
  const Dt xdt = dt_of(x, "x"), vdt = dt_of(values, "values");
  TORCH_CHECK(xdt == vdt, "sparse24_mm(values): dtype ", values.scalar_type(), " differs from x's ",
              x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  TORCH_CHECK(K % 4 == 0, "sparse24_mm(x): K = ", K, " must be a multiple of 4 (groups of 4 columns)");
  TORCH_CHECK(values.size(1) * 2 == K, "sparse24_mm(values): expected K/2 = ", K / 2, " columns for x of shape ",
              x.sizes(), ", got shape ", values.sizes());
  TORCH_CHECK(meta.size(0) == N && meta.size(1) == (K + 15) / 16, "sparse24_mm(meta): expected shape (", N, ", ",
              (K + 15) / 16, ") for values of shape ", values.sizes(), ", got ", meta.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "sparse24_mm(bias): expected a 1-D tensor of N = ", N,
                " elements, got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "sparse24_mm(bias): dtype ", b.scalar_type(),
                " differs from x's ", x.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "sparse24_mm(bias): bias is on ", b.device(), " but x is on ",
                x.device());
  }
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  if (K == 0)  // a fresh tensor either way: never a view of the caller's bias
    return has_bias ? bias->expand({M, N}).clone(at::MemoryFormat::Contiguous) : at::zeros({M, N}, x.options());

  const Kernels& kern = select_kernels();
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  // The fp32 accumulator of every path starts from the bias (or 0); a copy (clone), never the caller's bias itself.
  at::Tensor out32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  {  // rows of the bias (or 0), without expand + clone's dispatcher calls
    float* o = out32.data_ptr<float>();
    const Dt bdt = has_bias ? dt_of(*bias, "bias") : Dt::F32;
    const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
    for (int64_t n = 0; n < N; ++n) o[n] = has_bias ? cpu::scalar_to_f32(bdt, b.data_ptr(), n) : 0.f;
    at::parallel_for(1, M, std::max<int64_t>(1, 65536 / N), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) std::memcpy(o + m * N, o, N * sizeof(float));
    });
  }
  Problem P{};
  P.values = v.data_ptr();
  P.vdt = vdt;
  P.vsize = v.element_size();
  P.ldv = K / 2;
  P.meta = mt.data_ptr<int16_t>();
  P.ldm = mt.size(1);
  P.out = out32.data_ptr<float>();
  P.M = M;
  P.N = N;
  P.K = K;
  const int64_t w = kern.kb / 2;
  P.nfull = (K / 2) / w;
  if (M < kern.rowvec_min_m) {
    run_direct(kern, P, pack_x(x, kern.kb, (K / 2 + w - 1) / w, kern.xlayout));
  } else if (M <= kern.max_m) {
    run_rowvec(kern, P, x, out32);
  } else {
    const at::Tensor x32 = x.scalar_type() == at::kFloat ? x.contiguous() : x.contiguous().to(at::kFloat);
    run_expand_mm(kern, P, x32, out32);
  }
  propagate_nonfinite_x(x.contiguous(), xdt, P);
  return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
}

}  // namespace
}  // namespace sparse24_cpu
}  // namespace turbokernels

TORCH_LIBRARY_IMPL(turbokernels_C, CPU, m) {
  m.impl("sparse24_mm", &turbokernels::sparse24_cpu::sparse24_mm_cpu);
}
