// The instructions the CUDA C++ kernels of csrc/cuda/*.cuh use, in two builds of the same source:
//   * nvcc (__CUDACC__): inline PTX, sm_80+;
//   * the CPU emulator (TK_EMULATE, a plain C++ compiler: csrc/emu/*.cpp): the same instructions computed from the
//     PTX ISA's definitions, on tk_emu's thread-by-thread model (csrc/emu/emulator.h).
// Kernels are written against this file only (no threadIdx, no raw asm, no __half arithmetic), so the code CI runs
// on the CPU is the code the GPU runs. Registers holding two 16-bit values are uint32_t, the lower half first, as in
// PTX; T is F16 or BF16 (a tag, not a storage type: kernels move 16-bit values as uint16_t).
#pragma once

#include <cstdint>

namespace tk_arch {

struct F16 {
  static constexpr bool bf16 = false;
};
struct BF16 {
  static constexpr bool bf16 = true;
};

}  // namespace tk_arch

#if defined(__CUDACC__)
// ================================================================================================ the GPU build
#include <cuda_runtime.h>

#include <mutex>
#define TK_DEVICE __device__ __forceinline__
#define TK_HOST_DEVICE __host__ __device__ __forceinline__
#define TK_GLOBAL __global__
#define TK_LAUNCH_BOUNDS(n) __launch_bounds__(n)
// ... and at least `blocks` resident per SM: ptxas then budgets registers for that (without it, it may spill to reach
// an occupancy of its own choosing)
#define TK_LAUNCH_BOUNDS_MIN(n, blocks) __launch_bounds__(n, blocks)
// Kernel templates go in `inline namespace TK_BUILD` (gpu / emu): otherwise a __global__ template's host stub and
// its emulated instantiation have one mangled name in _C, and where nvcc emits the stub as a weak symbol (before
// CUDA 13, or -static-global-template-stub=false) the linker keeps one of the two definitions for both callers: a
// GPU launch runs the emulator's body on the host, or the emulated test calls the stub.
#define TK_BUILD gpu

namespace tk_arch {

// Host side: lets kKernel launch with `bytes` of dynamic shared memory on `device` (more than 48 KiB must be asked
// for; the attribute is per device), once per kernel and device; returns that call's error. A template on the
// kernel itself, not its type: instantiations of one kernel template share a type.
template <auto kKernel>
inline cudaError_t allow_dynamic_shared(int bytes, int device) {
  static std::once_flag once[64];
  static cudaError_t result[64];
  const int slot = device % 64;
  std::call_once(once[slot], [&] {
    result[slot] = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  });
  return result[slot];
}

TK_DEVICE unsigned tid() { return threadIdx.x; }
TK_DEVICE unsigned block_x() { return blockIdx.x; }
TK_DEVICE unsigned block_y() { return blockIdx.y; }
TK_DEVICE unsigned block_z() { return blockIdx.z; }
TK_DEVICE unsigned grid_z() { return gridDim.z; }
TK_DEVICE unsigned grid_x() { return gridDim.x; }
TK_DEVICE void syncthreads() { __syncthreads(); }
TK_DEVICE void threadfence() { __threadfence(); }

// The block's dynamic shared memory (extern __shared__), 16-byte aligned.
TK_DEVICE char* shared_memory() {
  extern __shared__ __align__(16) char tk_dynamic_smem[];
  return tk_dynamic_smem;
}

TK_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16 bytes global -> shared, the first src_bytes (0 or 16) read, the rest zero-filled; bypasses L1 (.cg).
TK_DEVICE void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
// 4 bytes global -> shared, the first src_bytes (0 or 4) read, the rest zero-filled; through L1 (.ca: .cg copies
// 16 bytes only).
TK_DEVICE void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
TK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
TK_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

TK_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// ldmatrix ... .trans: each 8x8 matrix transposed on the way (a row-major k x n tile of shared memory read as
// the k-major B operand of mma: decode attention's V)
TK_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// shfl.sync.bfly over the whole warp: lane l gets lane (l ^ mask)'s v
TK_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xFFFFFFFFu, v, mask); }

// 2^x by ex2.approx.f32 (what Triton's tl.exp2 emits): the ISA gives a maximum relative error of 2^-22 (4 fp32 ulp
// at most) over the full range, subnormal results kept; 2^-inf = +0. The emulated build computes std::exp2 (within
// an ulp); the tests' allowance (testing._softmax_pv_allowance: 8 u32 + 4 u32 |s| per score) holds either.
TK_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// d = a (16x16) * b (16x8) + d, fp32 accumulators
template <typename T>
TK_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (T::bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// d = A (16 x 32, 2:4 sparse along k) * b (32 x 8) + d, fp32 accumulators: a holds A's kept 16 x 16, e the
// metadata, supplied by threads 0 and 1 of each quad (sparsity selector 0). ::ordered_metadata: each 4-wide chunk's
// two indices must be increasing.
template <typename T>
TK_DEVICE void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  if constexpr (T::bf16) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
}

// lop3.b32: any bitwise function of three inputs in one instruction; LUT = f(0xF0, 0xCC, 0xAA).
template <int LUT>
TK_DEVICE uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
}

// two fused multiply-adds on the 16-bit halves, each rounded once (fma.rn.{f16x2,bf16x2})
template <typename T>
TK_DEVICE uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (T::bf16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

// (lo, hi) fp32 -> one register of two T, each rounded to nearest even. cvt's first source goes to the upper half.
template <typename T>
TK_DEVICE uint32_t pack2(float lo, float hi) {
  uint32_t d;
  if constexpr (T::bf16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  }
  return d;
}

template <typename T>
TK_DEVICE float to_float(uint16_t v) {
  if constexpr (T::bf16) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  } else {
    float f;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(v));
    return f;
  }
}

template <typename T>
TK_DEVICE uint16_t from_float(float v) {
  return static_cast<uint16_t>(pack2<T>(v, 0.f) & 0xFFFF);
}

TK_DEVICE float as_float(uint32_t bits) { return __uint_as_float(bits); }
TK_DEVICE float fma_f32(float a, float b, float c) { return __fmaf_rn(a, b, c); }

// shared memory: a plain load (the emulator checks its bounds and alignment)
template <typename V>
TK_DEVICE V lds(const V* p) { return *p; }
template <typename V>
TK_DEVICE void sts(V* p, V v) { *p = v; }

// global memory: plain loads/stores, and L2-coherent ones (ld.global.cg) for data other blocks wrote during this
// launch (split-K partials)
template <typename V>
TK_DEVICE V load(const V* p) { return *p; }
template <typename V>
TK_DEVICE void store(V* p, V v) { *p = v; }
TK_DEVICE float load_cg(const float* p) { return __ldcg(p); }
TK_DEVICE int atomic_add(int* p, int v) { return atomicAdd(p, v); }

}  // namespace tk_arch

#elif defined(TK_EMULATE)
// ========================================================================================== the emulated build
#include <cmath>
#include <cstring>
#include <string>

#include "emu/emulator.h"
#include "emu/numerics.h"
#include "emu/ptx_fragments.h"

#define TK_DEVICE inline
#define TK_HOST_DEVICE inline
#define TK_GLOBAL
#define TK_LAUNCH_BOUNDS(n)
#define TK_LAUNCH_BOUNDS_MIN(n, blocks)
#define TK_BUILD emu

namespace tk_arch {

inline unsigned tid() { return tk_emu::thread_idx().x; }
inline unsigned block_x() { return tk_emu::block_idx().x; }
inline unsigned block_y() { return tk_emu::block_idx().y; }
inline unsigned block_z() { return tk_emu::block_idx().z; }
inline unsigned grid_z() { return tk_emu::grid_dim().z; }
inline unsigned grid_x() { return tk_emu::grid_dim().x; }
inline void syncthreads() { tk_emu::syncthreads(); }
inline void threadfence() {}  // blocks run one after another: every earlier store is visible
inline char* shared_memory() { return tk_emu::shared_memory(); }

inline void cp_async16(void* dst, const void* src, int src_bytes) { tk_emu::cp_async(dst, src, 16, src_bytes); }
inline void cp_async4(void* dst, const void* src, int src_bytes) { tk_emu::cp_async(dst, src, 4, src_bytes); }
inline void cp_async_commit() { tk_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  tk_emu::cp_async_wait(N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  tk_emu::check_shared(p, 16);  // a row address: 16-byte aligned, 16 bytes inside shared memory
  const unsigned char* slots = tk_emu::warp_gather("ldmatrix.x4", &p, sizeof(p));
  const int lane = static_cast<int>(tk_emu::lane());
  for (int i = 0; i < 4; ++i) {
    uint16_t h[2];
    for (int k = 0; k < 2; ++k) {
      const tk_emu::Coord c = tk_emu::ldmatrix(lane, k);
      const char* row;
      std::memcpy(&row, slots + (8 * i + c.row) * tk_emu::kSlotBytes, sizeof(row));
      std::memcpy(&h[k], row + 2 * c.col, 2);
    }
    r[i] = h[0] | (static_cast<uint32_t>(h[1]) << 16);
  }
  tk_emu::warp_release();
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  tk_emu::check_shared(p, 16);
  const unsigned char* slots = tk_emu::warp_gather("ldmatrix.x4.trans", &p, sizeof(p));
  const int lane = static_cast<int>(tk_emu::lane());
  for (int i = 0; i < 4; ++i) {
    uint16_t h[2];
    for (int k = 0; k < 2; ++k) {
      const tk_emu::Coord c = tk_emu::ldmatrix_trans(lane, k);
      const char* row;
      std::memcpy(&row, slots + (8 * i + c.row) * tk_emu::kSlotBytes, sizeof(row));
      std::memcpy(&h[k], row + 2 * c.col, 2);
    }
    r[i] = h[0] | (static_cast<uint32_t>(h[1]) << 16);
  }
  tk_emu::warp_release();
}

inline float shfl_xor(float v, int mask) {
  const unsigned char* slots = tk_emu::warp_gather("shfl.bfly", &v, sizeof(v));
  float got;
  std::memcpy(&got, slots + ((tk_emu::lane() ^ static_cast<unsigned>(mask)) & 31u) * tk_emu::kSlotBytes, sizeof(got));
  tk_emu::warp_release();
  return got;
}

inline float exp2_approx(float x) { return std::exp2(x); }

template <typename T>
inline double element(uint32_t reg, int half) {
  return tk_emu::decode(static_cast<uint16_t>(reg >> (16 * half)), T::bf16 ? tk_emu::kBFloat16 : tk_emu::kHalf);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Operands {
    uint32_t a[4], b[2];
    float c[4];
  } mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.c, d, sizeof(mine.c));
  const unsigned char* slots = tk_emu::warp_gather("mma.m16n8k16", &mine, sizeof(mine));
  auto lane_ops = [&](int l) {
    Operands o;
    std::memcpy(&o, slots + l * tk_emu::kSlotBytes, sizeof(o));
    return o;
  };
  // Invert the fragment tables: A[row][k], B[k][n] of the whole warp's operands.
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const Operands o = lane_ops(l);
    for (int i = 0; i < 8; ++i) {
      const tk_emu::Coord c = tk_emu::mma_a(l, i);
      A[c.row][c.col] = element<T>(o.a[i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {
      const tk_emu::Coord c = tk_emu::mma_b(l, i);
      B[c.row][c.col] = element<T>(o.b[i / 2], i % 2);
    }
  }
  const int lane = static_cast<int>(tk_emu::lane());
  for (int i = 0; i < 4; ++i) {
    const tk_emu::Coord c = tk_emu::mma_c(lane, i);
    float acc = mine.c[i];
    for (int k = 0; k < 16; ++k) acc += static_cast<float>(A[c.row][k] * B[k][c.col]);  // 16-bit products: exact
    d[i] = acc;
  }
  tk_emu::warp_release();
}

// The ISA's semantics: A is the dense 16 x 32 matrix with zeros where the metadata selects nothing, so the product
// runs over all 32 k (0 * inf or NaN in B is NaN, as the ISA's D = A * B + C says; a kernel that relies on B
// elements at A's zeros being ignored fails here). Metadata of the supplying threads that ::ordered_metadata leaves
// undefined (an index pair not increasing, e.g. the poison 0xF or a zero-filled 0x0) is reported.
template <typename T>
inline void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  struct Operands {
    uint32_t a[4], b[4], e;
    float c[4];
  } mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  mine.e = e;
  std::memcpy(mine.c, d, sizeof(mine.c));
  const unsigned char* slots = tk_emu::warp_gather("mma.sp.m16n8k32", &mine, sizeof(mine));
  auto lane_ops = [&](int l) {
    Operands o;
    std::memcpy(&o, slots + l * tk_emu::kSlotBytes, sizeof(o));
    return o;
  };
  // (idx0, idx1) of every 4-wide chunk (row, chunk) from the lane and bits the ISA's metadata figure assigns
  int idx[16][8][2];
  for (int row = 0; row < 16; ++row)
    for (int chunk = 0; chunk < 8; ++chunk) {
      const tk_emu::MetaField f = tk_emu::mma_sp_meta(row, chunk, 0);
      const uint32_t nibble = (lane_ops(f.lane).e >> f.bit) & 0xF;
      idx[row][chunk][0] = static_cast<int>(nibble & 3);
      idx[row][chunk][1] = static_cast<int>(nibble >> 2);
      if (idx[row][chunk][0] >= idx[row][chunk][1]) {
        tk_emu::fail("mma.sp::ordered_metadata: lane " + std::to_string(f.lane) + " supplies metadata 0x" +
                     "0123456789ABCDEF"[nibble] + " (bits " + std::to_string(f.bit) + ".." +
                     std::to_string(f.bit + 3) + ") for row " + std::to_string(row) + ", columns " +
                     std::to_string(4 * chunk) + ".." + std::to_string(4 * chunk + 3) +
                     " of A: undefined (indices must be increasing)");
      }
    }
  double A[16][32] = {}, B[32][8];
  for (int l = 0; l < 32; ++l) {
    const Operands o = lane_ops(l);
    for (int i = 0; i < 8; ++i) {
      const tk_emu::Coord c = tk_emu::mma_sp_a(l, i);  // (row, first column of the chunk); nonzero number i & 1
      A[c.row][c.col + idx[c.row][c.col / 4][i & 1]] = element<T>(o.a[i / 2], i % 2);
      const tk_emu::Coord cb = tk_emu::mma_b(l, i);
      B[cb.row][cb.col] = element<T>(o.b[i / 2], i % 2);
    }
  }
  const int lane = static_cast<int>(tk_emu::lane());
  for (int i = 0; i < 4; ++i) {
    const tk_emu::Coord c = tk_emu::mma_c(lane, i);
    float acc = mine.c[i];
    for (int k = 0; k < 32; ++k) acc += static_cast<float>(A[c.row][k] * B[k][c.col]);  // 16-bit products: exact
    d[i] = acc;
  }
  tk_emu::warp_release();
}

template <int LUT>
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d = 0;
  for (int bit = 0; bit < 32; ++bit) {
    const int idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1);
    d |= static_cast<uint32_t>((LUT >> idx) & 1) << bit;
  }
  return d;
}

template <typename T>
inline uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  const tk_emu::Format f = T::bf16 ? tk_emu::kBFloat16 : tk_emu::kHalf;
  uint32_t d = 0;
  for (int h = 0; h < 2; ++h) {
    const double v = element<T>(a, h) * element<T>(b, h) + element<T>(c, h);
    d |= static_cast<uint32_t>(tk_emu::encode(v, f)) << (16 * h);
  }
  return d;
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  const tk_emu::Format f = T::bf16 ? tk_emu::kBFloat16 : tk_emu::kHalf;
  return tk_emu::encode(lo, f) | (static_cast<uint32_t>(tk_emu::encode(hi, f)) << 16);
}

template <typename T>
inline float to_float(uint16_t v) {
  return static_cast<float>(tk_emu::decode(v, T::bf16 ? tk_emu::kBFloat16 : tk_emu::kHalf));
}

template <typename T>
inline uint16_t from_float(float v) {
  return static_cast<uint16_t>(pack2<T>(v, 0.f) & 0xFFFF);
}

inline float as_float(uint32_t bits) { return tk_emu::as_float(bits); }
inline float fma_f32(float a, float b, float c) { return std::fma(a, b, c); }

template <typename V>
inline V lds(const V* p) {
  tk_emu::check_shared(p, sizeof(V));
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void sts(V* p, V v) {
  tk_emu::check_shared(p, sizeof(V));
  std::memcpy(p, &v, sizeof(V));
}

template <typename V>
inline V load(const V* p) {
  tk_emu::check_global(p, sizeof(V), false);
  return *p;
}
template <typename V>
inline void store(V* p, V v) {
  tk_emu::check_global(p, sizeof(V), true);
  *p = v;
}
inline float load_cg(const float* p) { return load(p); }
inline int atomic_add(int* p, int v) {
  tk_emu::check_global(p, sizeof(int), true);
  const int old = *p;
  *p = old + v;
  return old;
}

}  // namespace tk_arch

#else
#error "csrc/cuda/arch.cuh: compile with nvcc, or define TK_EMULATE for the CPU emulator"
#endif
