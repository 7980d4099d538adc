"""The reference backend equals torch's dense ops on the densified weight (float64)."""

import pytest
import torch
import torch.nn.functional as F

import freetickets_kernels as ftk
from freetickets_kernels.layout import block_norms, to_gemm_blocks

from conftest import CONV_CASES, LINEAR_CASES, random_layout, random_values, run_op

TOL = dict(rtol=1e-10, atol=1e-12)


def _dense_linear(x, values, layout, bias):
    return F.linear(x, layout.unpack(values), bias)


@pytest.mark.parametrize("out,inn,block,density,batch", LINEAR_CASES)
def test_linear_matches_dense(out, inn, block, density, batch):
    layout = random_layout((out, inn), block, density)
    values = random_values(layout)
    x = torch.randn(batch, inn, dtype=torch.float64)
    bias = torch.randn(out, dtype=torch.float64)
    got = run_op("reference", lambda x, v, b: ftk.block_sparse_linear(x, v, layout, b), [x, values, bias])
    want = run_op("reference", lambda x, v, b: _dense_linear(x, v, layout, b), [x, values, bias])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_linear_leading_dims_and_no_bias():
    layout = random_layout((12, 10), (4, 4), 0.5)
    values = random_values(layout)
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    y = ftk.block_sparse_linear(x, values, layout)
    assert y.shape == (2, 3, 12)
    torch.testing.assert_close(y, F.linear(x, layout.unpack(values)), **TOL)


def test_linear_all_zero_block_row():
    layout = random_layout((16, 16), (4, 4), 1.0)
    drop = torch.zeros_like(layout.block_mask)
    drop[1] = True  # block row 1 dead: its outputs are just the bias
    from freetickets_kernels.layout import BlockSparseLayout

    layout = BlockSparseLayout.from_block_mask(layout.block_mask & ~drop, 16, 16, 4)
    values = random_values(layout)
    x = torch.randn(3, 16, dtype=torch.float64)
    bias = torch.randn(16, dtype=torch.float64)
    y = ftk.block_sparse_linear(x, values, layout, bias)
    torch.testing.assert_close(y[:, 4:8], bias[4:8].expand(3, 4), **TOL)
    torch.testing.assert_close(y, F.linear(x, layout.unpack(values), bias), **TOL)


@pytest.mark.parametrize("cout,cin,kernel,block,density,batch,hw,stride,padding,dilation", CONV_CASES)
def test_conv2d_matches_dense(cout, cin, kernel, block, density, batch, hw, stride, padding, dilation):
    layout = random_layout((cout, cin, *kernel), block, density)
    values = random_values(layout)
    x = torch.randn(batch, cin, *hw, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    geo = (stride, padding, dilation)
    got = run_op(
        "reference", lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout, b, *geo), [x, values, bias]
    )
    want = run_op(
        "reference", lambda x, v, b: F.conv2d(x, layout.unpack(v), b, *geo), [x, values, bias]
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_conv2d_unbatched_input():
    layout = random_layout((6, 4, 3, 3), (2, 2), 0.5)
    values = random_values(layout)
    x = torch.randn(4, 5, 5, dtype=torch.float64)
    y = ftk.block_sparse_conv2d(x, values, layout, padding=1)
    torch.testing.assert_close(y, F.conv2d(x, layout.unpack(values), padding=1), **TOL)


def test_grad_values_only_at_live_blocks():
    # dvalues are the live blocks of the dense weight gradient, in slot order
    layout = random_layout((20, 18), (4, 6), 0.4, seed=11)
    values = random_values(layout).requires_grad_()
    x = torch.randn(5, 18, dtype=torch.float64)
    y = ftk.block_sparse_linear(x, values, layout)
    g = torch.randn_like(y)
    y.backward(g)
    dense_grad = g.t() @ x
    assert values.grad.shape == layout.values_shape
    torch.testing.assert_close(values.grad, layout.pack(dense_grad), **TOL)


def test_gradcheck_linear():
    layout = random_layout((9, 7), (4, 3), 0.6, seed=2)
    values = random_values(layout).requires_grad_()
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: ftk.block_sparse_linear(x, v, layout, b), (x, values, b))


def test_gradcheck_conv2d():
    layout = random_layout((5, 3, 3, 2), (2, 2), 0.6, seed=2)
    values = random_values(layout).requires_grad_()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fn = lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout, b, (2, 1), 1, (1, 2))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values, b))


def test_dense_grad_block_norms_linear():
    layout = random_layout((10, 13), (4, 5), 0.3)
    x = torch.randn(2, 3, 13, dtype=torch.float64)
    gy = torch.randn(2, 3, 10, dtype=torch.float64)
    norms = ftk.dense_grad_block_norms(x, gy, layout)
    dense = gy.reshape(-1, 10).t() @ x.reshape(-1, 13)
    assert norms.shape == layout.grid_shape
    torch.testing.assert_close(norms, block_norms(to_gemm_blocks(dense, (4, 5))), **TOL)


def test_dense_grad_block_norms_conv2d():
    layout = random_layout((6, 5, 3, 3), (4, 2), 0.3)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64)
    y = F.conv2d(x, w, stride=2, padding=1)
    gy = torch.randn_like(y)
    y.backward(gy)
    norms = ftk.dense_grad_block_norms(x, gy, layout, stride=2, padding=1)
    assert norms.shape == layout.grid_shape
    torch.testing.assert_close(norms, block_norms(to_gemm_blocks(w.grad, (4, 2))), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_handles_other_float_dtypes(dtype):
    layout = random_layout((16, 16), (4, 4), 0.5)
    values = random_values(layout, dtype=dtype)
    x = torch.randn(3, 16).to(dtype)
    with ftk.use_backend("reference"):
        y = ftk.block_sparse_linear(x, values, layout)
    assert y.dtype == dtype
    torch.testing.assert_close(y, F.linear(x, layout.unpack(values)))
