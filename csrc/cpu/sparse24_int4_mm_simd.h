// ISA-generic body of the sparse24_int4_mm CPU kernels. NOT a normal header: csrc/cpu/sparse24_int4_mm.cpp
// includes it once per instruction set, inside namespace `avx512` / `avx2` / `scalar`, after defining there
//   struct Vec   Vec::W fp32 lanes = W adjacent output columns; Vec::RMAX rows of x per pass over a word row.
//                loadw = W packed words of one word row, loadm = their W meta elements (int16, from the
//                transposed chunk), nib(w, i) = float(nibble i), idx(m, i) = selector of kept value i (the low 2
//                bits of each lane are its position inside its group of 4 k), Q = 4 x values broadcast to every
//                128-bit lane (quad), pick(Q, idx) = the x value each lane's kept value multiplies
//   TK_ATTR      the function attributes of that ISA
// so the kernels below exist three times, each compiled for its ISA and picked at run time. Everything here is
// either TK_ATTR or always_inline into a TK_ATTR function and uses nothing from outside but Problem (a plain
// struct) and scalar_to_f32: an inline function compiled for AVX-512 must never become the copy the linker keeps
// for everyone. No include guard on purpose.

constexpr int W = Vec::W;
constexpr int RMAX = Vec::RMAX;
using VF = typename Vec::F;
using VI = typename Vec::I;
using VQ = typename Vec::Q;

// acc[r][0, ncv * W) += sum over nibbles i in [i0, i1) of word row j of dequant(q_i) * x[r][k(i)], for r < R.
// q: the word row's first column of the piece; m: the same columns' meta elements of that row (transposed chunk);
// xj[r]: x row r at dense k = 16 j; s, o: the kept values' group's scales and offsets as fp32.
// Each unpacked, dequantized vector (w = q s + o, one rounding where the ISA fuses it) serves the R rows; each
// lane's chain adds the nibbles in order i = i0, i0 + 1, ... whatever the thread count. FULL: i0 = 0, i1 = 8 known
// at compile time (immediate shifts, every nibble in one group).
template <int R, bool FULL>
TK_ATTR __attribute__((always_inline)) inline void word_row(const int32_t* q, const uint16_t* m, int64_t ncv,
                                                            const float* const* xj, const float* s, const float* o,
                                                            float* acc, int64_t ldacc, int i0, int i1) {
  if constexpr (FULL) i0 = 0, i1 = 8;
  for (int64_t v = 0; v < ncv; ++v) {
    const VI wq = Vec::loadw(q + v * W);
    const VI mt = Vec::loadm(m + v * W);
    const VF sv = Vec::loadu(s + v * W), ov = Vec::loadu(o + v * W);
    VF a[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r] = Vec::loadu(acc + r * ldacc + v * W);
#pragma GCC unroll 8
    for (int i = i0; i < i1; ++i) {
      const VF w = Vec::fma(Vec::nib(wq, i), sv, ov);
      const VI id = Vec::idx(mt, i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r] = Vec::fma(w, Vec::pick(Vec::quad(xj[r] + 4 * (i >> 1)), id), a[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) Vec::storeu(acc + r * ldacc + v * W, a[r]);
  }
}

template <int R>
TK_ATTR __attribute__((always_inline)) inline void word_row_r(int rr, bool full, const int32_t* q,
                                                              const uint16_t* m, int64_t ncv,
                                                              const float* const* xj, const float* s,
                                                              const float* o, float* acc, int64_t ldacc, int i0,
                                                              int i1) {
  if constexpr (R > 1) {
    if (rr < R) return word_row_r<R - 1>(rr, full, q, m, ncv, xj, s, o, acc, ldacc, i0, i1);
  }
  if (full) word_row<R, true>(q, m, ncv, xj, s, o, acc, ldacc, 0, 8);
  else word_row<R, false>(q, m, ncv, xj, s, o, acc, ldacc, i0, i1);
}

// dst[0, n) = row g of a (G, N) scale/offset tensor, columns [c0, c0 + n), as fp32
TK_ATTR void group_to_f32(Dt dt, const void* src, int64_t off, int64_t n, float* dst) {
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
}

// Columns [c0, c0 + cw) (cw a multiple of W), all rows of x, all of K: out[m][c0 + n] = bias[c0 + n] + the sum.
// The word rows are walked in order, each row's piece of cw words read contiguously (a row of qweight spans all N
// columns, so a thread reads long runs, never a 64-byte piece per row). The meta elements of those columns,
// stored per column (N, K16), are transposed a chunk of JC word rows at a time into mt (JC x cw int16; one 64-byte
// line per column per chunk), so both tensors' bytes are read from memory once. acc (M x cw fp32) and mt stay in
// L1/L2 for the whole unit; for M > RMAX every row tile reuses the chunk's weight while it is in L2.
// scratch: M * cw + 2 * cw floats; mt: JC * cw uint16.
TK_ATTR void run_unit(const Problem& P, int64_t c0, int64_t cw, float* scratch, uint16_t* mt) {
  const int64_t ncv = cw / W;
  float* acc = scratch;              // (M, cw)
  float* sb = acc + P.M * cw;        // (cw): the current group's scales, fp32
  float* ob = sb + cw;               // (cw): its offsets
  for (int64_t i = 0; i < P.M * cw; ++i) acc[i] = 0.f;
  const int64_t KH = P.K / 2;        // kept values per row
  int64_t g_loaded = -1;
  auto load_group = [&](int64_t g) {
    if (g == g_loaded) return;
    group_to_f32(P.sdt, P.s, g * P.N + c0, cw, sb);
    group_to_f32(P.odt, P.o, g * P.N + c0, cw, ob);
    g_loaded = g;
  };
  for (int64_t jc = 0; jc < P.K16; jc += kChunkRows) {
    const int64_t nj = P.K16 - jc < kChunkRows ? P.K16 - jc : kChunkRows;
    Vec::transpose_meta(P.meta + c0 * P.K16 + jc, P.K16, nj, cw, mt);
    for (int64_t r0 = 0; r0 < P.M; r0 += RMAX) {
      const int rr = static_cast<int>(P.M - r0 < RMAX ? P.M - r0 : RMAX);
      for (int64_t j = jc; j < jc + nj; ++j) {
        const float* xj[RMAX];
        for (int r = 0; r < rr; ++r) xj[r] = P.x + (r0 + r) * P.ldx + 16 * j;
        const int32_t* q = P.q + j * P.N + c0;
        const uint16_t* m = mt + (j - jc) * cw;
        float* a = acc + r0 * cw;
        const int64_t c_first = 8 * j, c_end = KH < c_first + 8 ? KH : c_first + 8;  // kept values of the row
        if (c_first / P.gs == (c_end - 1) / P.gs && c_end - c_first == 8) {
          load_group(c_first / P.gs);
          word_row_r<RMAX>(rr, true, q, m, ncv, xj, sb, ob, a, cw, 0, 8);
        } else {
          // the row spans two or more groups (group sizes not a multiple of 8) or is the last, partial one: runs
          // of nibbles that share a group, in order (x past K is never paired with a nibble)
          for (int64_t c = c_first; c < c_end;) {
            const int64_t g = c / P.gs;
            const int64_t stop = (g + 1) * P.gs < c_end ? (g + 1) * P.gs : c_end;
            load_group(g);
            word_row_r<RMAX>(rr, false, q, m, ncv, xj, sb, ob, a, cw, static_cast<int>(c - c_first),
                             static_cast<int>(stop - c_first));
            c = stop;
          }
        }
      }
    }
  }
  // the epilogue: the bias joins the fp32 sum here, before the call's one conversion to x's dtype
  for (int64_t mm = 0; mm < P.M; ++mm) {
    float* dst = P.out + mm * P.N + c0;
    const float* src = acc + mm * cw;
    if (P.bias != nullptr) {
      for (int64_t n = 0; n < cw; ++n) dst[n] = src[n] + P.bias[c0 + n];
    } else {
      for (int64_t n = 0; n < cw; ++n) dst[n] = src[n];
    }
  }
}

// Dense fp32 rows [n0, n0 + nc) of W into w (nc x K, row-major), for the dequantize + BLAS path (large M).
TK_ATTR void expand_rows(const Problem& P, int64_t n0, int64_t nc, float* w) {
  const int64_t KH = P.K / 2;
  for (int64_t n = 0; n < nc; ++n) {
    float* dst = w + n * P.K;
    for (int64_t k = 0; k < P.K; ++k) dst[k] = 0.f;
    const int16_t* meta = P.meta + (n0 + n) * P.K16;
    int64_t g = -1, g_end = 0;
    float s = 0.f, o = 0.f;
    for (int64_t c = 0; c < KH; ++c) {
      if (c >= g_end) {  // a new group: its scale and offset once, not per value
        g = c / P.gs;
        g_end = (g + 1) * P.gs;
        s = scalar_to_f32(P.sdt, P.s, g * P.N + n0 + n);
        o = scalar_to_f32(P.odt, P.o, g * P.N + n0 + n);
      }
      const int64_t j = c >> 3;
      const int i = static_cast<int>(c & 7);
      const uint32_t word = static_cast<uint32_t>(P.q[j * P.N + n0 + n]);
      const unsigned pos = (static_cast<uint16_t>(meta[j]) >> (2 * i)) & 3u;
      dst[16 * j + 4 * (i >> 1) + pos] = static_cast<float>((word >> (4 * i)) & 15u) * s + o;
    }
  }
}
