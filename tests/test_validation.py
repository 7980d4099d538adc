"""Bad input to the public ops gives a clear TypeError/ValueError naming the argument."""

import pytest
import torch

import freetickets_kernels as ftk

from conftest import random_layout, random_values


@pytest.fixture
def lin():
    layout = random_layout((8, 12), (4, 4), 0.5)
    return torch.randn(3, 12), random_values(layout, dtype=torch.float32), layout


@pytest.fixture
def conv():
    layout = random_layout((8, 4, 3, 3), (4, 4), 0.5)
    return torch.randn(2, 4, 6, 6), random_values(layout, dtype=torch.float32), layout


def test_linear_wrong_in_features(lin):
    x, v, layout = lin
    with pytest.raises(ValueError, match="in_features=12"):
        ftk.block_sparse_linear(torch.randn(3, 11), v, layout)


def test_linear_dtype_mismatch(lin):
    x, v, layout = lin
    with pytest.raises(TypeError, match="values are torch.float64"):
        ftk.block_sparse_linear(x, v.double(), layout)


def test_non_floating_input(lin):
    x, v, layout = lin
    with pytest.raises(TypeError, match="floating-point"):
        ftk.block_sparse_linear(x.long(), v, layout)


def test_values_shape_mismatch(lin):
    x, v, layout = lin
    with pytest.raises(ValueError, match="values has shape"):
        ftk.block_sparse_linear(x, v[:-1], layout)


def test_bias_shape_and_dtype(lin):
    x, v, layout = lin
    with pytest.raises(ValueError, match="bias has shape"):
        ftk.block_sparse_linear(x, v, layout, torch.zeros(7))
    with pytest.raises(TypeError, match="bias is torch.float64"):
        ftk.block_sparse_linear(x, v, layout, torch.zeros(8, dtype=torch.float64))


def test_layout_type_and_kind(lin, conv):
    x, v, layout = lin
    with pytest.raises(TypeError, match="BlockSparseLayout"):
        ftk.block_sparse_linear(x, v, "layout")
    cx, cv, clayout = conv
    with pytest.raises(ValueError, match="needs a linear layout"):
        ftk.block_sparse_linear(x, cv, clayout)
    with pytest.raises(ValueError, match="needs a conv layout"):
        ftk.block_sparse_conv2d(cx, v, layout)


def test_conv_channel_and_rank_errors(conv):
    x, v, layout = conv
    with pytest.raises(ValueError, match="in_channels=4"):
        ftk.block_sparse_conv2d(torch.randn(2, 5, 6, 6), v, layout)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ftk.block_sparse_conv2d(torch.randn(1, 2, 4, 6, 6), v, layout)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stride=0), "stride must be positive"),
        (dict(padding=-1), "padding must be non-negative"),
        (dict(dilation=(1, 0)), "dilation must be positive"),
        (dict(stride=1.5), "stride must be an int"),
    ],
)
def test_conv_geometry_errors(conv, kwargs, match):
    x, v, layout = conv
    with pytest.raises((ValueError, TypeError), match=match):
        ftk.block_sparse_conv2d(x, v, layout, **kwargs)


def test_conv_input_too_small(conv):
    x, v, layout = conv
    with pytest.raises(ValueError, match="too small"):
        ftk.block_sparse_conv2d(torch.randn(1, 4, 2, 2), v, layout)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch(lin):
    x, v, layout = lin
    with pytest.raises(ValueError, match="on cuda"):
        ftk.block_sparse_linear(x.cuda(), v.cuda(), layout)


def test_dense_grad_block_norms_shape_errors(lin, conv):
    x, v, layout = lin
    with pytest.raises(ValueError, match="grad_output has shape"):
        ftk.dense_grad_block_norms(x, torch.randn(3, 7), layout)
    cx, cv, clayout = conv
    with pytest.raises(ValueError, match="grad_output has shape"):
        ftk.dense_grad_block_norms(cx, torch.randn(2, 8, 6, 6), clayout, padding=0)


def test_nan_and_inf_propagate_like_dense(lin):
    x, v, layout = lin
    x = x.clone()
    x[0, 0] = float("nan")
    x[1, 0] = float("inf")
    y = ftk.block_sparse_linear(x, v, layout)
    dense = torch.nn.functional.linear(x, layout.unpack(v))
    assert torch.equal(torch.isnan(y), torch.isnan(dense))
    assert torch.equal(torch.isinf(y), torch.isinf(dense))
