// The bf16 driver: packing the live blocks for the kernel, and running the
// kernel over (row tile, column chunk group) items that the threads share.
#include "internal.h"

namespace ftk_cpu {
namespace detail {

const Bf16Kernel* bf16_runs(const at::Tensor& operand, int64_t bo, int64_t bi) {
  if (operand.scalar_type() != at::kBFloat16 || bo % (kBf16Cols / 2) || bi % (kBf16K / 2)) return nullptr;
  return bf16_kernel();
}

Bf16Split values_split(const at::Tensor& values, bool reduce_inner) {
  const int64_t bo = values.size(1), bi = values.size(2);
  return reduce_inner ? bf16_split(bo, bi) : bf16_split(bi, bo);
}

at::Tensor pack_blocks_rows(const at::Tensor& values, bool reduce_inner) {
  const int64_t nnzb = values.size(0), bo = values.size(1), bi = values.size(2);
  const Bf16Split s = values_split(values, reduce_inner);
  // reduce_inner: [slot][g][n][kc][k] -> [slot][g][kc][n][k]; else [slot][kc][k][g][n] -> [slot][g][kc][n][k]
  if (reduce_inner)
    return values.contiguous().view({nnzb, bo / s.width, s.width, bi / s.depth, s.depth}).permute({0, 1, 3, 2, 4})
        .contiguous();
  return values.contiguous().view({nnzb, bo / s.depth, s.depth, bi / s.width, s.width}).permute({0, 3, 1, 4, 2})
      .contiguous();
}

at::Tensor pack_blocks_vnni(const at::Tensor& values, bool reduce_inner) {
  const int64_t nnzb = values.size(0), bo = values.size(1), bi = values.size(2);
  const Bf16Split sp = values_split(values, reduce_inner);
  const at::Tensor v = values.contiguous();
  at::Tensor packed = at::empty({nnzb * bo * bi}, v.options());
  const uint16_t* src = static_cast<const uint16_t*>(v.data_ptr());
  uint16_t* dst = static_cast<uint16_t*>(packed.data_ptr());
  // Sub-block (g, kc) of a slot: B[k][n] at [n / 16][k / 2][n % 16][k % 2] (W = sp.width, D = sp.depth).
  // reduce_inner: B[k][n] = V[g*W + n][kc*D + k]; else V[kc*D + k][g*W + n].
  const int64_t groups = (reduce_inner ? bo : bi) / sp.width, chunks = (reduce_inner ? bi : bo) / sp.depth;
  const int64_t half = sp.depth / 2 * 16;  // 32-bit pairs from columns 0-15 to 16-31
  // Per half (16 columns n): reduce_inner, B's pair rows are the words of V's rows n transposed
  // (transpose_words); else pair row p zips V's rows 2p and 2p + 1.  Element by element, the packing had
  // taken a third as long as a 256 x 1024 -> 1024 forward's tile program.
  at::parallel_for(0, nnzb, 8, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s)
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t kc = 0; kc < chunks; ++kc) {
          const uint16_t* v0 = src + s * bo * bi;
          uint32_t* out = reinterpret_cast<uint32_t*>(dst + ((s * groups + g) * chunks + kc) * sp.elems());
          for (int64_t h = 0; h < sp.width / 16; ++h, out += half) {
            if (reduce_inner) {
              transpose_words(v0 + (g * sp.width + 16 * h) * bi + kc * sp.depth, bi, out, 16, 16, sp.depth / 2);
              continue;
            }
            for (int64_t p = 0; p < sp.depth / 2; ++p) {
              const uint16_t* even = v0 + (kc * sp.depth + 2 * p) * bi + g * sp.width + 16 * h;
              const uint16_t* odd = even + bi;
              for (int64_t n = 0; n < 16; ++n) out[p * 16 + n] = uint32_t(even[n]) | uint32_t(odd[n]) << 16;
            }
          }
        }
  });
  return packed;
}

void bf16_blocks(const Bf16Kernel& k, int depth, int64_t n, Bf16Fill fill) {
  share_items(n, [&](int64_t begin, int64_t end) {
    uint16_t* out_rows[2 * kBf16TileRows];
    k.begin(depth);
    for (int64_t i = begin; i < end; ++i) {
      Bf16Block block{};
      block.out_rows = out_rows;
      block.out_col_stride = 1;
      block.depth = depth;
      fill(i, block, out_rows);
      k.block(block);
    }
    k.end();
  });
}

at::Tensor bf16_grad_values(const Bf16Kernel& k, int64_t lda, int64_t ldb, int64_t steps, const at::Tensor& row_ptr,
                            const at::Tensor& slot, int64_t bo, int64_t bi, const at::TensorOptions& options,
                            Bf16RowsA a_of, Bf16BlockB b_of) {
  const int64_t nnzb = slot.numel(), R = row_ptr.numel() - 1;
  std::vector<Bf16Term> terms;  // every block reduces over the same steps
  for (int64_t t = 0; t < steps; ++t) terms.push_back({t * kBf16K * 2, t * kBf16K / 2 * ldb});
  std::vector<int64_t> block_row(static_cast<size_t>(nnzb));
  const int32_t *rp = row_ptr.data_ptr<int32_t>(), *sl = slot.data_ptr<int32_t>();
  for (int64_t r = 0; r < R; ++r)
    for (int32_t e = rp[r]; e < rp[r + 1]; ++e) block_row[size_t(e)] = r;
  at::Tensor dv = at::empty({nnzb, bo, bi}, options);
  uint16_t* dvp = static_cast<uint16_t*>(dv.data_ptr());
  // items: (block, row group, column group); a side of 16-multiples takes groups of 16
  const int64_t rows = bf16_side(bo), cols = bf16_side(bi), og = bo / rows, ig = bi / cols;
  bf16_blocks(k, kBf16K, nnzb * og * ig, [&](int64_t item, Bf16Block& b, uint16_t** out_rows) {
    const int64_t e = item / (og * ig), o = item / ig % og, i = item % ig;
    b.row_tiles = int(rows / kBf16TileRows);
    b.a = a_of(block_row[size_t(e)], e) + o * rows * lda;
    b.lda = lda;
    b.b = b_of(e, i * cols);
    b.ldb = ldb;
    b.b_half = 16 * 4;
    b.terms = terms.data();
    b.nterms = int64_t(terms.size());
    b.cols = int(cols);
    for (int t = 0; t < rows; ++t) out_rows[t] = dvp + (sl[e] * bo + o * rows + t) * bi + i * cols;
  });
  return dv;
}

void bf16_gemm(const Bf16Kernel& k, const Bf16Gemm& g, Bf16OutRow out_row) {
  constexpr int64_t kTile = 2 * kBf16TileRows;
  const int64_t tiles = cdiv(g.rows, kTile), chunks = int64_t(g.chunk_col.size());
  if (tiles == 0 || chunks == 0) return;
  // Items are (row tile, chunk group); a thread's consecutive items share a
  // row tile, whose A rows then stay in L1/L2 across its chunks while B
  // streams in order.  Panels of row tiles that keep a chunk's B in L1
  // instead measured slower at the first AMX commit, and no faster on AMX
  // since (docs/cpu-backend.md, "AMX re-measured").
  const int64_t groups = std::min<int64_t>(chunks, cdiv(8 * at::get_num_threads(), tiles));
  // Results larger than the caches go straight to memory, where the kernel streams (kStreamBytes).
  const bool stream = streams_result(k, g.rows * g.out_cols * 2);
  const int64_t per_group = cdiv(chunks, groups);
  auto a_of = [&](int64_t m0) {  // row m0's A (m0 a multiple of 32)
    return g.rows_per_image ? g.a + m0 / g.rows_per_image * g.image_bytes + m0 % g.rows_per_image * g.lda
                            : g.a + m0 * g.lda;
  };
  share_items(tiles * groups, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> tail;  // a row tile past a_readable: its rows, zero-padded
    uint16_t* rows_out[kTile];
    uint16_t* out_rows[kTile];
    int64_t rows_of = -1;  // the tile rows_out holds
    k.begin(int(g.depth));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / groups, group = item % groups;
      const int64_t m0 = tile * kTile, valid = std::min(kTile, g.rows - m0);
      const int row_tiles = valid > kBf16TileRows ? 2 : 1;
      const uint8_t* a = a_of(m0);
      // One group: this thread's next item is the next row tile, with the same chunks and terms.
      const bool next_readable = item + 1 < end && m0 + kTile + kTile <= g.a_readable;
      const uint8_t* next = g.prefetch_next && groups == 1 && next_readable ? a_of(m0 + kTile) : nullptr;
      if (m0 + row_tiles * kBf16TileRows > g.a_readable) {
        tail.assign(size_t(kTile * g.lda), 0);
        std::memcpy(tail.data(), a, size_t(valid * g.lda));
        a = tail.data();
      }
      if (rows_of != tile)
        for (int64_t t = 0; t < kTile; ++t) rows_out[t] = t < valid ? out_row(m0 + t) : nullptr;
      rows_of = tile;
      const int64_t j1 = std::min(chunks, (group + 1) * per_group);
      for (int64_t j = group * per_group; j < j1; ++j) {
        const int64_t col = g.chunk_col[j];
        for (int64_t t = 0; t < kTile; ++t) out_rows[t] = rows_out[t] ? rows_out[t] + col * g.out_col_stride : nullptr;
        Bf16Block block{row_tiles, a, g.lda, g.b, g.ldb, g.b_half, g.terms.data() + g.chunk_ptr[j],
                        g.chunk_ptr[j + 1] - g.chunk_ptr[j], int(std::min<int64_t>(g.width, g.out_cols - col)),
                        g.bias ? g.bias + col : nullptr, out_rows, g.out_col_stride, stream};
        block.depth = int(g.depth);
        block.prefetch_a = next;
        k.block(block);
      }
    }
    k.end();
  });
}

}  // namespace detail
}  // namespace ftk_cpu
