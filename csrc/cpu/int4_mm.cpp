// int4_mm on CPU: out (M, N) = x (M, K) @ W [+ bias (N)], W[k][n] = q[k][n] * scales[k / gs][n] + offsets[k / gs][n].
//
// Layout (python/turbokernels/formats/int4.py): qweight int32 (ceil(K/8), N), word [k/8][n] holds q[k][n] in bits
// 4*(k%8)..+3. Rows are contiguous along N, so one vector load of 16 (AVX-512) or 8 (AVX2) words gives 8 k's for
// that many adjacent output columns: the kernel vectorizes across n and never transposes.
//
// Strategy (the fused path, int4_mm_simd.h)
//  * The weight is read once, in its packed form. Decode (M = 1) is bound by the bytes of weight it reads and int4
//    is 8x fewer than fp32, so dequantizing to memory first would throw that away.
//  * Per block of NB columns (the unit of work of a thread) and per group g:
//        acc[n] = sum_{k in g} x[k] * (q[k][n] - 8)      (unpack = shift by 4, low nibble - 8 -> float, then FMA)
//        y[n]  += scales[g][n] * acc[n] + (offsets[g][n] + 8 scales[g][n]) * sum_{k in g} x[k]
//    so scales and offsets cost a few FMAs per group, not per weight (o + 8s is kept exactly, as two floats), and
//    the hot loop is 1 FMA per weight and row plus the unpack. (Centering on 8 keeps the two terms from
//    cancelling; see group_rows.) The result is the
//    spec's sum without rounding each dequantized weight to fp32 first: against the exact quantized weights it
//    is more accurate than the fp32 reference (dequantize, then sgemm), not less. Each unpacked vector feeds RMAX
//    rows of x at once, so for M > 1 the unpack is amortized
//    and the loop runs at the FMA throughput of the core.
//  * Groups that start or end inside a word (group_size % 8 != 0, K % 8 != 0) feed that word with x masked to the
//    group; a ragged last column block runs on a zero-padded copy. x past K is never read.
//  * Decode (M <= RMAX = 4): the streaming path (int4_mm_simd.h, stream_strip): one contiguous column range per
//    thread, the packed rows walked in address order with the next row prefetched, sums in L1 scratch. The block
//    path walked 64-256 bytes of every row a page apart, and waited on memory (M = 1 at 4096 x 4096, 1 thread,
//    2-core EPYC: 6.4 -> 2.3 ms). TURBOKERNELS_INT4_BLOCK=1 (read per call) sends M <= 4 to the block path too,
//    to compare the two.
//  * Large M: the fused loop is FMA-bound at close to the machine's peak with AVX-512, which beats dequantize +
//    BLAS (measured 2.2x at M = 256 on AMD, where MKL runs its AVX2 code). With AVX2 or plain C++ the BLAS catches
//    up, so above Kernels::fused_max_m rows, column chunks are dequantized to fp32 and handed to at::mm_out.
//  * bf16 x on a CPU with AMX tiles (Sapphire Rapids and later), 12 <= M <= 512: AMX tiles (run_amx_bf16): the
//    weight dequantized to bf16 a 32-column panel at a time in L2, in the tiles' layout, and multiplied there;
//    above 512 rows dequantized chunks through torch's bf16 matmul (run_dequant_mm_bf16). Either beats any FMA loop
//    there (vdpbf16ps is no faster per product than fp32 FMA on that CPU). The weight is rounded to bf16 on these
//    paths, as torch's bf16 F.linear on the dequantized weight rounds it.
//  * fp32 x on such a CPU above 96 rows: dequantize + MKL's AVX-512 sgemm (kAvx512Amx.fused_max_m).
//  Accumulation is fp32; fp16/bf16 x is converted to fp32 once per call and the result back once at the end. The
//  bias joins the fp32 result first (the fused path adds it as it writes a block out, the BLAS path hands it to
//  addmm), so that conversion is the output's only rounding, as in torch's F.linear.
//
// ISAs: int4_mm_simd.h is compiled three times (AVX-512F+BW, AVX2+FMA+F16C, plain C++) with function-level target
// attributes, and the best one the CPU supports is picked at run time, so the build stays portable (no -march).
// TURBOKERNELS_CPU_ISA=scalar|avx2 caps the choice (the tests use it to cover every path).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "cpu/int4_args.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif


namespace turbokernels {
namespace int4_cpu {
namespace {  // internal linkage: the per-ISA copies must never be merged with (or called through) anything else

using cpu::Dt;
using cpu::scalar_to_f32;

// The k range of one group and how its packed word rows split: a masked head word (group starts mid-word), full
// middle words, a masked tail word (group ends mid-word or at a K that is not a multiple of 8). -1: none.
struct Span {
  int64_t k0, k1;
  int64_t head_w, mid_w0, mid_n, tail_w;
};

struct Problem {
  const float* x;     // (M, K) fp32, contiguous
  const float* xsum;  // (M, G): sum of x over each group
  const int32_t* q;   // (ceil(K/8), N)
  const void* s;      // (G, N), dtype sdt
  const void* o;      // (G, N), dtype odt
  Dt sdt, odt;
  const float* bias;  // (N) fp32, or nullptr
  float* out;         // (M, N) fp32
  int64_t M, K, N, G, gs;
  const Span* spans;  // (G)
};


// ---- plain C++ (any CPU) --------------------------------------------------------------------------------------
namespace scalar {
struct Vec {
  static constexpr int W = 1, J = 16, RMAX = 4, NREG = 16;
  using F = float;
  using I = uint32_t;
  static F zero() { return 0.f; }
  static F set1(float v) { return v; }
  static F loadu(const float* p) { return *p; }
  static void storeu(float* p, F v) { *p = v; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static I loadq(const int32_t* p) { return static_cast<uint32_t>(*p); }
  static I prepare(I w) { return w; }
  static F nibble(I w, int i) { return static_cast<float>(static_cast<int>((w >> (4 * i)) & 15u) - 8); }
  static F next_nibble(I& w, int i) { return nibble(w, i); }
  static constexpr float kStreamScale = 1.f;
  static F stream_nibble(I& w, int i) { return nibble(w, i); }
  static F load_f16(const uint16_t* p) { return scalar_to_f32(Dt::F16, p, 0); }
  static F load_bf16(const uint16_t* p) { return scalar_to_f32(Dt::BF16, p, 0); }
};
#define TK_ATTR
#include "int4_mm_simd.h"
#undef TK_ATTR
}  // namespace scalar

#if TK_X86_SIMD
// ---- AVX2 + FMA + F16C: 8 lanes, 16 registers (4 rows x 2 vectors of accumulators) -----------------------------
namespace avx2 {
#define TK_ATTR __attribute__((target("avx2,fma,f16c")))
#define TK_VEC TK_ATTR __attribute__((always_inline)) static inline
struct Vec {
  static constexpr int W = 8, J = 2, RMAX = 4, NREG = 16;
  using F = __m256;
  using I = __m256i;
  TK_VEC F zero() { return _mm256_setzero_ps(); }
  TK_VEC F set1(float v) { return _mm256_set1_ps(v); }
  TK_VEC F loadu(const float* p) { return _mm256_loadu_ps(p); }
  TK_VEC void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  TK_VEC F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  TK_VEC F add(F a, F b) { return _mm256_add_ps(a, b); }
  TK_VEC F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  TK_VEC I loadq(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // Flipping bit 3 of every nibble turns q into q - 8 read as a signed 4-bit number, so nibble i is two shifts
  // (left to the top, arithmetic right) and a convert, with no mask and no subtract.
  TK_VEC I prepare(I w) { return _mm256_xor_si256(w, _mm256_set1_epi32(static_cast<int>(0x88888888u))); }
  TK_VEC F nibble(I w, int i) {  // i is a constant once the nibble loop is unrolled
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 28 - 4 * i), 28));
  }
  TK_VEC F next_nibble(I& w, int i) { return nibble(w, i); }
  // The streaming path's unpack: nibble i shifted to the top of the lane and masked, (q - 8) 2^28 as an int32,
  // converted exactly (4 significant bits), against x 2^-28: one shift per nibble (none for the top one), not
  // two. Where one row of x meets each unpacked vector (M = 1), the shifts bound the loop on a Zen 1 EPYC (7001
  // series; in L2, one core: 4.4 G weights/s with two shifts a nibble, 6.1 with one, 7.5-8.9 with none and no
  // sign); weights from DRAM, 2 threads: M = 1 took 0.77-0.78x the time, M = 2-4 0.92-0.94x (4096 x 4096,
  // 4096 x 14336, in-process A/B). The block path keeps nibble(): the same change made it 4-13% slower there
  // (M = 8, 16: four rows of x per unpacked vector).
  static constexpr float kStreamScale = 268435456.f;  // 2^28
  TK_VEC F stream_nibble(I& w, int i) {
    const I top = i == 7 ? w : _mm256_slli_epi32(w, 28 - 4 * i);
    return _mm256_cvtepi32_ps(_mm256_and_si256(top, _mm256_set1_epi32(static_cast<int>(0xF0000000u))));
  }
  TK_VEC F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  TK_VEC F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
};
#include "int4_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace avx2

// ---- AVX-512F + BW: 16 lanes, 32 registers (4 rows x 4 vectors of accumulators) --------------------------------
namespace avx512 {
#define TK_ATTR __attribute__((target("avx512f,avx512bw,fma,f16c")))
#define TK_VEC TK_ATTR __attribute__((always_inline)) static inline
struct Vec {
  static constexpr int W = 16, J = 4, RMAX = 4, NREG = 32;
  using F = __m512;
  using I = __m512i;
  TK_VEC F zero() { return _mm512_setzero_ps(); }
  TK_VEC F set1(float v) { return _mm512_set1_ps(v); }
  TK_VEC F loadu(const float* p) { return _mm512_loadu_ps(p); }
  TK_VEC void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  TK_VEC F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  TK_VEC F add(F a, F b) { return _mm512_add_ps(a, b); }
  TK_VEC F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  TK_VEC I loadq(const int32_t* p) { return _mm512_loadu_si512(p); }
  // A 16-entry table lookup indexes with the low 4 bits of each lane only: "& 15", "- 8" and int->float in one
  // instruction (AVX2's 8-entry permute cannot do this).
  TK_VEC I prepare(I w) { return w; }
  TK_VEC F nibble(I w, int i) {  // i is a constant once the nibble loop is unrolled
    return _mm512_permutexvar_ps(i ? _mm512_srli_epi32(w, 4 * i) : w,
                                 _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f,
                                                4.f, 5.f, 6.f, 7.f));
  }
  // In the unrolled nibble loop a running shift by 4 is faster than shifting each nibble from the word (measured).
  TK_VEC F next_nibble(I& w, int) {
    const F v = nibble(w, 0);
    w = _mm512_srli_epi32(w, 4);
    return v;
  }
  static constexpr float kStreamScale = 1.f;
  TK_VEC F stream_nibble(I& w, int i) { return next_nibble(w, i); }
  TK_VEC F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  TK_VEC F load_bf16(const uint16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
};
#include "int4_mm_simd.h"
#undef TK_VEC
#undef TK_ATTR
}  // namespace avx512
#endif  // TK_X86_SIMD

// ---- run-time choice ---------------------------------------------------------------------------------------------
struct Kernels {
  int64_t nb;           // columns per block of fused_block
  int64_t fused_max_m;  // above this many rows, dequantize + BLAS instead
  int64_t w;            // fp32 lanes per vector
  int64_t stream_max_m; // up to this many rows (RMAX), the streaming path
  void (*fused_block)(const Problem&, int64_t, int64_t, int64_t, float*, int32_t*);
  void (*dequant_rows)(const Problem&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*);
  void (*stream_columns)(const Problem&, int64_t, int64_t, int64_t, float*, int32_t*);
  void (*row_to_f32)(Dt, const void*, int64_t, int64_t, float*, int64_t);
  int64_t dequant_chunk = int64_t(1) << 20;  // weights per chunk of run_dequant_mm
  // The streaming path reads x times stream_x_scale (1 / Vec::kStreamScale), copied once per call. A nonzero |x|
  // below stream_x_exact_min would lose bits there (x 2^-28 under 2^-126): such a call takes the block path.
  float stream_x_scale = 1.f, stream_x_exact_min = 0.f;
};

// fused_max_m: measured on a 2-core Zen machine (4096 x 4096, g128) against dequantize + MKL sgemm.
const Kernels kScalar{scalar::NB, 8, scalar::W, scalar::RMAX, scalar::fused_block, scalar::dequant_rows,
                      scalar::stream_columns, scalar::row_to_f32};
#if TK_X86_SIMD
const Kernels kAvx2{avx2::NB, 128, avx2::W, avx2::RMAX, avx2::fused_block, avx2::dequant_rows, avx2::stream_columns,
                    avx2::row_to_f32, int64_t(1) << 20, 1.f / avx2::Vec::kStreamScale, 0x1p-98f};
// The same on a core that splits 256-bit operations (cpu::cpu_splits_256bit: Zen 1), where the fused loop runs at
// 0.54-0.75x sgemm's speed per product (M = 128, 576 x 576 to 4096 x 4096; 2-core EPYC 7001): dequantize + BLAS
// from 25 rows (measured crossover 24-32 rows at 576 x 1536 g32, ~24 at 4096 x 4096; SmolLM2's prefill at 128
// rows ran its layers 1.8x slower than fp32 F.linear on the fused loop, 1.07x on the BLAS path). Chunks of 256k
// weights (1 MiB of fp32: the two cores' L2) there: at M = 32 / 128 the 576-wide layers took 1.0-1.55x / 0.92-1.18x
// fp32 F.linear's time against 1.17-1.70x / 1.0-1.21x with 1M-weight chunks (interleaved runs, 3 each).
const Kernels kAvx2HalfWidth = [] {
  Kernels k = kAvx2;  // kAvx2 but for these two thresholds (defined above: initialized first)
  k.fused_max_m = 24;
  k.dequant_chunk = int64_t(1) << 18;
  return k;
}();
static_assert(0x1p-98f / avx2::Vec::kStreamScale == 0x1p-126f, "stream_x_exact_min: x 2^-28 must stay normal");
static_assert(scalar::Vec::kStreamScale == 1.f && avx512::Vec::kStreamScale == 1.f, "stream_x_scale is 1 there");
// AVX-512: fused at every M (2.2x faster than dequantize + MKL at M = 256 and 1024 on AMD, where MKL runs AVX2
// code).
const Kernels kAvx512{avx512::NB, INT64_MAX, avx512::W, avx512::RMAX, avx512::fused_block, avx512::dequant_rows,
                      avx512::stream_columns, avx512::row_to_f32};
// The same on an Intel CPU with AMX (the level that tells one apart), where MKL runs its AVX-512 sgemm: measured on
// a 2-core Sapphire Rapids (4096 x 4096 g128, fp32 x), sgemm on the dequantized weight takes 0.80x / 0.69x / 0.76x
// the fused path's time at M = 128 / 256 / 512, and 1.24x at M = 64.
// Chunks of 4M weights there: MKL's sgemm on 64-column chunks (K = 14336) lost ~25% (M = 256: 345 -> 256 ms).
const Kernels kAvx512Amx{avx512::NB, 96, avx512::W, avx512::RMAX, avx512::fused_block, avx512::dequant_rows,
                         avx512::stream_columns, avx512::row_to_f32, int64_t(1) << 22};
#endif

const Kernels& select_kernels() {
  const int level = cpu::isa_level();
#if TK_X86_SIMD
  if (level >= cpu::kAmxBf16Isa) return kAvx512Amx;
  if (level >= cpu::kAvx512Isa) return kAvx512;
  if (level >= cpu::kAvx2Isa) return cpu::cpu_splits_256bit() ? kAvx2HalfWidth : kAvx2;
#endif
  (void)level;
  return kScalar;
}

constexpr int64_t kPanelRows = 256;  // rows of x per work item of the fused path

std::vector<Span> make_spans(int64_t K, int64_t gs, int64_t G) {
  std::vector<Span> spans(G);
  for (int64_t g = 0; g < G; ++g) {
    Span& sp = spans[g];
    sp.k0 = g * gs;
    sp.k1 = std::min(K, sp.k0 + gs);
    const int64_t first_full = (sp.k0 + 7) / 8, end_full = sp.k1 / 8;  // words entirely inside [k0, k1)
    sp.head_w = sp.k0 % 8 ? sp.k0 / 8 : -1;
    sp.tail_w = (sp.k1 % 8 && sp.k1 / 8 != sp.head_w) ? sp.k1 / 8 : -1;  // head == tail: the head mask has it all
    sp.mid_w0 = first_full;
    sp.mid_n = std::max<int64_t>(0, end_full - first_full);
  }
  return spans;
}

void run_fused(const Kernels& kern, const Problem& P) {
  // Work items are (panel of <= kPanelRows rows) x (block of nb columns), panel-major, split into one contiguous
  // range per thread: decode splits the columns; a long prompt splits panels too, and a thread's y buffer
  // (panel x nb floats) stays in L2.
  const int64_t nblocks = (P.N + kern.nb - 1) / kern.nb;
  const int64_t npanels = (P.M + kPanelRows - 1) / kPanelRows;
  const int64_t panel_rows = std::min(P.M, kPanelRows);
  // an item is K * nb * rows multiply-adds; don't wake a second thread for less than ~64k of them
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, P.K * kern.nb * panel_rows));
  at::parallel_for(0, npanels * nblocks, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch((panel_rows + 2) * kern.nb);
    std::vector<int32_t> qpad;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m0 = (i / nblocks) * kPanelRows, n0 = (i % nblocks) * kern.nb;
      if (P.N - n0 < kern.nb && qpad.empty()) qpad.resize(((P.K + 7) / 8) * kern.nb);
      kern.fused_block(P, m0, std::min(P.M, m0 + kPanelRows), n0, scratch.data(), qpad.data());
    }
  });
}

void run_stream(const Kernels& kern, const Problem& P) {
  // One contiguous column range per thread (whole vectors, so a column's lane arithmetic never depends on the
  // split), worked in strips whose scratch (3 M + 2 floats per column) stays in L1: 2048 / M columns.
  const int64_t nvec = (P.N + kern.w - 1) / kern.w;
  const int64_t sw = std::max<int64_t>(kern.w, (2048 / P.M) / kern.w * kern.w);
  // don't wake a second thread for less than ~32k multiply-adds
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, P.K * P.M * kern.w));
  at::parallel_for(0, nvec, grain, [&](int64_t v0, int64_t v1) {
    // no wider than this thread's columns, and not zeroed (stream_strip writes before it reads): at one token a
    // 2048-wide zeroed scratch was a 40 KiB memset per call, more than a small layer's product
    const int64_t width = std::min(sw, (v1 - v0) * kern.w);
    std::unique_ptr<float[]> scratch(new float[(3 * P.M + 2) * width + kern.w]);
    int32_t qt[64];  // kern.w words (<= 16)
    kern.stream_columns(P, v0 * kern.w, std::min(P.N, v1 * kern.w), width, scratch.get(), qt);
  });
}

void run_dequant_mm(const Kernels& kern, const Problem& P, const at::Tensor& x32, const at::Tensor& bias32,
                    at::Tensor& out32) {
  // ~4 MiB of fp32 weight per chunk (kern.dequant_chunk): big enough for an efficient GEMM, small enough to stay
  // in cache-ish sizes and to bound the memory of huge layers (a 128k-vocab head is never dequantized whole).
  int64_t nb = std::max<int64_t>(64, (kern.dequant_chunk / P.K) / 64 * 64);
  nb = std::min(nb, P.N);
  at::Tensor wbuf = at::empty({P.K * nb}, x32.options());
  for (int64_t n0 = 0; n0 < P.N; n0 += nb) {
    const int64_t nc = std::min(nb, P.N - n0);
    float* w = wbuf.data_ptr<float>();
    at::parallel_for(0, P.K, std::max<int64_t>(1, 16384 / nc), [&](int64_t k0, int64_t k1) {
      std::vector<float> so(2 * nc);
      kern.dequant_rows(P, k0, k1, n0, nc, w + k0 * nc, so.data(), so.data() + nc);
    });
    at::Tensor out_chunk = out32.narrow(1, n0, nc);
    const at::Tensor w_chunk = wbuf.narrow(0, 0, P.K * nc).view({P.K, nc});
    if (bias32.defined()) {
      at::addmm_out(out_chunk, bias32.narrow(0, n0, nc), x32, w_chunk);  // bias + x @ w, in fp32
    } else {
      at::mm_out(out_chunk, x32, w_chunk);
    }
  }
}

// ---- bf16 x on a CPU with AMX tiles (cpu::kAmxBf16Isa) ---------------------------------------------------------
// Two paths, both multiplying the weight dequantized in fp32 (q s + o) and rounded to bf16, with fp32 sums and one
// rounding of each output (the bias added before it): torch's own bf16 F.linear on the dequantized weight.
//   kAmxTileMinM..kAmxTileMaxM rows: run_amx_bf16, our tile loop (below);
//   more rows: run_dequant_mm_bf16, column chunks dequantized to bf16 and handed to at::mm (oneDNN's AMX GEMM); the
//   bias joins inside the GEMM, as a weight row that x's appended column of ones meets.
// Measured on a 2-core Sapphire Rapids, 4096 x 4096 g128 (weight in cache unless said; bench/results/
// cpu-xeon-2026-12-02/ has the figures with weights from DRAM). The fused AVX-512 path is FMA-bound at ~0.11
// TFLOP/s. M = 1024: fused 270 ms, at::mm path 30 ms, tile loop 53 ms (it reads x again for every 32 columns).
// M = 256: tile loop 8.2 ms, at::mm path 10.6. M = 16: tile loop 2.5 ms, at::mm path 3.2, fused 4.0. Weights from
// DRAM, tile loop vs fused (the tile loop dequantizes the whole weight whatever M): M = 12: 4096 x 4096 2.4 vs
// 4.8 ms, 4096 x 14336 8.6 vs 12.0, 14336 x 4096 12.1 vs 10.7; M = 8: 2.6 vs 3.3, 8.4 vs 9.3, 11.9 vs 7.4.
constexpr int64_t kAmxTileMinM = 12, kAmxTileMaxM = 512;

#if TK_X86_SIMD
// The groups of k = 8w .. 8w + 7 (one 64-bit division per word row, not per k: a division per k took more time
// than the rest of the dequantization, ~1 cycle per weight on a Sapphire Rapids).
inline void word_groups(int64_t w, int64_t gs, int64_t (&g)[8]) {
  int64_t gi = 8 * w / gs, next = (gi + 1) * gs;
  for (int i = 0; i < 8; ++i) {
    if (8 * w + i >= next) {
      ++gi;
      next += gs;
    }
    g[i] = gi;
  }
}

// Word rows [w0, w1) of columns [n0, n0 + nc) dequantized to bf16: wout[k][n - n0] = bf16(q s + o), k < K, rows
// ldw apart; s32, o32: the scales and offsets as fp32 (G, N). Each packed vector is loaded once for its 8 k's (the
// fp32 dequant_rows reloads it per k). AMX CPUs have AVX512_BF16, whose conversion rounds to nearest even.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dequant_bf16_words(
    const Problem& P, const float* s32, const float* o32, int64_t w0, int64_t w1, int64_t n0, int64_t nc,
    uint16_t* wout, int64_t ldw) {
  const __m512 table = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f,
                                      14.f, 15.f);
  for (int64_t w = w0; w < w1; ++w) {
    const int32_t* qrow = P.q + w * P.N + n0;
    const int kn = static_cast<int>(std::min<int64_t>(8, P.K - 8 * w));
    int64_t gk[8];
    word_groups(w, P.gs, gk);
    for (int64_t n = 0; n < nc; n += 16) {
      const __mmask16 m = nc - n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nc - n)) - 1u);
      __m512i word = _mm512_maskz_loadu_epi32(m, qrow + n);
      for (int i = 0; i < kn; ++i) {
        const int64_t k = 8 * w + i, g = gk[i];
        const __m512 sv = _mm512_maskz_loadu_ps(m, s32 + g * P.N + n0 + n);
        const __m512 ov = _mm512_maskz_loadu_ps(m, o32 + g * P.N + n0 + n);
        const __m512 v = _mm512_fmadd_ps(_mm512_permutexvar_ps(word, table), sv, ov);
        word = _mm512_srli_epi32(word, 4);
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(wout + k * ldw + n, m, h);
      }
    }
  }
}
#endif

#if TK_X86_SIMD
at::Tensor run_dequant_mm_bf16(const Kernels& kern, const Problem& P, const at::Tensor& x,
                               const std::optional<at::Tensor>& bias) {
  const bool has_bias = P.bias != nullptr;
  const int64_t Ka = has_bias ? P.K + 16 : P.K;  // + the bias row, padded so the GEMM keeps a friendly K
  const auto bf16 = x.options().dtype(at::kBFloat16);
  at::Tensor xa = x.contiguous();
  if (has_bias) {
    xa = at::zeros({P.M, Ka}, bf16);
    xa.narrow(1, 0, P.K).copy_(x);
    xa.select(1, P.K).fill_(1.0);
  }
  const at::Tensor s32 = at::empty({P.G, P.N}, x.options().dtype(at::kFloat));
  const at::Tensor o32 = at::empty({P.G, P.N}, x.options().dtype(at::kFloat));
  at::parallel_for(0, P.G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      kern.row_to_f32(P.sdt, P.s, g * P.N, P.N, s32.data_ptr<float>() + g * P.N, P.N);
      kern.row_to_f32(P.odt, P.o, g * P.N, P.N, o32.data_ptr<float>() + g * P.N, P.N);
    }
  });
  // ~2 MiB of bf16 weight per chunk: it stays in L2 between the dequantization and the GEMM
  int64_t nb = std::max<int64_t>(64, ((int64_t(1) << 20) / P.K) / 64 * 64);
  nb = std::min(nb, P.N);
  at::Tensor wb = at::zeros({Ka, nb}, bf16);
  at::Tensor out = at::empty({P.M, P.N}, bf16);
  for (int64_t n0 = 0; n0 < P.N; n0 += nb) {
    const int64_t nc = std::min(nb, P.N - n0);
    at::Tensor wc = wb.narrow(1, 0, nc);
    uint16_t* w = reinterpret_cast<uint16_t*>(wb.data_ptr<at::BFloat16>());
    at::parallel_for(0, (P.K + 7) / 8, std::max<int64_t>(1, 2048 / nc), [&](int64_t w0, int64_t w1) {
      dequant_bf16_words(P, s32.data_ptr<float>(), o32.data_ptr<float>(), w0, w1, n0, nc, w, nb);
    });
    if (has_bias) wc.select(0, P.K).copy_(bias->narrow(0, n0, nc));
    at::Tensor out_chunk = out.narrow(1, n0, nc);
    at::mm_out(out_chunk, xa, wc);
  }
  return out;
}

// The tile loop: the weight is dequantized as run_dequant_mm_bf16 does (w = bf16(fp32 q s + o)), but straight into
// the tile layout the multiply reads, a panel of 32 columns at a time in L2, and multiplied there: no GEMM call, no
// reorder by a library, no dequantized weight in memory. Per panel: B tiles for all of K (VNNI pairs: row r of a
// 32-k block holds k = 2r and 2r + 1 for 16 columns), then every 32-row block of x (two A tiles, zero-padded rows)
// against them into four 16 x 16 fp32 accumulator tiles (two when the block has <= 16 real rows); the bias joins the
// fp32 sums before the one rounding to bf16. Products of bf16 values are exact in fp32 and TDPBF16PS sums them in
// fp32 (denormal inputs and results count as zero), so the arithmetic is torch's bf16 F.linear on the dequantized
// weight, which the tests' allowance for this path describes.
#define TK_AMX_ATTR __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

// Linux gives a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA); once.
// Elsewhere the tile loop is not used (the fused or at::mm paths run instead).
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// np panels of 32 columns [n0, n0 + nc), nc <= 32 np, as bf16 B tiles, panel p at bp + p panel_elems:
// bp[p panel_elems + ((kb * 2 + j) * 16 + r) * 32 + 2 c + (k & 1)] = w(k, n0 + 32 p + 16 j + c) for
// k = 32 kb + 2 r + (k & 1); zero past K and past nc.
TK_AMX_ATTR void amx_pack_panel(const Problem& P, const float* s32, const float* o32, int64_t n0, int64_t nc,
                                int np, int64_t kblocks, uint16_t* bp) {
  const int64_t panel_elems = kblocks * 2 * 16 * 32;
  const __m512 table = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f,
                                      14.f, 15.f);
  // element 2c (k even) of a VNNI row from lane c of the first 16, element 2c + 1 from lane c of the second 16
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i inter = _mm512_load_si512(kInterleave);
  const int64_t K8 = (P.K + 7) / 8;
  for (int64_t w = 0; w < kblocks * 4; ++w) {
    // the panel's piece of a packed row is 128 bytes, a row (often a page) apart: no hardware prefetcher follows
    // that, so fetch kAhead rows ahead (4096 x 4096, 2 threads: the whole pack 6.2 -> 3.3 ms)
    constexpr int64_t kAhead = 16;
    if (w + kAhead < K8)
      for (int jj = 0; jj < 2 * np; ++jj) __builtin_prefetch(P.q + (w + kAhead) * P.N + n0 + 16 * jj);
    int64_t gk[8];
    word_groups(w, P.gs, gk);
    for (int jj = 0; jj < 2 * np; ++jj) {
      const int j = jj % 2;
      const int64_t c0 = 16 * jj, cn = std::max<int64_t>(0, std::min<int64_t>(16, nc - c0));
      const __mmask16 m = cn >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cn) - 1u);
      // 4 VNNI rows of tile j of panel jj / 2: k = 8w .. 8w + 7
      uint16_t* rowp = bp + jj / 2 * panel_elems + ((w / 4 * 2 + j) * 16 + (w % 4) * 4) * 32;
      if (w >= K8 || cn == 0) {
        for (int p = 0; p < 4; ++p) _mm512_store_si512(rowp + 32 * p, _mm512_setzero_si512());
        continue;
      }
      __m512i word = _mm512_maskz_loadu_epi32(m, P.q + w * P.N + n0 + c0);
      __m512 v[8];
      if (gk[0] == gk[7] && 8 * w + 8 <= P.K) {  // the usual word: one group, all 8 k's (2 loads, not 16)
        const __m512 sv = _mm512_maskz_loadu_ps(m, s32 + gk[0] * P.N + n0 + c0);
        const __m512 ov = _mm512_maskz_loadu_ps(m, o32 + gk[0] * P.N + n0 + c0);
        for (int i = 0; i < 8; ++i) {
          v[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(word, table), sv, ov);  // masked-off lanes: 0 * 0 + 0
          word = _mm512_srli_epi32(word, 4);
        }
      } else for (int i = 0; i < 8; ++i) {
        const int64_t k = 8 * w + i;
        if (k < P.K) {
          const int64_t g = gk[i];
          v[i] = _mm512_maskz_fmadd_ps(m, _mm512_permutexvar_ps(word, table),
                                       _mm512_maskz_loadu_ps(m, s32 + g * P.N + n0 + c0),
                                       _mm512_maskz_loadu_ps(m, o32 + g * P.N + n0 + c0));
        } else {
          v[i] = _mm512_setzero_ps();
        }
        word = _mm512_srli_epi32(word, 4);
      }
      for (int p = 0; p < 4; ++p) {
        const __m512i pair = (__m512i)_mm512_cvtne2ps_pbh(v[2 * p + 1], v[2 * p]);
        _mm512_store_si512(rowp + 32 * p, _mm512_permutexvar_epi16(inter, pair));
      }
    }
  }
}

// Columns [n0, n0 + 32) of out (fewer at N) for every 32-row block of x, from the panel's B tiles bpp; the tile
// config is loaded. cbuf: 32 x 32 floats of scratch.
TK_AMX_ATTR void amx_panel_rows(const Problem& P, const uint16_t* xp, int64_t M32, int64_t kblocks,
                                const uint16_t* bpp, int64_t n0, const float* bias, at::BFloat16* out,
                                float (*cbuf)[32]) {
  const int64_t nc = std::min<int64_t>(32, P.N - n0);
  const int64_t ldx = kblocks * 32 * 2;  // bytes per row of xp
  for (int64_t m0 = 0; m0 < M32; m0 += 32) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if (P.M - m0 <= 16) {  // rows m0 + 16.. are padding: half the tile work (M = 16 is a common decode batch)
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const uint16_t* b = bpp + kb * 2 * 16 * 32;
        _tile_loadd(4, xp + m0 * kblocks * 32 + kb * 32, ldx);
        _tile_loadd(6, b, 64);
        _tile_loadd(7, b + 16 * 32, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
      }
    } else {
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const uint16_t* a = xp + m0 * kblocks * 32 + kb * 32;
        const uint16_t* b = bpp + kb * 2 * 16 * 32;
        _tile_loadd(4, a, ldx);
        _tile_loadd(5, a + 16 * kblocks * 32, ldx);
        _tile_loadd(6, b, 64);
        _tile_loadd(7, b + 16 * 32, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, &cbuf[0][0], 128);
    _tile_stored(1, &cbuf[0][16], 128);
    _tile_stored(2, &cbuf[16][0], 128);
    _tile_stored(3, &cbuf[16][16], 128);
    const __mmask16 lo = nc >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nc) - 1u);
    const __mmask16 hi = nc >= 32 ? __mmask16(0xFFFF) : nc > 16 ? __mmask16((1u << (nc - 16)) - 1u) : __mmask16(0);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(lo, bias + n0) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(hi, bias + n0 + 16) : _mm512_setzero_ps();
    for (int64_t r = 0; r < 32 && m0 + r < P.M; ++r) {
      uint16_t* o = reinterpret_cast<uint16_t*>(out + (m0 + r) * P.N + n0);
      _mm256_mask_storeu_epi16(o, lo, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(&cbuf[r][0]), b0)));
      if (hi)
        _mm256_mask_storeu_epi16(o + 16, hi,
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(&cbuf[r][16]), b1)));
    }
  }
}

// out (M, N) bf16 = x (M, K) bf16 @ W [+ bias] for panels [p0, p1) of 32 columns: xp is x zero-padded to
// (M32, 32 kblocks) bf16.
TK_AMX_ATTR void amx_panels(const Problem& P, const float* s32, const float* o32, const uint16_t* xp, int64_t M32,
                            int64_t kblocks, const float* bias, at::BFloat16* out, int64_t p0, int64_t p1) {
  const int64_t panel_elems = kblocks * 2 * 16 * 32;
  // Panels packed per walk down the rows: as many as fit ~1 MiB of B tiles, at most 4. A walk reads 128 bytes of
  // each packed row per panel, a row (a page or more) apart: with a model's weights coming from DRAM, reading 512
  // bytes per page is what pays (2-core Sapphire Rapids, weights rotated past the 105 MiB L3, bf16 x, M = 16 / 64:
  // 4096 x 4096 4.6 / 6.6 ms with one panel, 3.8 / 5.6 with four, 4.7 / 6.4 with eight; 4096 x 14336 16.9 / 25.9,
  // 11.9 / 17.0, 13.1 / 20.6), while tiles beyond L2 slow the M loop down (14336 x 4096, 0.9 MiB a panel:
  // 9.7 / 15.5 ms with one, 15.7 / 24.0 with two).
  const int np = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4, (int64_t(1) << 20) / (panel_elems * 2))));
  std::vector<uint16_t> bp_raw(np * panel_elems + 32);  // 64-byte aligned below: the tile rows are stored whole
  uint16_t* bp = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(bp_raw.data()) + 63) & ~uintptr_t(63));
  alignas(64) float cbuf[32][32];
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {  // tmm0-3: C (16 x 16 fp32), tmm4-5: A (16 x 32 bf16), tmm6-7: B (16 x 16 pairs)
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  for (int64_t group0 = p0; group0 < p1; group0 += np) {
    const int cnt = static_cast<int>(std::min<int64_t>(np, p1 - group0));
    amx_pack_panel(P, s32, o32, group0 * 32, std::min<int64_t>(32 * cnt, P.N - group0 * 32), cnt, kblocks, bp);
    asm volatile("" ::: "memory");  // the tile loads are asm that does not say it reads bp
    for (int64_t panel = group0; panel < group0 + cnt; ++panel)
      amx_panel_rows(P, xp, M32, kblocks, bp + (panel - group0) * panel_elems, panel * 32, bias, out, cbuf);
  }
  _tile_release();
}

at::Tensor run_amx_bf16(const Kernels& kern, const Problem& P, const at::Tensor& x) {
  const int64_t kblocks = (P.K + 31) / 32, M32 = (P.M + 31) / 32 * 32;
  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor s32 = at::empty({P.G, P.N}, f32), o32 = at::empty({P.G, P.N}, f32);
  at::parallel_for(0, P.G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      kern.row_to_f32(P.sdt, P.s, g * P.N, P.N, s32.data_ptr<float>() + g * P.N, P.N);
      kern.row_to_f32(P.odt, P.o, g * P.N, P.N, o32.data_ptr<float>() + g * P.N, P.N);
    }
  });
  at::Tensor xp = at::zeros({M32, kblocks * 32}, x.options());
  xp.narrow(0, 0, P.M).narrow(1, 0, P.K).copy_(x);
  at::Tensor out = at::empty({P.M, P.N}, x.options());
  const int64_t panels = (P.N + 31) / 32;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    amx_panels(P, s32.data_ptr<float>(), o32.data_ptr<float>(),
               reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>()), M32, kblocks, P.bias,
               out.data_ptr<at::BFloat16>(), p0, p1);
  });
  return out;
}
#endif

at::Tensor int4_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t group_size, const std::optional<at::Tensor>& bias) {
  const cpu::Int4Args a = cpu::check_int4_args("int4_mm", x, qweight, scales, offsets, group_size, bias);
  const int64_t M = a.M, K = a.K, N = a.N, G = a.G;
  const Dt sdt = a.sdt, odt = a.odt;
  const at::Tensor& bias32 = a.bias32;
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  if (K == 0)  // a fresh tensor either way: never a view of the caller's bias
    return bias32.defined() ? bias->expand({M, N}).clone(at::MemoryFormat::Contiguous) : at::zeros({M, N}, x.options());
  const Kernels& kern = select_kernels();
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous(), o = offsets.contiguous();
  Problem P{};
  P.q = q.data_ptr<int32_t>();
  P.s = s.data_ptr();
  P.o = o.data_ptr();
  P.sdt = sdt;
  P.odt = odt;
  P.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  P.M = M;
  P.K = K;
  P.N = N;
  P.G = G;
  P.gs = group_size;
#if TK_X86_SIMD
  if (x.scalar_type() == at::kBFloat16 && cpu::isa_level() >= cpu::kAmxBf16Isa) {
    if (M >= kAmxTileMinM && M <= kAmxTileMaxM && amx_permitted()) return run_amx_bf16(kern, P, x);
    if (M > kAmxTileMaxM) return run_dequant_mm_bf16(kern, P, x, bias);
  }
#endif

  const at::Tensor x32 = x.scalar_type() == at::kFloat ? x.contiguous() : x.contiguous().to(at::kFloat);
  at::Tensor out32 = at::empty({M, N}, x32.options());
  P.x = x32.data_ptr<float>();
  P.out = out32.data_ptr<float>();

  if (M <= kern.fused_max_m) {
    const std::vector<Span> spans = make_spans(K, group_size, G);
    std::vector<float> xsum(M * G);  // offsets[g][n] * sum_{k in g} x[k]: the offset term costs one FMA per group
    const bool stream = M <= kern.stream_max_m && std::getenv("TURBOKERNELS_INT4_BLOCK") == nullptr;
    const float xscale = stream ? kern.stream_x_scale : 1.f, xmin = stream ? kern.stream_x_exact_min : 0.f;
    std::vector<float> xscaled(xscale != 1.f ? M * K : 0);  // x as the streaming kernel reads it
    std::vector<char> row_exact(M, 1);
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m_begin, int64_t m_end) {
      for (int64_t m = m_begin; m < m_end; ++m) {
        const float* xr = P.x + m * K;
        for (int64_t g = 0; g < G; ++g) {
          // double: free here (once per row), and the offset term is the one that cancels against the q*s term
          double part[4] = {0.0, 0.0, 0.0, 0.0};  // 4 chains: not latency-bound
          int64_t k = spans[g].k0;
          for (; k + 4 <= spans[g].k1; k += 4)
            for (int i = 0; i < 4; ++i) part[i] += xr[k + i];
          for (; k < spans[g].k1; ++k) part[0] += xr[k];
          xsum[m * G + g] = static_cast<float>((part[0] + part[1]) + (part[2] + part[3]));
        }
        if (xscale != 1.f) {
          bool ok = true;
          for (int64_t k = 0; k < K; ++k) {
            xscaled[m * K + k] = xr[k] * xscale;
            ok &= !(std::fabs(xr[k]) < xmin && xr[k] != 0.f);
          }
          row_exact[m] = ok;
        }
      }
    });
    P.xsum = xsum.data();
    P.spans = spans.data();
    if (stream && std::all_of(row_exact.begin(), row_exact.end(), [](char c) { return c != 0; })) {
      if (xscale != 1.f) P.x = xscaled.data();
      run_stream(kern, P);
    } else {
      run_fused(kern, P);
    }
  } else {
    run_dequant_mm(kern, P, x32, bias32, out32);
  }
  return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
}

}  // namespace
}  // namespace int4_cpu
}  // namespace turbokernels

TORCH_LIBRARY_IMPL(turbokernels_C, CPU, m) {
  m.impl("int4_mm", &turbokernels::int4_cpu::int4_mm_cpu);
}
