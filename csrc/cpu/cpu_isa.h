// Which SIMD variant a CPU kernel runs: the best the CPU supports, capped by TURBOKERNELS_CPU_ISA=scalar|avx2|avx512
// (a test/debug knob, read per call: cheap). Kernels compile one copy per ISA with function-level target
// attributes and pick one with this, so the build needs no -march. Also what every CPU kernel file shares:
// TK_X86_SIMD (whether the x86 copies exist), the activation/scale dtypes (Dt) and one element's fp32 value.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define TK_X86_SIMD 1
// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics as "maybe uninitialized".
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <cpuid.h>
#include <immintrin.h>
#else
#define TK_X86_SIMD 0
#endif

namespace turbokernels {
namespace cpu {

enum class Dt : int { F32, F16, BF16 };

// src[i] as fp32 (plain C++: called from every ISA's copy, it is the baseline code the linker may keep)
inline float scalar_to_f32(Dt dt, const void* src, int64_t i) {
  switch (dt) {
    case Dt::F32: return static_cast<const float*>(src)[i];
    case Dt::F16: return static_cast<float>(static_cast<const c10::Half*>(src)[i]);
    default: return static_cast<float>(static_cast<const c10::BFloat16*>(src)[i]);
  }
}

// x (M, K) of any strides in fp32/fp16/bf16 -> a new fp32 (M, ld) tensor, ld >= K, columns K.. zero: the padded
// copy the kernels read. One pass, no dispatcher calls: at::zeros + narrow + copy_ cost ~2 us a call at one token
// (three ops and a TensorIterator), as much as a small layer's product.
inline at::Tensor x_f32_padded(const at::Tensor& x, int64_t ld) {
  const int64_t M = x.size(0), K = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  at::Tensor out = at::empty({M, ld}, x.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  const Dt dt = x.scalar_type() == at::kFloat ? Dt::F32 : x.scalar_type() == at::kHalf ? Dt::F16 : Dt::BF16;
  const char* src = static_cast<const char*>(x.data_ptr());
  const int64_t esize = x.element_size();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, ld)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* d = dst + m * ld;
      const char* row = src + m * s0 * esize;
      if (dt == Dt::F32 && s1 == 1) std::memcpy(d, row, K * sizeof(float));
      else
        for (int64_t k = 0; k < K; ++k) d[k] = scalar_to_f32(dt, row, k * s1);
      std::fill(d + K, d + ld, 0.f);
    }
  });
  return out;
}

// Ordered: a kernel takes the best level it has a copy for (level >= ...). kAmxBf16Isa: AVX-512 and AMX-BF16
// tiles (Sapphire Rapids and later; an Intel CPU, whose MKL runs AVX-512 code): there a bf16 tile multiply outruns
// any AVX-512 FMA loop (vdpbf16ps is no faster per product than fp32 FMA on Sapphire Rapids: measured 2 cycles each,
// 4 per cycle for 16-lane FMA).
enum IsaLevel : int { kScalarIsa = 0, kAvx2Isa = 1, kAvx512Isa = 2, kAmxBf16Isa = 3 };

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
// CPUID.(EAX=7,ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE; and AVX512_BF16 (every such CPU has it; the AMX paths'
// dequantization uses its conversions, so a VM that hides it does not get them)
inline bool cpu_has_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 22 & 1u) && (d >> 24 & 1u) && __builtin_cpu_supports("avx512bf16");
}
#endif

// AMD Zen 1 / Zen+ (family 17h, models 00h-2Fh) and Hygon Dhyana (family 18h, the same core) execute each 256-bit
// AVX2 operation as two 128-bit halves: there the FMA loops of our kernels lose to the BLAS at fewer rows than on
// cores with full-width units (int4_mm.cpp, kAvx2HalfWidth).
inline bool cpu_splits_256bit() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const bool split = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    unsigned family = (a >> 8) & 0xFu, model = (a >> 4) & 0xFu;
    if (family == 0xFu) {
      family += (a >> 20) & 0xFFu;
      model |= ((a >> 16) & 0xFu) << 4;
    }
    return (family == 0x17u && model < 0x30u) || family == 0x18u;
  }();
  return split;
#else
  return false;
#endif
}

inline int supported_isa_level() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
      return int(cpu_has_amx_bf16() ? kAmxBf16Isa : kAvx512Isa);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return int(kAvx2Isa);  // AVX2 CPUs have F16C
    return int(kScalarIsa);
  }();
  return level;
#else
  return kScalarIsa;
#endif
}

inline int isa_level() {
  int level = supported_isa_level();
  if (const char* cap = std::getenv("TURBOKERNELS_CPU_ISA")) {
    if (std::strcmp(cap, "scalar") == 0) level = kScalarIsa;
    else if (std::strcmp(cap, "avx2") == 0) level = std::min(level, int(kAvx2Isa));
    else if (std::strcmp(cap, "avx512") == 0) level = std::min(level, int(kAvx512Isa));
  }
  return level;
}

}  // namespace cpu
}  // namespace turbokernels
