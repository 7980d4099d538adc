// Registration of torch.ops.freetickets_cpu.*: the schemas, and the CPU
// kernels behind them (linear.cpp, conv2d.cpp, runtime.cpp).  Op names are
// the backend vocabulary shared with torch.ops.freetickets and the other
// backends (freetickets_kernels/backends/).
#include <Python.h>

#include <torch/library.h>

#include "internal.h"

TORCH_LIBRARY(freetickets_cpu, m) {
  m.def("linear_forward(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor slot, "
        "Tensor? bias, int out_features) -> Tensor");
  m.def("linear_grad_input(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor row_idx, "
        "Tensor tslot, int in_features) -> Tensor");
  m.def("linear_grad_values(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, "
        "Tensor slot, int[] block_size) -> Tensor");
  m.def("conv2d_forward(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor slot, "
        "Tensor? bias, int out_channels, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
  m.def("conv2d_grad_input(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor row_idx, "
        "Tensor tslot, int[] input_size, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
  m.def("conv2d_grad_values(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, "
        "Tensor slot, int[] block_size, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
  m.def("build_info() -> str", &ftk_cpu::build_info);
  m.def("set_isa(str name) -> str", &ftk_cpu::set_isa);
  m.def("bf16_unavailable() -> str", &ftk_cpu::bf16_unavailable);
}

TORCH_LIBRARY_IMPL(freetickets_cpu, CPU, m) {
  m.impl("linear_forward", &ftk_cpu::linear_forward);
  m.impl("linear_grad_input", &ftk_cpu::linear_grad_input);
  m.impl("linear_grad_values", &ftk_cpu::linear_grad_values);
  m.impl("conv2d_forward", &ftk_cpu::conv2d_forward);
  m.impl("conv2d_grad_input", &ftk_cpu::conv2d_grad_input);
  m.impl("conv2d_grad_values", &ftk_cpu::conv2d_grad_values);
}

// `import freetickets_kernels._cpu` loads this library, which runs the
// registrations above; the module itself is empty.
extern "C" PyObject* PyInit__cpu(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
