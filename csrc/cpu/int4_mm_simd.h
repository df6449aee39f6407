// ISA-generic body of the int4_mm CPU kernels. NOT a normal header: csrc/cpu/int4_mm.cpp includes it once per
// instruction set, inside namespace `avx512` / `avx2` / `scalar`, after defining there
//   struct Vec   the vector type and its few operations (see int4_mm.cpp): Vec::W fp32 lanes, Vec::J vectors per
//                column block, Vec::RMAX rows of x per register tile, Vec::NREG vector registers; unpacking is
//                prepare(word) once per loaded vector, then nibble(w, i) = float(q_i - 8) (any i) or
//                next_nibble(w, i) (i = 0, 1, ..., 7 in order: may keep state in w); the streaming path unpacks
//                with stream_nibble(w, i) = next_nibble's value times kStreamScale (a power of two) and reads x
//                times its inverse (Problem::x, prepared by the caller), so each product is exactly x (q_i - 8)
//   TK_ATTR      the function attributes of that ISA (e.g. __attribute__((target("avx512f,avx512bw"))))
// so the kernels below exist three times, each compiled for its ISA and picked at run time. Everything here is
// either TK_ATTR or always_inline into a TK_ATTR function; nothing here may include a header or instantiate a
// template from outside (an inline function compiled for AVX-512 must not become the copy the linker keeps for
// everyone). No include guard on purpose.

constexpr int W = Vec::W;        // fp32 lanes per vector (= int4 columns per packed-word vector)
constexpr int J = Vec::J;        // vectors per column block
constexpr int NB = W * J;        // columns per block: the unit of work of one thread
constexpr int RMAX = Vec::RMAX;  // rows of x sharing one unpacked weight vector
using VF = typename Vec::F;
using VI = typename Vec::I;

// acc[r][j] += sum_{w < nw} sum_{i < 8} x[r][8w + i] * (q(word q[w * ldq + j * W + lane], nibble i) - 8)
// Each packed vector is unpacked once (nibble i - 8 -> float: Vec::nibble) and used by all R rows. The sum starts
// from zero in S interleaved accumulator sets (nibble i goes to set i % S) that are added to acc at the end: with
// few rows, more independent FMA chains hide the FMA latency, and shorter chains round less (decode has compute
// to spare: it waits for memory).
template <int R>
TK_ATTR __attribute__((always_inline)) inline void accumulate_words(const int32_t* q, int64_t ldq, int64_t nw,
                                                                    const float* const* x, VF (&acc)[R][J]) {
  // as many sets as fit in the registers next to the words, the broadcast x and a few constants
  constexpr int kFree = Vec::NREG - J - R - 3;
  constexpr int S = R * J >= 8 ? 1 : 4 * R * J <= kFree ? 4 : 2 * R * J <= kFree ? 2 : 1;
  VF part[S][R][J];
  for (int t = 0; t < S; ++t)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) part[t][r][j] = Vec::zero();
  for (int64_t w = 0; w < nw; ++w) {
    // The block's piece of each row is 64-256 bytes a row apart (N words: often a page): no hardware prefetcher
    // follows that, so fetch kPrefetchRows rows ahead (the next chunk's or group's first rows at the end: the same
    // block continues there). Lines already in L1 (the other row chunks of a panel) make this a cheap no-op.
    constexpr int64_t kPrefetchRows = 8;
    for (int j = 0; j < J * W; j += 16) __builtin_prefetch(q + (w + kPrefetchRows) * ldq + j);
    VI words[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) words[j] = Vec::prepare(Vec::loadq(q + w * ldq + j * W));
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      VF xb[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) xb[r] = Vec::set1(x[r][8 * w + i]);
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) {
        const VF v = Vec::next_nibble(words[j], i);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) part[i % S][r][j] = Vec::fma(xb[r], v, part[i % S][r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      VF sum = part[0][r][j];
      if constexpr (S == 2) sum = Vec::add(sum, part[1][r][j]);
      if constexpr (S == 4) sum = Vec::add(Vec::add(sum, part[1][r][j]), Vec::add(part[2][r][j], part[3][r][j]));
      acc[r][j] = Vec::add(acc[r][j], sum);
    }
}

// One packed word row shared by two groups (or the last, partial one): x outside [k0, k1) counts as 0, and x is
// never read past k1 (K need not be a multiple of 8).
template <int R>
TK_ATTR __attribute__((always_inline)) inline void accumulate_masked_word(const int32_t* q, int64_t w, int64_t k0,
                                                                          int64_t k1, const float* x, int64_t ldx,
                                                                          VF (&acc)[R][J]) {
  float xm[R][8];
  const float* xp[R];
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < 8; ++i) {
      const int64_t k = 8 * w + i;
      xm[r][i] = (k >= k0 && k < k1) ? x[r * ldx + k] : 0.f;
    }
    xp[r] = xm[r];
  }
  accumulate_words<R>(q, 0, 1, xp, acc);
}

// Rows [0, R) of x (x points at row 0, rows ldx apart) against one group of one column block:
//   y[r][n] += s[n] * sum_{k in group} x[r][k] (q[k][n] - 8)  +  (o[n] + 8 s[n]) * xsum[r]
// Centering q on 8 keeps the two terms small: for symmetric quantization o = -8s and the second one vanishes, for
// min/max quantization o + 8s is the middle of the group's range. Uncentered, both terms would be about
// 8 s |xsum| and cancel, losing fp32 digits on outputs much smaller than that.
// o + 8s is kept exactly, as hi + lo (Knuth's TwoSum; 8s is exact): rounded to fp32 it lost the low bits of o
// whenever 8s dwarfs it (a constant group stored with s = 1: o = 1e-6 came out 9.54e-7). Five adds per group and
// column vector, and one more FMA per row; exact whatever the compiler contracts, as the only product is exact.
template <int R>
TK_ATTR void group_rows(const int32_t* q, int64_t ldq, const Span& sp, const float* x, int64_t ldx,
                        const float* xsum, int64_t xsum_stride, const float* s, const float* o, float* y) {
  VF acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = Vec::zero();
  if (sp.head_w >= 0) accumulate_masked_word<R>(q + sp.head_w * ldq, sp.head_w, sp.k0, sp.k1, x, ldx, acc);
  // Long groups (per-channel: gs = K) are summed in chunks of kChunkWords words, each from zero, so the fp32
  // rounding error grows with the chunk length rather than with K; groups up to 128 are one chunk.
  constexpr int64_t kChunkWords = 16;
  for (int64_t w0 = sp.mid_w0; w0 < sp.mid_w0 + sp.mid_n; w0 += kChunkWords) {
    const int64_t nw = sp.mid_w0 + sp.mid_n - w0 < kChunkWords ? sp.mid_w0 + sp.mid_n - w0 : kChunkWords;
    const float* xp[R];
    for (int r = 0; r < R; ++r) xp[r] = x + r * ldx + 8 * w0;
    accumulate_words<R>(q + w0 * ldq, ldq, nw, xp, acc);
  }
  if (sp.tail_w >= 0) accumulate_masked_word<R>(q + sp.tail_w * ldq, sp.tail_w, sp.k0, sp.k1, x, ldx, acc);
  for (int j = 0; j < J; ++j) {
    const VF sv = Vec::loadu(s + j * W), ov = Vec::loadu(o + j * W);
    const VF s8 = Vec::fma(Vec::set1(8.f), sv, Vec::zero());  // exact
    const VF hi = Vec::add(ov, s8), bv = Vec::sub(hi, ov);
    const VF lo = Vec::add(Vec::sub(ov, Vec::sub(hi, bv)), Vec::sub(s8, bv));  // hi + lo = o + 8s exactly
    for (int r = 0; r < R; ++r) {
      const VF xs = Vec::set1(xsum[r * xsum_stride]);
      VF yv = Vec::loadu(y + r * NB + j * W);
      yv = Vec::fma(hi, xs, yv);
      yv = Vec::fma(sv, acc[r][j], yv);
      yv = Vec::fma(lo, xs, yv);
      Vec::storeu(y + r * NB + j * W, yv);
    }
  }
}

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

// group_rows<n> for a run-time n in [1, R]
template <int R>
TK_ATTR __attribute__((always_inline)) inline void group_rows_n(int n, const int32_t* q, int64_t ldq, const Span& sp,
                                                                const float* x, int64_t ldx, const float* xsum,
                                                                int64_t xsum_stride, const float* s, const float* o,
                                                                float* y) {
  if constexpr (R > 1) {
    if (n < R) return group_rows_n<R - 1>(n, q, ldq, sp, x, ldx, xsum, xsum_stride, s, o, y);
  }
  group_rows<R>(q, ldq, sp, x, ldx, xsum, xsum_stride, s, o, y);
}

// out[m0:m1, n0:n0 + NB] (fewer columns in the last block), all groups, plus the bias when there is one.
// scratch: (m1 - m0 + 2) * NB floats; qpad: ceil(K/8) * NB int32, used only when the block is partial.
TK_ATTR void fused_block(const Problem& P, int64_t m0, int64_t m1, int64_t n0, float* scratch, int32_t* qpad) {
  const int64_t ncols = P.N - n0 < NB ? P.N - n0 : NB;
  const int64_t K8 = (P.K + 7) / 8, rows = m1 - m0;
  const int32_t* q = P.q + n0;
  int64_t ldq = P.N;
  if (ncols < NB) {  // copy the ragged edge into a zero-padded tile so the kernel always runs full vectors
    for (int64_t w = 0; w < K8; ++w)
      for (int64_t n = 0; n < NB; ++n) qpad[w * NB + n] = n < ncols ? q[w * ldq + n] : 0;
    q = qpad;
    ldq = NB;
  }
  float* y = scratch;          // (rows, NB)
  float* sb = y + rows * NB;   // (NB)
  float* ob = sb + NB;         // (NB)
  for (int64_t i = 0; i < rows * NB; ++i) y[i] = 0.f;
  for (int64_t g = 0; g < P.G; ++g) {
    row_to_f32(P.sdt, P.s, g * P.N + n0, ncols, sb, NB);
    row_to_f32(P.odt, P.o, g * P.N + n0, ncols, ob, NB);
    // the group's weight tile (gs/8 words x NB columns) stays in L1 while every row chunk of the panel uses it
    for (int64_t r = 0; r < rows; r += RMAX) {
      const int n = static_cast<int>(rows - r < RMAX ? rows - r : RMAX);
      group_rows_n<RMAX>(n, q, ldq, P.spans[g], P.x + (m0 + r) * P.K, P.K, P.xsum + (m0 + r) * P.G + g, P.G, sb,
                         ob, y + r * NB);
    }
  }
  // The epilogue: the bias joins the fp32 sum here, so the one conversion to x's dtype is the output's only rounding.
  if (P.bias != nullptr) {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t n = 0; n < ncols; ++n) P.out[(m0 + m) * P.N + n0 + n] = y[m * NB + n] + P.bias[n0 + n];
  } else {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t n = 0; n < ncols; ++n) P.out[(m0 + m) * P.N + n0 + n] = y[m * NB + n];
  }
}

// Dequantize rows [k_begin, k_end) of columns [n0, n0 + nb) into w (row-major, nb floats per row):
// w[k][n] = q[k][n] * s[k / gs][n] + o[k / gs][n]. sb, ob: nb floats of scratch each.
TK_ATTR void dequant_rows(const Problem& P, int64_t k_begin, int64_t k_end, int64_t n0, int64_t nb, float* w,
                          float* sb, float* ob) {
  int64_t g_loaded = -1;
  for (int64_t k = k_begin; k < k_end; ++k) {
    const int64_t g = k / P.gs;
    if (g != g_loaded) {
      row_to_f32(P.sdt, P.s, g * P.N + n0, nb, sb, nb);
      row_to_f32(P.odt, P.o, g * P.N + n0, nb, ob, nb);
      g_loaded = g;
    }
    const int32_t* qrow = P.q + (k / 8) * P.N + n0;
    const int i = static_cast<int>(k % 8);
    float* dst = w + (k - k_begin) * nb;
    int64_t n = 0;
    for (; n + W <= nb; n += W) {
      const VF v = Vec::add(Vec::nibble(Vec::prepare(Vec::loadq(qrow + n)), i), Vec::set1(8.f));
      Vec::storeu(dst + n, Vec::fma(v, Vec::loadu(sb + n), Vec::loadu(ob + n)));
    }
    for (; n < nb; ++n)
      dst[n] = static_cast<float>((static_cast<uint32_t>(qrow[n]) >> (4 * i)) & 15u) * sb[n] + ob[n];
  }
}

// ---- the streaming path: M <= RMAX (decode) ------------------------------------------------------------------
// The block path above walks one NB-column block down all K rows: a 64-byte (AVX2) or 256-byte (AVX-512) piece of
// every packed row, N words apart: a new 4 KiB page every row at Llama sizes, which the hardware prefetchers do not
// follow, so M = 1 waited on memory latency (2.5 GB/s at 4096 x 4096 on a 2-core EPYC whose copy runs at 12).
// Here a thread owns a strip of columns and walks the packed rows in order: each row's strip is one contiguous
// run (up to 8 KiB at M = 1), the sums live in L1 scratch, and every byte of the weight is read once, in address
// order. Per word vector: the 8 nibbles unpacked once, 8 FMAs per row of x in two chains, one load and store of
// the row's partial sum. The arithmetic per column has the block path's form (chunks of <= 16 words summed from
// zero, the same centered epilogue), not its exact order, and no step depends on which columns a thread gets: the
// result is the same bits for any thread count.

constexpr int64_t kStreamChunkWords = 16;  // as group_rows: long groups are summed in chunks of this many words
// The row stream_word_row prefetches: this many packed rows ahead. One row is a few KiB of a thread's strip, too
// close to cover a memory latency on a cold small layer (a model's: read once a token); two took a cold 576 x 576
// layer from 36 to 29 us on the Xeon; more did not help any shape.
constexpr int64_t kStreamAheadRows = 2;

// part[r][v W + lane] (first ? = : +=) sum_{i<8} xw[r][i] * (nibble i of word v of qrow - 8), v in [0, nv)
// prefetch: the same columns of a later row (nullptr: none). A row's strip is a few KiB at most, and the hardware
// prefetchers stop at each 4 KiB page, so every row would start with a full memory latency; fetching the next row
// while this one is summed keeps the memory busy (never faults: a prefetch past the tensor is dropped).
template <int R>
TK_ATTR __attribute__((always_inline)) inline void stream_word_row(const int32_t* qrow, int64_t nv,
                                                                   const float* const* xw, float* part, int64_t ldp,
                                                                   bool first, const int32_t* prefetch) {
  // broadcast once per row, not per vector: the stores to part could alias xw for all the compiler knows, and
  // a broadcast from memory takes a shuffle port the nibble shifts need
  VF xb[R][8];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 8; ++i) xb[r][i] = Vec::set1(xw[r][i]);
  for (int64_t v = 0; v < nv; ++v) {
    if (prefetch != nullptr && (v * W) % 16 == 0) __builtin_prefetch(prefetch + v * W);
    VI wv = Vec::prepare(Vec::loadq(qrow + v * W));
    VF t[R][2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const VF nb = Vec::stream_nibble(wv, i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) t[r][i & 1] = Vec::fma(xb[r][i], nb, i < 2 ? Vec::zero() : t[r][i & 1]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float* p = part + r * ldp + v * W;
      const VF sum = Vec::add(t[r][0], t[r][1]);
      Vec::storeu(p, first ? sum : Vec::add(Vec::loadu(p), sum));
    }
  }
}

// Prefetch values [off, off + n) of a (G, N) scales/offsets tensor of dtype dt.
TK_ATTR __attribute__((always_inline)) inline void prefetch_group_row(const void* base, Dt dt, int64_t off,
                                                                      int64_t n) {
  const int64_t es = dt == Dt::F32 ? 4 : 2;
  const char* p = static_cast<const char*>(base) + off * es;
  for (int64_t b = 0; b < n * es; b += 64) __builtin_prefetch(p + b);
}

// Columns [n0, n0 + ncols) of rows [0, R) (x and out point at row 0; ncols <= the scratch's width sw, a
// multiple of W): all groups, then the bias. scratch: 3 R sw + 2 sw + W floats, qt: W words.
template <int R>
TK_ATTR void stream_strip(const Problem& P, const float* x, float* out, int64_t n0, int64_t ncols, int64_t sw,
                          float* scratch, int32_t* qt) {
  const int64_t nfull = ncols / W, ragged = ncols % W, nv = nfull + (ragged ? 1 : 0), w_pad = nv * W;
  float* acc = scratch;        // (R, sw): the group's sum
  float* part = acc + R * sw;  // (R, sw): a chunk's sum, from zero
  float* y = part + R * sw;    // (R, sw): the output, over all groups
  float* sb = y + R * sw;      // (sw): the group's scales as fp32
  float* ob = sb + sw;         // (sw): its offsets
  for (int64_t i = 0; i < R * w_pad; ++i) y[(i / w_pad) * sw + i % w_pad] = 0.f;
  const int32_t* q = P.q + n0;
  prefetch_group_row(P.s, P.sdt, n0, ncols);
  prefetch_group_row(P.o, P.odt, n0, ncols);
  for (int64_t g = 0; g < P.G; ++g) {
    // The next group's scales and offsets: a row N values on from this one, which no prefetcher follows, read only
    // at the group's end. Requested now, they arrive while this group's words are summed (at g32 they are a third
    // of the bytes a layer streams with fp32 scales; waited for, they cost a cold layer ~40% more time).
    if (g + 1 < P.G) {
      prefetch_group_row(P.s, P.sdt, (g + 1) * P.N + n0, ncols);
      prefetch_group_row(P.o, P.odt, (g + 1) * P.N + n0, ncols);
    }
    const Span& sp = P.spans[g];
    const int64_t w_first = sp.head_w >= 0 ? sp.head_w : sp.mid_w0;
    const int64_t w_last = sp.tail_w >= 0 ? sp.tail_w : sp.mid_w0 + sp.mid_n - 1;
    for (int64_t c0 = w_first; c0 <= w_last; c0 += kStreamChunkWords) {
      const int64_t c1 = std::min(w_last + 1, c0 + kStreamChunkWords);
      float* dst = c0 == w_first ? acc : part;  // the first chunk is the group's sum so far: no copy
      for (int64_t w = c0; w < c1; ++w) {
        float xm[R][8];  // x masked to [k0, k1) for a word the group shares or that runs past K
        const float* xw[R];
        const bool masked = w == sp.head_w || w == sp.tail_w;
        for (int r = 0; r < R; ++r) {
          if (masked) {
            for (int i = 0; i < 8; ++i) {
              const int64_t k = 8 * w + i;
              xm[r][i] = (k >= sp.k0 && k < sp.k1) ? x[r * P.K + k] : 0.f;
            }
            xw[r] = xm[r];
          } else {
            xw[r] = x + r * P.K + 8 * w;
          }
        }
        const int32_t* qrow = q + w * P.N;
        stream_word_row<R>(qrow, nfull, xw, dst, sw, w == c0, qrow + kStreamAheadRows * P.N);
        if (ragged) {  // the last columns of N: a zero-padded copy, so no read runs past the row (or the tensor)
          for (int64_t n = 0; n < W; ++n) qt[n] = n < ragged ? qrow[nfull * W + n] : 0;
          stream_word_row<R>(qt, 1, xw, dst + nfull * W, sw, w == c0, nullptr);
        }
      }
      if (dst == part)
        for (int r = 0; r < R; ++r)
          for (int64_t n = 0; n < w_pad; n += W)
            Vec::storeu(acc + r * sw + n, Vec::add(Vec::loadu(acc + r * sw + n), Vec::loadu(part + r * sw + n)));
    }
    // the group's epilogue, as group_rows: y += s acc + (hi + lo) xsum, o + 8s = hi + lo exactly
    // fp32 scales/offsets of whole vectors are read in place; others are converted (or padded) into sb/ob
    const float* sg = sb;
    const float* og = ob;
    if (P.sdt == Dt::F32 && ncols == w_pad) sg = static_cast<const float*>(P.s) + g * P.N + n0;
    else row_to_f32(P.sdt, P.s, g * P.N + n0, ncols, sb, w_pad);
    if (P.odt == Dt::F32 && ncols == w_pad) og = static_cast<const float*>(P.o) + g * P.N + n0;
    else row_to_f32(P.odt, P.o, g * P.N + n0, ncols, ob, w_pad);
    for (int64_t n = 0; n < w_pad; n += W) {
      const VF sv = Vec::loadu(sg + n), ov = Vec::loadu(og + n);
      const VF s8 = Vec::fma(Vec::set1(8.f), sv, Vec::zero());  // exact
      const VF hi = Vec::add(ov, s8), bv = Vec::sub(hi, ov);
      const VF lo = Vec::add(Vec::sub(ov, Vec::sub(hi, bv)), Vec::sub(s8, bv));
      for (int r = 0; r < R; ++r) {
        const VF xs = Vec::set1(P.xsum[r * P.G + g]);
        VF yv = Vec::loadu(y + r * sw + n);
        yv = Vec::fma(hi, xs, yv);
        yv = Vec::fma(sv, Vec::loadu(acc + r * sw + n), yv);
        yv = Vec::fma(lo, xs, yv);
        Vec::storeu(y + r * sw + n, yv);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t n = 0; n < ncols; ++n)
      out[r * P.N + n0 + n] = P.bias != nullptr ? y[r * sw + n] + P.bias[n0 + n] : y[r * sw + n];
}

// stream_strip<m> for a run-time m in [1, R]
template <int R>
TK_ATTR void stream_strip_n(int m, const Problem& P, const float* x, float* out, int64_t n0, int64_t ncols,
                            int64_t sw, float* scratch, int32_t* qt) {
  if constexpr (R > 1) {
    if (m < R) return stream_strip_n<R - 1>(m, P, x, out, n0, ncols, sw, scratch, qt);
  }
  stream_strip<R>(P, x, out, n0, ncols, sw, scratch, qt);
}

// Rows [0, M) (M <= RMAX), columns [n0, n1): n1 - n0 a multiple of W except at N. scratch as stream_strip's.
TK_ATTR void stream_columns(const Problem& P, int64_t n0, int64_t n1, int64_t sw, float* scratch, int32_t* qt) {
  for (int64_t c = n0; c < n1; c += sw)
    stream_strip_n<RMAX>(static_cast<int>(P.M), P, P.x, P.out, c, std::min(sw, n1 - c), sw, scratch, qt);
}
