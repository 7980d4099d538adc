"""The ``cpu`` backend: the C++ extension's kernels (csrc/cpu), float32.

Importing this module loads ``freetickets_kernels._cpu``, whose static
registrations create ``torch.ops.freetickets_cpu.*``.
"""

import torch

import freetickets_kernels._cpu  # noqa: F401  (registers torch.ops.freetickets_cpu)

# RigL's block norms need the *dense* weight gradient of one layer; a dense
# BLAS/oneDNN product is already the fastest way to compute it.
from .reference import conv2d_grad_block_norms, linear_grad_block_norms  # noqa: F401

NAME = "cpu"
_ops = torch.ops.freetickets_cpu


def build_info() -> str:
    return _ops.build_info()


def set_isa(name: str) -> str:
    """Force an instruction set ('avx512', 'avx2', 'portable' or 'auto'); returns the one in use."""
    return _ops.set_isa(name)


def linear_forward(x, values, row_ptr, col_idx, slot, bias, out_features):
    return _ops.linear_forward(x, values, row_ptr, col_idx, slot, bias, out_features)


def linear_grad_input(grad_out, values, col_ptr, row_idx, tslot, in_features):
    return _ops.linear_grad_input(grad_out, values, col_ptr, row_idx, tslot, in_features)


def linear_grad_values(grad_out, x, row_ptr, col_idx, slot, block_size):
    return _ops.linear_grad_values(grad_out, x, row_ptr, col_idx, slot, block_size)


def conv2d_forward(x, values, row_ptr, col_idx, slot, bias, out_channels, kernel_size, stride,
                   padding, dilation):
    return _ops.conv2d_forward(x, values, row_ptr, col_idx, slot, bias, out_channels, kernel_size,
                               stride, padding, dilation)


def conv2d_grad_input(grad_out, values, col_ptr, row_idx, tslot, input_size, kernel_size, stride,
                      padding, dilation):
    return _ops.conv2d_grad_input(grad_out, values, col_ptr, row_idx, tslot, input_size,
                                  kernel_size, stride, padding, dilation)


def conv2d_grad_values(grad_out, x, row_ptr, col_idx, slot, block_size, kernel_size, stride,
                       padding, dilation):
    return _ops.conv2d_grad_values(grad_out, x, row_ptr, col_idx, slot, block_size, kernel_size,
                                   stride, padding, dilation)
