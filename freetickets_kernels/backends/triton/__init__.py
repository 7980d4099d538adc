"""The ``triton`` backend: Triton kernels for CUDA tensors (fp16, bf16, fp32).

Same functions as ``reference.py``, built by :class:`ImplicitGemmOps` on the
three kernels of ``kernels.py``.  Under ``TRITON_INTERPRET=1`` the kernels also
run on CPU tensors, slowly: that is how CI checks them without a GPU.

fp32 uses tf32 tensor cores only when ``torch.backends.cuda.matmul.allow_tf32``
is set (as torch's own matmuls do); fp16/bf16 accumulate in fp32.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from ..implicit_gemm import ConvProblem, Entries, ImplicitGemmOps, stride_args
from . import kernels
from .tuning import dot_precision, interpreted, padded

NAME = "triton"


def build_info() -> str:
    mode = "interpreter (TRITON_INTERPRET=1)" if interpreted() else "compiled"
    return f"triton {triton.__version__}, {mode}"


def _blocks(bo: int, bi: int, dtype: torch.dtype) -> dict:
    """The kernels' compile-time block arguments."""
    return dict(BO=bo, BI=bi, PBO=padded(bo), PBI=padded(bi), PRECISION=dot_precision(dtype),
                UPCAST=dtype == torch.bfloat16 and interpreted())


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


INT32_MAX = 2 ** 31 - 1


def _tuning_args(pixels: int, activation: torch.Tensor) -> dict:
    """The autotune key's extra arguments (kernels.TUNE_KEY): pixels bucketed to a power of two (so a
    new batch size reuses a tuned tile), and whether the activation's channels are its inner dimension.
    Also the one place pixel indices are checked to fit the kernels' int32 pixel arithmetic."""
    if pixels > INT32_MAX:
        raise ValueError(f"triton backend: {pixels} pixels (batch x output height x width) exceed 2**31 - 1; "
                         "split the batch")
    return dict(M_BUCKET=triton.next_power_of_2(pixels), CHANNELS_INNER=int(activation.stride(1) == 1))


def _grid(pixels: int, per_tile: int):
    """A 1-D grid of pixel tiles x ``per_tile`` programs each (see kernels.py: no axis-1 limit)."""
    def grid(meta):
        size = triton.cdiv(pixels, meta["BLOCK_M"]) * per_tile
        if size > INT32_MAX:
            raise ValueError(f"triton backend: {size} programs exceed the grid's 2**31 - 1; split the batch")
        return (size,)

    return grid


class _TritonLauncher:
    def conv2d_forward(self, x, values, row_ptr, col_idx, slot, bias, prob: ConvProblem, y) -> None:
        m, rows = prob.out_pixels, row_ptr.numel() - 1
        with _on_device(x):
            kernels.forward_kernel[_grid(m, rows)](
                x, values, row_ptr, col_idx, slot, values if bias is None else bias, y,
                **_tuning_args(m, x), ROWS=rows, M=m, **prob.kernel_args(values.shape[2]),
                **stride_args("x", x), **stride_args("y", y),
                HAS_BIAS=bias is not None, **_blocks(*values.shape[1:], values.dtype),
            )

    def conv2d_grad_input(self, dy, values, col_ptr, row_idx, tslot, prob: ConvProblem, dx) -> None:
        m = prob.in_pixels
        with _on_device(dy):
            kernels.grad_input_kernel[_grid(m, prob.blocks_per_tap(values.shape[2]))](
                dy, values, col_ptr, row_idx, tslot, dx, **_tuning_args(m, dy),
                M=m, **prob.kernel_args(values.shape[2]), **stride_args("y", dy), **stride_args("x", dx),
                **_blocks(*values.shape[1:], values.dtype),
            )

    def conv2d_grad_blocks(self, dy, x, prob: ConvProblem, block_size, entries: Entries, out, split: int,
                           chunk: int, squared_norm: bool) -> None:
        bo, bi = block_size
        n_out = entries.rows.numel()
        with _on_device(x):
            kernels.grad_blocks_kernel[(n_out, split)](
                dy, x, entries.rows, entries.cols, entries.outs, out, **_tuning_args(prob.out_pixels, x),
                M=prob.out_pixels, CHUNK=chunk, NB=n_out, **prob.kernel_args(bi),
                **stride_args("y", dy), **stride_args("x", x),
                SPLIT=split, SQUARED_NORM=squared_norm, **_blocks(bo, bi, x.dtype),
            )


ImplicitGemmOps(_TritonLauncher()).export(globals())
