// w4a8_mm on CPU: out (M, N) = xhat (M, K) @ W [+ bias (N)], W the int4 weight of int4_mm (q s + o per group,
// python/turbokernels/formats/int4.py), xhat the activations quantized to int8 per block of 32 k
// (python/turbokernels/reference/w4a8_mm.py is the spec):
//     d_b = max_{k in b} |x_k| / 127 (fp32),  xq_k = round-half-even(x_k / d_b) in [-127, 127],  xhat_k = d_b xq_k
// (xq = 0 where d_b is 0 or not finite; then xhat = 0 * d_b: NaN for a block holding a NaN or an infinity).
//
// Why: the int4 x fp32 loop (int4_mm_simd.h) spends per weight an unpack, a convert and an FMA; on AVX2 cores that
// is ~4 weights per cycle, under half of what the memory delivers (bench/results: 38-44% of the copy bandwidth at
// M = 1). With int8 activations the products are integer dot products of 4 bytes per lane: vpdpbusd (AVX512-VNNI)
// or vpmaddubsw + vpmaddwd (AVX2), llama.cpp's Q4_0 x Q8_0 recipe: per vector of packed words (8 weights a lane),
// 3 unpacking instructions shared by up to 4 rows and 2 (VNNI) or 4 (AVX2) per row, where the fp32 loop spends 24
// shared (shift, shift, convert per nibble) and 8 per row (an FMA per nibble). The result differs from int4_mm's by
// the activations' rounding (|xhat - x| <= d_b / 2): an opt-in mode (turbokernels.w4a8_linear,
// turbokernels.nn.W4A8Linear), never chosen silently.
//
// Strategy (w4a8_mm_simd.h)
//  * Per call, x is quantized once (quantize_row): per row and block, d_b, the int32 sum of xq_b, and xq packed in
//    two int32 per packed word: the bytes xq[8w + 0, 2, 4, 6] ("even") and xq[8w + 1, 3, 5, 7] ("odd"). A packed
//    word masked with 0x0F0F0F0F holds q[8w + 0, 2, 4, 6] in its bytes, shifted right by 4 and masked
//    q[8w + 1, 3, 5, 7]: one unsigned x signed 4-byte dot each, no shuffles.
//  * The weight is read once, in its packed form, as int4_mm's streaming path reads it: a thread owns a contiguous
//    range of columns and walks the packed rows in order, a block (4 word rows) at a time, the next block's rows
//    prefetched. Up to 4 rows of x share each unpacked vector.
//  * Per block b and column n: S = sum_k xq_k q_kn exactly in int32 (|S| <= 32 * 15 * 127), then
//        facc[n] += d_b (S - 8 sum_b xq)                            (= d_b sum_k xq (q - 8), exact but its rounding)
//    and per group the epilogue of int4_mm:  y[n] += s[n] facc[n] + (o[n] + 8 s[n]) sum_{b in g} d_b sum_b xq.
//    So blocks never straddle groups: group_size must be a multiple of 32 (or the whole K); the Python op sends
//    other group sizes to the reference.
//  * More than kIntMaxM rows (prompts): xhat is formed in fp32 and multiplied by int4_mm's kernel (the same spec;
//    the integer loop would read the weight once per 4 rows).
//  Accumulation is fp32 (integer within a block); the bias joins the fp32 sum before the output's one rounding.
//
// ISAs: AVX512-VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later), AVX2 (maddubs: any AVX2 CPU, including AVX-512
// ones without VNNI), plain C++; picked at run time, capped by TURBOKERNELS_CPU_ISA as the other kernels are.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/int4_args.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

namespace turbokernels {
namespace w4a8_cpu {
namespace {  // internal linkage: the per-ISA copies must never be merged with (or called through) anything else

using cpu::Dt;
using cpu::scalar_to_f32;

constexpr int64_t kBlock = 32;     // k per activation block (4 packed word rows)
constexpr int64_t kIntMaxM = 16;   // more rows: xhat through int4_mm's kernel
constexpr int kRows = 4;           // rows of x sharing one unpacked weight vector

struct Problem {
  const int32_t* xe;   // (M, K8): bytes xq[8w], xq[8w + 2], xq[8w + 4], xq[8w + 6] (0 past K)
  const int32_t* xo;   // (M, K8): bytes xq[8w + 1], xq[8w + 3], xq[8w + 5], xq[8w + 7]
  const float* dx;     // (M, B): the block scales d_b
  const int32_t* sxq;  // (M, B): sum of xq over the block
  const float* xs;     // (M, G): sum over the group's blocks of d_b sum xq (the offset term's sum of xhat)
  const int32_t* q;    // (K8, N)
  const void* s;       // (G, N), dtype sdt
  const void* o;       // (G, N), dtype odt
  Dt sdt, odt;
  const float* bias;   // (N) fp32, or nullptr
  float* out;          // (M, N) fp32
  int64_t M, K, N, G, K8, B, bpg;  // bpg: blocks per group
};

// ---- plain C++ (any CPU) --------------------------------------------------------------------------------------
namespace scalar {
struct Vec {
  static constexpr int W = 1;
  using F = float;
  using I = int32_t;
  static F zero() { return 0.f; }
  static F set1(float v) { return v; }
  static I set1i(int32_t v) { return v; }
  static F loadu(const float* p) { return *p; }
  static void storeu(float* p, F v) { *p = v; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static I subi(I a, I b) { return a - b; }
  static F to_f32(I a) { return static_cast<float>(a); }
  static F load_f16(const uint16_t* p) { return scalar_to_f32(Dt::F16, p, 0); }
  static F load_bf16(const uint16_t* p) { return scalar_to_f32(Dt::BF16, p, 0); }
  template <int R, int NW>
  static void dot_block(const int32_t* q, int64_t ldq, const int32_t* const (&xe)[R], const int32_t* const (&xo)[R],
                        I (&acc)[R]) {
    for (int r = 0; r < R; ++r) acc[r] = 0;
    for (int i = 0; i < NW; ++i) {
      const uint32_t w = static_cast<uint32_t>(q[i * ldq]);
      for (int r = 0; r < R; ++r) {
        const uint32_t e = static_cast<uint32_t>(xe[r][i]), o = static_cast<uint32_t>(xo[r][i]);
        for (int j = 0; j < 4; ++j) {
          acc[r] += static_cast<int32_t>((w >> (8 * j)) & 15u) * static_cast<int8_t>((e >> (8 * j)) & 255u);
          acc[r] += static_cast<int32_t>((w >> (8 * j + 4)) & 15u) * static_cast<int8_t>((o >> (8 * j)) & 255u);
        }
      }
    }
  }
};
#define TK_ATTR
#include "w4a8_mm_simd.h"
#undef TK_ATTR
}  // namespace scalar

#if TK_X86_SIMD
// ---- AVX2: 8 lanes; vpmaddubsw (unsigned q x signed xq, pairs summed to int16) ---------------------------------
namespace avx2 {
#define TK_ATTR __attribute__((target("avx2,fma,f16c")))
#define TK_VEC TK_ATTR __attribute__((always_inline)) static inline
struct Vec {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  TK_VEC F zero() { return _mm256_setzero_ps(); }
  TK_VEC F set1(float v) { return _mm256_set1_ps(v); }
  TK_VEC I set1i(int32_t v) { return _mm256_set1_epi32(v); }
  TK_VEC F loadu(const float* p) { return _mm256_loadu_ps(p); }
  TK_VEC void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  TK_VEC F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  TK_VEC F add(F a, F b) { return _mm256_add_ps(a, b); }
  TK_VEC F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  TK_VEC I subi(I a, I b) { return _mm256_sub_epi32(a, b); }
  TK_VEC F to_f32(I a) { return _mm256_cvtepi32_ps(a); }
  TK_VEC F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  TK_VEC F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  // The int16 sums of a whole block cannot overflow: each vpmaddubsw lane is q q' x x' pairs, |.| <= 2 * 15 * 127,
  // and a block adds 2 NW <= 8 of them (<= 30480 < 32767); one vpmaddwd per block widens them to int32.
  template <int R, int NW>
  TK_VEC void dot_block(const int32_t* q, int64_t ldq, const int32_t* const (&xe)[R], const int32_t* const (&xo)[R],
                        I (&acc)[R]) {
    const __m256i m = _mm256_set1_epi32(0x0F0F0F0F);
    __m256i a16[R];
    for (int r = 0; r < R; ++r) a16[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int i = 0; i < NW; ++i) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * ldq));
      const __m256i lo = _mm256_and_si256(w, m), hi = _mm256_and_si256(_mm256_srli_epi32(w, 4), m);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xe[r][i])));
        a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xo[r][i])));
      }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_madd_epi16(a16[r], ones);
  }
};
#include "w4a8_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace avx2

// ---- AVX-512 with VNNI: 16 lanes; vpdpbusd (4 unsigned q x signed xq products summed into int32) ----------------
namespace avx512vnni {
#define TK_ATTR __attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c")))
#define TK_VEC TK_ATTR __attribute__((always_inline)) static inline
struct Vec {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  TK_VEC F zero() { return _mm512_setzero_ps(); }
  TK_VEC F set1(float v) { return _mm512_set1_ps(v); }
  TK_VEC I set1i(int32_t v) { return _mm512_set1_epi32(v); }
  TK_VEC F loadu(const float* p) { return _mm512_loadu_ps(p); }
  TK_VEC void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  TK_VEC F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  TK_VEC F add(F a, F b) { return _mm512_add_ps(a, b); }
  TK_VEC F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  TK_VEC I subi(I a, I b) { return _mm512_sub_epi32(a, b); }
  TK_VEC F to_f32(I a) { return _mm512_cvtepi32_ps(a); }
  TK_VEC F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  TK_VEC F load_bf16(const uint16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  template <int R, int NW>
  TK_VEC void dot_block(const int32_t* q, int64_t ldq, const int32_t* const (&xe)[R], const int32_t* const (&xo)[R],
                        I (&acc)[R]) {
    const __m512i m = _mm512_set1_epi32(0x0F0F0F0F);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int i = 0; i < NW; ++i) {
      const __m512i w = _mm512_loadu_si512(q + i * ldq);
      const __m512i lo = _mm512_and_si512(w, m), hi = _mm512_and_si512(_mm512_srli_epi32(w, 4), m);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi32(xe[r][i]));
        acc[r] = _mm512_dpbusd_epi32(acc[r], hi, _mm512_set1_epi32(xo[r][i]));
      }
    }
  }
};
#include "w4a8_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace avx512vnni
#endif  // TK_X86_SIMD

// ---- run-time choice ---------------------------------------------------------------------------------------------
struct Kernels {
  int64_t w;  // int32 lanes per vector
  void (*columns)(const Problem&, int64_t, int64_t, int64_t, float*, int32_t*);
  const char* name;
};

const Kernels kScalar{scalar::W, scalar::columns, "scalar"};
#if TK_X86_SIMD
const Kernels kAvx2{avx2::W, avx2::columns, "avx2"};
const Kernels kAvx512Vnni{avx512vnni::W, avx512vnni::columns, "avx512vnni"};

bool cpu_has_avx512_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return has;
}
#endif

const Kernels& select_kernels() {
  const int level = cpu::isa_level();
#if TK_X86_SIMD
  if (level >= cpu::kAvx512Isa && cpu_has_avx512_vnni()) return kAvx512Vnni;
  if (level >= cpu::kAvx2Isa) return kAvx2;
#endif
  (void)level;
  return kScalar;
}

#if TK_X86_SIMD && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define TK_QUANT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TK_QUANT_CLONES
#endif

// Round half to even for |t| <= 2^22: adding and subtracting 1.5 * 2^23 leaves the integer nearest t in the default
// rounding mode, as std::nearbyint does without its libm call (~40 cycles each: 10 us per call at K = 576, as much
// as the product of a small layer). The build has no -ffast-math, which could fold the two additions away.
inline float round_half_even(float t) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
  return (t + kMagic) - kMagic;
}

// Row m of x (fp32, K values) quantized: dx[b], sxq[b] for b < B, and either xe/xo (K8 words each) or, when xhat is
// given, the dequantized row xhat[k] = d_b xq[k] instead; as the spec says. Plain C++ (K values per row: nothing next
// to the K x N weight), branch-free over each block so the compiler vectorizes it. The division (not a reciprocal's
// product) keeps |x / d| <= 127 (rounded) for any d, a subnormal one included, and is what the reference computes.
// Compiled twice with GCC on Linux (target_clones: AVX2 and the baseline, picked at load time); the same IEEE
// operations either way, so the same bits. The block's max |x| is taken on the bit patterns (|x| as an unsigned
// integer orders like |x|, and any NaN lies above infinity's 0x7f800000): an integer max the compiler vectorizes,
// NaN included.
TK_QUANT_CLONES void quantize_row(const float* x, int64_t K, int64_t B, int64_t K8, float* dx, int32_t* sxq,
                                  int32_t* xe, int32_t* xo, float* xhat) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t k0 = b * kBlock, n = std::min(K, k0 + kBlock) - k0;
    const float* v = x + k0;
    float pad[kBlock];  // the last block of a K that is not a multiple of 32, zero-padded
    if (n < kBlock) {
      for (int64_t i = 0; i < kBlock; ++i) pad[i] = i < n ? v[i] : 0.f;
      v = pad;
    }
    uint32_t top = 0;
    for (int64_t i = 0; i < kBlock; ++i) {
      uint32_t u;
      std::memcpy(&u, v + i, sizeof(u));
      top = std::max(top, u & 0x7fffffffu);
    }
    float amax;
    std::memcpy(&amax, &top, sizeof(amax));
    const float d = top > 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : amax / 127.f;
    const bool ok = d != 0.f && std::isfinite(d);
    int8_t xq[kBlock];
    if (ok) {
      for (int64_t i = 0; i < kBlock; ++i) {  // v = 0 past K: xq = 0 there
        float t = round_half_even(v[i] / d);
        t = t < -127.f ? -127.f : (t > 127.f ? 127.f : t);
        xq[i] = static_cast<int8_t>(static_cast<int32_t>(t));
      }
    } else {
      std::fill(xq, xq + kBlock, int8_t(0));
    }
    int32_t sum = 0;
    for (int64_t i = 0; i < kBlock; ++i) sum += xq[i];
    dx[b] = d;
    sxq[b] = sum;
    if (xhat != nullptr) {
      for (int64_t i = 0; i < n; ++i) xhat[k0 + i] = d * static_cast<float>(xq[i]);
      continue;
    }
    for (int64_t j = 0; j < 4 && 4 * b + j < K8; ++j) {
      const int8_t* p = xq + 8 * j;
      auto pack = [](int8_t a, int8_t b2, int8_t c, int8_t e) {
        return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint8_t>(a)) |
                                    static_cast<uint32_t>(static_cast<uint8_t>(b2)) << 8 |
                                    static_cast<uint32_t>(static_cast<uint8_t>(c)) << 16 |
                                    static_cast<uint32_t>(static_cast<uint8_t>(e)) << 24);
      };
      xe[4 * b + j] = pack(p[0], p[2], p[4], p[6]);
      xo[4 * b + j] = pack(p[1], p[3], p[5], p[7]);
    }
  }
}

at::Tensor w4a8_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t group_size, const std::optional<at::Tensor>& bias) {
  const cpu::Int4Args a = cpu::check_int4_args("w4a8_mm", x, qweight, scales, offsets, group_size, bias);
  const int64_t M = a.M, K = a.K, N = a.N, G = a.G;
  const Dt sdt = a.sdt, odt = a.odt;
  const at::Tensor& bias32 = a.bias32;
  TORCH_CHECK(G == 1 || group_size % kBlock == 0, "w4a8_mm(group_size): the CPU kernel needs a multiple of ",
              kBlock, " (or one group over all of K), got ", group_size);
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  if (K == 0)
    return bias32.defined() ? bias->expand({M, N}).clone(at::MemoryFormat::Contiguous) : at::zeros({M, N}, x.options());

  const int64_t K8 = (K + 7) / 8, B = (K + kBlock - 1) / kBlock;
  const at::Tensor x32 = x.scalar_type() == at::kFloat ? x.contiguous() : x.contiguous().to(at::kFloat);
  const auto f32 = x32.options();
  const auto i32 = f32.dtype(at::kInt);
  at::Tensor dx = at::empty({M, B}, f32), sxq = at::empty({M, B}, i32);
  const int64_t qgrain = std::max<int64_t>(1, 16384 / K);

  if (M > kIntMaxM) {  // xhat in fp32 through int4_mm's kernel (the same spec, computed in fp32)
    at::Tensor xhat = at::empty({M, K}, f32);
    at::parallel_for(0, M, qgrain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        quantize_row(x32.data_ptr<float>() + m * K, K, B, K8, dx.data_ptr<float>() + m * B,
                     sxq.data_ptr<int32_t>() + m * B, nullptr, nullptr, xhat.data_ptr<float>() + m * K);
    });
    static const auto int4_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("turbokernels_C::int4_mm", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              const std::optional<at::Tensor>&)>();
    const std::optional<at::Tensor> b32 = bias32.defined() ? std::optional<at::Tensor>(bias32) : std::nullopt;
    const at::Tensor out32 = int4_op.call(xhat, qweight, scales, offsets, group_size, b32);
    return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
  }

  at::Tensor xe = at::empty({M, K8}, i32), xo = at::empty({M, K8}, i32);
  at::parallel_for(0, M, qgrain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(x32.data_ptr<float>() + m * K, K, B, K8, dx.data_ptr<float>() + m * B,
                   sxq.data_ptr<int32_t>() + m * B, xe.data_ptr<int32_t>() + m * K8, xo.data_ptr<int32_t>() + m * K8,
                   nullptr);
  });

  // sum over each group's blocks of d_b sum xq: double (once per row and group), so the offset term that cancels
  // against the q s term is as exact as int4_mm's sum of x
  const int64_t bpg = G == 1 ? B : group_size / kBlock;
  std::vector<float> xs(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      double t = 0.0;
      for (int64_t b = g * bpg; b < std::min(B, (g + 1) * bpg); ++b)
        t += static_cast<double>(dx.data_ptr<float>()[m * B + b]) * sxq.data_ptr<int32_t>()[m * B + b];
      xs[m * G + g] = static_cast<float>(t);
    }

  const Kernels& kern = select_kernels();
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous(), o = offsets.contiguous();
  at::Tensor out32 = at::empty({M, N}, f32);
  Problem P{};
  P.xe = xe.data_ptr<int32_t>();
  P.xo = xo.data_ptr<int32_t>();
  P.dx = dx.data_ptr<float>();
  P.sxq = sxq.data_ptr<int32_t>();
  P.xs = xs.data();
  P.q = q.data_ptr<int32_t>();
  P.s = s.data_ptr();
  P.o = o.data_ptr();
  P.sdt = sdt;
  P.odt = odt;
  P.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  P.out = out32.data_ptr<float>();
  P.M = M;
  P.K = K;
  P.N = N;
  P.G = G;
  P.K8 = K8;
  P.B = B;
  P.bpg = bpg;
  // One contiguous column range per thread (whole vectors: a column's arithmetic never depends on the split),
  // worked in strips of 2048 / M columns: the scratch (2 rows + 2 floats per column) stays in L1, and with more
  // than 4 rows the strip's packed weight (K/8 words per column: 256 KiB at M = 16, K = 4096) stays in L2 for the
  // row tiles after the first.
  const int64_t nvec = (N + kern.w - 1) / kern.w;
  const int64_t sw = std::max<int64_t>(kern.w, (2048 / M) / kern.w * kern.w);
  // don't wake a second thread for less than ~64k multiply-adds
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * M * kern.w));
  at::parallel_for(0, nvec, grain, [&](int64_t v0, int64_t v1) {
    const int64_t width = std::min(sw, (v1 - v0) * kern.w);
    std::unique_ptr<float[]> scratch(new float[(2 * kRows + 2) * width]);
    int32_t qt[4 * 16];
    kern.columns(P, v0 * kern.w, std::min(N, v1 * kern.w), width, scratch.get(), qt);
  });
  return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
}

}  // namespace

// The ISA the kernel runs here (for tests and the benchmark's labels): "avx512vnni", "avx2" or "scalar".
std::string w4a8_mm_isa() { return select_kernels().name; }

}  // namespace w4a8_cpu
}  // namespace turbokernels

TORCH_LIBRARY_IMPL(turbokernels_C, CPU, m) {
  m.impl("w4a8_mm", &turbokernels::w4a8_cpu::w4a8_mm_cpu);
}
