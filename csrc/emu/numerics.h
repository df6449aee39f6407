// fp16 / bf16 on the host, bit-exact: what the emulated conversion and fma instructions round to. Values are raw
// 16-bit patterns, as the kernels hold them in 32-bit registers (two per register, the lower half first).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tk_emu {

// The IEEE-754 binary formats: `mantissa` stored fraction bits, `bias` exponent bias.
struct Format {
  int mantissa, bias;
};
constexpr Format kHalf{10, 15};
constexpr Format kBFloat16{7, 127};

inline double decode(uint16_t bits, Format f) {
  const int e = (bits >> f.mantissa) & ((1 << (15 - f.mantissa)) - 1);
  const int m = bits & ((1 << f.mantissa) - 1);
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  const int emax = (1 << (15 - f.mantissa)) - 1;
  if (e == emax) return m ? std::nan("") : sign * INFINITY;
  if (e == 0) return sign * std::ldexp(m, 1 - f.bias - f.mantissa);
  return sign * std::ldexp(m + (1 << f.mantissa), e - f.bias - f.mantissa);
}

// Round a double to the format, to nearest even, with subnormals and overflow to infinity (cvt.rn / fma.rn).
// Exact when `v` is the exact result of the operation (the emulated fma computes a * b + c in double: exact for
// 16-bit operands unless the addends' exponents are more than ~30 apart, far beyond what the kernels feed it).
inline uint16_t encode(double v, Format f) {
  const int emax = (1 << (15 - f.mantissa)) - 1;
  if (std::isnan(v)) return static_cast<uint16_t>((emax << f.mantissa) | (1 << (f.mantissa - 1)));
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const double a = std::fabs(v);
  const int min_exp = 1 - f.bias;  // exponent of the smallest normal
  int e = 0;
  if (a != 0.0) {
    std::frexp(a, &e);
    e -= 1;  // a = 1.xxx * 2^e
  }
  if (a == 0.0 || e < min_exp) {  // subnormal range: quantum 2^(min_exp - mantissa)
    const double q = std::nearbyint(std::ldexp(a, f.mantissa - min_exp));  // may round up to the smallest normal
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(q));
  }
  double q = std::nearbyint(std::ldexp(a, f.mantissa - e));  // in [2^mantissa, 2^(mantissa+1)]
  if (q == std::ldexp(1.0, f.mantissa + 1)) {
    q /= 2;
    e += 1;
  }
  if (e + f.bias >= emax) return static_cast<uint16_t>(sign | (emax << f.mantissa));  // infinity
  return static_cast<uint16_t>(sign | ((e + f.bias) << f.mantissa) | (static_cast<uint32_t>(q) - (1u << f.mantissa)));
}

inline float as_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint32_t as_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

}  // namespace tk_emu
