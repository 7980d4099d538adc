// The sparse-GEMM driver: C = sum over each output column block's live terms
// of A rows times B blocks, tile by tile through the ISA's kernel (tile.h),
// the threads sharing (row chunk, block group) items; and its weights-first
// form (C^T = W B^T) for few tokens and convs on planes.
#include <tuple>

#include "internal.h"

namespace ftk_cpu {
namespace detail {

void OutRows::scatter(const IsaKernel& k, const float* stage, int64_t ld, int64_t m0, int64_t m1, int64_t c0,
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

namespace {

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

}  // namespace

void run_on(const SparseGemm& g, int64_t rows, const OutRows& out, FillRows fill_rows) {
  if (rows <= 0) return;  // an empty batch: nothing to compute (and no chunks to share out)
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

void weights_first(const WeightsFirst& w, const float* bt, int64_t ldb, int64_t n, float* ct, int64_t ldc,
                   int64_t b_readable, ColumnGrid grid) {
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
    const int64_t col = w.blocks_per_tap ? w.idx[e] % w.blocks_per_tap : w.idx[e];
    const int64_t tap_off = w.blocks_per_tap ? w.tap_off[w.idx[e] / w.blocks_per_tap] : 0;
    g.terms.push_back({0, int32_t(std::min(w.inner_block, w.inner - col * w.inner_block)),
                       w.slot[e] * w.block_floats, bt + tap_off + col * w.inner_block * ldb});
  }
  run(g, [&](int64_t m0, int tn, const int32_t*, int64_t, const float** a_rows) {
    const int64_t o = m0 % w.group;  // row inside its block; unused rows read slot 0 harmlessly
    for (int t = 0; t < kMaxTileRows; ++t) a_rows[t] = w.values + (t < tn ? (o + t) * w.row_step : 0);
  });
}

}  // namespace detail
}  // namespace ftk_cpu
