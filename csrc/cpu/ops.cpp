// CPU backend ops: torch glue around the tile kernel (tile.h).
//
// Every op is one sparse GEMM whose output column blocks each sum over a list
// of live weight blocks ("terms"); only live blocks are ever read, and no
// dense weight is built.  Registered as torch.ops.freetickets_cpu.*.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "tile.h"

namespace ftk_cpu {
namespace {

// ------------------------------------------------------------------ ISA choice

std::atomic<const IsaKernel*> g_isa{nullptr};

const IsaKernel* isa_by_name(const std::string& name) {
  if (name == "avx512") return &isa_avx512();
  if (name == "avx2") return &isa_avx2();
  if (name == "portable") return &isa_portable();
  return nullptr;
}

const IsaKernel& best_isa() {
  for (const IsaKernel* isa : {&isa_avx512(), &isa_avx2()})
    if (isa_supported(*isa)) return *isa;
  return isa_portable();
}

const IsaKernel& set_isa_checked(const std::string& name) {
  const IsaKernel* isa = name == "auto" ? &best_isa() : isa_by_name(name);
  TORCH_CHECK(isa != nullptr, "freetickets_cpu: unknown instruction set '", name,
              "'; choose auto, avx512, avx2 or portable");
  TORCH_CHECK(isa_supported(*isa), "freetickets_cpu: this CPU (or this build) has no '", name,
              "' kernel; best available is '", best_isa().name, "'");
  g_isa.store(isa);
  return *isa;
}

const IsaKernel& isa() {
  const IsaKernel* current = g_isa.load();
  if (current) return *current;
  const char* env = std::getenv("FREETICKETS_CPU_ISA");
  return set_isa_checked(env && *env ? env : "auto");
}

// ------------------------------------------------------------------ checks

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "freetickets_cpu: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "freetickets_cpu: ", name,
              " must be float32, got ", t.scalar_type());
}

// Compressed indices (ptr over `outer`, idx < n_inner, slots a valid range).
// Cheap (O(outer + nnzb)) and it turns a corrupted layout into an error, not a crash.
void check_indices(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& slot,
                   int64_t n_inner, int64_t nnzb, const char* what) {
  for (const at::Tensor* t : {&ptr, &idx, &slot}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous() &&
                    t->device().is_cpu(),
                "freetickets_cpu: ", what, " indices must be contiguous 1-D int32 CPU tensors");
  }
  TORCH_CHECK(idx.numel() == nnzb && slot.numel() == nnzb, "freetickets_cpu: ", what,
              " indices hold ", idx.numel(), " entries but values hold ", nnzb, " blocks");
  const int32_t* p = ptr.data_ptr<int32_t>();
  const int64_t outer = ptr.numel() - 1;
  TORCH_CHECK(outer >= 0 && p[0] == 0 && p[outer] == nnzb, "freetickets_cpu: ", what,
              " pointer does not span the ", nnzb, " blocks");
  for (int64_t i = 0; i < outer; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], "freetickets_cpu: ", what, " pointer is not monotone");
  const int32_t* ix = idx.data_ptr<int32_t>();
  const int32_t* sl = slot.data_ptr<int32_t>();
  for (int64_t e = 0; e < nnzb; ++e) {
    TORCH_CHECK(ix[e] >= 0 && ix[e] < n_inner, "freetickets_cpu: ", what,
                " block index out of range");
    TORCH_CHECK(sl[e] >= 0 && sl[e] < nnzb, "freetickets_cpu: ", what, " slot out of range");
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Temporaries that never leave an op call (transposed or padded operands,
// partial sums) live in per-thread buffers that only grow: a fresh
// multi-megabyte allocation page-faults on every call, which cost up to 3x
// the kernel time here.  Each role has its own slot; results returned to
// torch never live in scratch.
enum Scratch { kTransposeA, kTransposeB, kPartial, kNumScratch };

at::Tensor scratch(Scratch which, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local at::Tensor buffers[kNumScratch];
  int64_t numel = 1;
  for (int64_t d : sizes) numel *= d;
  at::Tensor& buf = buffers[which];
  if (!buf.defined() || buf.numel() < numel || buf.options().dtype() != options.dtype()) {
    // A normal tensor even under torch.inference_mode(): an inference tensor
    // could not be written to by a later call made outside it.
    c10::InferenceMode normal_tensors(false);
    buf = at::empty({std::max<int64_t>(numel, 1)}, options);
  }
  return buf.narrow(0, 0, numel).view(sizes);
}

// body(begin, end) over items [0, n), the threads taking batches from a
// shared counter rather than a fixed share each: on this VM one vCPU can run
// slower than the other for a while, and with a static split every op waits
// for it (libgomp's spin-waits took 11% of a profiled conv).  Batches shrink
// as the work runs out (guided scheduling): long contiguous runs first,
// small ones to even out the finish.
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

// A conv op's [N, C, H, W] result: channels_last when the op's main input is
// strictly channels_last, as torch's conv does; else contiguous.  Mirrors
// validation.conv_memory_format().  Either way the kernel writes it in place.
at::Tensor conv_output(at::IntArrayRef sizes, const at::Tensor& like) {
  const bool channels_last = like.is_contiguous(at::MemoryFormat::ChannelsLast) && !like.is_contiguous();
  return at::empty(sizes, like.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
}

// ------------------------------------------------------------------ drivers

// A work buffer holding at least n floats.  Buffers only grow: a vector's
// resize zero-fills every element it regrows, and work items of different
// sizes alternate (grad-values' in-place and packed block columns).
void grow(std::vector<float>& buf, int64_t n) {
  if (buf.size() < size_t(n)) buf.resize(size_t(n));
}

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
  void scatter(const IsaKernel& k, const float* stage, int64_t ld, int64_t m0, int64_t m1, int64_t c0,
               int64_t c1, bool streaming) const {
    PixelWalk px(m0, height, width);
    for (int64_t t0 = m0; t0 < m1;) {
      float* first = row(px);
      int64_t t1 = t0 + 1;
      for (px.next(); t1 < m1 && row(px) == first + (t1 - t0) * x_stride && x_stride == 1; px.next()) ++t1;
      k.transpose(stage + (t0 - m0) * ld, ld, int(t1 - t0), int(c1 - c0), first + c0 * col_stride, col_stride,
                  streaming);
      t0 = t1;
    }
  }
};

OutRows matrix_rows(float* c, int64_t rows, int64_t ldc) {
  return {c, 1, std::max<int64_t>(rows, 1), 0, 0, ldc, 1};
}

OutRows pixel_rows(const at::Tensor& t) {  // t: [N, C, H, W], any strides
  return {t.data_ptr<float>(), t.size(2), t.size(3), t.stride(0), t.stride(2), t.stride(3), t.stride(1)};
}

// C (M rows, `out`) gets n_blocks column blocks of `width`; block j sums terms
// [term_ptr[j], term_ptr[j+1]).  fill_rows(m0, tn, segs, nsegs, a_rows) sets
// the A row pointers ([nseg][kMaxTileRows]) of tile rows m0..m0+tn (unused rows
// -> zeros) for the listed segments only: those some block of the group reads.
// With row_group > 0 the terms belong to groups of row_group rows instead, and
// column block j reads B's columns from j * width on (B is then one matrix
// with ldb readable columns, not packed blocks).
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
  // not follow: with blocks of 16 (a line per row and term) every term
  // waited for its rows.  1x1 1024 -> 256 @14 channels_last forward, blocks
  // of 16: 7.2 -> 4.6 ms; 3x3 64 -> 64 @32: 6.0 -> 4.9 ms.
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

// Consecutive column blocks that a tile computes one after the other with the
// same A row pointers.  Setting those pointers (conv: a tap's padding checks
// for every row) costs as much as a few terms, so it is done once per tile for
// a whole group; a group's B (its terms' blocks, up to kGroupBytes) stays in L2
// while the tile walks it.  Groups get smaller when few row chunks would leave
// threads idle.
struct BlockGroups {
  std::vector<int64_t> begin;  // group i holds blocks [begin[i], begin[i + 1])
  std::vector<int64_t> seg_ptr;
  std::vector<int32_t> segs;  // segments (conv taps) group i reads: segs[seg_ptr[i]..seg_ptr[i+1])
  // prefetch_a: the lines of A rows group i reads: lines[line_ptr[i]..line_ptr[i+1])
  struct Line {
    int32_t seg;
    int64_t off;  // floats from the row's start
  };
  std::vector<int64_t> line_ptr;
  std::vector<Line> lines;
};

// Each group's A lines: from every distinct (segment, offset) its terms
// read, a line's floats apart through the term's last element.
void add_a_lines(const SparseGemm& g, BlockGroups& groups) {
  groups.line_ptr.assign(1, 0);
  for (size_t grp = 0; grp + 1 < groups.begin.size(); ++grp) {
    std::vector<std::tuple<int32_t, int64_t, int32_t>> reads;
    for (int64_t i = g.term_ptr[groups.begin[grp]]; i < g.term_ptr[groups.begin[grp + 1]]; ++i)
      reads.emplace_back(g.terms[i].seg, g.terms[i].a_off, g.terms[i].k);
    std::sort(reads.begin(), reads.end());
    reads.erase(std::unique(reads.begin(), reads.end()), reads.end());
    for (const auto& [seg, off, k] : reads) {
      for (int64_t f = off; f < off + k; f += kLineFloats) groups.lines.push_back({seg, f});
      if ((k - 1) % kLineFloats) groups.lines.push_back({seg, off + k - 1});
    }
    groups.line_ptr.push_back(int64_t(groups.lines.size()));
  }
}

BlockGroups group_blocks(const SparseGemm& g, int64_t n_chunks) {
  constexpr int64_t kGroupBytes = 256 << 10;
  BlockGroups out;
  const int64_t bytes_per_k = int64_t(g.width) * int64_t(sizeof(float));
  int64_t total = 0;
  for (const Term& t : g.terms) total += t.k * bytes_per_k;
  const int64_t want_groups = cdiv(4 * int64_t(at::get_num_threads()), n_chunks);
  const int64_t limit = std::max<int64_t>(1, std::min(kGroupBytes, total / want_groups));
  std::vector<char> seen(size_t(g.nseg));
  int64_t bytes = 0;
  out.begin.push_back(0);
  out.seg_ptr.push_back(0);
  for (int64_t blk = 0; blk < g.n_blocks; ++blk) {
    for (int64_t i = g.term_ptr[blk]; i < g.term_ptr[blk + 1]; ++i) {
      bytes += g.terms[i].k * bytes_per_k;
      seen[g.terms[i].seg] = 1;
    }
    if (bytes >= limit || blk + 1 == g.n_blocks) {
      out.begin.push_back(blk + 1);
      for (int32_t sg = 0; sg < g.nseg; ++sg)
        if (seen[sg]) out.segs.push_back(sg);
      out.seg_ptr.push_back(int64_t(out.segs.size()));
      std::fill(seen.begin(), seen.end(), 0);
      bytes = 0;
    }
  }
  return out;
}

// Bytes of this core's level-1 data or level-2 cache, as the C library
// reports them; `fallback` where it does not.
int64_t cache_bytes(int level, int64_t fallback) {
  long bytes = 0;
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)  // glibc
  bytes = sysconf(level == 1 ? _SC_LEVEL1_DCACHE_SIZE : _SC_LEVEL2_CACHE_SIZE);
#endif
  return bytes > 0 ? int64_t(bytes) : fallback;
}

// Whether `floats` of results outgrow the L2 caches of the threads in use:
// the next op would read them from further out anyway, so they are written
// with non-temporal stores, saving the read of every line before its write.
bool too_big_for_cache(int64_t floats) {
  static const int64_t l2 = cache_bytes(2, int64_t(1) << 20);
  return floats * int64_t(sizeof(float)) > l2 * at::get_num_threads();
}

// Whether a tile's A rows, spanning `floats`, are prefetched for the next
// tile while one runs (SparseGemm::prefetch_a): where they fit in L1.
// Wider rows evict the running tile's own: 3x3 WRN 640 @8 channels_last
// (60 KB per tile here) ran 3-8% slower with the prefetches, 320 @16
// (30 KB) 4-10% faster.
bool prefetch_pays(int64_t floats) {
  static const int64_t l1 = cache_bytes(1, int64_t(32) << 10);
  return floats * int64_t(sizeof(float)) <= l1;
}

// The GEMM's rows [0, rows) written through `out` (a piece of the result
// when the caller splits it, e.g. by image; whole: run()).
template <class FillRows>
void run_on(const SparseGemm& g, int64_t rows, const OutRows& out, FillRows fill_rows) {
  const IsaKernel& k = isa();
  const int tr = std::min(k.tile_rows(g.width), kMaxTileRows);
  const int64_t chunk = g.row_group ? g.row_group : g.transposed_b ? rows : int64_t(tr) * 4;
  const int64_t n_chunks = cdiv(rows, chunk);
  BlockGroups groups;
  if (g.row_group) {  // each chunk has its own terms and one segment; every B panel is a group
    for (int64_t blk = 0; blk <= g.n_blocks; ++blk) groups.begin.push_back(blk);
  } else {
    groups = group_blocks(g, n_chunks);
  }
  const int32_t only_segment = 0;
  const bool prefetch_rows = g.prefetch_a && !g.row_group && g.a_stride == 1;
  if (prefetch_rows) add_a_lines(g, groups);
  const bool staged = out.col_stride != 1;
  const bool streaming = staged && too_big_for_cache(g.rows * g.out_cols);
  const int64_t n_groups = int64_t(groups.begin.size()) - 1;
  share_items(n_chunks * n_groups, [&](int64_t begin, int64_t end) {
    std::vector<const float*> a_rows(size_t(g.nseg) * kMaxTileRows), a_next(a_rows.size());
    float *c_base[kMaxTileRows], *c_rows[kMaxTileRows];
    std::vector<Term> packed_terms;
    std::vector<float> panel, stage;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item % n_groups, chunk_i = item / n_groups;
      const int64_t m_begin = chunk_i * chunk, m_end = std::min(rows, (chunk_i + 1) * chunk);
      const int64_t blk0 = groups.begin[grp], blk1 = groups.begin[grp + 1];
      // With strided output columns (NCHW) the item computes into a row-major
      // stage, then writes it out along the pixels: whole cache lines instead
      // of a scattered store per tile row and column.
      const int64_t stage_ld = (blk1 - blk0) * g.width;
      if (staged) grow(stage, (m_end - m_begin) * stage_ld);
      const Term* terms = g.terms.data();
      if (g.transposed_b) {  // B block [width][ldb_t] -> panel [k][width]
        const int64_t t0 = g.term_ptr[blk0], t1 = g.term_ptr[blk1];
        grow(panel, (t1 - t0) * g.ldb_t * g.width);
        packed_terms.assign(g.terms.begin() + t0, g.terms.begin() + t1);
        for (int64_t i = 0; i < t1 - t0; ++i) {
          float* dst = panel.data() + i * g.ldb_t * g.width;
          const float* src = packed_terms[i].b;
          for (int64_t o = 0; o < g.width; ++o)
            for (int64_t kk = 0; kk < g.ldb_t; ++kk) dst[kk * g.width + o] = src[o * g.ldb_t + kk];
          packed_terms[i].b = dst;
        }
        terms = packed_terms.data() - t0;  // indexed by term_ptr like g.terms
      }
      const int32_t* segs = g.row_group ? &only_segment : groups.segs.data() + groups.seg_ptr[grp];
      const int64_t nsegs = g.row_group ? 1 : groups.seg_ptr[grp + 1] - groups.seg_ptr[grp];
      bool next_filled = false;  // a_next holds this tile's rows
      for (int64_t m0 = m_begin; m0 < m_end; m0 += tr) {
        const int tn = int(std::min<int64_t>(tr, m_end - m0));
        if (next_filled)
          std::swap(a_rows, a_next);
        else
          fill_rows(m0, tn, segs, nsegs, a_rows.data());
        // the next tile's rows, prefetched a share per block of this one
        const int tn_next = prefetch_rows ? int(std::min<int64_t>(tr, m_end - m0 - tn)) : 0;
        next_filled = tn_next > 0;
        if (next_filled) fill_rows(m0 + tn, tn_next, segs, nsegs, a_next.data());
        const BlockGroups::Line* next_lines = next_filled ? groups.lines.data() + groups.line_ptr[grp] : nullptr;
        const int64_t lines = next_filled ? tn_next * (groups.line_ptr[grp + 1] - groups.line_ptr[grp]) : 0;
        int64_t line = 0, line_i = 0;  // line = line_i * tn_next + row
        int row = 0;
        if (staged) {  // column blk0 * width
          for (int t = 0; t < tn; ++t) c_base[t] = stage.data() + (m0 - m_begin + t) * stage_ld;
        } else {
          PixelWalk px(m0, out.height, out.width);
          for (int t = 0; t < tn; ++t, px.next()) c_base[t] = out.row(px);
        }
        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t term_group = g.row_group ? chunk_i : blk;
          const SparseGemm::BlockCols cols = g.block_cols(blk);
          const int64_t c_col = staged ? (blk - blk0) * g.width : cols.c;
          for (int t = 0; t < tn; ++t) c_rows[t] = c_base[t] + c_col;
          TileArgs args;
          args.tn = tn;
          args.width = g.width;
          args.w_valid = cols.valid;
          // packed blocks are zero-padded to full width; a B matrix (no bias) may end mid-panel or
          // have readable padding past it
          args.b_cols = int(g.row_group ? (g.b_readable ? g.b_readable : g.ldb) - cols.b : g.width);
          args.accumulate = false;
          args.a_rows = a_rows.data();
          args.a_stride = g.a_stride;
          args.terms = terms + g.term_ptr[term_group];
          args.nterms = g.term_ptr[term_group + 1] - g.term_ptr[term_group];
          args.ldb = g.ldb;
          args.b_off = g.row_group ? cols.b : 0;
          args.a_terms_ahead = g.a_terms_ahead;
          args.bias = g.bias ? g.bias + blk * g.width : nullptr;
          args.c_rows = c_rows;
          k.tile(args);
          for (const int64_t until = lines * (blk - blk0 + 1) / (blk1 - blk0); line < until; ++line) {
            const BlockGroups::Line& l = next_lines[line_i];
            __builtin_prefetch(a_next[l.seg * kMaxTileRows + row] + l.off);
            if (++row == tn_next) row = 0, ++line_i;
          }
        }
      }
      if (staged)
        out.scatter(k, stage.data(), stage_ld, m_begin, m_end, blk0 * g.width, std::min(g.out_cols, blk1 * g.width),
                    streaming);
    }
  });
}

template <class FillRows>
void run(const SparseGemm& g, FillRows fill_rows) {
  run_on(g, g.rows, g.out, fill_rows);
}

// Bias padded to whole blocks so the kernel can load full vectors.
at::Tensor padded_bias(const std::optional<at::Tensor>& bias, int64_t n, const at::Tensor& like) {
  if (!bias.has_value()) return at::Tensor();
  check_float(*bias, "bias");
  at::Tensor out = at::zeros({n}, like.options());
  out.narrow(0, 0, bias->numel()).copy_(*bias);
  return out;
}

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

FlatPixels flat_pixels(const at::Tensor& t_) {
  const bool flat = t_.is_contiguous() || t_.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor t = flat ? t_ : t_.contiguous();
  return {t, t.stride(0), t.stride(1), t.size(3) > 1 ? t.stride(3) : t.stride(2)};
}

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
                           int64_t streamed, bool ragged) {
  const int64_t threads = at::get_num_threads(), values = nnzb * bo * bi;
  // Splitting pays when blocks alone cannot feed every thread, or when each
  // block's share of A and B (read again per block) outweighs a partial copy
  // of all blocks per thread.
  int64_t splits = 1;
  if (nnzb < 4 * threads || values * threads <= streamed) splits = std::min(threads, units);
  if (splits <= 1) {
    const auto sizes = {int64_t(1), nnzb, bo, bi};
    return {ragged ? at::zeros(sizes, like.options()) : at::empty(sizes, like.options()), 1, nnzb, bo, bi};
  }
  return {scratch(kPartial, {splits, nnzb, bo, bi}, like.options()).zero_(), splits, nnzb, bo, bi};
}

// The grad-values work of one conv tap (linear: the only one): its live
// blocks, and its reduction segments grouped by unit (conv: an output row;
// linear: a run of tokens): unit u's are segs[unit_ptr[u] .. unit_ptr[u+1]).
struct TapWork {
  std::vector<Entry> entries;
  std::vector<Segment> segs;
  std::vector<int64_t> unit_ptr;
};

// dv[split, slot] (+)= sum over segments of A[r-block rows, seg] . B[seg, col0:col0+Bi]
// for every entry.  Entries of one block column share B, whose rows are
// gathered once per chunk (~256 reduction steps) into a contiguous panel that
// stays in L1 while the column's blocks use it.  Split: each thread walks its
// units chunk by chunk through every tap and block, so A and B are read once.
// Unsplit: each thread takes whole block columns through all units.
void grad_values_blocks(const GradRows& a, const GradCols& b, int64_t ldb,
                        std::vector<TapWork>& taps, int64_t n_units, const GradValues& dv) {
  const IsaKernel& k = isa();
  const int64_t bo = dv.bo, bi = dv.bi;
  const int tr = std::min(k.tile_rows(int(bi)), kMaxTileRows);
  constexpr int64_t kChunk = 256;
  struct Column {
    int64_t tap;
    size_t first, last;  // its entries: taps[tap].entries[first, last)
  };
  std::vector<Column> columns;
  int64_t most_k = 1;
  for (int64_t tap = 0; tap < int64_t(taps.size()); ++tap) {
    std::vector<Entry>& es = taps[tap].entries;
    std::sort(es.begin(), es.end(), [](const Entry& x, const Entry& y) {
      return x.col0 != y.col0 ? x.col0 < y.col0 : x.r < y.r;
    });
    for (size_t e = 0; e < es.size(); ++e) {
      if (e == 0 || es[e].col0 != es[e - 1].col0) columns.push_back({tap, e, e});
      columns.back().last = e + 1;
    }
    for (const Segment& s : taps[tap].segs) most_k = std::max<int64_t>(most_k, s.k);
  }
  const int64_t units_per_chunk = std::max<int64_t>(1, kChunk / most_k);

  struct Worker {
    std::vector<Term> terms;
    std::vector<float> panel;
  };
  // One block column over units [u0, u1): pack its B rows, run every block.
  // A column of one block with its channels contiguous reads B in place: a
  // packed copy pays only when blocks share it.
  auto column = [&](Worker& w, const Column& col, int64_t u0, int64_t u1, int64_t split, bool accumulate) -> bool {
    const TapWork& tw = taps[col.tap];
    const int64_t s0 = tw.unit_ptr[u0], s1 = tw.unit_ptr[u1];
    if (s0 == s1) return false;
    const int64_t col0 = tw.entries[col.first].col0, valid = std::min(bi, b.cols - col0);
    const bool in_place = b.col_stride == 1 && col.last - col.first == 1;
    int64_t kc = 0;
    for (int64_t s = s0; s < s1; ++s) kc += tw.segs[s].k;
    if (!in_place) grow(w.panel, kc * bi);
    w.terms.clear();
    float* dst = w.panel.data();
    for (int64_t s = s0; s < s1; ++s) {
      const Segment& sg = tw.segs[s];
      const float* src = b.base + sg.b_off + col0 * b.col_stride;
      w.terms.push_back({0, sg.k, sg.a_off, in_place ? src : dst});
      if (in_place) continue;
      if (b.col_stride == 1) {  // channels contiguous: row by row
        for (int32_t kk = 0; kk < sg.k; ++kk, src += ldb, dst += bi) {
          // Rows a pixel's channels apart (4 KB with 1024): the hardware
          // prefetchers do not follow such strides, and this copy, the first
          // read of x, waited for every row: a quarter of a 1x1 1024 -> 256 @14
          // channels_last grad-values with blocks of 16.  With these
          // prefetches (and prefetch_b for blocks read in place) 9.8 -> 6.4 ms.
          __builtin_prefetch(src + kPrefetchSteps * ldb);
          if (bi > kLineFloats) __builtin_prefetch(src + kPrefetchSteps * ldb + bi - 1);
          if (valid == bi) {
            for (int64_t c = 0; c < bi; ++c) dst[c] = src[c];
          } else {
            for (int64_t c = 0; c < bi; ++c) dst[c] = c < valid ? src[c] : 0.f;
          }
        }
      } else if (ldb == 1) {  // NCHW, consecutive pixels: a transpose of the channels' rows
        k.transpose(src, b.col_stride, int(valid), sg.k, dst, bi, false);
        for (int32_t kk = 0; kk < sg.k; ++kk)
          for (int64_t c = valid; c < bi; ++c) dst[kk * bi + c] = 0.f;
        dst += sg.k * bi;
      } else {  // NCHW, strided pixels: channel by channel
        for (int64_t c = 0; c < bi; ++c) {
          const float* col = src + c * b.col_stride;
          for (int32_t kk = 0; kk < sg.k; ++kk) dst[kk * bi + c] = c < valid ? col[kk * ldb] : 0.f;
        }
        dst += sg.k * bi;
      }
    }
    const float* a_rows[kMaxTileRows];
    float* c_rows[kMaxTileRows];
    for (size_t e = col.first; e < col.last; ++e) {
      const Entry& en = tw.entries[e];
      float* block = dv.block(split, en.slot);
      const int64_t rows = std::min(bo, a.rows - en.r * bo);
      const int64_t per_tile = cdiv(rows, cdiv(rows, tr));  // even tiles: 16 rows as 8 + 8, not 12 + 4
      for (int64_t o0 = 0; o0 < rows; o0 += per_tile) {
        const int tn = int(std::min(per_tile, rows - o0));
        const int64_t row0 = en.r * bo + o0;
        for (int t = 0; t < kMaxTileRows; ++t) {
          a_rows[t] = a.base + (row0 + std::min(t, tn - 1)) * a.row_stride;  // unused rows repeat a real one
          if (t < tn) c_rows[t] = block + (o0 + t) * bi;
        }
        const bool adjacent = a.row_stride == 1 && row0 + kMaxTileRows <= a.rows;
        TileArgs args;
        args.tn = tn;
        args.width = int(bi);
        args.w_valid = int(valid);
        args.b_cols = int(in_place ? valid : bi);  // a panel is zero-padded to Bi columns
        args.accumulate = accumulate;
        args.a_rows = a_rows;
        args.a_stride = a.k_stride;
        args.a_rows_adjacent = adjacent;
        args.terms = w.terms.data();
        args.nterms = int64_t(w.terms.size());
        args.ldb = in_place ? ldb : bi;
        args.prefetch_b = in_place;
        args.b_off = 0;
        args.bias = nullptr;
        args.c_rows = c_rows;
        k.tile(args);
      }
    }
    return true;
  };

  if (dv.splits > 1) {  // partial sums start at zero: always accumulate
    at::parallel_for(0, dv.splits, 1, [&](int64_t begin, int64_t end) {
      Worker w;
      for (int64_t split = begin; split < end; ++split) {
        const int64_t u_end = n_units * (split + 1) / dv.splits;
        for (int64_t u0 = n_units * split / dv.splits; u0 < u_end; u0 += units_per_chunk)
          for (const Column& col : columns) column(w, col, u0, std::min(u_end, u0 + units_per_chunk), split, true);
      }
    });
    return;
  }
  share_items(int64_t(columns.size()), [&](int64_t begin, int64_t end) {
    Worker w;
    for (int64_t c = begin; c < end; ++c) {
      const Column& col = columns[c];
      bool written = false;
      for (int64_t u0 = 0; u0 < n_units; u0 += units_per_chunk)
        written |= column(w, col, u0, std::min(n_units, u0 + units_per_chunk), 0, written);
      if (!written)  // no reduction step reaches these blocks: their gradient is zero
        for (size_t e = col.first; e < col.last; ++e)
          std::fill_n(dv.block(0, taps[col.tap].entries[e].slot), bo * bi, 0.f);
    }
  });
}

// Live blocks as grad-values entries, one TapWork per tap (linear: one tap).
std::vector<TapWork> taps_with_entries(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                       int64_t taps, int64_t cols_per_tap, int64_t bi) {
  const int32_t *rp = row_ptr.data_ptr<int32_t>(), *ci = col_idx.data_ptr<int32_t>(),
                *sl = slot.data_ptr<int32_t>();
  std::vector<TapWork> work(static_cast<size_t>(taps));
  for (int64_t r = 0; r + 1 < row_ptr.numel(); ++r)
    for (int32_t e = rp[r]; e < rp[r + 1]; ++e)
      work[ci[e] / cols_per_tap].entries.push_back({r, (ci[e] % cols_per_tap) * bi, sl[e]});
  return work;
}

// ------------------------------------------------------------------ linear

// The transposed product C^T [rows, n] = W B^T, vectorized along n so that
// B^T [inner, n] and C^T are read and written along their rows (ldb, ldc
// floats apart).  Forward: W's block rows, from the BSR indices; grad-input:
// W^T's, from the transposed ones.  Tiles stay inside one block row (`group`
// rows), whose live blocks are the terms; A row t is the block's values at
// t * row_step, elements elem_step apart (forward: Bi, 1; grad-input: 1, Bi).
// Linear's few-token forward streams the values once this way, and stride-1
// NCHW convs run on each image's channel planes (weights_first_on_planes).
struct WeightsFirst {
  const float* values;
  const int32_t *ptr, *idx, *slot;
  int64_t rows, group, inner, inner_block, row_step, elem_step, block_floats;
  // A conv's block columns are (tap, channel block): tap t's B^T rows start
  // tap_off[t] floats further on (set by the caller; empty: one tap).
  int64_t cols_per_tap = 0;
  std::vector<int64_t> tap_off;
  // The values are read once per call, from memory (linear forward; a conv
  // reads them again for every image): a tile's rows of one block are a few
  // lines, then the next live block lies anywhere, so each term waited for
  // memory.  Tiles prefetch the blocks about kValuesAheadSteps reduction
  // steps on.  32 tokens 4096 -> 4096, density 0.3, blocks of 16/32/64:
  // 0.83/0.83/0.73x the time (A/B, builds alternating in separate processes);
  // 0.5: 0.73x; 0.1 and 0.05: 0.88-1.11x, within this VM's noise.  Convs on planes
  // gained nothing clear.
  bool values_from_memory = false;
};

constexpr int64_t kValuesAheadSteps = 128;

WeightsFirst weights_first_forward(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                   const at::Tensor& slot, int64_t out_features, int64_t in_features) {
  const int64_t bo = values.size(1), bi = values.size(2);
  return {values.data_ptr<float>(), row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
          slot.data_ptr<int32_t>(), out_features, bo, in_features, bi, bi, 1, bo * bi};
}

WeightsFirst weights_first_grad_input(const at::Tensor& values, const at::Tensor& col_ptr,
                                      const at::Tensor& row_idx, const at::Tensor& tslot, int64_t out_features,
                                      int64_t in_features) {
  const int64_t bo = values.size(1), bi = values.size(2);
  return {values.data_ptr<float>(), col_ptr.data_ptr<int32_t>(), row_idx.data_ptr<int32_t>(),
          tslot.data_ptr<int32_t>(), in_features, bi, out_features, bo, 1, bi, bo * bi};
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: the ISA's
// register transpose on pieces of 256 rows or columns (the longer side) that
// the threads share (torch's copy of a transposed matrix runs on one thread).
void transpose_parallel(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  constexpr int64_t kPiece = 256;
  const IsaKernel& k = isa();
  const bool by_rows = rows > cols;
  at::parallel_for(0, cdiv(by_rows ? rows : cols, kPiece), 1, [&](int64_t begin, int64_t end) {
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t p0 = piece * kPiece, np = std::min(kPiece, (by_rows ? rows : cols) - p0);
      if (by_rows)
        k.transpose(src + p0 * lds, lds, int(np), int(cols), dst + p0, ldd, false);
      else
        k.transpose(src + p0, lds, int(rows), int(np), dst + p0 * ldd, ldd, false);
    }
  });
}

// C^T's n columns as grid_rows rows of n / grid_rows columns, rows b_pitch
// floats apart in B^T (and contiguous in C^T): a conv's output pixels on
// zero-padded planes.
struct ColumnGrid {
  int64_t rows, b_pitch;
};

// b_readable: floats readable in each B^T row (0: ldb).
void weights_first(const WeightsFirst& w, const float* bt, int64_t ldb, int64_t n, float* ct, int64_t ldc,
                   int64_t b_readable = 0, ColumnGrid grid = {1, 0}) {
  const int64_t cols = n / grid.rows, panel = std::min<int64_t>(cols, 64);
  const int64_t groups = cdiv(w.rows, w.group);
  SparseGemm g{w.rows, grid.rows * cdiv(cols, panel), int(panel), n, matrix_rows(ct, w.rows, ldc), {}, {}, ldb,
               nullptr, 1, w.group};
  g.a_stride = w.elem_step;
  if (w.values_from_memory && w.elem_step == 1) g.a_terms_ahead = int(cdiv(kValuesAheadSteps, w.inner_block));
  g.b_readable = b_readable;
  if (grid.rows > 1) {
    g.grid_cols = cols;
    g.b_pitch = grid.b_pitch;
  }
  g.term_ptr.assign(w.ptr, w.ptr + groups + 1);
  for (int64_t e = 0; e < w.ptr[groups]; ++e) {
    const int64_t col = w.cols_per_tap ? w.idx[e] % w.cols_per_tap : w.idx[e];
    const int64_t tap_off = w.cols_per_tap ? w.tap_off[w.idx[e] / w.cols_per_tap] : 0;
    g.terms.push_back({0, int32_t(std::min(w.inner_block, w.inner - col * w.inner_block)),
                       w.slot[e] * w.block_floats, bt + tap_off + col * w.inner_block * ldb});
  }
  run(g, [&](int64_t m0, int tn, const int32_t*, int64_t, const float** a_rows) {
    const int64_t o = m0 % w.group;  // row inside its block; unused rows read slot 0 harmlessly
    for (int t = 0; t < kMaxTileRows; ++t) a_rows[t] = w.values + (t < tn ? (o + t) * w.row_step : 0);
  });
}

// values [nnzb, Bo, Bi] as [nnzb, Bi, Bo] in scratch slot `which`, block by
// block in register transposes the threads share.
at::Tensor blocks_transposed(const at::Tensor& values, Scratch which) {
  const int64_t nnzb = values.size(0), bo = values.size(1), bi = values.size(2);
  at::Tensor out = scratch(which, {nnzb, bi, bo}, values.options());
  const float* src = values.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const IsaKernel& k = isa();
  at::parallel_for(0, nnzb, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk)
      k.transpose(src + blk * bo * bi, bi, int(bo), int(bi), dst + blk * bo * bi, bo, false);
  });
  return out;
}

// Linear forward, few tokens: Y^T = W X^T through scratch transposes.
void linear_forward_weights_first(const at::Tensor& x, const at::Tensor& values,
                                  const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  const at::Tensor& slot, const std::optional<at::Tensor>& bias,
                                  int64_t out_features, at::Tensor& y) {
  // X^T's rows padded with zeros to whole cache lines: a row that starts
  // mid-line makes every vector load of it straddle two lines (2x slower
  // here); the padding is never stored, but holds no stale denormals either.
  const int64_t n = x.size(0), in = x.size(1), ld = cdiv(n, kLineFloats) * kLineFloats;
  const at::Tensor xt = scratch(kTransposeA, {in, ld}, x.options());
  xt.narrow(1, n, ld - n).zero_();
  transpose_parallel(x.data_ptr<float>(), in, n, in, xt.data_ptr<float>(), ld);
  at::Tensor yt = scratch(kTransposeB, {out_features, n}, x.options());
  WeightsFirst w = weights_first_forward(values, row_ptr, col_idx, slot, out_features, in);
  w.values_from_memory = true;
  weights_first(w, xt.data_ptr<float>(), ld, n, yt.data_ptr<float>(), n);
  transpose_parallel(yt.data_ptr<float>(), n, out_features, n, y.data_ptr<float>(), out_features);
  if (bias.has_value()) {
    check_float(*bias, "bias");
    y.add_(*bias);
  }
}

// Up to one B panel (64 tokens) the weights-first forward streams the values once.
constexpr int64_t kWeightsFirstTokens = 64;

// y [N, out] = x W^T + bias.
at::Tensor linear_forward(const at::Tensor& x_, const at::Tensor& values_, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, const at::Tensor& slot,
                          const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_float(x_, "x");
  check_float(values_, "values");
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  const int64_t n = x.size(0), in = x.size(1), nnzb = values_.size(0);
  const int64_t bo = values_.size(1), bi = values_.size(2), R = row_ptr.numel() - 1;
  check_indices(row_ptr, col_idx, slot, cdiv(in, bi), nnzb, "BSR");
  TORCH_CHECK(R == cdiv(out_features, bo), "freetickets_cpu: row_ptr does not match out_features");
  // The kernel vectorizes along B's rows: Y = X W^T wants W^T.  When the
  // values outweigh the activations, few tokens (one panel) compute
  // Y^T = W X^T with the values as stored, and more tokens transpose the
  // values block group by block group inside the threads; otherwise one
  // transposed copy of all values is cheapest.
  const bool values_dominate = n * (in + out_features) < nnzb * bo * bi;
  if (n >= 16 && n <= kWeightsFirstTokens && values_dominate) {
    linear_forward_weights_first(x, values_.contiguous(), row_ptr, col_idx, slot, bias, out_features, y);
    return y;
  }
  const bool per_group = n >= 16 && values_dominate;
  const at::Tensor values = values_.contiguous();
  // [nnzb, Bi, Bo]: Bo is the vector axis
  const at::Tensor vt = per_group ? values : blocks_transposed(values, kTransposeA);
  const at::Tensor bp = padded_bias(bias, R * bo, x);
  SparseGemm g{n, R, int(bo), out_features, matrix_rows(y.data_ptr<float>(), n, out_features), {}, {}, bo,
               bp.defined() ? bp.data_ptr<float>() : nullptr, 1};
  g.transposed_b = per_group;
  g.ldb_t = bi;
  const int32_t *rp = row_ptr.data_ptr<int32_t>(), *ci = col_idx.data_ptr<int32_t>(),
                *sl = slot.data_ptr<int32_t>();
  g.term_ptr.assign(rp, rp + R + 1);
  for (int64_t e = 0; e < nnzb; ++e)
    g.terms.push_back({0, int32_t(std::min(bi, in - ci[e] * bi)), ci[e] * bi,
                       vt.data_ptr<float>() + sl[e] * bi * bo});
  g.prefetch_a = prefetch_pays(isa().tile_rows(g.width) * in);
  const at::Tensor zeros = at::zeros({std::max<int64_t>(in, 1)}, x.options());
  const float *xp = x.data_ptr<float>(), *zero = zeros.data_ptr<float>();
  run(g, [&](int64_t m0, int tn, const int32_t*, int64_t, const float** a_rows) {
    for (int t = 0; t < kMaxTileRows; ++t) a_rows[t] = t < tn ? xp + (m0 + t) * in : zero;
  });
  return y;
}

// dx [N, in] = dy W.
at::Tensor linear_grad_input(const at::Tensor& dy_, const at::Tensor& values_, const at::Tensor& col_ptr,
                             const at::Tensor& row_idx, const at::Tensor& tslot, int64_t in_features) {
  check_float(dy_, "grad_out");
  check_float(values_, "values");
  const at::Tensor dy = dy_.contiguous(), values = values_.contiguous();
  at::Tensor dx = at::empty({dy.size(0), in_features}, dy.options());
  const int64_t n = dy.size(0), out = dy.size(1), nnzb = values.size(0);
  const int64_t bo = values.size(1), bi = values.size(2), C = col_ptr.numel() - 1;
  check_indices(col_ptr, row_idx, tslot, cdiv(out, bo), nnzb, "transposed");
  TORCH_CHECK(C == cdiv(in_features, bi), "freetickets_cpu: col_ptr does not match in_features");
  SparseGemm g{n, C, int(bi), in_features, matrix_rows(dx.data_ptr<float>(), n, in_features), {}, {}, bi, nullptr, 1};
  const int32_t *cp = col_ptr.data_ptr<int32_t>(), *ri = row_idx.data_ptr<int32_t>(),
                *ts = tslot.data_ptr<int32_t>();
  g.term_ptr.assign(cp, cp + C + 1);
  for (int64_t e = 0; e < nnzb; ++e)
    g.terms.push_back({0, int32_t(std::min(bo, out - ri[e] * bo)), ri[e] * bo,
                       values.data_ptr<float>() + ts[e] * bo * bi});
  g.prefetch_a = prefetch_pays(isa().tile_rows(g.width) * out);
  const at::Tensor zeros = at::zeros({std::max<int64_t>(out, 1)}, dy.options());
  const float *dp = dy.data_ptr<float>(), *zero = zeros.data_ptr<float>();
  run(g, [&](int64_t m0, int tn, const int32_t*, int64_t, const float** a_rows) {
    for (int t = 0; t < kMaxTileRows; ++t) a_rows[t] = t < tn ? dp + (m0 + t) * out : zero;
  });
  return dx;
}

// Grad-values of linear and of pointwise convs: the reduction runs over the
// per_image pixels (tokens) of each of `images`, in units of up to 256 that
// never cross from one image to the next (A and B may not be contiguous
// across them).
at::Tensor grad_values_pointwise(const GradRows& a, const GradCols& b, int64_t images, int64_t per_image,
                                 const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                 at::IntArrayRef block_size, const at::Tensor& like) {
  const int64_t rows = images * per_image, in = b.cols, nnzb = col_idx.numel(), bo = block_size[0],
                bi = block_size[1];
  check_indices(row_ptr, col_idx, slot, cdiv(in, bi), nnzb, "BSR");
  std::vector<TapWork> work = taps_with_entries(row_ptr, col_idx, slot, 1, cdiv(in, bi), bi);
  TapWork& tw = work[0];
  tw.unit_ptr.push_back(0);
  for (int64_t n = 0; n < images; ++n)
    for (int64_t k0 = 0; k0 < per_image; k0 += 256) {
      tw.segs.push_back({n * a.image_stride + k0 * a.k_stride, n * b.image_stride + k0 * b.k_stride,
                         int32_t(std::min<int64_t>(256, per_image - k0))});
      tw.unit_ptr.push_back(int64_t(tw.segs.size()));
    }
  const int64_t units = int64_t(tw.segs.size());
  const GradValues dv = new_grad_values(like, nnzb, bo, bi, units, rows * (in + a.rows),
                                        a.rows % bo != 0 || in % bi != 0);
  grad_values_blocks(a, b, b.k_stride, work, units, dv);
  return dv.result();
}

at::Tensor linear_grad_values(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& slot,
                              at::IntArrayRef block_size) {
  check_float(dy_, "grad_out");
  check_float(x_, "x");
  const at::Tensor dy = dy_.contiguous(), x = x_.contiguous();
  const GradCols b{x.data_ptr<float>(), 1, x.size(1), 0, x.size(1)};
  // grad_out^T in scratch: read in place, a block row's reduction steps lie
  // a grad_out row apart (16 KB with 4096 features), a power-of-two stride
  // whose lines compete for a few cache sets, too far apart for the
  // hardware prefetchers.  256 tokens 4096 -> 4096, blocks of 32: density
  // 0.5 72 -> 54 ms, 0.1 12.9 -> 8.2 ms (0.64-0.89x the time on six shapes,
  // 32 to 4096 tokens).  Convs keep their own layout: a channels_last
  // grad_out copied to NCHW ran slower on 6 of 7 ResNet/WRN shapes.
  const int64_t n = dy.size(0), out = dy.size(1);
  const at::Tensor dyt = scratch(kTransposeA, {out, n}, dy.options());
  transpose_parallel(dy.data_ptr<float>(), out, n, out, dyt.data_ptr<float>(), n);
  const GradRows a{dyt.data_ptr<float>(), n, 1, 0, out};
  return grad_values_pointwise(a, b, 1, x.size(0), row_ptr, col_idx, slot, block_size, x);
}

// ------------------------------------------------------------------ conv2d

struct ConvGeom {
  int64_t n, cin, h, w, cout, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t taps() const { return kh * kw; }
  // 1x1, stride 1, no padding: the conv is a GEMM over pixels
  bool pointwise() const { return kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0; }
};

ConvGeom conv_geom(at::IntArrayRef input_size, int64_t cout, at::IntArrayRef kernel,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(input_size.size() == 4 && kernel.size() == 2 && stride.size() == 2 &&
                  padding.size() == 2 && dilation.size() == 2,
              "freetickets_cpu: conv2d needs a 4-D input and pairs for kernel/stride/padding/dilation");
  ConvGeom g{input_size[0], input_size[1], input_size[2], input_size[3], cout, 0, 0,
             kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  g.oh = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.oh > 0 && g.ow > 0, "freetickets_cpu: conv2d output would be empty");
  return g;
}

// The A row pointers of a conv's implicit GEMM: GEMM row m is pixel (y, x) of
// image n in the walked grid (forward: the output; grad-input: the input), and
// tap `tap` reads pixel ((y * mul_h + h[tap]) / div_h, (x * mul_w + w[tap]) / div_w)
// of `src` when that divides exactly and lies inside it, else zeros.
// Forward: mul = stride, div = 1.  Grad-input walks the transposed conv:
// mul = 1, div = stride, offsets negated.  `src` is read in place through its
// strides: a row points at a pixel's first channel, the kernel steps
// `channel_stride` per channel (1 for channels_last, H * W for NCHW).
struct TapRows {
  const float* src;
  at::Tensor zeros;  // a padding row: zero wherever a term reads it
  const float* zero_row;  // its data, read by every tile's fill
  int64_t src_h, src_w, image_stride, y_stride, x_stride, channel_stride;
  int64_t walk_h, walk_w, mul_h, mul_w, div_h, div_w;
  std::vector<int64_t> h, w;

  // src_sizes / src_strides: [N, C, H, W] (only C, H, W are read when one
  // image is walked at a time; `src` may then be set per image).
  TapRows(const ConvGeom& g, bool transposed, const float* src_, at::IntArrayRef src_sizes,
          at::IntArrayRef src_strides, const at::TensorOptions& options)
      : src(src_) {
    src_h = src_sizes[2];
    src_w = src_sizes[3];
    image_stride = src_strides[0];
    y_stride = src_strides[2];
    x_stride = src_strides[3];
    channel_stride = src_strides[1];
    zeros = at::zeros({(src_sizes[1] - 1) * channel_stride + 1}, options);
    zero_row = zeros.data_ptr<float>();
    walk_h = transposed ? g.h : g.oh;
    walk_w = transposed ? g.w : g.ow;
    mul_h = transposed ? 1 : g.sh;
    mul_w = transposed ? 1 : g.sw;
    div_h = transposed ? g.sh : 1;
    div_w = transposed ? g.sw : 1;
    for (int64_t tap = 0; tap < g.taps(); ++tap) {
      const int64_t dh = (tap / g.kw) * g.dh - g.ph, dw = (tap % g.kw) * g.dw - g.pw;
      h.push_back(transposed ? -dh : dh);
      w.push_back(transposed ? -dw : dw);
    }
  }

  // Source coordinate times div, and whether it is a whole pixel inside [0, size).
  static bool inside(int64_t scaled, int64_t div, int64_t size) {
    return scaled >= 0 && scaled < size * div && (div == 1 || scaled % div == 0);
  }

  void fill(int64_t m0, int tn, const int32_t* taps, int64_t ntaps, const float** a_rows) const {
    // locals: the pointer stores below would otherwise reload every member
    const int64_t *hs = h.data(), *ws = w.data(), sh = src_h, sw = src_w, ys = y_stride, xs = x_stride;
    const int64_t mh = mul_h, mw = mul_w, dh = div_h, dw = div_w;
    const float* zero = zero_row;
    PixelWalk px(m0, walk_h, walk_w);
    if (dh == 1 && dw == 1) {
      // The tile's pixels as runs along walked rows (one or two where rows
      // are wider than a tile): a tap reads a run's pixels from one source
      // row, mw * xs apart, and only an interval of them lies inside it (the
      // rest read the zero row).  No per-pixel checks.
      int t = 0;
      while (t < tn) {
        const int run = int(std::min<int64_t>(tn - t, walk_w - px.x));
        const float* image = src + px.n * image_stride;
        for (int64_t u = 0; u < ntaps; ++u) {
          const float** out = a_rows + taps[u] * kMaxTileRows + t;
          const int64_t sy = px.y * mh + hs[taps[u]];
          // inside for i in [lo, hi): 0 <= (px.x + i) * mw + ws < sw
          const int64_t first = px.x * mw + ws[taps[u]];
          int lo = 0, hi = 0;
          if (sy >= 0 && sy < sh) {
            lo = first >= 0 ? 0 : int(std::min<int64_t>(run, cdiv(-first, mw)));
            hi = first >= sw ? 0 : int(std::min<int64_t>(run, cdiv(sw - first, mw)));
          }
          const int64_t off = sy * ys + first * xs, step = mw * xs;
          for (int i = 0; i < run; ++i) out[i] = i >= lo && i < hi ? image + (off + i * step) : zero;
        }
        t += run;
        px.y += (px.x + run) / walk_w;  // a run ends at a row's end or at the tile's
        px.x = (px.x + run) % walk_w;
        if (px.y == walk_h) px.y = 0, ++px.n;
      }
      for (int64_t u = 0; u < ntaps; ++u)
        for (int i = t; i < kMaxTileRows; ++i) a_rows[taps[u] * kMaxTileRows + i] = zero;
      return;
    }
    for (int t = 0; t < kMaxTileRows; ++t, px.next()) {
      const float* image = src + px.n * image_stride;
      for (int64_t u = 0; u < ntaps; ++u) {
        const int64_t sy = px.y * mh + hs[taps[u]], sx = px.x * mw + ws[taps[u]];
        const bool ok = t < tn && inside(sy, dh, sh) && inside(sx, dw, sw);
        a_rows[taps[u] * kMaxTileRows + t] = ok ? image + sy / dh * ys + sx / dw * xs : zero;
      }
    }
  }
};

// one_image(img) for every image.  With a few images per thread, each thread
// takes whole images (the work of one image at low density is too small to
// share); else the threads share each image.
bool whole_images_per_thread(int64_t images) { return images >= 2 * at::get_num_threads(); }

template <class OneImage>
void for_each_image(int64_t images, OneImage one_image) {
  if (whole_images_per_thread(images)) {  // run() inside a parallel region runs inline
    // The workers run torch ops (views, copies) on the op's tensors: under the
    // caller's thread-local state, i.e. below autograd (else copies from an
    // input that requires grad would record history on the scratch buffers,
    // keeping every call's inputs alive) and in its inference mode.
    const at::ThreadLocalState caller;
    share_items(images, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard state(caller);
      for (int64_t img = begin; img < end; ++img) one_image(img);
    });
  } else {
    for (int64_t img = 0; img < images; ++img) one_image(img);
  }
}

// Stride-1 convs on NCHW planes run weights-first on each image: output
// pixel (oy, ox) reads B^T column oy * Wp + ox, Wp being the width of the
// planes zero-padded by the conv's padding, and tap (i, j) reads the padded
// planes shifted by i * dh * Wp + j * dw: whole vectors, always in bounds.
// C^T is the output image itself: its rows, OW wide, are computed from the
// padded rows Wp floats apart (ColumnGrid), so no result is copied.  The
// planes are copied into scratch (one image at a time: L2-sized) unless a
// 1x1 conv can read them in place (whole lines long: else every vector load
// straddles two lines, 2x slower here).  Grad-input is the stride-1 conv of
// grad_out padded by (k - 1) * d - p with the taps flipped (so it needs
// p <= (k - 1) * d).
struct Planes {
  int64_t pad_h, pad_w;
  bool flip;
};

Planes planes_for(const ConvGeom& g, bool grad_input) {
  if (!grad_input) return {g.ph, g.pw, false};
  return {(g.kh - 1) * g.dh - g.ph, (g.kw - 1) * g.dw - g.pw, true};
}

// Whether that applies to `src` and pays: a 1x1 conv's planes must hold a
// vector (16 pixels), other convs may spend at most a quarter of the columns
// on padding, and the live values, streamed once per image, must weigh less
// than an image's activations (large maps, narrow layers).
// 1x1: where the planes are not whole lines long (14x14, 7x7) each path
// makes one extra pass over an activation: the planes copy their source, the
// general path transposes its result; the smaller wins (ResNet-50's
// 1024->256 @14 and 2048->512 @7 forwards and the expanding convs'
// grad-inputs ran 11-35% faster on the general path).
// Convs with taps copy the padded planes in and write output rows in place;
// the general path packs NCHW images channels-last (packs_images) and
// writes its results through transposes.  Planes pay where the output rows
// are long (the tiles run along them) or the general path's blocks are
// mostly padding (fewer input channels than a block: a 3-channel first
// conv).  3x3, 32 images, density 0.1, EPYC (AVX2), planes / general:
// 64->64 @32 forward 2.9 / 3.3 ms, 160->160 @32 training step 55 / 61 ms
// (forward within 3%); rows of 16 and less lost: 320->320 @16 step 51 / 43
// ms, 256->256 @14 forward 9.5 / 6.3 ms (rows of 14 waste a partial vector).
bool on_planes(const ConvGeom& g, const at::Tensor& src, const at::Tensor& values, bool grad_input) {
  const Planes pp = planes_for(g, grad_input);
  const int64_t wp = src.size(3) + 2 * pp.pad_w, out_w = grad_input ? g.w : g.ow;
  const int64_t src_channels = grad_input ? g.cout : g.cin, out_channels = grad_input ? g.cin : g.cout;
  const bool pointwise_pays = g.h * g.w >= 16 && ((g.h * g.w) % kLineFloats == 0 || src_channels <= out_channels);
  const bool shape_pays =
      g.pointwise() ? pointwise_pays : 4 * (wp - out_w) <= wp && (g.cin < values.size(2) || out_w >= 32);
  return src.is_contiguous() && g.sh == 1 && g.sw == 1 && pp.pad_h >= 0 && pp.pad_w >= 0 && shape_pays &&
         g.oh * g.ow * (g.cin + g.cout) >= values.numel();
}

// One contiguous image's c planes of h x w into planes of ld floats in `dst`,
// each zero-padded to (h + 2 pad_h) x (w + 2 pad_w); the tail of every plane
// and the slack up to `floats` are zeros too.  One pass, in order.
void pad_planes(const float* src, int64_t c, int64_t h, int64_t w, const Planes& pp, int64_t ld, float* dst,
                int64_t floats) {
  const int64_t wp = w + 2 * pp.pad_w;
  for (int64_t ch = 0; ch < c; ++ch, src += h * w) {
    float* plane = dst + ch * ld;
    std::fill(plane, plane + pp.pad_h * wp, 0.f);
    for (int64_t y = 0; y < h; ++y) {
      float* row = plane + (pp.pad_h + y) * wp;
      std::fill(row, row + pp.pad_w, 0.f);
      std::copy(src + y * w, src + (y + 1) * w, row + pp.pad_w);
      std::fill(row + pp.pad_w + w, row + wp, 0.f);
    }
    std::fill(plane + (pp.pad_h + h) * wp, plane + ld, 0.f);  // bottom rows, tail
  }
  std::fill(dst + c * ld, dst + floats, 0.f);
}

// out[img] = the weights-first product over src[img]'s planes, padded as
// planes_for(g, grad_input) says.
void weights_first_on_planes(WeightsFirst w, const ConvGeom& g, bool grad_input, const at::Tensor& src,
                             const at::Tensor& out) {
  const Planes pp = planes_for(g, grad_input);
  const int64_t c_src = src.size(1), h = src.size(2), wd = src.size(3), c_out = out.size(1);
  const int64_t out_h = out.size(2), out_w = out.size(3);
  const int64_t hp = h + 2 * pp.pad_h, wp = wd + 2 * pp.pad_w, n = out_h * out_w;
  const bool copy_in = g.taps() > 1 || (hp * wp) % kLineFloats != 0;
  const int64_t ld = copy_in ? cdiv(hp * wp, kLineFloats) * kLineFloats : hp * wp;
  // Every B^T read is whole vectors: up to a line past a row (or the last
  // plane, into zeroed slack).
  const int64_t b_readable = wp == out_w ? cdiv(n, kLineFloats) * kLineFloats : out_h * wp + kLineFloats;
  const int64_t floats = c_src * ld + (g.kw - 1) * g.dw + kLineFloats;
  for (int64_t tap = 0; tap < g.taps(); ++tap) {
    const int64_t i = tap / g.kw, j = tap % g.kw;
    w.tap_off.push_back((pp.flip ? g.kh - 1 - i : i) * g.dh * wp + (pp.flip ? g.kw - 1 - j : j) * g.dw);
  }
  for_each_image(g.n, [&](int64_t img) {
    const float* bt = src.data_ptr<float>() + img * c_src * h * wd;
    if (copy_in) {
      float* planes = scratch(kTransposeA, {floats}, src.options()).data_ptr<float>();
      pad_planes(bt, c_src, h, wd, pp, ld, planes, floats);
      bt = planes;
    }
    weights_first(w, bt, ld, n, out.data_ptr<float>() + img * c_out * n, n, b_readable,
                  wp == out_w ? ColumnGrid{1, 0} : ColumnGrid{out_h, wp});
  });
}

// Whether a conv source is read through a channels-last copy of each image:
// NCHW planes put a pixel's channels H * W floats apart, so each reduction
// step of a tile reads another line, and the taps read those lines again
// (4 KB planes: all in one L1 set, so from L2).  An image packed in L2 by
// register transposes costs less where the GEMM walks about as many pixels
// as the source has (stride 1; grad-input) and each thread takes whole
// images; a strided forward reads a quarter of them per tap, a few images
// would pack their whole batch out of cache, and a 1x1 conv reads each line
// once.  3x3 NCHW, blocks of 32, 32 images: 160->160 @32 6.3 -> 5.5 ms,
// 320->320 @16 5.8 -> 5.2 ms; 64->64 @32 unchanged (the input's read from
// memory, which the strided reads overlapped with the FMAs, moves into the
// packing).
bool packs_images(const ConvGeom& g, bool transposed, const at::Tensor& src) {
  const int64_t walked = transposed ? g.h * g.w : g.oh * g.ow;
  const bool planes = src.stride(3) == 1 && src.stride(2) == src.size(3) && src.stride(1) != 1 && src.size(1) > 1;
  return planes && g.taps() > 1 && whole_images_per_thread(g.n) && 2 * walked >= src.size(2) * src.size(3);
}

// Element stride between a pixel's channels as the conv kernel reads them.
int64_t read_channel_stride(const ConvGeom& g, bool transposed, const at::Tensor& src) {
  return packs_images(g, transposed, src) ? 1 : src.stride(1);
}

// Forward, grad-input: one sparse GEMM whose A rows are the conv taps' reads
// of `src` (walked as TapRows says); terms were built with
// read_channel_stride(src).  Packed sources run image by image, each thread
// on its own: the image's planes transposed into pixel rows of C floats in
// scratch, then the GEMM's rows of that image.
void run_conv(SparseGemm& gemm, const ConvGeom& g, bool transposed, const at::Tensor& src) {
  const auto fill = [](const TapRows& rows) {
    return [&rows](int64_t m0, int tn, const int32_t* taps, int64_t ntaps, const float** a_rows) {
      rows.fill(m0, tn, taps, ntaps, a_rows);
    };
  };
  if (!packs_images(g, transposed, src)) {
    const TapRows rows(g, transposed, src.data_ptr<float>(), src.sizes(), src.strides(), src.options());
    gemm.a_stride = rows.channel_stride;
    // a tile's rows span kh source rows of its pixels and the taps' reach
    const int64_t tile_px = isa().tile_rows(gemm.width) + (g.kw - 1) * g.dw;
    gemm.prefetch_a = prefetch_pays(g.kh * tile_px * src.size(1));
    run(gemm, fill(rows));
    return;
  }
  const int64_t c = src.size(1), h = src.size(2), w = src.size(3);
  const TapRows packed(g, transposed, nullptr, src.sizes(), {h * w * c, 1, w * c, c}, src.options());
  gemm.a_stride = 1;
  const int64_t image_rows = gemm.rows / g.n, image_floats = h * w * c;
  for_each_image(g.n, [&](int64_t img) {
    const at::Tensor image = scratch(kTransposeA, {image_floats}, src.options());
    isa().transpose(src.data_ptr<float>() + img * src.stride(0), src.stride(1), int(c), int(h * w),
                    image.data_ptr<float>(), c, false);
    TapRows rows = packed;
    rows.src = image.data_ptr<float>();
    OutRows out = gemm.out;
    out.base += img * out.image_stride;
    run_on(gemm, image_rows, out, fill(rows));
  });
}

at::Tensor conv2d_forward(const at::Tensor& x, const at::Tensor& values_, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, const at::Tensor& slot,
                          const std::optional<at::Tensor>& bias, int64_t out_channels,
                          at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation) {
  check_float(x, "x");
  check_float(values_, "values");
  const ConvGeom g = conv_geom(x.sizes(), out_channels, kernel, stride, padding, dilation);
  const int64_t nnzb = values_.size(0), bo = values_.size(1), bi = values_.size(2);
  const int64_t cbpt = cdiv(g.cin, bi), R = row_ptr.numel() - 1;
  check_indices(row_ptr, col_idx, slot, g.taps() * cbpt, nnzb, "BSR");
  TORCH_CHECK(R == cdiv(out_channels, bo), "freetickets_cpu: row_ptr does not match out_channels");
  const at::Tensor y = conv_output({g.n, g.cout, g.oh, g.ow}, x);
  if (on_planes(g, x, values_, false)) {
    const at::Tensor values = values_.contiguous();
    WeightsFirst w = weights_first_forward(values, row_ptr, col_idx, slot, g.cout, g.cin);
    w.cols_per_tap = cbpt;  // BSR block columns are tap * cbpt + channel block
    weights_first_on_planes(w, g, false, x, y);
    if (bias.has_value()) {
      check_float(*bias, "bias");
      y.add_(bias->view({1, -1, 1, 1}));
    }
    return y;
  }
  const at::Tensor vt = values_.transpose(1, 2).contiguous();  // small next to the activations
  const at::Tensor bp = padded_bias(bias, R * bo, x);
  const int64_t channel_stride = read_channel_stride(g, false, x);
  SparseGemm gemm{g.n * g.oh * g.ow, R, int(bo), g.cout, pixel_rows(y), {}, {}, bo,
                  bp.defined() ? bp.data_ptr<float>() : nullptr, int(g.taps())};
  const int32_t *rp = row_ptr.data_ptr<int32_t>(), *ci = col_idx.data_ptr<int32_t>(),
                *sl = slot.data_ptr<int32_t>();
  gemm.term_ptr.assign(rp, rp + R + 1);
  for (int64_t e = 0; e < nnzb; ++e) {
    const int64_t tap = ci[e] / cbpt, cb = ci[e] % cbpt;
    gemm.terms.push_back({int32_t(tap), int32_t(std::min(bi, g.cin - cb * bi)), cb * bi * channel_stride,
                          vt.data_ptr<float>() + sl[e] * bi * bo});
  }
  run_conv(gemm, g, /*transposed=*/false, x);
  return y;
}

at::Tensor conv2d_grad_input(const at::Tensor& dy, const at::Tensor& values_, const at::Tensor& col_ptr,
                             const at::Tensor& row_idx, const at::Tensor& tslot,
                             at::IntArrayRef input_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_float(dy, "grad_out");
  check_float(values_, "values");
  const ConvGeom g = conv_geom(input_size, dy.size(1), kernel, stride, padding, dilation);
  TORCH_CHECK(dy.size(2) == g.oh && dy.size(3) == g.ow,
              "freetickets_cpu: grad_out spatial size does not match the conv geometry");
  const at::Tensor values = values_.contiguous();
  const int64_t nnzb = values.size(0), bo = values.size(1), bi = values.size(2);
  const int64_t cbpt = cdiv(g.cin, bi), C = col_ptr.numel() - 1;
  TORCH_CHECK(C == g.taps() * cbpt, "freetickets_cpu: col_ptr does not match the input channels");
  check_indices(col_ptr, row_idx, tslot, cdiv(g.cout, bo), nnzb, "transposed");
  const at::Tensor dx = conv_output({g.n, g.cin, g.h, g.w}, dy);
  const int32_t *cp = col_ptr.data_ptr<int32_t>(), *ri = row_idx.data_ptr<int32_t>(),
                *ts = tslot.data_ptr<int32_t>();
  if (on_planes(g, dy, values, true)) {
    WeightsFirst w = weights_first_grad_input(values, col_ptr, row_idx, tslot, g.cout, g.cin);
    // rows are input channel blocks: gather each one's blocks over all taps,
    // column tap * R + output block row
    const int64_t R = cdiv(g.cout, bo);
    std::vector<int32_t> ptr{0}, idx, slots;
    for (int64_t cb = 0; cb < cbpt; ++cb) {
      for (int64_t tap = 0; tap < g.taps(); ++tap)
        for (int32_t e = cp[tap * cbpt + cb]; e < cp[tap * cbpt + cb + 1]; ++e) {
          idx.push_back(int32_t(tap * R + ri[e]));
          slots.push_back(ts[e]);
        }
      ptr.push_back(int32_t(idx.size()));
    }
    w.ptr = ptr.data();
    w.idx = idx.data();
    w.slot = slots.data();
    w.cols_per_tap = R;
    weights_first_on_planes(w, g, true, dy, dx);
    return dx;
  }
  const int64_t channel_stride = read_channel_stride(g, true, dy);
  // Output block cb (Bi input channels) sums, over taps, the blocks of column tap*cbpt + cb.
  SparseGemm gemm{g.n * g.h * g.w, cbpt, int(bi), g.cin, pixel_rows(dx), {0}, {}, bi, nullptr, int(g.taps())};
  for (int64_t cb = 0; cb < cbpt; ++cb) {
    for (int64_t tap = 0; tap < g.taps(); ++tap) {
      const int64_t col = tap * cbpt + cb;
      for (int32_t e = cp[col]; e < cp[col + 1]; ++e)
        gemm.terms.push_back({int32_t(tap), int32_t(std::min(bo, g.cout - ri[e] * bo)),
                              ri[e] * bo * channel_stride, values.data_ptr<float>() + ts[e] * bo * bi});
    }
    gemm.term_ptr.push_back(int64_t(gemm.terms.size()));
  }
  run_conv(gemm, g, /*transposed=*/true, dy);
  return dx;
}

at::Tensor conv2d_grad_values(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& slot,
                              at::IntArrayRef block_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_float(dy, "grad_out");
  check_float(x, "x");
  const ConvGeom g = conv_geom(x.sizes(), dy.size(1), kernel, stride, padding, dilation);
  const int64_t nnzb = col_idx.numel(), bo = block_size[0], bi = block_size[1];
  const int64_t cbpt = cdiv(g.cin, bi), M = g.n * g.oh * g.ow;
  const FlatPixels dyf = flat_pixels(dy), xf = flat_pixels(x);
  const GradRows a{dyf.t.data_ptr<float>(), dyf.channel, dyf.pixel, dyf.image, g.cout};
  const GradCols b{xf.t.data_ptr<float>(), xf.channel, xf.pixel, xf.image, g.cin};
  if (g.pointwise())
    return grad_values_pointwise(a, b, g.n, g.h * g.w, row_ptr, col_idx, slot, block_size, x);
  check_indices(row_ptr, col_idx, slot, g.taps() * cbpt, nnzb, "BSR");
  std::vector<TapWork> work = taps_with_entries(row_ptr, col_idx, slot, g.taps(), cbpt, bi);
  // units are output rows (n, oh); each tap reads one segment of a row: the
  // output columns whose input column iw = ow*sw - pw + j*dw lies inside the image
  for (int64_t tap = 0; tap < g.taps(); ++tap) {
    TapWork& tw = work[tap];
    const int64_t i = tap / g.kw, j = tap % g.kw;
    const int64_t ow_lo = std::max<int64_t>(0, cdiv(g.pw - j * g.dw, g.sw));
    const int64_t ow_hi = std::min<int64_t>(g.ow, cdiv(g.w + g.pw - j * g.dw, g.sw));
    tw.unit_ptr.push_back(0);
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t oh = 0; oh < g.oh; ++oh) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh, iw = ow_lo * g.sw - g.pw + j * g.dw;
        if (!tw.entries.empty() && ow_hi > ow_lo && ih >= 0 && ih < g.h)
          tw.segs.push_back({n * a.image_stride + (oh * g.ow + ow_lo) * a.k_stride,
                             n * b.image_stride + ih * xf.t.stride(2) + iw * xf.t.stride(3), int32_t(ow_hi - ow_lo)});
        tw.unit_ptr.push_back(int64_t(tw.segs.size()));
      }
  }
  const GradValues dv = new_grad_values(x, nnzb, bo, bi, g.n * g.oh, M * (g.cout + g.taps() * g.cin),
                                        g.cout % bo != 0 || g.cin % bi != 0);
  grad_values_blocks(a, b, g.sw * xf.t.stride(3), work, g.n * g.oh, dv);
  return dv.result();
}

std::string build_info() {
  std::string s = "isa=";
  s += isa().name;
  s += " supported=";
  const char* sep = "";
  std::vector<const IsaKernel*> listed;  // non-x86 builds alias every ISA to the portable one
  for (const IsaKernel* k : {&isa_avx512(), &isa_avx2(), &isa_portable()}) {
    if (!isa_supported(*k) || std::count(listed.begin(), listed.end(), k)) continue;
    listed.push_back(k);
    s += sep;
    s += k->name;
    sep = ",";
  }
#ifdef _OPENMP
  s += " openmp=" + std::to_string(_OPENMP);
#else
  s += " openmp=no";
#endif
  s += " threads=" + std::to_string(at::get_num_threads());
  return s;
}

std::string set_isa(const std::string& name) { return set_isa_checked(name).name; }

}  // namespace
}  // namespace ftk_cpu

TORCH_LIBRARY(freetickets_cpu, m) {
  m.def("linear_forward(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor slot, "
        "Tensor? bias, int out_features) -> Tensor");
  m.def("linear_grad_input(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor row_idx, "
        "Tensor tslot, int in_features) -> Tensor");
  m.def("linear_grad_values(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, "
        "Tensor slot, int[] block_size) -> Tensor");
  m.def("conv2d_forward(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor slot, "
        "Tensor? bias, int out_channels, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
  m.def("conv2d_grad_input(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor row_idx, "
        "Tensor tslot, int[] input_size, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
  m.def("conv2d_grad_values(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, "
        "Tensor slot, int[] block_size, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
  m.def("build_info() -> str", &ftk_cpu::build_info);
  m.def("set_isa(str name) -> str", &ftk_cpu::set_isa);
}

TORCH_LIBRARY_IMPL(freetickets_cpu, CPU, m) {
  m.impl("linear_forward", &ftk_cpu::linear_forward);
  m.impl("linear_grad_input", &ftk_cpu::linear_grad_input);
  m.impl("linear_grad_values", &ftk_cpu::linear_grad_values);
  m.impl("conv2d_forward", &ftk_cpu::conv2d_forward);
  m.impl("conv2d_grad_input", &ftk_cpu::conv2d_grad_input);
  m.impl("conv2d_grad_values", &ftk_cpu::conv2d_grad_values);
}

// `import freetickets_kernels._cpu` loads this library, which runs the
// registrations above; the module itself is empty.
extern "C" PyObject* PyInit__cpu(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
