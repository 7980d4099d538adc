// The CPU backend's one internal header: what its files share.
//
// Every op is one sparse GEMM whose output column blocks each sum over a list
// of live weight blocks ("terms"); only live blocks are ever read, and no
// dense weight is built.  Where things live:
//   runtime.cpp      ISA choice, argument checks, per-thread scratch, cache sizes, build_info
//   sparse_gemm.cpp  the sparse-GEMM driver (SparseGemm, run) and its weights-first form
//   grad_values.cpp  the weight-gradient of the live blocks (linear and conv)
//   linear.cpp       linear_forward, linear_grad_input, linear_grad_values
//   conv2d.cpp       conv geometry, tap rows, planes, packing; conv2d_forward/_grad_input/_grad_values
//   precision.cpp    the dtypes an op takes, and widening bfloat16/float16 to float32
//   register.cpp     torch.ops.freetickets_cpu.* registration
//   tile.h, tile_impl.inc, isa_*.cpp: the one inner kernel, built per instruction set
//   bf16_gemm.cpp    the bf16 driver: packed blocks, (row tile, column chunk) items
//   bf16_linear.cpp, bf16_conv2d.cpp: the bf16 ops over it
//   bf16_copies.cpp  their operands' transposing copies
//   bf16_tile.h, bf16_{amx,avx512,emulated}.cpp, bf16_support.cpp: the bf16 inner kernel
// Measured reasons for the paths below: docs/cpu-backend.md.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/FunctionRef.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "bf16_tile.h"
#include "tile.h"

namespace ftk_cpu {

// ------------------------------------------------------------------ the ops

// register.cpp binds these.  float32 tensors run the float32 kernels;
// bfloat16 and float16 ones are widened (widened_call below).
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, const at::Tensor& slot, const std::optional<at::Tensor>& bias,
                          int64_t out_features);
at::Tensor linear_grad_input(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& col_ptr,
                             const at::Tensor& row_idx, const at::Tensor& tslot, int64_t in_features);
at::Tensor linear_grad_values(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& slot, at::IntArrayRef block_size);
at::Tensor conv2d_forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, const at::Tensor& slot, const std::optional<at::Tensor>& bias,
                          int64_t out_channels, at::IntArrayRef kernel, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation);
at::Tensor conv2d_grad_input(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& col_ptr,
                             const at::Tensor& row_idx, const at::Tensor& tslot, at::IntArrayRef input_size,
                             at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation);
at::Tensor conv2d_grad_values(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& slot, at::IntArrayRef block_size,
                              at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation);

std::string build_info();
std::string set_isa(const std::string& name);
std::string bf16_unavailable();

// bf16_linear.cpp / bf16_conv2d.cpp: the same ops on bfloat16 operands
// through the bf16 kernel k (the ops above call them where bf16_runs).
at::Tensor bf16_linear_forward(const Bf16Kernel& k, const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                               const std::optional<at::Tensor>& bias, int64_t out_features);
at::Tensor bf16_linear_grad_input(const Bf16Kernel& k, const at::Tensor& grad_out, const at::Tensor& values,
                                  const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& tslot,
                                  int64_t in_features);
at::Tensor bf16_linear_grad_values(const Bf16Kernel& k, const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                   at::IntArrayRef block_size);
at::Tensor bf16_conv2d_forward(const Bf16Kernel& k, const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                               const std::optional<at::Tensor>& bias, int64_t out_channels, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
at::Tensor bf16_conv2d_grad_input(const Bf16Kernel& k, const at::Tensor& grad_out, const at::Tensor& values,
                                  const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& tslot,
                                  at::IntArrayRef input_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation);
at::Tensor bf16_conv2d_grad_values(const Bf16Kernel& k, const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                   at::IntArrayRef block_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation);

namespace detail {

// ------------------------------------------------------------------ runtime.cpp

// The instruction set in use: FREETICKETS_CPU_ISA or the best this CPU runs,
// until set_isa changes it.
const IsaKernel& isa();
// The bf16 kernel chosen with it (nullptr: bf16 operands are widened).
const Bf16Kernel* bf16_kernel();

void check_float(const at::Tensor& t, const char* name);

// Compressed indices (ptr over `outer`, idx < n_inner, slots a valid range).
// Cheap (O(outer + nnzb)) and it turns a corrupted layout into an error, not a crash.
void check_indices(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot, int64_t n_inner,
                   int64_t nnzb, const char* what);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Temporaries that never leave an op call (transposed or padded operands,
// partial sums) live in per-thread buffers that only grow: a fresh
// multi-megabyte allocation page-faults on every call.  Each role has its
// own slot; results returned to torch never live in scratch.
enum Scratch { kTransposeA, kTransposeB, kPartial, kNumScratch };
at::Tensor scratch(Scratch which, at::IntArrayRef sizes, const at::TensorOptions& options);

// A work buffer holding at least n floats.  Buffers only grow: a vector's
// resize zero-fills every element it regrows, and work items of different
// sizes alternate (grad-values' in-place and packed block columns).
inline void grow(std::vector<float>& buf, int64_t n) {
  if (buf.size() < size_t(n)) buf.resize(size_t(n));
}

// Bias padded to whole blocks so the kernel can load full vectors (undefined without a bias).
at::Tensor padded_bias(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& like);

// A conv op's [N, C, H, W] result: channels_last when the op's main input is
// strictly channels_last, as torch's conv does; else contiguous.  Mirrors
// validation.conv_memory_format().  Either way the kernel writes it in place.
at::Tensor conv_output(at::IntArrayRef sizes, const at::Tensor& like);

// Whether `floats` of results outgrow the L2 caches of the threads in use:
// the next op would read them from further out anyway, so they are written
// with non-temporal stores, saving the read of every line before its write.
bool too_big_for_cache(int64_t floats);

// Whether a tile's A rows, spanning `floats`, are prefetched for the next
// tile while one runs (SparseGemm::prefetch_a): where they fit in L1; wider
// rows evict the running tile's own.
bool prefetch_pays(int64_t floats);

// body(begin, end) over items [0, n), the threads taking batches from a
// shared counter rather than a fixed share each: one vCPU can run slower than
// the other for a while, and with a static split every op waits for it.
// Batches shrink as the work runs out (guided scheduling): long contiguous
// runs first, small ones to even out the finish.
template <class Body>
void share_items(int64_t n, Body body) {
  const int64_t threads = at::get_num_threads();
  if (n <= 0) return;
  if (threads == 1 || n == 1 || at::in_parallel_region()) {
    body(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (;;) {
      int64_t begin = next.load(), size = 0;
      do {
        size = std::max<int64_t>(1, (n - begin) / (2 * threads));
      } while (begin < n && !next.compare_exchange_weak(begin, begin + size));
      if (begin >= n) return;
      body(begin, std::min(n, begin + size));
    }
  });
}

// ------------------------------------------------------------------ precision.cpp

// The dtype an op runs in: that of its floating operands, which must agree
// and be float32, bfloat16 or float16 (`names` label them in the error).
at::ScalarType op_dtype(std::initializer_list<const at::Tensor*> operands, std::initializer_list<const char*> names);

// A bfloat16/float16 operand as float32 (a copy of its elements, with its
// strides unless they overlap); anything else as it is.  No dense weight appears: `values` are
// the packed live blocks.
at::Tensor widen(const at::Tensor& t);
inline std::optional<at::Tensor> widen(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(widen(*t)) : std::nullopt;
}
template <class T>
const T& widen(const T& arg) {
  return arg;
}

// The portable low-precision path: op(args) on float32 copies of its
// bfloat16/float16 operands, accumulated in float32, the result rounded once
// to `dtype` (same memory format).
template <class Op, class... Args>
at::Tensor widened_call(at::ScalarType dtype, Op op, const Args&... args) {
  return op(widen(args)...).to(dtype);
}

// ------------------------------------------------------------------ bf16_gemm.cpp

// The bf16 kernel that bfloat16 operands with blocks of bo x bi run, or
// nullptr: the widened path (fp16 always; block sides that are not whole
// multiples of 16; FREETICKETS_CPU_ISA naming a float32 instruction set).
const Bf16Kernel* bf16_runs(const at::Tensor& operand, int64_t bo, int64_t bi);

// How values' blocks split into the kernel's sub-blocks (bf16_split):
// reduce_inner (forward) columns along Bo, reduction along Bi; else the reverse.
Bf16Split values_split(const at::Tensor& values, bool reduce_inner);

// values [nnzb, Bo, Bi] (bf16) as the kernels' B: per slot, (column group g,
// reduction chunk kc) sub-blocks of s.elems() elements (s = values_split) in
// VNNI pairs ([half][pair row][16 columns][2]), at ((slot * groups + g) *
// chunks + kc) * s.elems().  reduce_inner: B[k][n] = V[n][k] (forward:
// columns are output features, groups Bo / s.width, chunks Bi / s.depth);
// else B[k][n] = V[k][n] (grad-input).  Packed per call, counted in the op's time.
at::Tensor pack_blocks_vnni(const at::Tensor& values, bool reduce_inner);
constexpr int64_t kPackedLdb = 16 * 2 * 2;  // bytes between pair rows of a packed B

// values as the kernels' A instead (a result computed channels by pixels):
// the same sub-blocks at the same places, each its s.width rows (columns n
// of pack_blocks_vnni's B) of s.depth reduction steps, row-major.
at::Tensor pack_blocks_rows(const at::Tensor& values, bool reduce_inner);

// Results larger than this go straight to memory with streaming stores where
// the kernel streams (Bf16Kernel::streams): a plain store reads each line
// first (a few MB: past one core's L2 on the machines measured).  On the AMX
// Xeon streaming cost more than it saved: a result buffer fresh from the
// allocator was often just written by the op before, so its lines were in
// cache and each streamed store first evicted one.
constexpr int64_t kStreamBytes = int64_t(4) << 20;
inline bool streams_result(const Bf16Kernel& k, int64_t bytes) { return k.streams && bytes > kStreamBytes; }

// C [rows, out_cols] (bf16, rows through out_row) = A [rows, ...] B: output
// column chunk j (`width` columns from chunk_col[j]) sums its terms
// [chunk_ptr[j], chunk_ptr[j + 1]), each `depth` deep (set_split: B packed
// by pack_blocks_vnni).  A's rows are lda bytes apart and
// a_readable of them can be read (a conv's padded input: more than rows);
// a row tile reaching past them reads a zero-padded copy of its rows, whose
// terms then must stay inside their row's lda bytes (a matrix).
struct Bf16Gemm {
  int64_t rows;
  const uint8_t* a;
  int64_t lda, a_readable;
  const uint8_t* b;
  int64_t ldb = kPackedLdb, b_half = Bf16Split{kBf16Cols, kBf16K}.half_bytes();
  int64_t width = kBf16Cols, depth = kBf16K;
  std::vector<int64_t> chunk_ptr{0}, chunk_col;
  std::vector<Bf16Term> terms;
  int64_t out_cols;
  const float* bias = nullptr;  // float32, readable to the last chunk's column + 32
  int64_t out_col_stride = 1;
  // Rows in images of rows_per_image (a multiple of 32: no tile spans two),
  // image_bytes apart in A (0: one image).
  int64_t rows_per_image = 0, image_bytes = 0;
  // Ask for the next row tile's A lines while a tile computes (Bf16Block::prefetch_a): 1x1 convs, whose
  // rows are pixels read at the live blocks' channels only; a 3x3's taps re-read neighbouring rows
  // already cached, where the hints cost more than they save (docs/cpu-backend.md, "NCHW copies in
  // registers, 1x1 prefetches").
  bool prefetch_next = false;
  void set_split(const Bf16Split& s) {
    width = s.width;
    depth = s.depth;
    b_half = s.half_bytes();
  }
};
using Bf16OutRow = c10::function_ref<uint16_t*(int64_t m)>;  // row m's column 0; nullptr: not stored
void bf16_gemm(const Bf16Kernel& k, const Bf16Gemm& g, Bf16OutRow out_row);

// body(i, block, out_rows) fills work item i's block (its out_rows: 32
// pointers; its terms `depth` deep) for items [0, n), which the threads
// share; then the kernel runs it.
using Bf16Fill = c10::function_ref<void(int64_t i, Bf16Block& block, uint16_t** out_rows)>;
void bf16_blocks(const Bf16Kernel& k, int depth, int64_t n, Bf16Fill fill);

// The transposing copies of bf16 operands (bf16_copies.cpp); kCopyTile bounds copy_tile's sides.
constexpr int64_t kCopyTile = 32;
// dst[a * da + b] = src[a * sa + b * sb] (16-bit elements) for a < na, b < nb.
void copy_tile(const uint16_t* src, int64_t sa, int64_t sb, uint16_t* dst, int64_t da, int64_t na, int64_t nb);
// dst[c * ldd + r] = the 32-bit word (a VNNI pair of bf16) at src + r * lds + 2 c, for r < rows, c < cols:
// lds in 16-bit elements, ldd in words.
void transpose_words(const uint16_t* src, int64_t lds, uint32_t* dst, int64_t ldd, int64_t rows, int64_t cols);

// Grad-values: dv [nnzb, Bo, Bi] (bf16), block e = A (a_of(r, e): the Bo
// rows of grad_out^T of its block row r, lda bytes apart) times B (b_of(e,
// col): its columns from col, 16 or 32 of them side by side, in VNNI pairs
// of reduction steps ldb bytes apart), over
// `steps` chunks of 32 reduction steps.  The threads share out the blocks,
// in groups of 32 (16 for sides of 16-multiples) rows by as many columns.
using Bf16RowsA = c10::function_ref<const uint8_t*(int64_t r, int64_t e)>;
using Bf16BlockB = c10::function_ref<const uint8_t*(int64_t e, int64_t col)>;
at::Tensor bf16_grad_values(const Bf16Kernel& k, int64_t lda, int64_t ldb, int64_t steps, const at::Tensor& row_ptr,
                            const at::Tensor& slot, int64_t bo, int64_t bi, const at::TensorOptions& options,
                            Bf16RowsA a_of, Bf16BlockB b_of);

// ------------------------------------------------------------------ sparse_gemm.cpp

// (image, row, column) of consecutive pixels m0, m0 + 1, ... without a division per pixel.
struct PixelWalk {
  int64_t n, y, x, height, width;
  PixelWalk(int64_t m0, int64_t height_, int64_t width_)
      : n(m0 / (height_ * width_)), y(m0 / width_ % height_), x(m0 % width_), height(height_), width(width_) {}
  void next() {
    if (++x < width) return;
    x = 0;
    if (++y < height) return;
    y = 0;
    ++n;
  }
};

// Where C lives: GEMM row m is pixel (y, x) of image n of a height x width
// grid, at base + n * image_stride + y * y_stride + x * x_stride, and its
// columns are col_stride apart.  A conv writes its output tensor in place
// whatever its memory format (NCHW: columns H * W apart); a matrix is one
// image of one grid row.
struct OutRows {
  float* base;
  int64_t height, width, image_stride, y_stride, x_stride, col_stride;
  float* row(const PixelWalk& p) const { return base + p.n * image_stride + p.y * y_stride + p.x * x_stride; }

  // Rows [m0, m1) x columns [c0, c1) of `stage` (row-major, leading dimension
  // ld, column c0 first) into C: with strided columns (NCHW) each run of
  // consecutive pixels is a transpose into the channels' planes.
  void scatter(const IsaKernel& k, const float* stage, int64_t ld, int64_t m0, int64_t m1, int64_t c0, int64_t c1,
               bool streaming) const;
};

inline OutRows matrix_rows(float* c, int64_t rows, int64_t ldc) {
  return {c, 1, std::max<int64_t>(rows, 1), 0, 0, ldc, 1};
}

inline OutRows pixel_rows(const at::Tensor& t) {  // t: [N, C, H, W], any strides
  return {t.data_ptr<float>(), t.size(2), t.size(3), t.stride(0), t.stride(2), t.stride(3), t.stride(1)};
}

// C (M rows, `out`) gets n_blocks column blocks of `width`; block j sums terms
// [term_ptr[j], term_ptr[j+1]).  With row_group > 0 the terms belong to
// groups of row_group rows instead, and column block j reads B's columns from
// j * width on (B is then one matrix with ldb readable columns, not packed
// blocks).
struct SparseGemm {
  int64_t rows;
  int64_t n_blocks;
  int width;
  int64_t out_cols;  // valid columns of C
  OutRows out;
  std::vector<int64_t> term_ptr;
  std::vector<Term> terms;
  int64_t ldb;
  const float* bias;  // padded to n_blocks * width, or nullptr
  int nseg;
  int64_t row_group = 0;
  // Terms point at B stored transposed ([width][ldb_t] row-major, as the
  // values of a BSR block are): each group transposes its blocks into a
  // thread-local panel once, then runs every row through them.
  bool transposed_b = false;
  int64_t ldb_t = 0;
  int64_t a_stride = 1;  // elements between A_t[k] and A_t[k + 1] (NCHW conv input: H * W)
  int64_t b_readable = 0;  // row_group: floats readable in each B row from column 0 (0: ldb)
  // row_group: C's columns as rows of grid_cols columns, contiguous in C
  // and b_pitch floats apart in B (a conv's output rows on zero-padded
  // planes: B's rows carry the padding, C's do not); each row is
  // cdiv(grid_cols, width) blocks.  0: one row of out_cols columns.
  int64_t grid_cols = 0, b_pitch = 0;
  // A rows read with stride 1 from memory (matrix rows, channels-last
  // pixels; set where prefetch_pays): while a tile runs, the lines of the
  // next tile's rows that its block group reads are prefetched.  The terms
  // jump between the rows' channel blocks, which the hardware prefetchers do
  // not follow (docs/cpu-backend.md, "Prefetching A rows").
  bool prefetch_a = false;
  int a_terms_ahead = 0;  // TileArgs::a_terms_ahead

  // Where column block blk starts in B and in C, and how many of its columns are valid.
  struct BlockCols {
    int64_t b, c;
    int valid;
  };
  BlockCols block_cols(int64_t blk) const {
    if (!grid_cols) return {blk * width, blk * width, int(std::min<int64_t>(width, out_cols - blk * width))};
    const int64_t per_row = cdiv(grid_cols, width), row = blk / per_row, col = blk % per_row * width;
    return {row * b_pitch + col, row * grid_cols + col, int(std::min<int64_t>(width, grid_cols - col))};
  }
};

// fill_rows(m0, tn, segs, nsegs, a_rows) sets the A row pointers
// ([nseg][kMaxTileRows]) of tile rows m0..m0+tn (unused rows -> zeros) for
// the listed segments only: those some block of the tile's group reads.
using FillRows = c10::function_ref<void(int64_t m0, int tn, const int32_t* segs, int64_t nsegs, const float** a_rows)>;

// The GEMM's rows [0, rows) written through `out` (a piece of the result
// when the caller splits it, e.g. by image; whole: run()).
void run_on(const SparseGemm& g, int64_t rows, const OutRows& out, FillRows fill_rows);
inline void run(const SparseGemm& g, FillRows fill_rows) { run_on(g, g.rows, g.out, fill_rows); }

// The transposed product C^T [rows, n] = W B^T, vectorized along n so that
// B^T [inner, n] and C^T are read and written along their rows (ldb, ldc
// floats apart).  Forward: W's block rows, from the BSR indices; grad-input:
// W^T's, from the transposed ones.  Tiles stay inside one block row (`group`
// rows), whose live blocks are the terms; A row t is the block's values at
// t * row_step, elements elem_step apart (forward: Bi, 1; grad-input: 1, Bi).
// Linear's few-token forward streams the values once this way, and stride-1
// NCHW convs run on each image's channel planes (conv2d.cpp).
struct WeightsFirst {
  const float* values;
  const int32_t *ptr, *idx, *slot;
  int64_t rows, group, inner, inner_block, row_step, elem_step, block_floats;
  // A conv's block columns are (tap, block): tap t's B^T rows start
  // tap_off[t] floats further on (set by the caller; 0: one tap).  Forward:
  // input channel blocks per tap; grad-input on planes: output-row blocks.
  int64_t blocks_per_tap = 0;
  std::vector<int64_t> tap_off;
  // The values are read once per call, from memory (linear forward; a conv
  // reads them again for every image): a tile's rows of one block are a few
  // lines, then the next live block lies anywhere, so each term waited for
  // memory.  Tiles prefetch the blocks about kValuesAheadSteps reduction
  // steps on (docs/cpu-backend.md, "Weights-first linear forward").
  bool values_from_memory = false;
};

WeightsFirst weights_first_forward(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                   const at::Tensor& slot, int64_t out_features, int64_t in_features);
WeightsFirst weights_first_grad_input(const at::Tensor& values, const at::Tensor& col_ptr, const at::Tensor& row_idx,
                                      const at::Tensor& tslot, int64_t out_features, int64_t in_features);

// C^T's n columns as grid_rows rows of n / grid_rows columns, rows b_pitch
// floats apart in B^T (and contiguous in C^T): a conv's output pixels on
// zero-padded planes.
struct ColumnGrid {
  int64_t rows, b_pitch;
};

// b_readable: floats readable in each B^T row (0: ldb).
void weights_first(const WeightsFirst& w, const float* bt, int64_t ldb, int64_t n, float* ct, int64_t ldc,
                   int64_t b_readable = 0, ColumnGrid grid = {1, 0});

// ------------------------------------------------------------------ grad_values.cpp

// The A operand of grad-values, dy^T, read in place from grad_out: output
// feature/channel o's reduction row starts at base + o * row_stride and steps
// k_stride per reduction index; the reduction index of pixel p of image n is
// at n * image_stride + p * k_stride (a segment's a_off).  A strided row costs
// no more than a transposed copy would: a tile's rows are neighbouring
// channels, so each reduction step reads one cache line for all of them.
struct GradRows {
  const float* base;
  int64_t row_stride, k_stride, image_stride, rows;
};

// The B operand of grad-values, x, read in place: a segment's reduction
// index kk starts at base + b_off + kk * ldb (conv: its input pixel; ldb is
// grad_values_blocks' argument), and input feature/channel c lies c *
// col_stride further on.  Pointwise reductions run over the pixels of an
// image: pixel p of image n starts at n * image_stride + p * k_stride.
struct GradCols {
  const float* base;
  int64_t col_stride, k_stride, image_stride, cols;
};

// grad_out or x of a conv as [N, C, pixels], read in place: either memory
// format flattens (H, W) to one pixel stride (a size-1 dimension's stride is
// arbitrary: with one column, rows step the pixels); other layouts are copied.
struct FlatPixels {
  at::Tensor t;
  int64_t image, channel, pixel;
};
FlatPixels flat_pixels(const at::Tensor& t);

// One live block for grad-values: output row block r, column offset col0 in B.
struct Entry {
  int64_t r, col0, slot;
};

// A piece of the grad-values reduction: k consecutive reduction indices whose
// A values start at a_off in every A row and whose B rows start at b_off and
// are ldb apart.  Linear: chunks of tokens.  Conv: the output pixels of one
// output row that a tap reads inside the image (padding reads zeros and is
// skipped), so no shifted copy of the input is ever made.
struct Segment {
  int64_t a_off, b_off;
  int32_t k;
};

// The grad-values work of one conv tap (linear: the only one): its live
// blocks, and its reduction segments grouped by unit (conv: an output row;
// linear: a run of tokens): unit u's are segs[unit_ptr[u] .. unit_ptr[u+1]).
struct TapWork {
  std::vector<Entry> entries;
  std::vector<Segment> segs;
  std::vector<int64_t> unit_ptr;
};

// Where grad-values go.  A long reduction is split among threads, each
// summing its share of every block into its own partial sums
// [splits, nnzb, Bo, Bi] (scratch, added up at the end); otherwise threads
// share out the blocks and the kernel writes the result itself.
struct GradValues {
  at::Tensor buffer;
  int64_t splits, nnzb, bo, bi;
  float* block(int64_t split, int64_t slot) const {
    return buffer.data_ptr<float>() + (split * nnzb + slot) * bo * bi;
  }
  at::Tensor result() const { return splits == 1 ? buffer.select(0, 0) : buffer.sum(0); }
};

// `units`: how many pieces the reduction comes in; `streamed`: floats of A and
// B the reduction reads.  `ragged`: some block reaches past the weight, whose
// padding the kernel never stores, so it must start as zeros.
GradValues new_grad_values(const at::Tensor& like, int64_t nnzb, int64_t bo, int64_t bi, int64_t units,
                           int64_t streamed, bool ragged);

// Live blocks as grad-values entries, one TapWork per tap (linear: one tap).
std::vector<TapWork> taps_with_entries(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                       int64_t taps, int64_t blocks_per_tap, int64_t bi);

// dv[split, slot] (+)= sum over segments of A[r-block rows, seg] . B[seg, col0:col0+Bi]
// for every entry of every tap, over units [0, n_units).
void grad_values_blocks(const GradRows& a, const GradCols& b, int64_t ldb, std::vector<TapWork>& taps,
                        int64_t n_units, const GradValues& dv);

// Grad-values of linear and of pointwise convs: the reduction runs over the
// per_image pixels (tokens) of each of `images`.
at::Tensor grad_values_pointwise(const GradRows& a, const GradCols& b, int64_t images, int64_t per_image,
                                 const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                 at::IntArrayRef block_size, const at::Tensor& like);

}  // namespace detail
}  // namespace ftk_cpu
