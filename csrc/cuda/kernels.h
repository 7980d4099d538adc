// Host entry points of the CUDA kernels (kernels.cu), registered in ops.cpp.
// Each writes every element of its output tensor; ``geometry`` is the 24 ints
// built by freetickets_kernels/backends/implicit_gemm.py: rows of the GEMM,
// the 15 conv shape arguments, then the (n, c, h, w) strides of the two
// activations the kernel reads or writes.
#pragma once

#include <ATen/ATen.h>

namespace ftk_cuda {

void forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
             const at::Tensor& slot, const c10::optional<at::Tensor>& bias, const at::Tensor& y,
             c10::IntArrayRef geometry);

void grad_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_ptr,
                const at::Tensor& row_idx, const at::Tensor& tslot, const at::Tensor& dx,
                c10::IntArrayRef geometry);

void grad_blocks(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols,
                 const at::Tensor& outs, const at::Tensor& out, c10::IntArrayRef geometry, int64_t block_o,
                 int64_t block_i, int64_t split, int64_t chunk, bool squared_norm);

}  // namespace ftk_cuda
