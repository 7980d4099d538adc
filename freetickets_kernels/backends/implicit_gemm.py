"""What the GPU backends (Triton, CUDA) share: every op as an implicit-GEMM convolution.

A linear layer is the 1x1 convolution of 1x1 images (``M`` = tokens), so each
backend needs only three kernels, given here as a :class:`Launcher` (and named
as the CUDA extension's ops, ``torch.ops.freetickets_cuda.*``):

* ``conv2d_forward``: ``y = conv(x, W) (+ bias)``, a program per (pixel tile,
  block row);
* ``conv2d_grad_input``: ``dx``, a program per (input-pixel tile, channel block),
  through the transposed indices;
* ``conv2d_grad_blocks``: listed blocks of the dense weight gradient, reduced
  over output pixels, optionally split in ``split`` pixel ranges of ``chunk``:
  the live blocks for grad-values, every block for RigL's block norms.

:class:`ImplicitGemmOps` turns a launcher into the backend functions of
``reference.py``: output allocation (memory format as torch's conv), problem
geometry, entry lists, split choice and the reduction of split partials.

Geometry vocabulary, the same in :class:`ConvProblem`, the Triton kernels'
arguments (upper case) and csrc/cuda's ``ConvGeometry`` (lower case): ``cin,
h, w`` (input), ``cout, oh, ow`` (output), ``kh, kw`` (kernel), ``sh, sw``,
``ph, pw``, ``dh, dw`` (stride, padding, dilation), ``blocks_per_tap`` (channel
blocks per kernel tap: weight block column ``c`` is ``Bi`` input channels,
block ``c % blocks_per_tap``, at tap ``c // blocks_per_tap``), and the ``(n, c,
h, w)`` element strides of the input-side activation (x or dx: ``sx*``) and
the output-side one (y or dy: ``sy*``).  The CUDA ops take only the named
``kernel_size, stride, padding, dilation`` of the public ops and read every
other field off their tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from ..layout import BlockSparseLayout, cdiv, expand_ptr
from ..validation import conv_memory_format, conv_output_size


@dataclass(frozen=True)
class ConvProblem:
    """A problem in the kernels' terms: a conv, or a linear as a 1x1 conv of 1x1 images."""

    n: int
    cin: int
    h: int
    w: int
    cout: int
    kernel_size: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)

    @property
    def out_hw(self) -> Tuple[int, int]:
        return conv_output_size((self.h, self.w), self.kernel_size, self.stride, self.padding, self.dilation)

    @property
    def out_pixels(self) -> int:
        return self.n * self.out_hw[0] * self.out_hw[1]

    @property
    def in_pixels(self) -> int:
        return self.n * self.h * self.w

    def blocks_per_tap(self, block_in: int) -> int:
        """Channel blocks per kernel tap (``BlockSparseLayout.blocks_per_tap``)."""
        return cdiv(self.cin, block_in)

    def kernel_args(self, block_in: int) -> Dict[str, int]:
        """The Triton kernels' geometry arguments, by name (csrc/cuda's ConvGeometry fields)."""
        (oh, ow), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.out_hw, self.kernel_size, self.stride, self.padding, self.dilation)
        return dict(CIN=self.cin, H=self.h, W=self.w, COUT=self.cout, OH=oh, OW=ow, KH=kh, KW=kw,
                    BLOCKS_PER_TAP=self.blocks_per_tap(block_in), SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)

    def conv_args(self) -> Dict[str, List[int]]:
        """``kernel_size, stride, padding, dilation``: the conv arguments of the ops, by name."""
        return dict(kernel_size=list(self.kernel_size), stride=list(self.stride), padding=list(self.padding),
                    dilation=list(self.dilation))

    def block_grid(self, block_size: Sequence[int]) -> Tuple[int, int]:
        return BlockSparseLayout.grid_for((self.cout, self.cin, *self.kernel_size), tuple(block_size))


def strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(n, c, h, w) element strides of a 4-D activation, or of a 2-D one as [N, C, 1, 1]."""
    return tuple(t.stride()) if t.dim() == 4 else (t.stride(0), t.stride(1), 0, 0)


def stride_args(side: str, t: torch.Tensor) -> Dict[str, int]:
    """``strides(t)`` as the Triton kernels' arguments ``s{side}n, s{side}c, s{side}h, s{side}w``;
    ``side`` is ``"x"`` for the input-side activation (x, dx), ``"y"`` for the output side (y, dy)."""
    return {f"s{side}{dim}": s for dim, s in zip("nchw", strides(t))}


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU (4 stands in for Triton's CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def split_count(entries: int, pixels: int, device: torch.device) -> int:
    """Pixel-range splits of the grad-blocks reduction, so that few blocks still fill the GPU."""
    want = cdiv(4 * _processors(device), max(entries, 1))
    most = max(1, pixels // 1024)  # keep every split a long reduction
    pow2 = lambda v: 1 << (max(v, 1) - 1).bit_length()  # noqa: E731
    return min(pow2(want), pow2(most))


@dataclass(frozen=True)
class Entries:
    """Blocks of the weight gradient to compute: block row, block column, output index."""

    rows: torch.Tensor  # int32
    cols: torch.Tensor  # int32
    outs: torch.Tensor  # int32

    @staticmethod
    def live(row_ptr, col_idx, slot) -> "Entries":
        return Entries(expand_ptr(row_ptr, col_idx.numel()).to(torch.int32), col_idx, slot)

    @staticmethod
    def every(grid: Tuple[int, int], device) -> "Entries":
        flat = torch.arange(grid[0] * grid[1], device=device, dtype=torch.int32)
        return Entries(flat // grid[1], flat % grid[1], flat)


class Launcher(Protocol):
    """A backend's three kernels; each writes every element of its output tensor."""

    def conv2d_forward(self, x, values, row_ptr, col_idx, slot, bias, prob: ConvProblem, y) -> None: ...

    def conv2d_grad_input(self, dy, values, col_ptr, row_idx, tslot, prob: ConvProblem, dx) -> None: ...

    def conv2d_grad_blocks(self, dy, x, prob: ConvProblem, block_size, entries: Entries, out, split: int,
                           chunk: int, squared_norm: bool) -> None:
        """The gradient (or its squared norm) of the listed blocks: grad-values and block norms.
        ``out`` is ``[split, n_out, Bo, Bi]`` fp32 when split > 1; else ``[n_out, Bo, Bi]``
        in x's dtype, or ``[n_out]`` fp32 squared norms when ``squared_norm``."""


class ImplicitGemmOps:
    """The backend functions of ``reference.py`` on top of a :class:`Launcher`."""

    def __init__(self, launcher: Launcher):
        self.launch = launcher

    # ------------------------------------------------------------- shared steps
    def _forward(self, x, values, row_ptr, col_idx, slot, bias, prob: ConvProblem, y):
        if prob.out_pixels > 0:
            bias = bias.contiguous() if bias is not None else None
            self.launch.conv2d_forward(x, values.contiguous(), row_ptr, col_idx, slot, bias, prob, y)
        return y

    def _grad_input(self, dy, values, col_ptr, row_idx, tslot, prob: ConvProblem, dx):
        if prob.in_pixels > 0:
            self.launch.conv2d_grad_input(dy, values.contiguous(), col_ptr, row_idx, tslot, prob, dx)
        return dx

    def _grad_blocks(self, dy, x, prob: ConvProblem, block_size, entries: Entries, squared_norm: bool):
        bo, bi = block_size
        n_out = entries.rows.numel()
        m = prob.out_pixels
        dev = x.device
        if n_out == 0 or m == 0:
            return (torch.zeros(n_out, dtype=torch.float32, device=dev) if squared_norm
                    else torch.zeros((n_out, bo, bi), dtype=x.dtype, device=dev))
        split = split_count(n_out, m, dev)
        if split > 1:
            out = torch.empty((split, n_out, bo, bi), dtype=torch.float32, device=dev)
        elif squared_norm:
            out = torch.empty(n_out, dtype=torch.float32, device=dev)
        else:
            out = torch.empty((n_out, bo, bi), dtype=x.dtype, device=dev)
        self.launch.conv2d_grad_blocks(dy, x, prob, (bo, bi), entries, out, split, cdiv(m, split), squared_norm)
        if split == 1:
            return out
        blocks = out.sum(0)
        return blocks.square().sum((1, 2)) if squared_norm else blocks.to(x.dtype)

    def _norms(self, dy, x, prob: ConvProblem, block_size):
        grid = prob.block_grid(block_size)
        squared = self._grad_blocks(dy, x, prob, block_size, Entries.every(grid, x.device), True)
        return squared.sqrt().reshape(grid).to(x.dtype)

    # ---------------------------------------------------------------- linear
    @staticmethod
    def _linear(n: int, cin: int, cout: int) -> ConvProblem:
        return ConvProblem(n=n, cin=cin, h=1, w=1, cout=cout)

    def linear_forward(self, x, values, row_ptr, col_idx, slot, bias: Optional[torch.Tensor], out_features: int):
        y = x.new_empty((x.shape[0], out_features))
        prob = self._linear(x.shape[0], x.shape[1], out_features)
        return self._forward(x, values, row_ptr, col_idx, slot, bias, prob, y)

    def linear_grad_input(self, grad_out, values, col_ptr, row_idx, tslot, in_features: int):
        dx = grad_out.new_empty((grad_out.shape[0], in_features))
        prob = self._linear(grad_out.shape[0], in_features, grad_out.shape[1])
        return self._grad_input(grad_out, values, col_ptr, row_idx, tslot, prob, dx)

    def linear_grad_values(self, grad_out, x, row_ptr, col_idx, slot, block_size):
        prob = self._linear(x.shape[0], x.shape[1], grad_out.shape[1])
        return self._grad_blocks(grad_out, x, prob, block_size, Entries.live(row_ptr, col_idx, slot), False)

    def linear_grad_block_norms(self, grad_out, x, block_size):
        return self._norms(grad_out, x, self._linear(x.shape[0], x.shape[1], grad_out.shape[1]), block_size)

    # ---------------------------------------------------------------- conv2d
    @staticmethod
    def _conv(input_size, cout, kernel_size, stride, padding, dilation) -> ConvProblem:
        n, cin, h, w = input_size
        return ConvProblem(n, cin, h, w, cout, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))

    def conv2d_forward(self, x, values, row_ptr, col_idx, slot, bias, out_channels: int, kernel_size, stride,
                       padding, dilation):
        prob = self._conv(x.shape, out_channels, kernel_size, stride, padding, dilation)
        y = torch.empty((prob.n, out_channels, *prob.out_hw), dtype=x.dtype, device=x.device,
                        memory_format=conv_memory_format(x))
        return self._forward(x, values, row_ptr, col_idx, slot, bias, prob, y)

    def conv2d_grad_input(self, grad_out, values, col_ptr, row_idx, tslot, input_size, kernel_size, stride,
                          padding, dilation):
        prob = self._conv(input_size, grad_out.shape[1], kernel_size, stride, padding, dilation)
        dx = torch.empty(tuple(input_size), dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=conv_memory_format(grad_out))
        return self._grad_input(grad_out, values, col_ptr, row_idx, tslot, prob, dx)

    def conv2d_grad_values(self, grad_out, x, row_ptr, col_idx, slot, block_size, kernel_size, stride,
                           padding, dilation):
        prob = self._conv(x.shape, grad_out.shape[1], kernel_size, stride, padding, dilation)
        return self._grad_blocks(grad_out, x, prob, block_size, Entries.live(row_ptr, col_idx, slot), False)

    def conv2d_grad_block_norms(self, grad_out, x, block_size, kernel_size, stride, padding, dilation):
        prob = self._conv(x.shape, grad_out.shape[1], kernel_size, stride, padding, dilation)
        return self._norms(grad_out, x, prob, block_size)

    def export(self, namespace: dict) -> None:
        """Bind the eight backend functions as module-level names of ``namespace``."""
        for name in ("linear_forward", "linear_grad_input", "linear_grad_values", "linear_grad_block_norms",
                     "conv2d_forward", "conv2d_grad_input", "conv2d_grad_values", "conv2d_grad_block_norms"):
            namespace[name] = getattr(self, name)
