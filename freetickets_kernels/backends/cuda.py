"""The ``cuda`` backend: the CUDA C++ extension's kernels (csrc/cuda) for CUDA tensors.

fp16 and bf16 multiply on tensor cores (WMMA, fp32 accumulate); fp32 on CUDA
cores in full fp32.  Same functions as ``reference.py``, built by
:class:`ImplicitGemmOps` on the extension's three kernels (``conv2d_forward``,
``conv2d_grad_input``, ``conv2d_grad_blocks``), exactly as the
Triton backend is: the two GPU backends share geometry, output allocation and
the reduction of split partials, and differ only in their kernels.

Importing this module loads ``freetickets_kernels._cuda``, whose static
registrations create ``torch.ops.freetickets_cuda.*``.
"""

import torch

import freetickets_kernels._cuda  # noqa: F401  (registers torch.ops.freetickets_cuda)

from .implicit_gemm import ConvProblem, Entries, ImplicitGemmOps

NAME = "cuda"
_ops = torch.ops.freetickets_cuda

build_info = _ops.build_info


class _CudaLauncher:
    """The extension's ops take the named conv arguments and read the rest of the
    geometry (channels, image sizes, strides) off their tensors."""

    def conv2d_forward(self, x, values, row_ptr, col_idx, slot, bias, prob: ConvProblem, y) -> None:
        _ops.conv2d_forward(x, values, row_ptr, col_idx, slot, bias, y, **prob.conv_args())

    def conv2d_grad_input(self, dy, values, col_ptr, row_idx, tslot, prob: ConvProblem, dx) -> None:
        _ops.conv2d_grad_input(dy, values, col_ptr, row_idx, tslot, dx, **prob.conv_args())

    def conv2d_grad_blocks(self, dy, x, prob: ConvProblem, block_size, entries: Entries, out, split: int,
                           chunk: int, squared_norm: bool) -> None:
        _ops.conv2d_grad_blocks(dy, x, entries.rows, entries.cols, entries.outs, out, list(block_size),
                                **prob.conv_args(), split=split, chunk=chunk, squared_norm=squared_norm)


ImplicitGemmOps(_CudaLauncher()).export(globals())
