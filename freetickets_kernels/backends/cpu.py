"""The ``cpu`` backend: the C++ extension's kernels (csrc/cpu).

float32 runs the float32 kernels.  bfloat16 tensors whose blocks have sides
that are multiples of 16 run the bf16 kernels (AMX, else AVX512-BF16;
csrc/cpu/bf16_*): bf16 operands, float32 accumulation, one rounding of each
result.  Other bfloat16 and all float16 tensors are widened to float32 at the
op's entry (csrc/cpu/precision.cpp) and the result is rounded once, so they
never fall to the reference backend.

Importing this module loads ``freetickets_kernels._cpu``, whose static
registrations create ``torch.ops.freetickets_cpu.*``.  The extension's ops
carry the backend functions' names and signatures (see ``reference.py``), so
they are bound here as they are, not wrapped:

* ``linear_forward``, ``linear_grad_input``, ``linear_grad_values``,
  ``conv2d_forward``, ``conv2d_grad_input``, ``conv2d_grad_values``: the kernels;
* ``build_info()``: how the extension was built and which instruction sets
  this machine supports (``supported=...`` for float32, ``bf16_kernels=...``);
* ``bf16_unavailable()``: one line per bf16 kernel this machine cannot run, and why;
* ``set_isa(name)``: force an instruction set, as ``FREETICKETS_CPU_ISA`` does:
  'avx512', 'avx2', 'portable' (float32; bf16 widened), 'amx', 'avx512_bf16',
  'amx_emulated' (bf16; the emulation is for tests) or 'auto'; returns the one in use.
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
    bf16_unavailable = _ops.bf16_unavailable

    linear_forward = _ops.linear_forward
    linear_grad_input = _ops.linear_grad_input
    linear_grad_values = _ops.linear_grad_values
    conv2d_forward = _ops.conv2d_forward
    conv2d_grad_input = _ops.conv2d_grad_input
    conv2d_grad_values = _ops.conv2d_grad_values
except AttributeError as exc:  # a stale build: the backend is unavailable, not broken
    raise ImportError(f"freetickets_kernels._cpu lacks an op, rebuild it ({exc})") from None
