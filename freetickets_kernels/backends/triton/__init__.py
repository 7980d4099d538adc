"""The ``triton`` backend: Triton kernels for CUDA tensors (fp16, bf16, fp32).

Same functions as ``reference.py``.  Linear calls are 1x1 convolutions of 1x1
images, so every op runs one of the three kernels in ``kernels.py``.
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors, slowly:
that is how CI checks them without a GPU.

fp32 uses tf32 tensor cores only when ``torch.backends.cuda.matmul.allow_tf32``
is set (as torch's own matmuls do); fp16/bf16 accumulate in fp32.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton

from ...layout import expand_ptr
from ...validation import conv_memory_format, conv_output_size
from . import kernels
from .tuning import dot_precision, interpreted, padded

NAME = "triton"


def build_info() -> str:
    mode = "interpreter (TRITON_INTERPRET=1)" if interpreted() else "compiled"
    return f"triton {triton.__version__}, {mode}"


@dataclass(frozen=True)
class _Conv:
    """A problem in the kernels' terms: a conv, or a linear as a 1x1 conv of 1x1 images."""

    n: int
    cin: int
    h: int
    w: int
    cout: int
    kernel: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)

    @property
    def out_hw(self) -> Tuple[int, int]:
        return conv_output_size((self.h, self.w), self.kernel, self.stride, self.padding, self.dilation)

    def shape_args(self, block_in: int) -> tuple:
        """CIN, H, W, COUT, OH, OW, KH, KW, CBPT, SH, SW, PH, PW, DH, DW."""
        return (self.cin, self.h, self.w, self.cout, *self.out_hw, *self.kernel,
                triton.cdiv(self.cin, block_in), *self.stride, *self.padding, *self.dilation)


def _linear(x: torch.Tensor, out_features: int) -> _Conv:
    return _Conv(n=x.shape[0], cin=x.shape[1], h=1, w=1, cout=out_features)


def _conv(input_size: Sequence[int], cout: int, kernel_size, stride, padding, dilation) -> _Conv:
    n, cin, h, w = input_size
    return _Conv(n, cin, h, w, cout, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(n, c, h, w) element strides of a 4-D activation, or of a 2-D one as [N, C, 1, 1]."""
    return tuple(t.stride()) if t.dim() == 4 else (t.stride(0), t.stride(1), 0, 0)


def _blocks(bo: int, bi: int, dtype: torch.dtype) -> dict:
    """The kernels' compile-time block arguments."""
    return dict(BO=bo, BI=bi, PBO=padded(bo), PBI=padded(bi), PRECISION=dot_precision(dtype),
                UPCAST=dtype == torch.bfloat16 and interpreted())


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU (4 stands in for the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split(entries: int, pixels: int, device: torch.device) -> int:
    """Pixel-range splits of the grad-blocks reduction, so that few blocks still fill the GPU."""
    sms = _processors(device)
    want = triton.cdiv(4 * sms, max(entries, 1))
    most = max(1, pixels // 1024)  # keep every split a long reduction
    return min(triton.next_power_of_2(want), triton.next_power_of_2(most))


# ------------------------------------------------------------------ launches


def _forward(x, values, row_ptr, col_idx, slot, bias, prob: _Conv, y):
    m = prob.n * prob.out_hw[0] * prob.out_hw[1]
    if m == 0:
        return y
    values = values.contiguous()
    bias = bias.contiguous() if bias is not None else None
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), row_ptr.numel() - 1)  # noqa: E731
    with _on_device(x):
        kernels.forward_kernel[grid](
            x, values, row_ptr, col_idx, slot, values if bias is None else bias, y,
            m, *prob.shape_args(values.shape[2]), *_strides(x), *_strides(y),
            HAS_BIAS=bias is not None, **_blocks(*values.shape[1:], values.dtype),
        )
    return y


def _grad_input(dy, values, col_ptr, row_idx, tslot, prob: _Conv, dx):
    m = prob.n * prob.h * prob.w
    if m == 0:
        return dx
    values = values.contiguous()
    cbpt = triton.cdiv(prob.cin, values.shape[2])
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), cbpt)  # noqa: E731
    with _on_device(dy):
        kernels.grad_input_kernel[grid](
            dy, values, col_ptr, row_idx, tslot, dx,
            m, *prob.shape_args(values.shape[2]), *_strides(dy), *_strides(dx), **_blocks(*values.shape[1:], values.dtype),
        )
    return dx


def _grad_blocks(dy, x, prob: _Conv, block_size, entries, n_out: int, squared_norm: bool):
    """Blocks ``entries = (rows, cols, out_index)`` of the dense weight gradient, reduced
    over pixels.  Returns ``[n_out, Bo, Bi]`` blocks in x's dtype, or ``[n_out]``
    fp32 squared block norms."""
    bo, bi = block_size
    rows, cols, outs = entries
    nb = rows.numel()
    m = prob.n * prob.out_hw[0] * prob.out_hw[1]
    split = _split(nb, m, x.device)
    # every program writes its whole output, so nothing needs zeroing
    if squared_norm and split == 1:
        out = torch.empty(n_out, dtype=torch.float32, device=x.device)
    elif split == 1:
        out = torch.empty((n_out, bo, bi), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split, n_out, bo, bi), dtype=torch.float32, device=x.device)
    if nb > 0:
        with _on_device(x):
            kernels.grad_blocks_kernel[(nb, split)](
                dy, x, rows, cols, outs, out,
                m, triton.cdiv(m, split), n_out, *prob.shape_args(bi), *_strides(dy), *_strides(x),
                SPLIT=split, SQUARED_NORM=squared_norm, **_blocks(bo, bi, x.dtype),
            )
    if split == 1:
        return out
    blocks = out.sum(0)
    return blocks.square().sum((1, 2)) if squared_norm else blocks.to(x.dtype)


def _live_entries(row_ptr, col_idx, slot):
    return expand_ptr(row_ptr, col_idx.numel()).to(torch.int32), col_idx, slot


def _all_entries(grid: Tuple[int, int], device) -> tuple:
    r, c = grid
    flat = torch.arange(r * c, device=device, dtype=torch.int32)
    return flat // c, flat % c, flat


def _norms(dy, x, prob: _Conv, block_size):
    bo, bi = block_size
    grid = (triton.cdiv(prob.cout, bo), prob.kernel[0] * prob.kernel[1] * triton.cdiv(prob.cin, bi))
    squared = _grad_blocks(dy, x, prob, block_size, _all_entries(grid, x.device), grid[0] * grid[1], True)
    return squared.sqrt().reshape(grid).to(x.dtype)


# --------------------------------------------------------------------- linear


def linear_forward(x, values, row_ptr, col_idx, slot, bias: Optional[torch.Tensor], out_features: int):
    y = x.new_empty((x.shape[0], out_features))
    return _forward(x, values, row_ptr, col_idx, slot, bias, _linear(x, out_features), y)


def linear_grad_input(grad_out, values, col_ptr, row_idx, tslot, in_features: int):
    dx = grad_out.new_empty((grad_out.shape[0], in_features))
    prob = _Conv(n=grad_out.shape[0], cin=in_features, h=1, w=1, cout=grad_out.shape[1])
    return _grad_input(grad_out, values, col_ptr, row_idx, tslot, prob, dx)


def linear_grad_values(grad_out, x, row_ptr, col_idx, slot, block_size):
    prob = _linear(x, grad_out.shape[1])
    return _grad_blocks(grad_out, x, prob, block_size, _live_entries(row_ptr, col_idx, slot),
                        col_idx.numel(), False)


def linear_grad_block_norms(grad_out, x, block_size):
    return _norms(grad_out, x, _linear(x, grad_out.shape[1]), block_size)


# --------------------------------------------------------------------- conv2d


def conv2d_forward(x, values, row_ptr, col_idx, slot, bias, out_channels: int, kernel_size, stride,
                   padding, dilation):
    prob = _conv(x.shape, out_channels, kernel_size, stride, padding, dilation)
    y = torch.empty((prob.n, out_channels, *prob.out_hw), dtype=x.dtype, device=x.device,
                    memory_format=conv_memory_format(x))
    return _forward(x, values, row_ptr, col_idx, slot, bias, prob, y)


def conv2d_grad_input(grad_out, values, col_ptr, row_idx, tslot, input_size, kernel_size, stride,
                      padding, dilation):
    prob = _conv(input_size, grad_out.shape[1], kernel_size, stride, padding, dilation)
    dx = torch.empty(tuple(input_size), dtype=grad_out.dtype, device=grad_out.device,
                     memory_format=conv_memory_format(grad_out))
    return _grad_input(grad_out, values, col_ptr, row_idx, tslot, prob, dx)


def conv2d_grad_values(grad_out, x, row_ptr, col_idx, slot, block_size, kernel_size, stride,
                       padding, dilation):
    prob = _conv(x.shape, grad_out.shape[1], kernel_size, stride, padding, dilation)
    return _grad_blocks(grad_out, x, prob, block_size, _live_entries(row_ptr, col_idx, slot),
                        col_idx.numel(), False)


def conv2d_grad_block_norms(grad_out, x, block_size, kernel_size, stride, padding, dilation):
    prob = _conv(x.shape, grad_out.shape[1], kernel_size, stride, padding, dilation)
    return _norms(grad_out, x, prob, block_size)
