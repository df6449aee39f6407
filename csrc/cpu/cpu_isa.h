// Which SIMD variant a CPU kernel runs: the best the CPU supports, capped by TURBOKERNELS_CPU_ISA=scalar|avx2
// (a test/debug knob, read per call: cheap). Kernels compile one copy per ISA with function-level target
// attributes and pick one with this, so the build needs no -march.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace turbokernels {
namespace cpu {

enum IsaLevel : int { kScalarIsa = 0, kAvx2Isa = 1, kAvx512Isa = 2 };

inline int supported_isa_level() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return int(kAvx512Isa);
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
  }
  return level;
}

}  // namespace cpu
}  // namespace turbokernels
