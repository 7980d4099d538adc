// Linear ops: y = x W^T + b, dx = dy W, dv = dy^T x (grad_values.cpp),
// with W block-sparse.  The kernel vectorizes along B's rows, so each op
// picks which operand to transpose (see linear_forward).
#include "internal.h"

namespace ftk_cpu {
using namespace detail;
namespace {

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
  // mid-line makes every vector load of it straddle two lines; the padding
  // is never stored, but holds no stale denormals either.
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

}  // namespace

// Up to one B panel (64 tokens) the weights-first forward streams the values once.
constexpr int64_t kWeightsFirstTokens = 64;

// y [N, out] = x W^T + bias.
at::Tensor linear_forward(const at::Tensor& x_, const at::Tensor& values_, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, const at::Tensor& slot,
                          const std::optional<at::Tensor>& bias, int64_t out_features) {
  const at::ScalarType dtype = op_dtype({&x_, &values_}, {"x", "values"});
  if (bias.has_value()) op_dtype({&x_, &*bias}, {"x", "bias"});
  if (const Bf16Kernel* k = bf16_runs(x_, values_.size(1), values_.size(2)))
    return bf16_linear_forward(*k, x_, values_, row_ptr, col_idx, slot, bias, out_features);
  if (dtype != at::kFloat)
    return widened_call(dtype, linear_forward, x_, values_, row_ptr, col_idx, slot, bias, out_features);
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
  const at::ScalarType dtype = op_dtype({&dy_, &values_}, {"grad_out", "values"});
  if (const Bf16Kernel* k = bf16_runs(dy_, values_.size(1), values_.size(2)))
    return bf16_linear_grad_input(*k, dy_, values_, col_ptr, row_idx, tslot, in_features);
  if (dtype != at::kFloat)
    return widened_call(dtype, linear_grad_input, dy_, values_, col_ptr, row_idx, tslot, in_features);
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

at::Tensor linear_grad_values(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const at::Tensor& slot,
                              at::IntArrayRef block_size) {
  const at::ScalarType dtype = op_dtype({&dy_, &x_}, {"grad_out", "x"});
  if (const Bf16Kernel* k = bf16_runs(dy_, block_size[0], block_size[1]))
    return bf16_linear_grad_values(*k, dy_, x_, row_ptr, col_idx, slot, block_size);
  if (dtype != at::kFloat)
    return widened_call(dtype, linear_grad_values, dy_, x_, row_ptr, col_idx, slot, block_size);
  const at::Tensor dy = dy_.contiguous(), x = x_.contiguous();
  const GradCols b{x.data_ptr<float>(), 1, x.size(1), 0, x.size(1)};
  // grad_out^T in scratch: read in place, a block row's reduction steps lie
  // a grad_out row apart (16 KB with 4096 features), a power-of-two stride
  // whose lines compete for a few cache sets, too far apart for the
  // hardware prefetchers.  Convs keep their own layout (docs/cpu-backend.md,
  // "Transposed grad_out for linear grad-values").
  const int64_t n = dy.size(0), out = dy.size(1);
  if (n == 0) {  // an empty batch: no gradient
    check_indices(row_ptr, col_idx, slot, cdiv(x.size(1), block_size[1]), col_idx.numel(), "BSR");
    return at::zeros({col_idx.numel(), block_size[0], block_size[1]}, x.options());
  }
  const at::Tensor dyt = scratch(kTransposeA, {out, n}, dy.options());
  transpose_parallel(dy.data_ptr<float>(), out, n, out, dyt.data_ptr<float>(), n);
  const GradRows a{dyt.data_ptr<float>(), n, 1, 0, out};
  return grad_values_pointwise(a, b, 1, x.size(0), row_ptr, col_idx, slot, block_size, x);
}

}  // namespace ftk_cpu
