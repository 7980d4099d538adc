// Host entry points of the CUDA kernels (forward.cu, grad_input.cu,
// grad_blocks.cu), registered in ops.cpp as
// torch.ops.freetickets_cuda.*.  Implicit-GEMM launchers: each writes every
// element of its output tensor, allocated by freetickets_kernels/backends/
// implicit_gemm.py.  A linear layer is the 1x1 conv of 1x1 images: 2-D
// activations [N, C] are read as [N, C, 1, 1].  The conv arguments are the
// public ops' (kernel_size, stride, padding, dilation); every other dimension
// and the activations' strides are read off the tensors.
#pragma once

#include <ATen/ATen.h>

namespace ftk_cuda {

void conv2d_forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, const at::Tensor& slot, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& y, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                    c10::IntArrayRef padding, c10::IntArrayRef dilation);

void conv2d_grad_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_ptr,
                       const at::Tensor& row_idx, const at::Tensor& tslot, const at::Tensor& dx,
                       c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                       c10::IntArrayRef dilation);

// The gradient of the listed weight blocks (or their squared L2 norms): the
// live blocks for grad_values, every block for grad_block_norms.
void conv2d_grad_blocks(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols,
                        const at::Tensor& outs, const at::Tensor& out, c10::IntArrayRef block_size,
                        c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                        c10::IntArrayRef dilation, int64_t split, int64_t chunk, bool squared_norm);

}  // namespace ftk_cuda
