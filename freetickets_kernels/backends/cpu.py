"""The ``cpu`` backend: the C++ extension's kernels (csrc/cpu).

float32 runs the float32 kernels; bfloat16 and float16 tensors are widened
to float32 at each op's entry (csrc/cpu/precision.cpp) and the result is
rounded once, so they never fall to the reference backend.

Importing this module loads ``freetickets_kernels._cpu``, whose static
registrations create ``torch.ops.freetickets_cpu.*``.  The extension's ops
carry the backend functions' names and signatures (see ``reference.py``), so
they are bound here as they are, not wrapped:

* ``linear_forward``, ``linear_grad_input``, ``linear_grad_values``,
  ``conv2d_forward``, ``conv2d_grad_input``, ``conv2d_grad_values``: the kernels;
* ``build_info()``: how the extension was built and which instruction sets
  this machine supports (``supported=...``);
* ``set_isa(name)``: force an instruction set ('avx512', 'avx2', 'portable'
  or 'auto'); returns the one in use.
"""

import torch

import freetickets_kernels._cpu  # noqa: F401  (registers torch.ops.freetickets_cpu)

# RigL's block norms need the *dense* weight gradient of one layer; a dense
# BLAS/oneDNN product is already the fastest way to compute it.
from .reference import conv2d_grad_block_norms, linear_grad_block_norms  # noqa: F401

NAME = "cpu"
_ops = torch.ops.freetickets_cpu

try:
    build_info = _ops.build_info
    set_isa = _ops.set_isa

    linear_forward = _ops.linear_forward
    linear_grad_input = _ops.linear_grad_input
    linear_grad_values = _ops.linear_grad_values
    conv2d_forward = _ops.conv2d_forward
    conv2d_grad_input = _ops.conv2d_grad_input
    conv2d_grad_values = _ops.conv2d_grad_values
except AttributeError as exc:  # a stale build: the backend is unavailable, not broken
    raise ImportError(f"freetickets_kernels._cpu lacks an op, rebuild it ({exc})") from None
