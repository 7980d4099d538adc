// Host side shared by the three CUDA kernels' launchers: one call's
// convolution in the kernels' terms (ConvGeometry), and the checks on the
// tensors the Python backend passes in.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>

namespace ftk_cuda {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One call's convolution, read off its two activations and the named conv
// arguments of the op.  The field names are those of ConvProblem and of the
// Triton kernels' arguments (upper case there), see
// freetickets_kernels/backends/implicit_gemm.py; tests/test_implicit_gemm.py
// checks this field list against ConvProblem.kernel_args.
struct ConvGeometry {
  int n, cin, h, w, cout, oh, ow, kh, kw, blocks_per_tap, sh, sw, ph, pw, dh, dw;
  int64_t sx[4];  // (n, c, h, w) strides of the input-side activation (x; dx)
  int64_t sy[4];  // (n, c, h, w) strides of the output-side activation (y; dy)

  int64_t in_pixels() const { return static_cast<int64_t>(n) * h * w; }
  int64_t out_pixels() const { return static_cast<int64_t>(n) * oh * ow; }
};

// `input` is x or dx ([N, Cin, H, W], or [N, Cin] for a linear layer), `output`
// y or dy ([N, Cout, OH, OW] or [N, Cout]); block_in = input channels per block.
ConvGeometry conv_geometry(const at::Tensor& input, const at::Tensor& output, c10::IntArrayRef kernel_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                           int64_t block_in);

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like);
void check_index(const at::Tensor& t, const char* name, const at::Tensor& like);  // contiguous int32
void check_same_type(const at::Tensor& t, const char* name, const at::Tensor& like);
void check_values(const at::Tensor& values, const at::Tensor& like);  // contiguous [nnzb, Bo, Bi]

// A launch's grid dimension y or z, checked against CUDA's 65,535.
unsigned grid_yz(int64_t blocks, const char* what);

}  // namespace ftk_cuda

// The storage types the kernels are instantiated for.
#define FTK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
