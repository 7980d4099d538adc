// torch.ops.freetickets_cuda: the CUDA kernels as torch custom ops that write
// into outputs allocated by the Python backend (freetickets_kernels/backends/cuda.py).
#include <Python.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <string>

#include "kernels.h"

namespace {

std::string build_info() {
  return "built with CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string(CUDART_VERSION % 1000 / 10) + "; WMMA tensor cores for fp16/bf16, CUDA cores for fp32";
}

}  // namespace

// The ops carry the names of the backend functions they serve (one vocabulary
// with freetickets:: and freetickets_cpu::).  They are implicit-GEMM launchers
// that write into `out` tensors allocated by the Python backend; a linear layer
// is the 1x1 conv of 1x1 images ([N, C] activations, kernel_size = stride =
// dilation = [1, 1], padding = [0, 0]).  Only the conv arguments are passed by
// name; channels, image sizes and strides are read off the tensors.
TORCH_LIBRARY(freetickets_cuda, m) {
  // y = conv2d(x, W) (+ bias), W given by values and its BSR indices
  m.def("conv2d_forward(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor slot, Tensor? bias, "
        "Tensor(a!) y, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> ()");
  // dx = conv2d's input gradient, through the transposed (column-major) indices
  m.def("conv2d_grad_input(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor row_idx, Tensor tslot, "
        "Tensor(a!) dx, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> ()");
  // The weight gradient of a list of blocks, (rows[e], cols[e]) -> out[outs[e]], or each one's squared
  // L2 norm (squared_norm): serves both grad_values (the live blocks) and grad_block_norms (every block,
  // for RigL).  With split > 1, split k sums output pixels [k*chunk, (k+1)*chunk) into out[k] (fp32).
  m.def("conv2d_grad_blocks(Tensor grad_out, Tensor x, Tensor rows, Tensor cols, Tensor outs, Tensor(a!) out, "
        "int[2] block_size, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int split, "
        "int chunk, bool squared_norm) -> ()");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(freetickets_cuda, CUDA, m) {
  m.impl("conv2d_forward", &ftk_cuda::conv2d_forward);
  m.impl("conv2d_grad_input", &ftk_cuda::conv2d_grad_input);
  m.impl("conv2d_grad_blocks", &ftk_cuda::conv2d_grad_blocks);
}

// `import freetickets_kernels._cuda` loads this library, which runs the
// registrations above; the module itself is empty.
extern "C" PyObject* PyInit__cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
