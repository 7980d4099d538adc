"""The reference backend: pure torch, any device, any float dtype. The oracle.

It densifies the block-sparse weight and calls torch's own dense ops, so its
correctness rests on torch alone.  Every other backend is tested against it.
The forward reads the BSR indices and grad-input the transposed ones, so a
layout whose two index sets disagree fails the tests here too.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..layout import block_norms, cdiv, expand_ptr, from_gemm_blocks, to_gemm_blocks
from ..validation import conv_memory_format

NAME = "reference"


def _weight_shape(out_features: int, in_features: int, kernel_size: Optional[Sequence[int]]):
    if kernel_size is None:
        return (out_features, in_features)
    return (out_features, in_features, kernel_size[0], kernel_size[1])


def _grid_cols(in_features: int, bi: int, kernel_size: Optional[Sequence[int]]) -> int:
    taps = 1 if kernel_size is None else kernel_size[0] * kernel_size[1]
    return taps * cdiv(in_features, bi)


def _densify(values, ptr, idx, slot, n_outer, n_inner, transposed, weight_shape):
    """Scatter ``values`` into a dense weight from compressed indices.

    ``transposed=False``: (row_ptr, col_idx) with n_outer=R, n_inner=C.
    ``transposed=True``: (col_ptr, row_idx) with n_outer=C, n_inner=R.
    """
    bo, bi = values.shape[1], values.shape[2]
    outer = expand_ptr(ptr, idx.numel())
    inner = idx.long()
    rows, cols = (inner, outer) if transposed else (outer, inner)
    r, c = (n_inner, n_outer) if transposed else (n_outer, n_inner)
    blocks = values.new_zeros((r, c, bo, bi))
    blocks[rows, cols] = values[slot.long()]
    return from_gemm_blocks(blocks, weight_shape)


def _gather(dense_weight_grad, row_ptr, col_idx, slot, block_size):
    """Live blocks of a dense weight gradient, in slot order."""
    blocks = to_gemm_blocks(dense_weight_grad, block_size)
    rows = expand_ptr(row_ptr, col_idx.numel())
    out = blocks.new_empty((col_idx.numel(), *block_size))
    out[slot.long()] = blocks[rows, col_idx.long()]
    return out


# --------------------------------------------------------------------- linear


def linear_forward(x, values, row_ptr, col_idx, slot, bias, out_features: int):
    bi = values.shape[2]
    in_features = x.shape[1]
    w = _densify(
        values, row_ptr, col_idx, slot, row_ptr.numel() - 1, _grid_cols(in_features, bi, None),
        False, (out_features, in_features),
    )
    return F.linear(x, w, bias)


def linear_grad_input(grad_out, values, col_ptr, row_idx, tslot, in_features: int):
    out_features = grad_out.shape[1]
    r = cdiv(out_features, values.shape[1])
    w = _densify(
        values, col_ptr, row_idx, tslot, col_ptr.numel() - 1, r, True, (out_features, in_features)
    )
    return grad_out @ w


def linear_dense_weight_grad(grad_out, x):
    """The dense ``[out, in]`` weight gradient of ``y = x @ W.T`` (2-D ``grad_out`` and ``x``)."""
    return grad_out.t() @ x


def linear_grad_values(grad_out, x, row_ptr, col_idx, slot, block_size: List[int]):
    return _gather(linear_dense_weight_grad(grad_out, x), row_ptr, col_idx, slot, tuple(block_size))


def linear_grad_block_norms(grad_out, x, block_size: List[int]):
    return block_norms(to_gemm_blocks(linear_dense_weight_grad(grad_out, x), tuple(block_size)))


# --------------------------------------------------------------------- conv2d


def conv2d_forward(
    x, values, row_ptr, col_idx, slot, bias, out_channels: int, kernel_size, stride, padding, dilation
):
    in_channels = x.shape[1]
    w = _densify(
        values, row_ptr, col_idx, slot, row_ptr.numel() - 1,
        _grid_cols(in_channels, values.shape[2], kernel_size), False,
        _weight_shape(out_channels, in_channels, kernel_size),
    )
    y = F.conv2d(x, w, bias, list(stride), list(padding), list(dilation))
    return y.contiguous(memory_format=conv_memory_format(x))


def conv2d_grad_input(
    grad_out, values, col_ptr, row_idx, tslot, input_size, kernel_size, stride, padding, dilation
):
    out_channels = grad_out.shape[1]
    r = cdiv(out_channels, values.shape[1])
    w = _densify(
        values, col_ptr, row_idx, tslot, col_ptr.numel() - 1, r, True,
        _weight_shape(out_channels, input_size[1], kernel_size),
    )
    dx = torch.nn.grad.conv2d_input(
        list(input_size), w, grad_out, list(stride), list(padding), list(dilation)
    )
    return dx.contiguous(memory_format=conv_memory_format(grad_out))


def conv2d_dense_weight_grad(grad_out, x, kernel_size, stride, padding, dilation):
    """The dense ``[Cout, Cin, kh, kw]`` weight gradient of a groups=1 conv."""
    shape = _weight_shape(grad_out.shape[1], x.shape[1], kernel_size)
    return torch.nn.grad.conv2d_weight(
        x, list(shape), grad_out, list(stride), list(padding), list(dilation)
    )


def conv2d_grad_values(
    grad_out, x, row_ptr, col_idx, slot, block_size, kernel_size, stride, padding, dilation
):
    dw = conv2d_dense_weight_grad(grad_out, x, kernel_size, stride, padding, dilation)
    return _gather(dw, row_ptr, col_idx, slot, tuple(block_size))


def conv2d_grad_block_norms(grad_out, x, block_size, kernel_size, stride, padding, dilation):
    dw = conv2d_dense_weight_grad(grad_out, x, kernel_size, stride, padding, dilation)
    return block_norms(to_gemm_blocks(dw, tuple(block_size)))
