// ISA-generic body of the w4a8_mm CPU kernel. NOT a normal header: csrc/cpu/w4a8_mm.cpp includes it once per
// instruction set, inside namespace `avx512vnni` / `avx2` / `scalar`, after defining there
//   struct Vec   W int32 lanes per vector (= packed-word columns per vector); I / F the int32 and fp32 vector
//                types and their few operations (see w4a8_mm.cpp), and dot_block<R, NW>: the integer sums of one
//                block of k for R rows
//   TK_ATTR      the function attributes of that ISA
// as int4_mm_simd.h is (the same rules: everything here is TK_ATTR or always_inline into a TK_ATTR function, no
// includes, no templates from outside, no include guard on purpose).

constexpr int W = Vec::W;
using VF = typename Vec::F;
using VI = typename Vec::I;

// dst[0, n) = src[off, off + n) as fp32, dst[n, npad) = 0
TK_ATTR void row_to_f32(Dt dt, const void* src, int64_t off, int64_t n, float* dst, int64_t npad) {
  int64_t i = 0;
  if (dt == Dt::F32) {
    const float* p = static_cast<const float*>(src) + off;
    for (; i + W <= n; i += W) Vec::storeu(dst + i, Vec::loadu(p + i));
  } else if (dt == Dt::F16) {
    const uint16_t* p = static_cast<const uint16_t*>(src) + off;
    for (; i + W <= n; i += W) Vec::storeu(dst + i, Vec::load_f16(p + i));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(src) + off;
    for (; i + W <= n; i += W) Vec::storeu(dst + i, Vec::load_bf16(p + i));
  }
  for (; i < n; ++i) dst[i] = scalar_to_f32(dt, src, off + i);
  for (; i < npad; ++i) dst[i] = 0.f;
}

// facc[r][v W + lane] (first ? = : +=) dx[r] * (S - 8 sxq[r]) for the vectors v in [0, nv) of one block, S the
// block's integer sum  sum_k xq[r][k] q[k][n]  (dot_block): that is dx * sum_k xq (q - 8), exact up to the product's
// one rounding (|S - 8 sxq| <= 32 * 8 * 127 is an exact int32 and an exact float). pf: the same columns of the next
// block's rows (nullptr: none), fetched while this block is summed (the rows are N words apart: a page at a model's
// sizes, which the hardware prefetchers do not cross).
template <int R, int NW>
TK_ATTR __attribute__((always_inline)) inline void block_rows(const int32_t* q, int64_t ldq, int64_t nv,
                                                              const int32_t* const (&xe)[R],
                                                              const int32_t* const (&xo)[R], const float (&d)[R],
                                                              const int32_t (&c)[R], float* facc, int64_t ldf,
                                                              bool first, const int32_t* pf, int pf_rows) {
  VF dv[R];
  VI cv[R];
  for (int r = 0; r < R; ++r) {
    dv[r] = Vec::set1(d[r]);
    cv[r] = Vec::set1i(c[r]);
  }
  for (int64_t v = 0; v < nv; ++v) {
    if (pf != nullptr && (v * W) % 16 == 0)
      for (int i = 0; i < pf_rows; ++i) __builtin_prefetch(pf + i * ldq + v * W);
    VI acc[R];
    Vec::template dot_block<R, NW>(q + v * W, ldq, xe, xo, acc);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* p = facc + r * ldf + v * W;
      const VF t = Vec::to_f32(Vec::subi(acc[r], cv[r]));
      Vec::storeu(p, Vec::fma(dv[r], t, first ? Vec::zero() : Vec::loadu(p)));
    }
  }
}

template <int R>
TK_ATTR __attribute__((always_inline)) inline void block_rows_n(int nw, const int32_t* q, int64_t ldq, int64_t nv,
                                                                const int32_t* const (&xe)[R],
                                                                const int32_t* const (&xo)[R], const float (&d)[R],
                                                                const int32_t (&c)[R], float* facc, int64_t ldf,
                                                                bool first, const int32_t* pf, int pf_rows) {
  switch (nw) {  // 4 but in the last block of a K that is not a multiple of 32
    case 4: return block_rows<R, 4>(q, ldq, nv, xe, xo, d, c, facc, ldf, first, pf, pf_rows);
    case 3: return block_rows<R, 3>(q, ldq, nv, xe, xo, d, c, facc, ldf, first, pf, pf_rows);
    case 2: return block_rows<R, 2>(q, ldq, nv, xe, xo, d, c, facc, ldf, first, pf, pf_rows);
    default: return block_rows<R, 1>(q, ldq, nv, xe, xo, d, c, facc, ldf, first, pf, pf_rows);
  }
}

// Rows [m0, m0 + R), columns [n0, n0 + ncols) (ncols <= sw, sw a multiple of W): every group, then the bias.
// scratch: 2 R sw + 2 sw floats; qt: 4 W words (the ragged last vector of N, zero-padded).
template <int R>
TK_ATTR void strip(const Problem& P, int64_t m0, int64_t n0, int64_t ncols, int64_t sw, float* scratch,
                   int32_t* qt) {
  const int64_t nfull = ncols / W, ragged = ncols % W, nv = nfull + (ragged ? 1 : 0), w_pad = nv * W;
  float* facc = scratch;     // (R, sw): the group's sum  sum_b dx_b sum_{k in b} xq (q - 8)
  float* y = facc + R * sw;  // (R, sw): the output over all groups
  float* sb = y + R * sw;    // (sw): the group's scales as fp32
  float* ob = sb + sw;       // (sw): its offsets
  for (int r = 0; r < R; ++r)
    for (int64_t n = 0; n < w_pad; ++n) y[r * sw + n] = 0.f;
  const int32_t* q = P.q + n0;
  for (int64_t g = 0; g < P.G; ++g) {
    const int64_t b0 = g * P.bpg, b1 = std::min(P.B, b0 + P.bpg);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t w0 = 4 * b;
      const int nw = static_cast<int>(std::min<int64_t>(4, P.K8 - w0));
      const int32_t* xe[R];
      const int32_t* xo[R];
      float d[R];
      int32_t c[R];
      for (int r = 0; r < R; ++r) {
        xe[r] = P.xe + (m0 + r) * P.K8 + w0;
        xo[r] = P.xo + (m0 + r) * P.K8 + w0;
        d[r] = P.dx[(m0 + r) * P.B + b];
        c[r] = 8 * P.sxq[(m0 + r) * P.B + b];
      }
      const int pf_rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(4, P.K8 - w0 - 4)));
      const int32_t* qb = q + w0 * P.N;
      block_rows_n<R>(nw, qb, P.N, nfull, xe, xo, d, c, facc, sw, b == b0, pf_rows ? qb + 4 * P.N : nullptr,
                      pf_rows);
      if (ragged) {  // the last columns of N: a zero-padded copy, so no read runs past a row (or the tensor)
        for (int i = 0; i < nw; ++i)
          for (int64_t n = 0; n < W; ++n) qt[i * W + n] = n < ragged ? qb[i * P.N + nfull * W + n] : 0;
        block_rows_n<R>(nw, qt, W, 1, xe, xo, d, c, facc + nfull * W, sw, b == b0, nullptr, 0);
      }
    }
    // the group's epilogue, as int4_mm's: y += s facc + (o + 8 s) xs, o + 8 s = hi + lo exactly (TwoSum)
    row_to_f32(P.sdt, P.s, g * P.N + n0, ncols, sb, w_pad);
    row_to_f32(P.odt, P.o, g * P.N + n0, ncols, ob, w_pad);
    for (int64_t n = 0; n < w_pad; n += W) {
      const VF sv = Vec::loadu(sb + n), ov = Vec::loadu(ob + n);
      const VF s8 = Vec::fma(Vec::set1(8.f), sv, Vec::zero());  // exact
      const VF hi = Vec::add(ov, s8), bv = Vec::sub(hi, ov);
      const VF lo = Vec::add(Vec::sub(ov, Vec::sub(hi, bv)), Vec::sub(s8, bv));
      for (int r = 0; r < R; ++r) {
        const VF xs = Vec::set1(P.xs[(m0 + r) * P.G + g]);
        VF yv = Vec::loadu(y + r * sw + n);
        yv = Vec::fma(hi, xs, yv);
        yv = Vec::fma(sv, Vec::loadu(facc + r * sw + n), yv);
        yv = Vec::fma(lo, xs, yv);
        Vec::storeu(y + r * sw + n, yv);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t n = 0; n < ncols; ++n)
      P.out[(m0 + r) * P.N + n0 + n] = P.bias != nullptr ? y[r * sw + n] + P.bias[n0 + n] : y[r * sw + n];
}

// All rows, columns [n0, n1) in strips of sw: per strip, every tile of up to 4 rows (a strip's packed columns are
// K/8 x sw words, sized by the caller to stay in L2: the second tile reads them there, not from memory).
// scratch as strip's for R = 4.
TK_ATTR void columns(const Problem& P, int64_t n0, int64_t n1, int64_t sw, float* scratch, int32_t* qt) {
  for (int64_t c = n0; c < n1; c += sw) {
    const int64_t nc = std::min(sw, n1 - c);
    for (int64_t m0 = 0; m0 < P.M; m0 += 4) {
      switch (std::min<int64_t>(4, P.M - m0)) {
        case 4: strip<4>(P, m0, c, nc, sw, scratch, qt); break;
        case 3: strip<3>(P, m0, c, nc, sw, scratch, qt); break;
        case 2: strip<2>(P, m0, c, nc, sw, scratch, qt); break;
        default: strip<1>(P, m0, c, nc, sw, scratch, qt); break;
      }
    }
  }
}
