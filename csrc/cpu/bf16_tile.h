// The one inner kernel of the bfloat16 CPU path, shared by every bf16 op (torch-free).
//
// A block computes C (16 or 32 rows x 16 or 32 columns, float32) as a sum
// over terms of A_i (rows x depth, bf16) . B_i (depth x columns, bf16), depth
// 32 or 16, then stores C (+ bias) rounded to bf16 through per-row output
// pointers.  This is the shape of AMX's TDPBF16PS: an A tile is 16 rows of
// up to 32 bf16, a B tile up to 16 pairs of reduction rows of 16 columns in
// VNNI order (B[k][n] at pair row k / 2, element 2 n + k % 2), C tiles
// 16 x 16 floats.  A 32-wide block is two B tiles ("halves"), so C lives in
// 1 to 4 tile registers across all of a block's terms.  Blocks of 16 (sides
// that are multiples of 16, not 32) take one half and 16-deep terms.
//
// Three implementations (bf16_amx.cpp, bf16_avx512.cpp, bf16_emulated.cpp):
// the AMX tile program, the same sums with AVX512-BF16 (VDPBF16PS), and the
// tile program over a scalar emulation of the AMX instructions, which the
// tests run on every machine so the tiling and index math are proven where
// AMX is absent.
#pragma once
#include <cstdint>

namespace ftk_cpu {

constexpr int kBf16Cols = 32;       // columns of a block at most (two B tiles)
constexpr int kBf16K = 32;          // reduction length of a term at most (one A tile row)
constexpr int kBf16TileRows = 16;   // rows of an A / C tile

struct Bf16Term {
  int64_t a_off;  // bytes from the block's A to this term's (A row 0, first reduction column)
  int64_t b_off;  // bytes from the block's B to this term's (pair row 0, columns 0-15)
};

// The sub-blocks an op's weight blocks split into: `width` columns of C by
// `depth` reduction steps per term, each 32 where the block side is a
// multiple of 32, else 16.  Packed, one is depth / 2 pair rows of 16 columns
// x 2 per half (bf16_gemm.cpp).
struct Bf16Split {
  int64_t width, depth;
  int64_t elems() const { return width * depth; }     // bf16 elements of a packed sub-block
  int64_t half_bytes() const { return depth / 2 * 64; }  // bytes from its columns 0-15 to 16-31
};
inline int64_t bf16_side(int64_t block_side) { return block_side % kBf16Cols == 0 ? kBf16Cols : kBf16Cols / 2; }
inline Bf16Split bf16_split(int64_t columns_side, int64_t reduction_side) {
  return {bf16_side(columns_side), bf16_side(reduction_side)};
}

struct Bf16Block {
  int row_tiles;                 // 1: 16 rows, 2: 32 rows (always readable from A)
  const uint8_t* a;              // A row 0
  int64_t lda;                   // bytes between A rows
  const uint8_t* b;              // B base
  int64_t ldb;                   // bytes between B pair rows
  int64_t b_half;                // bytes from B's columns 0-15 to columns 16-31
  const Bf16Term* terms;
  int64_t nterms;
  int cols;                      // columns stored (<= 32; <= 16: one half is computed)
  const float* bias;             // 32 floats added before rounding, or nullptr
  uint16_t* const* out_rows;     // [16 * row_tiles]: where row t's column 0 goes; nullptr: not stored
  int64_t out_col_stride;        // elements between stored columns
  bool stream = false;           // write whole 64-byte result rows with streaming stores (outputs far past L2)
  // Where set, column j of row t goes to out_rows[t] + out_col_offsets[j] (< 0: not stored) instead, and
  // `bias` is one float per row: a result computed channels by pixels (rows output channels, NCHW).
  const int64_t* out_col_offsets = nullptr;
  int depth = kBf16K;            // reduction steps per term, 32 or 16: that of the kernel's `begin`
  // Where set (with out_rows, not out_col_offsets): one float per row added before rounding, in place of
  // `bias` (a result computed features by tokens, stored down its rows: the weights-as-A linear).
  const float* row_bias = nullptr;
  // Where set: row 0 of the A that this thread's next block reads with the same terms (the next row
  // tile).  The kernel asks for its lines while this block computes: a sparse GEMM reads only the live
  // blocks' channels of each A row, a gappy pattern the hardware prefetchers do not follow.
  const uint8_t* prefetch_a = nullptr;
};

// Into the caches: the `bytes` read from each of `rows` rows (lda apart) at `a` (a hint, never a fault;
// static, as bf16_round).  Its first and last byte's lines: a term's row is at most kBf16K bf16 (64
// bytes), so at most two lines.
static inline void prefetch_rows(const uint8_t* a, int64_t lda, int rows, int64_t bytes) {
  for (int i = 0; i < rows; ++i) {
    __builtin_prefetch(a + i * lda);
    __builtin_prefetch(a + i * lda + bytes - 1);
  }
}

// One bf16 kernel: `begin(depth)` once per thread and op call before its
// blocks, all of that depth (AMX: load the tile configuration for it, which
// oneDNN may have replaced since), `end` after them (AMX: release the tile state).
struct Bf16Kernel {
  const char* name;
  void (*begin)(int depth);
  void (*block)(const Bf16Block& b);
  void (*end)();
  // Whether results past kStreamBytes go out with streaming stores (streams_result in internal.h), as
  // measured on the CPU family each kernel is chosen on (docs/cpu-backend.md, "Streamed stores"):
  // AVX512-BF16 (Zen 4) yes, AMX (Xeon) no.  A kernel that streams fences its stores in `end`.
  bool streams = false;
};

const Bf16Kernel& bf16_amx();
const Bf16Kernel& bf16_avx512();
const Bf16Kernel& bf16_emulated();

// Whether this CPU (and this build, and for AMX the OS) runs `k`; when not,
// `why` says in one line.
bool bf16_supported(const Bf16Kernel& k, const char** why);

// float32 -> bfloat16, round to nearest even (NaN stays NaN).
// static: each file gets its own copy, compiled for its own target.
static inline uint16_t bf16_round(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

static inline float bf16_widen(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

}  // namespace ftk_cpu
