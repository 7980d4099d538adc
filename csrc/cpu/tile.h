// The one inner kernel of the CPU backend, shared by every op (torch-free).
//
// A tile computes `tn` rows of an output block of width `width`:
//   C[t, 0:w_valid] = init + sum over terms i of  A_t,i[0:k_i] . B_i[0:k_i, 0:width]
// where A_t,i = a_rows[seg_i][t] + a_off_i (a row pointer per tile row, so conv
// taps and zero padding need no im2col), read with element stride a_stride,
// and B_i is row-major with leading dimension ldb.  Accumulators stay in
// registers across all terms.
#pragma once
#include <cstdint>

namespace ftk_cpu {

constexpr int kMaxTileRows = 16;
constexpr int64_t kLineFloats = 64 / sizeof(float);  // a cache line
// How many reduction steps ahead strided rows are prefetched (the kernel's A
// and B rows, grad-values' packing copy).
constexpr int kPrefetchSteps = 8;

struct Term {
  int32_t seg;     // which set of A row pointers: a conv tap, 0 for linear
  int32_t k;       // reduction length of this term
  int64_t a_off;   // element offset added to every A row pointer
  const float* b;  // B: k rows of `ldb` floats; `width` columns are used
};

struct TileArgs {
  int tn;                      // rows to store (<= tile_rows(width)); unused rows point at zeros
  int width;                   // columns computed
  int w_valid;                 // columns stored (< width on a ragged edge)
  int b_cols;                  // floats readable in every B row (and the bias) from column 0 (>= w_valid)
  bool accumulate;             // start from C's content instead of zero / bias
  const float* const* a_rows;  // [nseg][kMaxTileRows]
  const Term* terms;
  int64_t nterms;
  int64_t a_stride = 1;        // elements between A_t,i[k] and A_t,i[k + 1]
  // Row t's pointer is row 0's plus t (neighbouring floats, kMaxTileRows of
  // them readable): one base register instead of one per row, which frees
  // the general registers the row pointers otherwise spill from.
  bool a_rows_adjacent = false;
  int64_t ldb;
  // B rows read in place from an activation, a pixel's channels apart: each
  // step prefetches the row kPrefetchSteps on (the hardware prefetchers do
  // not follow strides of kilobytes)
  bool prefetch_b = false;
  // A rows (a_stride 1) that each term reads from another place in memory,
  // a jump the hardware prefetchers do not foresee: each term prefetches the
  // rows of the term this many on (0: none)
  int a_terms_ahead = 0;
  int64_t b_off;               // column offset added to every term's B
  const float* bias;           // `width` floats added at init, or nullptr
  float* const* c_rows;        // [tn] output row pointers
};

// One instruction set's kernel: its name, its preferred rows per tile, the
// tile, and a transpose dst[c * ldd + r] = src[r * lds + c] (r < rows,
// c < cols) for writing row-major results into NCHW planes and packing NCHW
// images channels-last (`streaming`: non-temporal stores where
// aligned, for results larger than the cache).
struct IsaKernel {
  const char* name;
  int (*tile_rows)(int width);
  void (*tile)(const TileArgs& args);
  void (*transpose)(const float* src, int64_t lds, int rows, int cols, float* dst, int64_t ldd, bool streaming);
};

const IsaKernel& isa_avx512();
const IsaKernel& isa_avx2();
const IsaKernel& isa_portable();
bool isa_supported(const IsaKernel& isa);

}  // namespace ftk_cpu
