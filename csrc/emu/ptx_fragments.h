// Which matrix element each lane holds in each register of a warp-level matrix instruction, transcribed from the
// PTX ISA (PTX ISA 8.x/9.0, "Warp-level matrix fragments"; groupID = lane >> 2, threadID_in_group = lane % 4):
//   ldmatrix.sync.aligned.m8n8.x4.b16 ("Warp-level matrix load instruction: ldmatrix"): threads 8i..8i+7 give the
//       row addresses of matrix i (rows of 8 b16); destination register i of lane l holds elements
//       (row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1) of matrix i, the lower column in the lower half.
//   mma.m16n8k16 .f16/.bf16, A (16 x 16, .row): a_i for i = 0..7, two per register (a0 a1 | a2 a3 | a4 a5 | a6 a7):
//       row = groupID for a0, a1, a4, a5, groupID + 8 for a2, a3, a6, a7;
//       col = threadID_in_group * 2 + (i & 1) for i < 4, + 8 for i >= 4.
//   mma.m16n8k16 B (16 x 8, .col): b_i, i = 0..3, (b0 b1 | b2 b3): row (k) = threadID_in_group * 2 + (i & 1) for
//       i < 2, + 8 for i >= 2; col (n) = groupID.
//   mma.m16n8k32 B (the sparse mma.sp's dense B, 32 x 8): b_i, i = 0..7, two per register: k = threadID_in_group * 2
//       + (i & 1) + 8 * (i >> 1); n = groupID.
//   C/D (16 x 8, f32): c_i, i = 0..3: row = groupID + 8 * (i >= 2); col = threadID_in_group * 2 + (i & 1).
//   mma.sp m16n8k32 A: the 16 x 16 compressed matrix, laid out as the dense m16n8k16 A (the ISA's "sparse matrix
//       storage": the same fragment figure over the compressed columns).
//   mma.sp{::ordered_metadata}.m16n8k32 .f16/.bf16 (PTX ISA 9.x, 9.7.14.6.2.2 "Matrix Fragments for sparse
//       mma.m16n8k32 with .f16 and .bf16 types", and 9.7.14.6.1 "Sparse matrix storage"):
//     A (Figure 120): a_i, i = 0..7, two per register, "two non-zero elements out of 4 consecutive elements":
//       row = groupID for ai where 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise; col = [firstcol .. firstcol + 3]
//       with firstcol = threadID_in_group * 4 for i < 4, threadID_in_group * 4 + 16 for i >= 4; which of the 4
//       columns: "as described in Sparse matrix storage", i.e. the metadata's index of nonzero number i & 1.
//     Metadata: "A .b32 register containing 16 2-bit vectors with each pair of 2-bit vectors storing the indices of
//       two non-zero element[s] from a 4-wide chunk of matrix A" (Figure 122), from "a thread-pair within a group of
//       four consecutive threads ... the sparsity selector must be either 0 (threads T0, T1) or 1 (threads T2, T3)".
//       Figure 122 (an image; read as in LLVM's mlir/test/Integration/Dialect/SparseTensor/GPU/CUDA/
//       sparse-mma-2-4-f16.mlir, which runs this instruction on sm_80, and as CUTLASS's reordered metadata implies:
//       formats/sparse24.py cutlass_meta_offsets puts rows g and g + 8 of one int16 column in one 32-bit word):
//       selector s, thread 2s + p of quad g: bits [15..0] hold the 4 chunks of columns 16p .. 16p + 15 of row g,
//       bits [31..16] the same of row g + 8; chunk j of the 4 at bits 4j .. 4j + 3, the first nonzero's index in
//       the lower 2 bits (Figure 112: 0b0100 = columns 0 and 1; ::ordered_metadata allows only 0b0100, 0b1000,
//       0b1001, 0b1100, 0b1101, 0b1110: idx0 < idx1).
// tests/test_cuda_emulator.py checks these functions against the ISA's formulas written out again in Python and a
// few hand-read entries of the ISA's figures; tests/test_sparse24_mm_cuda_emulated.py the mma.sp ones (through
// emu_sparse_fragment_tables, and one emulated mma.sp on registers built in Python from a 16 x 32 tile).
#pragma once

namespace tk_emu {

struct Coord {
  int row, col;
};

// element i (0..7) of the m16n8k16 A fragment
inline Coord mma_a(int lane, int i) {
  const int g = lane >> 2, t = lane & 3;
  return Coord{g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)};
}

// element i of the B fragment (k16: i = 0..3; k32: i = 0..7): (k, n)
inline Coord mma_b(int lane, int i) {
  const int g = lane >> 2, t = lane & 3;
  return Coord{2 * t + (i & 1) + 8 * (i >> 1), g};
}

// element i (0..3) of the f32 C/D fragment
inline Coord mma_c(int lane, int i) {
  const int g = lane >> 2, t = lane & 3;
  return Coord{g + 8 * (i >> 1), 2 * t + (i & 1)};
}

// element i (0..7) of the mma.sp m16n8k32 .f16/.bf16 A fragment: (row, first column of its 4-wide chunk); it is
// nonzero number i & 1 of that chunk
inline Coord mma_sp_a(int lane, int i) {
  const int g = lane >> 2, t = lane & 3;
  return Coord{g + 8 * ((i >> 1) & 1), 4 * t + 16 * (i >> 2)};
}

// Where the metadata of the 4-wide chunk `chunk` (columns 4 chunk .. 4 chunk + 3, chunk 0..7) of A's row `row` comes
// from in mma.sp m16n8k32 .f16/.bf16 with sparsity selector `selector`: bits bit .. bit + 3 of lane's register.
struct MetaField {
  int lane, bit;
};
inline MetaField mma_sp_meta(int row, int chunk, int selector) {
  return MetaField{4 * (row % 8) + 2 * selector + chunk / 4, 16 * (row / 8) + 4 * (chunk % 4)};
}

// The same, from the register's side: nibble f (0..7, bits 4f .. 4f + 3) of lane's metadata -> (row, first column of
// the chunk), or {-1, -1} when the lane supplies none under `selector`.
inline Coord mma_sp_meta_cell(int lane, int f, int selector) {
  const int p = (lane & 3) - 2 * selector;
  if (p < 0 || p > 1) return Coord{-1, -1};
  return Coord{(lane >> 2) + 8 * (f / 4), 16 * p + 4 * (f % 4)};
}

// element h (0: lower half, 1: upper) of destination register of ldmatrix (non-transposed), within its 8x8 matrix
inline Coord ldmatrix(int lane, int h) { return Coord{lane >> 2, 2 * (lane & 3) + h}; }

// the same for ldmatrix ... .trans (the ISA: "the matrix is loaded in column-major format"): element h of lane l's
// register is the stored matrix's (row 2 (l % 4) + h, column l / 4), i.e. the non-transposed map with row and
// column exchanged; the 8 row addresses are given as without .trans
inline Coord ldmatrix_trans(int lane, int h) { return Coord{2 * (lane & 3) + h, lane >> 2}; }

}  // namespace tk_emu
