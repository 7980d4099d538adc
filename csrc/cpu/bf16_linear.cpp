// Linear ops on bfloat16 operands through the bf16 kernel (bf16_tile.h):
// y = x W^T + b and dx = dy W as row-tile GEMMs over packed blocks (a
// forward of few tokens: weights first, weights_as_a_forward), and
// dv = dy^T x per live block over the tokens (as a 1x1 conv's).  float32
// accumulation, one rounding to bf16 per result.
#include <cstring>

#include "internal.h"

namespace ftk_cpu {
using namespace detail;
namespace {

// x as the kernel's A: bf16 rows of a whole number of 32-element chunks
// (zero-padded where the features are ragged; a chunk past them reads zeros).
at::Tensor rows_of_chunks(const at::Tensor& x) {
  const int64_t k = x.size(1);
  if (k % kBf16K == 0) return x.contiguous();
  at::Tensor padded = at::zeros({x.size(0), cdiv(k, kBf16K) * kBf16K}, x.options());
  padded.narrow(1, 0, k).copy_(x);
  return padded;
}

const uint8_t* bytes(const at::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }

// The row-tile GEMM C = A B over `outer` output blocks of `block` columns:
// block j sums its live blocks ptr[j]..ptr[j+1] (inner block idx, packed
// slot) over chunks of `inner` reduction columns, as sub-blocks `s` (packed B).
at::Tensor block_rows_gemm(const Bf16Kernel& k, const at::Tensor& a_, int64_t out_cols, int64_t block, int64_t inner,
                           int64_t reduction, const at::Tensor& packed, const Bf16Split& s, const int32_t* ptr,
                           const int32_t* idx, const int32_t* slot, const at::Tensor& bias) {
  const at::Tensor a = rows_of_chunks(a_);
  const int64_t rows = a.size(0), groups = block / s.width, chunks = inner / s.depth;
  at::Tensor c = at::empty({rows, out_cols}, a.options());
  Bf16Gemm g{rows, bytes(a), a.size(1) * 2, rows, bytes(packed)};
  g.set_split(s);
  g.out_cols = out_cols;
  g.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  for (int64_t j = 0; j < cdiv(out_cols, block); ++j)
    for (int64_t grp = 0; grp < groups && j * block + grp * s.width < out_cols; ++grp) {
      for (int32_t e = ptr[j]; e < ptr[j + 1]; ++e)
        for (int64_t kc = 0; kc < chunks; ++kc) {
          const int64_t k0 = idx[e] * inner + kc * s.depth;
          if (k0 >= reduction) break;  // past a ragged edge: padding
          g.terms.push_back({k0 * 2, ((slot[e] * groups + grp) * chunks + kc) * s.elems() * 2});
        }
      g.chunk_ptr.push_back(int64_t(g.terms.size()));
      g.chunk_col.push_back(j * block + grp * s.width);
    }
  uint16_t* out = static_cast<uint16_t*>(c.data_ptr());
  bf16_gemm(k, g, [&](int64_t m) { return out + m * out_cols; });
  return c;
}

// x^T in VNNI pairs for the weights-first forward: [pair rows][tpad tokens][2], pair row p of token t holding
// features 2p and 2p + 1 of x (zero past the features and for tokens >= x's).  A pair is one 32-bit word of
// x's row, so this is a transpose of words (transpose_words); pair by pair, each token's word was a read
// from a line of its own, and the copy took a fifth of a 256 x 4096 -> 4096 forward.
at::Tensor token_pairs(const at::Tensor& x_, int64_t pair_rows, int64_t tpad) {
  const at::Tensor x = x_.contiguous();
  const int64_t tokens = x.size(0), in = x.size(1), whole = in / 2;  // pairs holding two features
  at::Tensor t = at::empty({pair_rows, tpad, 2}, x.options());
  const uint16_t* src = static_cast<const uint16_t*>(x.data_ptr());
  uint32_t* dst = static_cast<uint32_t*>(t.data_ptr());
  constexpr int64_t kPairsPerItem = 64;
  at::parallel_for(0, cdiv(pair_rows, kPairsPerItem), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p0 = item * kPairsPerItem, p1 = std::min(pair_rows, p0 + kPairsPerItem);
      const int64_t w1 = std::clamp(whole, p0, p1);  // [p0, w1): whole pairs
      transpose_words(src + 2 * p0, in, dst + p0 * tpad, tpad, tokens, w1 - p0);
      for (int64_t p = w1; p < p1; ++p) {  // the odd last feature, then padding
        uint32_t* row = dst + p * tpad;
        for (int64_t tok = 0; tok < tokens; ++tok) row[tok] = 2 * p < in ? src[tok * in + 2 * p] : 0;
      }
      for (int64_t p = p0; p < p1; ++p) std::memset(dst + p * tpad + tokens, 0, (tpad - tokens) * 4);
    }
  });
  return t;
}

// y = x W^T + b for few tokens, as y^T = W x^T: A = the live blocks in place (a block's rows are its
// reduction steps, contiguous: no packing), B = x^T in VNNI pairs (token_pairs: tokens as columns), each
// block's result column (a token) stored down that token's row of y.  Where x is smaller than the live
// blocks, packing those for the row-tile GEMM cost as much as its multiplies (32 tokens, 4096 -> 4096).
at::Tensor weights_as_a_forward(const Bf16Kernel& k, const at::Tensor& x, const at::Tensor& values_,
                                const int32_t* rp, const int32_t* ci, const int32_t* sl, int64_t R,
                                const float* bias, int64_t out_features) {
  const at::Tensor values = values_.contiguous();
  const int64_t tokens = x.size(0), in = x.size(1), bo = values.size(1), bi = values.size(2);
  const Bf16Split s = values_split(values, true);  // width: rows of a block of y^T (output features)
  const int64_t tpad = cdiv(tokens, kBf16Cols) * kBf16Cols, tiles = tpad / kBf16Cols;
  const at::Tensor bt = token_pairs(x, cdiv(in, kBf16K) * kBf16K / 2, tpad);
  const int64_t groups = bo / s.width, chunks = bi / s.depth, ldb = tpad * 4;
  std::vector<int64_t> chunk_ptr{0}, chunk_row;  // output chunks: `width` features from chunk_row
  std::vector<Bf16Term> terms;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t grp = 0; grp < groups && r * bo + grp * s.width < out_features; ++grp) {
      for (int32_t e = rp[r]; e < rp[r + 1]; ++e)
        for (int64_t kc = 0; kc < chunks && ci[e] * bi + kc * s.depth < in; ++kc)
          terms.push_back({((sl[e] * bo + grp * s.width) * bi + kc * s.depth) * 2,
                           (ci[e] * bi + kc * s.depth) / 2 * ldb});
      chunk_ptr.push_back(int64_t(terms.size()));
      chunk_row.push_back(r * bo + grp * s.width);
    }
  at::Tensor y = at::empty({tokens, out_features}, x.options());
  uint16_t* out = static_cast<uint16_t*>(y.data_ptr());
  const int64_t chunks_out = int64_t(chunk_row.size());
  // items (output chunk, token tile): a thread's consecutive items share their A
  bf16_blocks(k, int(s.depth), chunks_out * tiles, [&](int64_t item, Bf16Block& b, uint16_t** out_rows) {
    const int64_t j = item / tiles, tile = item % tiles, f0 = chunk_row[size_t(j)];
    b.row_tiles = int(s.width / kBf16TileRows);
    b.a = bytes(values);
    b.lda = bi * 2;
    b.b = bytes(bt) + tile * kBf16Cols * 4;
    b.ldb = ldb;
    b.b_half = 16 * 4;
    b.terms = terms.data() + chunk_ptr[size_t(j)];
    b.nterms = chunk_ptr[size_t(j) + 1] - chunk_ptr[size_t(j)];
    b.cols = int(std::min<int64_t>(kBf16Cols, tokens - tile * kBf16Cols));
    b.row_bias = bias ? bias + f0 : nullptr;
    b.out_col_stride = out_features;
    for (int64_t r = 0; r < s.width; ++r)
      out_rows[r] = f0 + r < out_features ? out + tile * kBf16Cols * out_features + f0 + r : nullptr;
  });
  return y;
}

}  // namespace

at::Tensor bf16_linear_forward(const Bf16Kernel& k, const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                               const std::optional<at::Tensor>& bias, int64_t out_features) {
  const int64_t in = x.size(1), nnzb = values.size(0), bo = values.size(1), bi = values.size(2);
  check_indices(row_ptr, col_idx, slot, cdiv(in, bi), nnzb, "BSR");
  TORCH_CHECK(row_ptr.numel() - 1 == cdiv(out_features, bo), "freetickets_cpu: row_ptr does not match out_features");
  at::Tensor b;
  if (bias.has_value()) {
    b = at::zeros({cdiv(out_features, bo) * bo + kBf16Cols}, values.options().dtype(at::kFloat));
    b.narrow(0, 0, out_features).copy_(*bias);
  }
  if (x.size(0) * in < nnzb * bo * bi && x.size(0) > 0)  // x smaller than the live blocks: weights first
    return weights_as_a_forward(k, x, values, row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                                slot.data_ptr<int32_t>(), row_ptr.numel() - 1,
                                b.defined() ? b.data_ptr<float>() : nullptr, out_features);
  return block_rows_gemm(k, x, out_features, bo, bi, in, pack_blocks_vnni(values, true), values_split(values, true),
                         row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(), slot.data_ptr<int32_t>(), b);
}

at::Tensor bf16_linear_grad_input(const Bf16Kernel& k, const at::Tensor& dy, const at::Tensor& values,
                                  const at::Tensor& col_ptr, const at::Tensor& row_idx, const at::Tensor& tslot,
                                  int64_t in_features) {
  const int64_t out = dy.size(1), nnzb = values.size(0), bo = values.size(1), bi = values.size(2);
  check_indices(col_ptr, row_idx, tslot, cdiv(out, bo), nnzb, "transposed");
  TORCH_CHECK(col_ptr.numel() - 1 == cdiv(in_features, bi), "freetickets_cpu: col_ptr does not match in_features");
  return block_rows_gemm(k, dy, in_features, bi, bo, out, pack_blocks_vnni(values, false),
                         values_split(values, false), col_ptr.data_ptr<int32_t>(), row_idx.data_ptr<int32_t>(),
                         tslot.data_ptr<int32_t>(), at::Tensor());
}

at::Tensor bf16_linear_grad_values(const Bf16Kernel& k, const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& slot,
                                   at::IntArrayRef block_size) {
  if (x.size(0) == 0) return at::zeros({col_idx.numel(), block_size[0], block_size[1]}, x.options());  // no tokens
  // The tokens as the pixels of one 1 x n channels-last image: dv is that 1x1
  // conv's, whose operand builders copy the read chunks of x and the live
  // rows of dy only (aten's copies into padded, transposed buffers took
  // longer than the multiplies).
  auto image = [](const at::Tensor& t) { return t.t().unsqueeze(0).unsqueeze(2); };  // [1, features, 1, n]
  return bf16_conv2d_grad_values(k, image(dy), image(x), row_ptr, col_idx, slot, block_size, {1, 1}, {1, 1},
                                 {0, 0}, {1, 1});
}

}  // namespace ftk_cpu
