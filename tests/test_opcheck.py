"""torch.library.opcheck on every custom op (schema, fake kernel, autograd registration)."""

import pytest
import torch

import freetickets_kernels as ftk
from freetickets_kernels import ops

from conftest import random_layout, random_values

BACKENDS = [b for b in ("reference", "cpu") if b in ftk.available_backends()]


def _linear_args(dtype, grad):
    layout = random_layout((10, 7), (4, 3), 0.6)
    x = torch.randn(5, 7, dtype=dtype, requires_grad=grad)
    v = random_values(layout, dtype=dtype).requires_grad_(grad)
    b = torch.randn(10, dtype=dtype, requires_grad=grad)
    return layout, x, v, b


def _conv_args(dtype, grad):
    layout = random_layout((6, 5, 3, 3), (4, 2), 0.6)
    x = torch.randn(2, 5, 7, 6, dtype=dtype, requires_grad=grad)
    v = random_values(layout, dtype=dtype).requires_grad_(grad)
    b = torch.randn(6, dtype=dtype, requires_grad=grad)
    return layout, x, v, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_linear(backend, grad):
    layout, x, v, b = _linear_args(torch.float32, grad)
    with ftk.use_backend(backend):
        torch.library.opcheck(ops.linear_forward, (x, v, *layout.indices.as_tuple(), b, 10))
        if not grad:
            ix = layout.indices
            dy = torch.randn(5, 10)
            torch.library.opcheck(ops.linear_grad_input, (dy, v, ix.col_ptr, ix.row_idx, ix.tslot, 7))
            torch.library.opcheck(ops.linear_grad_values, (dy, x, ix.row_ptr, ix.col_idx, ix.slot, [4, 3]))
            torch.library.opcheck(ops.linear_grad_block_norms, (dy, x, [4, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_conv2d(backend, grad):
    layout, x, v, b = _conv_args(torch.float32, grad)
    geo = ([3, 3], [2, 1], [1, 1], [1, 2])
    with ftk.use_backend(backend):
        torch.library.opcheck(ops.conv2d_forward, (x, v, *layout.indices.as_tuple(), b, 6, *geo))
        if not grad:
            ix = layout.indices
            y = ops.conv2d_forward(x, v, *ix.as_tuple(), b, 6, *geo)
            dy = torch.randn_like(y)
            torch.library.opcheck(
                ops.conv2d_grad_input, (dy, v, ix.col_ptr, ix.row_idx, ix.tslot, list(x.shape), *geo)
            )
            torch.library.opcheck(
                ops.conv2d_grad_values, (dy, x, ix.row_ptr, ix.col_idx, ix.slot, [4, 2], *geo)
            )
            torch.library.opcheck(ops.conv2d_grad_block_norms, (dy, x, [4, 2], *geo))


def test_torch_compile_traces_the_op():
    layout, x, v, b = _linear_args(torch.float32, False)
    fn = torch.compile(lambda x, v, b: ftk.block_sparse_linear(x, v, layout, b), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x, v, b), ftk.block_sparse_linear(x, v, layout, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_conv2d_channels_last(backend):
    # channels_last in -> channels_last out, in the fake kernel and every backend alike
    layout, x, v, b = _conv_args(torch.float32, True)
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    geo = ([3, 3], [1, 1], [1, 1], [1, 1])
    with ftk.use_backend(backend):
        torch.library.opcheck(ops.conv2d_forward, (x, v, *layout.indices.as_tuple(), b, 6, *geo))
        y = ftk.block_sparse_conv2d(x, v, layout, b, 1, 1)
        assert y.is_contiguous(memory_format=torch.channels_last)
        y.sum().backward()
        assert x.grad.shape == x.shape
