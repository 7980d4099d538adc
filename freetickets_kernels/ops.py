"""Public block-sparse ops: ``torch.library`` custom ops, autograd, backend dispatch.

The custom ops (namespace ``freetickets``) take only tensors and ints so that
``torch.compile`` can trace them through their fake kernels.  The friendly
functions at the bottom take a :class:`BlockSparseLayout`, validate, and call
them.  Each op asks :func:`backends.select` for a backend per call and calls
the backend function of the same name: ``freetickets::linear_forward``,
``linear_grad_input``, ``linear_grad_values``, ``linear_grad_block_norms``,
``conv2d_forward``, ``conv2d_grad_input``, ``conv2d_grad_values`` and
``conv2d_grad_block_norms`` (as ``torch.ops.freetickets_cpu`` names them too).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import autocast, backends
from .layout import BlockSparseLayout, IntPair, cdiv
from .validation import (
    autocast_casts,
    check_conv_input,
    check_layout,
    check_linear_input,
    check_operands,
    conv_geometry,
    conv_memory_format,
    conv_output_size,
)

__all__ = ["block_sparse_linear", "block_sparse_conv2d", "dense_grad_block_norms"]


def _impl(t: Tensor):
    return backends.select(t.device, t.dtype).module


# --------------------------------------------------------------------- linear


@torch.library.custom_op("freetickets::linear_forward", mutates_args=())
def linear_forward(
    x: Tensor,
    values: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    slot: Tensor,
    col_ptr: Tensor,
    row_idx: Tensor,
    tslot: Tensor,
    bias: Optional[Tensor],
    out_features: int,
) -> Tensor:
    """``y = x @ W.T + bias`` for ``x [N, in]``; W is block-sparse."""
    return _impl(x).linear_forward(x, values, row_ptr, col_idx, slot, bias, out_features)


@linear_forward.register_fake
def _(x, values, row_ptr, col_idx, slot, col_ptr, row_idx, tslot, bias, out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("freetickets::linear_grad_input", mutates_args=())
def linear_grad_input(
    grad_out: Tensor, values: Tensor, col_ptr: Tensor, row_idx: Tensor, tslot: Tensor, in_features: int
) -> Tensor:
    """``dx = dy @ W`` through the transposed (column-major) indices."""
    return _impl(grad_out).linear_grad_input(grad_out, values, col_ptr, row_idx, tslot, in_features)


@linear_grad_input.register_fake
def _(grad_out, values, col_ptr, row_idx, tslot, in_features):
    return grad_out.new_empty(grad_out.shape[0], in_features)


@torch.library.custom_op("freetickets::linear_grad_values", mutates_args=())
def linear_grad_values(
    grad_out: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, slot: Tensor, block_size: List[int]
) -> Tensor:
    """``dW = dy.T @ x`` at the live blocks only, as ``[nnzb, Bo, Bi]`` in slot order."""
    return _impl(x).linear_grad_values(grad_out, x, row_ptr, col_idx, slot, block_size)


@linear_grad_values.register_fake
def _(grad_out, x, row_ptr, col_idx, slot, block_size):
    return x.new_empty(col_idx.shape[0], block_size[0], block_size[1])


def _linear_setup(ctx, inputs, output):
    x, values, row_ptr, col_idx, slot, col_ptr, row_idx, tslot, bias, _ = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, slot, col_ptr, row_idx, tslot)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, values, row_ptr, col_idx, slot, col_ptr, row_idx, tslot = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = dv = db = None
    grad = grad.contiguous()  # once for both ops (a no-op but for odd grads, such as y.sum()'s)
    if need[0]:
        dx = linear_grad_input(grad, values, col_ptr, row_idx, tslot, x.shape[1])
    if need[1]:
        dv = linear_grad_values(grad, x, row_ptr, col_idx, slot, list(values.shape[1:]))
    if ctx.has_bias and need[8]:
        db = grad.sum(0)
    return dx, dv, None, None, None, None, None, None, db, None


linear_forward.register_autograd(_linear_backward, setup_context=_linear_setup)


# --------------------------------------------------------------------- conv2d


@torch.library.custom_op("freetickets::conv2d_forward", mutates_args=())
def conv2d_forward(
    x: Tensor,
    values: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    slot: Tensor,
    col_ptr: Tensor,
    row_idx: Tensor,
    tslot: Tensor,
    bias: Optional[Tensor],
    out_channels: int,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    """2-D convolution (groups=1, NCHW) with a block-sparse weight."""
    return _impl(x).conv2d_forward(
        x, values, row_ptr, col_idx, slot, bias, out_channels, kernel_size, stride, padding, dilation
    )


@conv2d_forward.register_fake
def _(x, values, row_ptr, col_idx, slot, col_ptr, row_idx, tslot, bias, out_channels,
      kernel_size, stride, padding, dilation):
    oh, ow = conv_output_size(tuple(x.shape[2:]), kernel_size, stride, padding, dilation)
    return x.new_empty(x.shape[0], out_channels, oh, ow).contiguous(memory_format=conv_memory_format(x))


@torch.library.custom_op("freetickets::conv2d_grad_input", mutates_args=())
def conv2d_grad_input(
    grad_out: Tensor,
    values: Tensor,
    col_ptr: Tensor,
    row_idx: Tensor,
    tslot: Tensor,
    input_size: List[int],
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    return _impl(grad_out).conv2d_grad_input(
        grad_out, values, col_ptr, row_idx, tslot, input_size, kernel_size, stride, padding, dilation
    )


@conv2d_grad_input.register_fake
def _(grad_out, values, col_ptr, row_idx, tslot, input_size, kernel_size, stride, padding, dilation):
    return grad_out.new_empty(input_size).contiguous(memory_format=conv_memory_format(grad_out))


@torch.library.custom_op("freetickets::conv2d_grad_values", mutates_args=())
def conv2d_grad_values(
    grad_out: Tensor,
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    slot: Tensor,
    block_size: List[int],
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    return _impl(x).conv2d_grad_values(
        grad_out, x, row_ptr, col_idx, slot, block_size, kernel_size, stride, padding, dilation
    )


@conv2d_grad_values.register_fake
def _(grad_out, x, row_ptr, col_idx, slot, block_size, kernel_size, stride, padding, dilation):
    return x.new_empty(col_idx.shape[0], block_size[0], block_size[1])


def _conv_setup(ctx, inputs, output):
    x, values, row_ptr, col_idx, slot, col_ptr, row_idx, tslot, bias = inputs[:9]
    ctx.save_for_backward(x, values, row_ptr, col_idx, slot, col_ptr, row_idx, tslot)
    ctx.has_bias = bias is not None
    ctx.geometry = inputs[10:14]  # kernel_size, stride, padding, dilation


def _conv_backward(ctx, grad):
    x, values, row_ptr, col_idx, slot, col_ptr, row_idx, tslot = ctx.saved_tensors
    need = ctx.needs_input_grad
    # grad in the forward output's memory format (a no-op but for odd grads, such
    # as the expanded one of y.sum()): grad-input then returns x's format, as
    # AccumulateGrad wants (else it copies), and the kernels read it in place
    grad = grad.contiguous(memory_format=conv_memory_format(x))
    dx = dv = db = None
    if need[0]:
        dx = conv2d_grad_input(
            grad, values, col_ptr, row_idx, tslot, list(x.shape), *ctx.geometry
        )
    if need[1]:
        dv = conv2d_grad_values(
            grad, x, row_ptr, col_idx, slot, list(values.shape[1:]), *ctx.geometry
        )
    if ctx.has_bias and need[8]:
        db = grad.sum((0, 2, 3))
    return (dx, dv) + (None,) * 6 + (db,) + (None,) * 5


conv2d_forward.register_autograd(_conv_backward, setup_context=_conv_setup)


# ------------------------------------------------------------ RigL gradients


@torch.library.custom_op("freetickets::linear_grad_block_norms", mutates_args=())
def linear_grad_block_norms(grad_out: Tensor, x: Tensor, block_size: List[int]) -> Tensor:
    """L2 norm of every block ``[R, C]`` of the dense gradient ``dy.T @ x``."""
    return _impl(x).linear_grad_block_norms(grad_out, x, block_size)


@linear_grad_block_norms.register_fake
def _(grad_out, x, block_size):
    return x.new_empty(cdiv(grad_out.shape[1], block_size[0]), cdiv(x.shape[1], block_size[1]))


@torch.library.custom_op("freetickets::conv2d_grad_block_norms", mutates_args=())
def conv2d_grad_block_norms(
    grad_out: Tensor,
    x: Tensor,
    block_size: List[int],
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> Tensor:
    """L2 norm of every block ``[R, C]`` of the dense conv weight gradient."""
    return _impl(x).conv2d_grad_block_norms(
        grad_out, x, block_size, kernel_size, stride, padding, dilation
    )


@conv2d_grad_block_norms.register_fake
def _(grad_out, x, block_size, kernel_size, stride, padding, dilation):
    cols = kernel_size[0] * kernel_size[1] * cdiv(x.shape[1], block_size[1])
    return x.new_empty(cdiv(grad_out.shape[1], block_size[0]), cols)


# every op above runs in the autocast dtype inside torch.autocast (cpu, cuda)
autocast.register([
    "linear_forward", "linear_grad_input", "linear_grad_values", "linear_grad_block_norms",
    "conv2d_forward", "conv2d_grad_input", "conv2d_grad_values", "conv2d_grad_block_norms",
])


# ------------------------------------------------------------- public API


def block_sparse_linear(
    x: Tensor, values: Tensor, layout: BlockSparseLayout, bias: Optional[Tensor] = None
) -> Tensor:
    """``F.linear(x, W, bias)`` where ``W`` is given as ``(values, layout)``.

    ``x`` is ``[..., in_features]``; the result is ``[..., out_features]``.
    Differentiable in ``x``, ``values`` and ``bias``.
    """
    op = "block_sparse_linear"
    check_layout(layout, op, conv=False)
    check_operands(op, x, values, layout, bias)
    check_linear_input(x, layout, op)
    lead = x.shape[:-1]
    y = linear_forward(
        x.reshape(-1, layout.in_features), values, *layout.indices.as_tuple(), bias,
        layout.out_features,
    )
    return y.reshape(*lead, layout.out_features)


def block_sparse_conv2d(
    x: Tensor,
    values: Tensor,
    layout: BlockSparseLayout,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Tensor:
    """``F.conv2d(x, W, bias, stride, padding, dilation)`` (groups=1), W as ``(values, layout)``.

    ``x`` is ``[N, Cin, H, W]`` or unbatched ``[Cin, H, W]``.
    """
    op = "block_sparse_conv2d"
    check_layout(layout, op, conv=True)
    s, p, d = conv_geometry(stride, padding, dilation, op)
    check_operands(op, x, values, layout, bias)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    check_conv_input(x, layout, s, p, d, op)
    y = conv2d_forward(
        x, values, *layout.indices.as_tuple(), bias, layout.out_features,
        list(layout.kernel_size), list(s), list(p), list(d),
    )
    return y.squeeze(0) if unbatched else y


def dense_grad_block_norms(
    x: Tensor,
    grad_output: Tensor,
    layout: BlockSparseLayout,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Tensor:
    """Block L2 norms ``[R, C]`` of the *dense* weight gradient, for RigL growth.

    ``x`` is the layer's input and ``grad_output`` the gradient of its output,
    as in a backward pass; ``stride``/``padding``/``dilation`` only for conv.
    """
    op = "dense_grad_block_norms"
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"{op}: layout must be a BlockSparseLayout, got {type(layout).__name__}")
    for name, t in (("x", x), ("grad_output", grad_output)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor")
    if (grad_output.dtype != x.dtype and not autocast_casts(x, grad_output)) or grad_output.device != x.device:
        raise TypeError(
            f"{op}: x is {x.dtype} on {x.device} but grad_output is "
            f"{grad_output.dtype} on {grad_output.device}"
        )
    bs = list(layout.block_size)
    if not layout.is_conv:
        check_linear_input(x, layout, op)
        if grad_output.shape[:-1] != x.shape[:-1] or grad_output.shape[-1] != layout.out_features:
            raise ValueError(
                f"{op}: grad_output has shape {tuple(grad_output.shape)}, expected "
                f"{(*x.shape[:-1], layout.out_features)}"
            )
        return linear_grad_block_norms(
            grad_output.reshape(-1, layout.out_features), x.reshape(-1, layout.in_features), bs
        )
    s, p, d = conv_geometry(stride, padding, dilation, op)
    check_conv_input(x, layout, s, p, d, op)
    oh, ow = conv_output_size(tuple(x.shape[2:]), layout.kernel_size, s, p, d)
    expected = (x.shape[0], layout.out_features, oh, ow)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"{op}: grad_output has shape {tuple(grad_output.shape)}, expected {expected}")
    return conv2d_grad_block_norms(grad_output, x, bs, list(layout.kernel_size), list(s), list(p), list(d))
