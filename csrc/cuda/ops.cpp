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

TORCH_LIBRARY(freetickets_cuda, m) {
  m.def("forward(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor slot, Tensor? bias, "
        "Tensor(a!) y, int[] geometry) -> ()");
  m.def("grad_input(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor row_idx, Tensor tslot, "
        "Tensor(a!) dx, int[] geometry) -> ()");
  m.def("grad_blocks(Tensor grad_out, Tensor x, Tensor rows, Tensor cols, Tensor outs, Tensor(a!) out, "
        "int[] geometry, int block_o, int block_i, int split, int chunk, bool squared_norm) -> ()");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(freetickets_cuda, CUDA, m) {
  m.impl("forward", &ftk_cuda::forward);
  m.impl("grad_input", &ftk_cuda::grad_input);
  m.impl("grad_blocks", &ftk_cuda::grad_blocks);
}

// `import freetickets_kernels._cuda` loads this library, which runs the
// registrations above; the module itself is empty.
extern "C" PyObject* PyInit__cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
