// Linear ops on bfloat16 operands through the bf16 kernel (bf16_tile.h):
// y = x W^T + b and dx = dy W as row-tile GEMMs over packed blocks, and
// dv = dy^T x per live block over the tokens (as a 1x1 conv's).  float32
// accumulation, one rounding to bf16 per result.
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
