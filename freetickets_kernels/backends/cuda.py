"""The ``cuda`` backend: the CUDA C++ extension's kernels (csrc/cuda) for CUDA tensors.

fp16 and bf16 multiply on tensor cores (WMMA, fp32 accumulate); fp32 on CUDA
cores in full fp32.  Same functions as ``reference.py``, built by
:class:`ImplicitGemmOps` on the extension's three kernels, exactly as the
Triton backend is: the two GPU backends share geometry, output allocation and
the reduction of split partials, and differ only in their kernels.

Importing this module loads ``freetickets_kernels._cuda``, whose static
registrations create ``torch.ops.freetickets_cuda.*``.
"""

import torch

import freetickets_kernels._cuda  # noqa: F401  (registers torch.ops.freetickets_cuda)

from .implicit_gemm import ConvProblem, Entries, ImplicitGemmOps, strides

NAME = "cuda"
_ops = torch.ops.freetickets_cuda


def build_info() -> str:
    return _ops.build_info()


def _geometry(rows: int, prob: ConvProblem, block_in: int, a: torch.Tensor, b: torch.Tensor):
    return [rows, *prob.shape_args(block_in), *strides(a), *strides(b)]


class _CudaLauncher:
    def forward(self, x, values, row_ptr, col_idx, slot, bias, prob: ConvProblem, y) -> None:
        _ops.forward(x, values, row_ptr, col_idx, slot, bias, y,
                     _geometry(prob.out_pixels, prob, values.shape[2], x, y))

    def grad_input(self, dy, values, col_ptr, row_idx, tslot, prob: ConvProblem, dx) -> None:
        _ops.grad_input(dy, values, col_ptr, row_idx, tslot, dx,
                        _geometry(prob.in_pixels, prob, values.shape[2], dy, dx))

    def grad_blocks(self, dy, x, prob: ConvProblem, block_size, entries: Entries, out, split: int,
                    chunk: int, squared_norm: bool) -> None:
        bo, bi = block_size
        _ops.grad_blocks(dy, x, entries.rows, entries.cols, entries.outs, out,
                         _geometry(prob.out_pixels, prob, bi, dy, x), bo, bi, split, chunk, squared_norm)


ImplicitGemmOps(_CudaLauncher()).export(globals())
