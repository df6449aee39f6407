// sparse24_mm on CUDA: out (M, N) = x (M, K) @ W.T [+ bias (N)], W (N, K) 2:4-sparse along K, fp16/bf16, on sparse
// tensor cores (mma.sp, sm_80+).
//
// Layout (python/turbokernels/formats/sparse24.py): values (N, K/2) = the two kept values of every group of 4
// consecutive k, increasing column; meta int16 (N, K/16), per group a nibble idx0 | idx1 << 2, group j of an element
// at bits 4*j. The kernel reads both as they are (no re-layout pass, no second op): the format was chosen so that
// the mma.sp operands are plain 32-bit loads of it, see "Operands" below.
//
// Why the weight is operand A: only A of mma.sp may be sparse. So the kernel computes out^T (N, M) = W (N, K) @ x^T
// (K, M) with W as the row-major sparse A and x as the "col" B (B's k runs along x's rows, which are contiguous),
// and stores the transposed tile.
//
// Operands of mma.sp.sync.aligned.m16n8k32.row.col.f32.{f16,bf16} (PTX ISA, "Matrix multiply-accumulate operation
// using mma.sp instruction with sparse matrix A": "Sparse matrix storage" and "Matrix fragments for sparse
// mma.m16n8k32 with .f16/.bf16"); g = lane / 4, t = lane % 4:
//  * A, 16 x 32 dense = 16 x 16 compressed: laid out like the dense m16n8k16 A fragment over the compressed
//    columns, so register i holds compressed columns (2t, 2t+1) [+8] of row g [+8] = the kept pair of group t [+4]:
//    exactly 2 adjacent halves of `values`, so one ldmatrix.x4 of a 16 x 16 values tile gives the fragment.
//  * B, 32 x 8 (k x m): register i holds k = 2t + 8i, 2t + 8i + 1 of column m = g, i.e. x[m][k..k+1]: one
//    ldmatrix.x4 (non-transposed) of an 8 (m) x 32 (k) tile of x as it sits in memory.
//  * metadata, one 32-bit register: with sparsity selector 0 the threads t = 0 and t = 1 of every quad supply it
//    (f16/bf16 m16n8k32 uses a thread pair). Thread t = 0 holds the 8 nibbles of k 0..15 (4 groups) of row g in
//    bits 0..15 and of row g + 8 in bits 16..31; thread t = 1 the same for k 16..31. The nibble encoding (two 2-bit
//    indices, the lower one in the low bits, 0b0100 = columns 0 and 1) is ours. So the register is
//        meta[n0 + g][k0/16 + t] | meta[n0 + g + 8][k0/16 + t] << 16
//    two int16 loads from shared memory, no bit shuffling. Cross-check: PyTorch's CUTLASS reorder (the
//    cutlass_meta_offsets docstring in formats/sparse24.py: rows g, g+8 interleaved, then 2x2 transposes) puts
//    exactly these two int16 next to each other as one 32-bit word, in the order t = 0, t = 1.
//    Our indices are always increasing (Sparse24Weight validates idx0 < idx1), so the ::ordered_metadata form that
//    nvcc 13 recommends applies.
//
// Strategy
//  * Block tile 64 (N) x 64 (M), 4 warps as 2 x 2, each warp 32 x 32 = 2 (m16 along N) x 4 (n8 along M) mma.sp per
//    k32 step, fp32 accumulators (32 per thread). BK = 64 (two k32 steps) per stage. For M <= 16 (decode) a
//    128 (N) x 16 (M) tile, 4 warps along N (warp 32 x 16): the weight is what costs there, and a 64-row x tile
//    would load and multiply 48 rows of padding per block.
//  * 3-stage cp.async pipeline (64 x 64: values 4 KiB + x 8 KiB + meta 0.5 KiB per stage; ~44 KiB static shared
//    memory with the padding; 128 x 16: ~40 KiB). Rows are padded by 16 bytes (values 80 B, x 144 B): the 8 row
//    addresses of each ldmatrix phase then fall in 8 distinct 16-byte bank groups (no conflicts), and every
//    cp.async stays 16-byte aligned.
//  * Tails: rows past N or M are clamped to the last valid row when loading (finite data, results discarded at the
//    masked store) so the metadata never holds the invalid all-zero nibble of a zero-filled row. K must be a
//    multiple of 32 (the mma's k); a last BK tile of 32 skips its second k32 step, and its zero-filled columns are
//    never fed to an mma.
//  * Small M (decode): few output tiles cannot fill the GPU, so grid z splits K; each split writes fp32 partials to a
//    workspace (splits, M, N) and a second kernel sums them in a fixed order (deterministic, no atomics).
//  * The output is stored straight from the accumulators, transposed: lanes with the same t write 8 consecutive n.
//    An smem-staged, vectorized epilogue is a possible later gain (it matters only when M is large).
//  * Bias: added to the fp32 accumulator before the one conversion to T (by the GEMM kernel, or by the split-K
//    reduction to the sum of the partials), so the output is rounded once, as in torch's F.linear.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace turbokernels {
namespace sparse24_cuda {
namespace {

// Block tiles (template parameters of the kernel): BN weight rows (output features) x BM activation rows, split
// over 4 warps as WARPS_N x WARPS_M. Two configurations are instantiated (see launch()).
constexpr int BK = 64;                 // dense k per pipeline stage (two mma k32 steps)
constexpr int STAGES = 3;
constexpr int THREADS = 128;           // 4 warps
constexpr int A_STRIDE = BK / 2 + 8;   // halves per shared row of values: 32 + 8 padding = 80 bytes
constexpr int B_STRIDE = BK + 8;       // halves per shared row of x: 64 + 8 padding = 144 bytes
constexpr int M_STRIDE = BK / 16;      // int16 meta elements per shared row: 4

template <int BN, int BM>
struct __align__(16) Smem {
  uint16_t a[STAGES][BN * A_STRIDE];
  uint16_t b[STAGES][BM * B_STRIDE];
  uint16_t m[STAGES][BN * M_STRIDE];
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// src_bytes 0 zero-fills the destination without reading the source.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_sp(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One stage: the values, x and meta tiles of k tile `kt` (dense columns kt*BK ..). Rows past N / M are clamped;
// columns past K are zero-filled (and never used: see the k32 step count in the main loop).
template <typename T, int BN, int BM>
__device__ __forceinline__ void load_stage(Smem<BN, BM>& s, int stage, const T* __restrict__ x,
                                           const T* __restrict__ values,
                                           const int16_t* __restrict__ meta, int M, int N, int K, int n0, int m0,
                                           int kt) {
  const int tid = threadIdx.x;
  const int k0 = kt * BK;
  static_assert((BN * 4) % THREADS == 0 && (BM * 8) % THREADS == 0 && (BN * 2) % THREADS == 0, "tile vs threads");
  // values: BN rows x 64 bytes = 4 chunks of 16 B (8 kept values = 16 dense k) per row.
#pragma unroll
  for (int i = 0; i < (BN * 4) / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int row = c >> 2, col = c & 3;
    const int n = min(n0 + row, N - 1);
    const bool ok = k0 + col * 16 < K;
    const T* src = values + static_cast<int64_t>(n) * (K / 2) + (ok ? k0 / 2 + col * 8 : 0);
    cp_async16(&s.a[stage][row * A_STRIDE + col * 8], src, ok);
  }
  // x: BM rows x 128 bytes = 8 chunks of 16 B per row.
#pragma unroll
  for (int i = 0; i < (BM * 8) / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int row = c >> 3, col = c & 7;
    const int m = min(m0 + row, M - 1);
    const bool ok = k0 + col * 8 < K;
    const T* src = x + static_cast<int64_t>(m) * K + (ok ? k0 + col * 8 : 0);
    cp_async16(&s.b[stage][row * B_STRIDE + col * 8], src, ok);
  }
  // meta: BN rows x 8 bytes; a row of global meta is only 4-byte aligned (K/16 int16, K % 32 == 0), so 4-byte
  // copies, each covering one k32 step of one row.
#pragma unroll
  for (int i = 0; i < (BN * 2) / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int row = c >> 1, half = c & 1;
    const int n = min(n0 + row, N - 1);
    const bool ok = k0 + half * 32 < K;
    const int16_t* src = meta + static_cast<int64_t>(n) * (K / 16) + (ok ? k0 / 16 + half * 2 : 0);
    cp_async4(&s.m[stage][row * M_STRIDE + half * 2], src, ok);
  }
}

// grid (ceil(N / BN), ceil(M / BM), splits); warp tile (BN / WARPS_N) x (BM / WARPS_M). Split z covers k tiles
// [z * tiles_per_split, ...). With splits == 1
// it writes `out` (M, N) in T, the bias (N, or nullptr) added to the fp32 accumulator first; otherwise fp32
// partials to ws (splits, M, N), without the bias (the reduction adds it once).
template <typename T, int BN, int BM, int WARPS_N, int WARPS_M>
__global__ void __launch_bounds__(THREADS)
    sparse24_mm_kernel(const T* __restrict__ x, const T* __restrict__ values, const int16_t* __restrict__ meta,
                       const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ ws, int M, int N, int K,
                       int tiles_per_split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(WARPS_N * WARPS_M * 32 == THREADS, "4 warps");
  constexpr int WN = BN / WARPS_N, WM = BM / WARPS_M;  // warp tile
  constexpr int MI = WN / 16, NJ = WM / 8;             // mma.sp tiles per warp: MI along N (m16), NJ along M (n8)
  static_assert(MI * 16 == WN && NJ * 8 == WM, "warp tile must be whole m16 x n8 tiles");
  static_assert(sizeof(Smem<BN, BM>) <= 48 * 1024, "static shared memory limit");
  __shared__ Smem<BN, BM> smem;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int ktiles = (K + BK - 1) / BK;
  const int kt_begin = blockIdx.z * tiles_per_split;
  const int nkt = min(ktiles, kt_begin + tiles_per_split) - kt_begin;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = (warp / WARPS_M) * WN, wm = (warp % WARPS_M) * WM;  // warp's offsets inside the block tile
  const int g = lane >> 2, t = lane & 3;

  float acc[MI][NJ][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < nkt) load_stage<T, BN, BM>(smem, st, x, values, meta, M, N, K, n0, m0, kt_begin + st);
    cp_async_commit();
  }

  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<STAGES - 2>();  // tile `it` has landed (for this thread) ...
    __syncthreads();              // ... for all threads, and everyone is done with the stage refilled next
    const int nxt = it + STAGES - 1;
    if (nxt < nkt) load_stage<T, BN, BM>(smem, nxt % STAGES, x, values, meta, M, N, K, n0, m0, kt_begin + nxt);
    cp_async_commit();

    const int stage = it % STAGES;
    const uint16_t* sa = smem.a[stage];
    const uint16_t* sb = smem.b[stage];
    const uint16_t* sm = smem.m[stage];
    const int ksteps = ((kt_begin + it) * BK + 32 < K) ? 2 : 1;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      if (ks < ksteps) {
        uint32_t a[MI][4], b[NJ][4], e[MI];
#pragma unroll
        for (int i = 0; i < MI; ++i) {
          // matrices: rows 0-7 / 8-15 x compressed columns 0-7 / 8-15 of this k32 step
          ldmatrix_x4(a[i], sa + (wn + i * 16 + (lane & 15)) * A_STRIDE + ks * 16 + (lane >> 4) * 8);
          const int row = wn + i * 16 + g;
          const uint32_t lo = sm[row * M_STRIDE + ks * 2 + (t & 1)];
          const uint32_t hi = sm[(row + 8) * M_STRIDE + ks * 2 + (t & 1)];
          e[i] = lo | (hi << 16);  // threads t = 2, 3 load a copy that selector 0 ignores
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          // matrices: m rows 0-7 x k 0-7, 8-15, 16-23, 24-31 of this k32 step
          ldmatrix_x4(b[j], sb + (wm + j * 8 + (lane & 7)) * B_STRIDE + ks * 32 + (lane >> 3) * 8);
        }
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
          for (int j = 0; j < NJ; ++j) mma_sp<T>(acc[i][j], a[i], b[j], e[i]);
      }
    }
  }
  cp_async_wait<0>();

  // The bias of this thread's two rows n per m16 tile (g and g + 8), in fp32; 0 when there is none or the partial
  // sums go to ws.
  float bn[MI][2];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + wn + i * 16 + g + h * 8;
      bn[i][h] = (bias != nullptr && ws == nullptr && n < N) ? to_float<T>(bias[n]) : 0.f;
    }

  // acc[i][j][r]: n = n0 + wn + 16 i + g + 8 (r >> 1), m = m0 + wm + 8 j + 2 t + (r & 1)
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int n = n0 + wn + i * 16 + g + (r >> 1) * 8;
        const int m = m0 + wm + j * 8 + 2 * t + (r & 1);
        if (n < N && m < M) {
          const int64_t off = static_cast<int64_t>(m) * N + n;
          if (ws != nullptr) {
            ws[static_cast<int64_t>(blockIdx.z) * M * N + off] = acc[i][j][r];
          } else {
            out[off] = from_float<T>(acc[i][j][r] + bn[i][r >> 1]);  // the output's one rounding
          }
        }
      }
#else
  __trap();  // mma.sp and cp.async need sm_80+
#endif
}

// out[idx] = sum over the splits of ws[z][idx], in split order (deterministic), plus bias[idx % N] (unless
// nullptr), in fp32: the one rounding of the output is the final conversion.
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ ws, const T* __restrict__ bias, T* __restrict__ out,
                                     int64_t total, int N, int splits) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += ws[z * total + idx];
    if (bias != nullptr) s += to_float<T>(bias[idx % N]);
    out[idx] = from_float<T>(s);
  }
}

template <typename T, int BN, int BM, int WARPS_N, int WARPS_M>
void launch(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, const at::Tensor& bias,
            at::Tensor& out, int M, int N, int K) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int ktiles = (K + BK - 1) / BK;
  const int tiles = ((N + BN - 1) / BN) * ((M + BM - 1) / BM);
  // Split K only while the output tiles leave SMs idle: aim at ~2 blocks per SM, keep >= 4 k tiles (256 k) per
  // split so the pipeline still fills, at most 16 splits, and a workspace of at most 64 Mi floats.
  int splits = 1;
  if (tiles < sms) {
    splits = std::min({(2 * sms + tiles - 1) / tiles, ktiles / 4, 16});
    const int64_t mn = static_cast<int64_t>(M) * N;
    while (splits > 1 && splits * mn > (int64_t{64} << 20)) --splits;
    splits = std::max(splits, 1);
  }
  const int tiles_per_split = (ktiles + splits - 1) / splits;
  splits = (ktiles + tiles_per_split - 1) / tiles_per_split;  // no empty split

  const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM, splits);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* vp = reinterpret_cast<const T*>(values.data_ptr());
  const int16_t* mp = meta.data_ptr<int16_t>();
  const T* bp = bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr;
  T* op = reinterpret_cast<T*>(out.data_ptr());
  if (splits == 1) {
    sparse24_mm_kernel<T, BN, BM, WARPS_N, WARPS_M>
        <<<grid, THREADS, 0, stream>>>(xp, vp, mp, bp, op, nullptr, M, N, K, tiles_per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor ws = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
  sparse24_mm_kernel<T, BN, BM, WARPS_N, WARPS_M>
      <<<grid, THREADS, 0, stream>>>(xp, vp, mp, bp, nullptr, ws.data_ptr<float>(), M, N, K, tiles_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = static_cast<int64_t>(M) * N;
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, int64_t{sms} * 8));
  splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(ws.data_ptr<float>(), bp, op, total, N, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// cp.async copies 16-byte chunks: the base pointers must be 16-byte aligned (row strides are, given K % 32 == 0).
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

at::Tensor sparse24_mm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && values.is_cuda() && meta.is_cuda(),
              "sparse24_mm (cuda): x, values and meta must be CUDA tensors");
  TORCH_CHECK(x.device() == values.device() && x.device() == meta.device(),
              "sparse24_mm (cuda): x, values and meta must be on the same device");
  TORCH_CHECK(x.dim() == 2, "sparse24_mm (cuda): x must be 2-D (M, K), got ", x.dim(), "-D");
  TORCH_CHECK(values.dim() == 2, "sparse24_mm (cuda): values must be 2-D (N, K/2), got ", values.dim(), "-D");
  TORCH_CHECK(meta.dim() == 2, "sparse24_mm (cuda): meta must be 2-D (N, K/16), got ", meta.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sparse24_mm (cuda): x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "sparse24_mm (cuda): values dtype ", values.scalar_type(),
              " differs from x's ", x.scalar_type());
  TORCH_CHECK(meta.scalar_type() == at::kShort, "sparse24_mm (cuda): meta must be int16, got ", meta.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  TORCH_CHECK(K % 32 == 0, "sparse24_mm (cuda): x.shape[1] (in_features K) must be a multiple of 32 (the k of "
              "mma.sp), got ", K);
  TORCH_CHECK(values.size(1) * 2 == K, "sparse24_mm (cuda): values must have shape (N, K/2) = (", N, ", ", K / 2,
              "), got ", values.sizes());
  TORCH_CHECK(meta.size(0) == N && meta.size(1) == K / 16, "sparse24_mm (cuda): meta must have shape (N, K/16) = (",
              N, ", ", K / 16, "), got ", meta.sizes());
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, "sparse24_mm (cuda): dimensions must fit in int32");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == x.device(), "sparse24_mm (cuda): bias is on ", b.device(), " but x is on ", x.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "sparse24_mm (cuda): bias must have shape (N,) = (", N, ",), got ",
                b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "sparse24_mm (cuda): bias dtype ", b.scalar_type(),
                " differs from x's ", x.scalar_type());
  }

  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return has_bias ? out.copy_(bias->expand({M, N})) : out.zero_();
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = aligned(x), vc = aligned(values), mc = aligned(meta);
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();  // read one element at a time: no alignment
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  // M <= 16 (decode, small batches): 128 x 16 tiles, so a block does not load and multiply 48 padding rows of x;
  // otherwise 64 x 64.
  if (x.scalar_type() == at::kHalf) {
    if (M <= 16) launch<__half, 128, 16, 4, 1>(xc, vc, mc, bc, out, m, n, k);
    else launch<__half, 64, 64, 2, 2>(xc, vc, mc, bc, out, m, n, k);
  } else {
    if (M <= 16) launch<__nv_bfloat16, 128, 16, 4, 1>(xc, vc, mc, bc, out, m, n, k);
    else launch<__nv_bfloat16, 64, 64, 2, 2>(xc, vc, mc, bc, out, m, n, k);
  }
  return out;
}

}  // namespace
}  // namespace sparse24_cuda
}  // namespace turbokernels

TORCH_LIBRARY_IMPL(turbokernels_C, CUDA, m) { m.impl("sparse24_mm", &turbokernels::sparse24_cuda::sparse24_mm_cuda); }
