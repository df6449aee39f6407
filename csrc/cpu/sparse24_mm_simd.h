// ISA-generic body of the sparse24_mm CPU kernels. NOT a normal header: csrc/cpu/sparse24_mm.cpp includes it once
// per instruction set, inside namespace `avx512` / `avx2` / `scalar`, after defining there
//   struct Vec   Vec::W fp32 lanes = kept values per block (a block is 2W dense k of x, 2W bits of meta);
//                Vec::RMAX rows of x per register tile and Vec::nr(R) weight rows next to R rows of x;
//                X = one block of one x row as the gather needs it (loadx), I = the block's gather indices
//                (index: from the meta words of the block), gather(X, I) = the W x values the W kept values
//                multiply, load_f32/f16/bf16 = W kept values as fp32, reduce = horizontal sum
//   TK_ATTR      the function attributes of that ISA
// so the kernels below exist three times, each compiled for its ISA and picked at run time. Everything here is
// either TK_ATTR or always_inline into a TK_ATTR function and uses nothing from outside but Problem/Dt (plain
// structs): an inline function compiled for AVX-512 must never become the copy the linker keeps for everyone.
// No include guard on purpose.

constexpr int W = Vec::W;        // kept values per block
constexpr int KB = 2 * W;        // dense k per block
constexpr int RMAX = Vec::RMAX;  // rows of x per register tile
using VF = typename Vec::F;
using VI = typename Vec::I;
using VX = typename Vec::X;

template <Dt VD>
TK_ATTR __attribute__((always_inline)) inline VF load_values(const void* v, int64_t i) {
  if constexpr (VD == Dt::F32) return Vec::load_f32(static_cast<const float*>(v) + i);
  else if constexpr (VD == Dt::F16) return Vec::load_f16(static_cast<const uint16_t*>(v) + i);
  else return Vec::load_bf16(static_cast<const uint16_t*>(v) + i);
}

// out[m0 + r][n0 + n] += sum over blocks [b0, b1) of row n0 + n's kept values times the x values they select, for
// r < R, n < NR. Each block of x is loaded once per row of x and used by the NR weight rows; each block of weights
// (W values + its meta, turned into gather indices once) by the R rows of x. Accumulation runs in W lanes (every
// lane sums one chain of (b1 - b0) products) and is reduced once at the end.
template <Dt VD, int R, int NR>
TK_ATTR void tile(const Problem& P, int64_t m0, int64_t n0, int64_t b0, int64_t b1) {
  VF acc[NR][R];
  for (int n = 0; n < NR; ++n)
    for (int r = 0; r < R; ++r) acc[n][r] = Vec::zero();
  const float* x = P.x + m0 * P.ldx;
  const char* vals = static_cast<const char*>(P.values) + n0 * P.ldv * P.vsize;
  const int16_t* meta = P.meta + n0 * P.ldm;
  const int64_t bfull = b1 < P.nfull ? b1 : P.nfull;  // blocks whose W values and meta are all in the tensors
  for (int64_t b = b0; b < bfull; ++b) {
    VX xb[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) xb[r] = Vec::loadx(x + r * P.ldx + b * KB);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const VI idx = Vec::index(meta + n * P.ldm, b);
      const VF v = load_values<VD>(vals + n * P.ldv * P.vsize, b * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[n][r] = Vec::fma(v, Vec::gather(xb[r], idx), acc[n][r]);
    }
  }
  if (b1 > P.nfull) {
    // The last, partial block (K/2 is not a multiple of W): its values and meta words are copied into zero-padded
    // buffers. Padded values are 0 and padded x is 0, so whatever the padding indices select adds nothing.
    VX xb[R];
    for (int r = 0; r < R; ++r) xb[r] = Vec::loadx(x + r * P.ldx + P.nfull * KB);
    const int64_t nv = P.K / 2 - P.nfull * W;                       // values in the block
    const int64_t w0 = P.nfull * KB / 16, nw = P.ldm - w0;           // its meta words (KB >= 16 here)
    for (int n = 0; n < NR; ++n) {
      float vbuf[W];
      int16_t mbuf[KB / 16 > 0 ? KB / 16 : 1];
      for (int i = 0; i < W; ++i) vbuf[i] = i < nv ? P.value_at(n0 + n, P.nfull * W + i) : 0.f;
      for (int i = 0; i < (KB / 16 > 0 ? KB / 16 : 1); ++i) mbuf[i] = i < nw ? meta[n * P.ldm + w0 + i] : 0;
      const VI idx = Vec::index(mbuf, 0);
      const VF v = Vec::load_f32(vbuf);
      for (int r = 0; r < R; ++r) acc[n][r] = Vec::fma(v, Vec::gather(xb[r], idx), acc[n][r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NR; ++n) P.out[(m0 + r) * P.N + n0 + n] += Vec::reduce(acc[n][r]);
}

// tile<R, nn> for a run-time nn in [1, NR]
template <Dt VD, int R, int NR>
TK_ATTR __attribute__((always_inline)) inline void tile_n(int nn, const Problem& P, int64_t m0, int64_t n0,
                                                          int64_t b0, int64_t b1) {
  if constexpr (NR > 1) {
    if (nn < NR) return tile_n<VD, R, NR - 1>(nn, P, m0, n0, b0, b1);
  }
  tile<VD, R, NR>(P, m0, n0, b0, b1);
}

// tile for run-time row counts: rr in [1, R] rows of x, nn in [1, Vec::nr(rr)] weight rows
template <Dt VD, int R>
TK_ATTR __attribute__((always_inline)) inline void tile_rn(int rr, int nn, const Problem& P, int64_t m0,
                                                           int64_t n0, int64_t b0, int64_t b1) {
  if constexpr (R > 1) {
    if (rr < R) return tile_rn<VD, R - 1>(rr, nn, P, m0, n0, b0, b1);
  }
  tile_n<VD, R, Vec::nr(R)>(nn, P, m0, n0, b0, b1);
}

// out rows [0, M), weight rows [n_begin, n_end), blocks [b0, b1). The weight rows are taken Vec::nr(R) at a time
// and every x row tile runs against them while they are in L1/L2; the caller bounds [b0, b1) so that the M rows of
// x it reads stay in L2.
template <Dt VD>
TK_ATTR void run_range(const Problem& P, int64_t n_begin, int64_t n_end, int64_t b0, int64_t b1) {
  const int R = static_cast<int>(P.M < RMAX ? P.M : RMAX);
  const int64_t nr = Vec::nr(R);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += nr) {
    const int nn = static_cast<int>(n_end - n0 < nr ? n_end - n0 : nr);
    for (int64_t m0 = 0; m0 < P.M; m0 += RMAX) {
      const int rr = static_cast<int>(P.M - m0 < RMAX ? P.M - m0 : RMAX);
      tile_rn<VD, RMAX>(rr, nn, P, m0, n0, b0, b1);  // nn <= nr(R) <= nr(rr): Vec::nr never grows with R
    }
  }
}

TK_ATTR void run(const Problem& P, int64_t n_begin, int64_t n_end, int64_t b0, int64_t b1) {
  switch (P.vdt) {
    case Dt::F32: return run_range<Dt::F32>(P, n_begin, n_end, b0, b1);
    case Dt::F16: return run_range<Dt::F16>(P, n_begin, n_end, b0, b1);
    default: return run_range<Dt::BF16>(P, n_begin, n_end, b0, b1);
  }
}

// Dense fp32 rows [n0, n0 + nc) of W into w (nc x K, row-major) for the expand + BLAS path.
TK_ATTR void expand_rows(const Problem& P, int64_t n0, int64_t nc, float* w) {
  for (int64_t n = 0; n < nc; ++n) {
    float* dst = w + n * P.K;
    for (int64_t k = 0; k < P.K; ++k) dst[k] = 0.f;
    const int16_t* meta = P.meta + (n0 + n) * P.ldm;
    for (int64_t g = 0; g < P.K / 4; ++g) {
      const unsigned nib = (static_cast<uint16_t>(meta[g >> 2]) >> (4 * (g & 3))) & 15u;
      dst[4 * g + (nib & 3)] = P.value_at(n0 + n, 2 * g);
      dst[4 * g + (nib >> 2)] = P.value_at(n0 + n, 2 * g + 1);
    }
  }
}

// ---- the row-vectorized path (M >= Kernels::mvec_min_m): lanes run over rows of x -----------------------------
// x is stored transposed, xt (K, ldxt) fp32 with ldxt = M rounded up to W, and each kept value is broadcast and
// multiplies a contiguous vector of x[m0 .. m0 + W)[k] chosen by its meta bits (a scalar address, no shuffle):
// one FMA per W multiply-adds plus scalar decoding shared by the MV vectors of the tile, so with a few vectors the
// loop runs at the FMA rate while doing half the multiply-adds of a dense GEMM. Results go to outt (N, ldxt).

template <Dt VD>
TK_ATTR __attribute__((always_inline)) inline float value_scalar(const void* v, int64_t i) {
  if constexpr (VD == Dt::F32) {
    return static_cast<const float*>(v)[i];
  } else if constexpr (VD == Dt::F16) {
    return Vec::half_to_f32(static_cast<const uint16_t*>(v)[i]);
  } else {
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(v)[i]) << 16;
    float f;
    __builtin_memcpy(&f, &bits, sizeof(f));
    return f;
  }
}

// outt[n0 + n][c0 + j * W + lane] += sum over groups [g0, g1) of row n0 + n, for n < NR, j < MV
// (fp16/bf16 values are converted one at a time: widening them a vector at a time into an fp32 buffer first
// measured no faster)
template <Dt VD, int NR, int MV>
TK_ATTR void tile_t(const Problem& P, const float* xt, int64_t ldxt, float* outt, int64_t n0, int64_t c0,
                    int64_t g0, int64_t g1) {
  // two accumulator sets (first / second kept value of a group) when one set is too few chains for the latency
  constexpr int S = NR * MV >= 8 ? 1 : 2;
  VF acc[S][NR][MV];
  for (int s = 0; s < S; ++s)
    for (int n = 0; n < NR; ++n)
      for (int j = 0; j < MV; ++j) acc[s][n][j] = Vec::zero();
  const char* vals = static_cast<const char*>(P.values) + n0 * P.ldv * P.vsize;
  const int16_t* meta = P.meta + n0 * P.ldm;
  const float* x = xt + c0;
  for (int64_t g = g0; g < g1; ++g) {
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const unsigned nib = (static_cast<uint16_t>(meta[n * P.ldm + (g >> 2)]) >> (4 * (g & 3))) & 15u;
      const float* xa = x + (4 * g + (nib & 3u)) * ldxt;
      const float* xb = x + (4 * g + (nib >> 2)) * ldxt;
      const void* vn = vals + n * P.ldv * P.vsize;
      const VF va = Vec::set1(value_scalar<VD>(vn, 2 * g)), vb = Vec::set1(value_scalar<VD>(vn, 2 * g + 1));
#pragma GCC unroll 8
      for (int j = 0; j < MV; ++j) {
        acc[0][n][j] = Vec::fma(va, Vec::loadu(xa + j * W), acc[0][n][j]);
        acc[S - 1][n][j] = Vec::fma(vb, Vec::loadu(xb + j * W), acc[S - 1][n][j]);
      }
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int j = 0; j < MV; ++j) {
      float* o = outt + (n0 + n) * ldxt + c0 + j * W;
      VF sum = acc[0][n][j];
      if constexpr (S == 2) sum = Vec::add(sum, acc[1][n][j]);
      Vec::storeu(o, Vec::add(Vec::loadu(o), sum));
    }
}

template <Dt VD, int NR, int MV>
TK_ATTR __attribute__((always_inline)) inline void tile_t_mv(int mv, const Problem& P, const float* xt,
                                                             int64_t ldxt, float* outt, int64_t n0, int64_t c0,
                                                             int64_t g0, int64_t g1) {
  if constexpr (MV > 1) {
    if (mv < MV) return tile_t_mv<VD, NR, MV - 1>(mv, P, xt, ldxt, outt, n0, c0, g0, g1);
  }
  tile_t<VD, NR, MV>(P, xt, ldxt, outt, n0, c0, g0, g1);
}

// weight rows [n_begin, n_end), groups [g0, g1), all rows of x
template <Dt VD>
TK_ATTR void run_t_range(const Problem& P, const float* xt, int64_t ldxt, float* outt, int64_t n_begin,
                         int64_t n_end, int64_t g0, int64_t g1) {
  constexpr int NR = Vec::TNR, MV = Vec::TMV;
  const int64_t nvec = ldxt / W;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
    const bool full = n_end - n0 >= NR;
    for (int64_t v0 = 0; v0 < nvec; v0 += MV) {
      const int mv = static_cast<int>(nvec - v0 < MV ? nvec - v0 : MV);
      if (full) {
        tile_t_mv<VD, NR, MV>(mv, P, xt, ldxt, outt, n0, v0 * W, g0, g1);
      } else {
        for (int64_t n = n0; n < n_end; ++n) tile_t_mv<VD, 1, MV>(mv, P, xt, ldxt, outt, n, v0 * W, g0, g1);
      }
    }
  }
}

TK_ATTR void run_t(const Problem& P, const float* xt, int64_t ldxt, float* outt, int64_t n_begin, int64_t n_end,
                   int64_t g0, int64_t g1) {
  switch (P.vdt) {
    case Dt::F32: return run_t_range<Dt::F32>(P, xt, ldxt, outt, n_begin, n_end, g0, g1);
    case Dt::F16: return run_t_range<Dt::F16>(P, xt, ldxt, outt, n_begin, n_end, g0, g1);
    default: return run_t_range<Dt::BF16>(P, xt, ldxt, outt, n_begin, n_end, g0, g1);
  }
}
