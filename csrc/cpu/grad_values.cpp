// Grad-values: the weight gradient of the live blocks only, dv = dy^T x
// block by block, for linear and conv alike.  A and B are read in place
// (conv: each tap's reduction runs over the output rows it reads inside the
// image), so no im2col or shifted copy of the input is ever made.
#include "internal.h"

namespace ftk_cpu {
namespace detail {

FlatPixels flat_pixels(const at::Tensor& t_) {
  const bool flat = t_.is_contiguous() || t_.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor t = flat ? t_ : t_.contiguous();
  return {t, t.stride(0), t.stride(1), t.size(3) > 1 ? t.stride(3) : t.stride(2)};
}

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
          // read of x, waited for every row (docs/cpu-backend.md,
          // "Prefetching strided B rows").
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

std::vector<TapWork> taps_with_entries(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                       int64_t taps, int64_t blocks_per_tap, int64_t bi) {
  const int32_t *rp = row_ptr.data_ptr<int32_t>(), *ci = col_idx.data_ptr<int32_t>(),
                *sl = slot.data_ptr<int32_t>();
  std::vector<TapWork> work(static_cast<size_t>(taps));
  for (int64_t r = 0; r + 1 < row_ptr.numel(); ++r)
    for (int32_t e = rp[r]; e < rp[r + 1]; ++e)
      work[ci[e] / blocks_per_tap].entries.push_back({r, (ci[e] % blocks_per_tap) * bi, sl[e]});
  return work;
}

// Units of up to 256 pixels (tokens) that never cross from one image to the
// next (A and B may not be contiguous across them).
at::Tensor grad_values_pointwise(const GradRows& a, const GradCols& b, int64_t images, int64_t per_image,
                                 const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                 at::IntArrayRef block_size, const at::Tensor& like) {
  const int64_t rows = images * per_image, in = b.cols, nnzb = col_idx.numel(), bo = block_size[0],
                bi = block_size[1];
  check_indices(row_ptr, col_idx, slot, cdiv(in, bi), nnzb, "BSR");
  if (rows == 0) return at::zeros({nnzb, bo, bi}, like.options());  // an empty batch: no gradient
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

}  // namespace detail
}  // namespace ftk_cpu
