// int4 -> fp16/bf16 in registers, for the int4 tensor-core kernels (int4_mm.cuh: B fragments, sparse24_int4_mm.cuh:
// sparse A fragments). A lane's 32-bit word holds 8 nibbles; pair j (0..3) is the nibbles at bits 4j and 16 + 4j,
// which become one register of two 16-bit values (lower half: bits 4j). Each function rounds the weight to T once:
//  * half: lop3 puts the two nibbles into the mantissas of a magic number M (fp16 1024, bf16 128: one ulp is 1
//    there), so the pair reads M + q exactly; an fma with -M gives q exactly; fma2 q * s + o, one rounding;
//  * zero (integer zero points, o = -z s: GPTQ, AWQ): the fma with -(M + z) gives q - z exactly; fma2 (q - z) * s;
//  * float (scales or offsets T cannot hold): the same lop3 with fp32's magic 2^23, fp32 fma, one cvt to the pair.
#pragma once

#include "cuda/arch.cuh"

namespace tk_int4_dequant {
inline namespace TK_BUILD {  // as the kernels (arch.cuh)

using namespace tk_arch;

template <typename T>
struct Magic {
  static constexpr uint32_t M = T::bf16 ? 0x43004300u : 0x64006400u;      // (128, 128) / (1024, 1024)
  static constexpr uint32_t NEG_M = T::bf16 ? 0xC300C300u : 0xE400E400u;  // -M
  static constexpr uint32_t ONE = T::bf16 ? 0x3F803F80u : 0x3C003C00u;
};

// M + q of pair j: (a & b) | c puts the nibbles into the low mantissa bits of M
template <typename T>
TK_DEVICE uint32_t magic_pair(uint32_t word, int j) {
  return lop3<0xEA>(word >> (4 * j), 0x000F000Fu, Magic<T>::M);
}

// q s + o; s2 = (s, s), o2 = (o, o) in T
template <typename T>
TK_DEVICE uint32_t pair_half(uint32_t word, int j, uint32_t s2, uint32_t o2) {
  const uint32_t q = fma2<T>(magic_pair<T>(word, j), Magic<T>::ONE, Magic<T>::NEG_M);  // exact: (M + q) - M
  return fma2<T>(q, s2, o2);
}

// (q - z) s; s2 = (s, s), neg_mz2 = (-(M + z), -(M + z)) in T
template <typename T>
TK_DEVICE uint32_t pair_zero(uint32_t word, int j, uint32_t s2, uint32_t neg_mz2) {
  const uint32_t q = fma2<T>(magic_pair<T>(word, j), Magic<T>::ONE, neg_mz2);  // exact: (M + q) - (M + z)
  return fma2<T>(q, s2, 0u);
}

// q s + o in fp32, then one rounding of the pair to T
template <typename T>
TK_DEVICE uint32_t pair_float(uint32_t word, int j, float s, float o) {
  float w[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float magic_q = as_float(lop3<0xEA>(word >> (4 * j + 16 * h), 0xFu, 0x4B000000u));  // 2^23 + q
    w[h] = fma_f32(magic_q - 8388608.f, s, o);
  }
  return pack2<T>(w[0], w[1]);
}

}  // inline namespace TK_BUILD
}  // namespace tk_int4_dequant
