"""Empty batches on every op and backend: empty outputs and input gradients, zero values
gradients, as torch's F.linear / F.conv2d give (the CPU work split once divided by zero)."""

import copy

import pytest
import torch

import freetickets_kernels as ftk

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in ftk.available_backends()]


def _check(layer, x, backend):
    dense = ftk.densify(torch.nn.Sequential(copy.deepcopy(layer)))[0]  # the torch layer it stands for
    x = x.detach().requires_grad_()
    with ftk.use_backend(backend):
        y = layer(x)
        y.sum().backward()
    xd = x.detach().clone().requires_grad_()
    want = dense(xd)
    want.sum().backward()
    assert y.shape == want.shape and y.dtype == want.dtype
    assert x.grad.shape == x.shape
    if x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
            memory_format=torch.channels_last)
    assert layer.values.grad is not None and torch.count_nonzero(layer.values.grad) == 0
    assert torch.count_nonzero(dense.weight.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 24), (3, 0, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_empty_batch(backend, shape, dtype):
    torch.manual_seed(0)
    layer = ftk.SparseLinear(24, 40, density=0.3, block_size=8).to(dtype)
    _check(layer, torch.randn(shape, dtype=dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel,padding", [(3, 1), (1, 0)])
def test_conv2d_empty_batch(backend, fmt, kernel, padding):
    torch.manual_seed(0)
    layer = ftk.SparseConv2d(16, 24, kernel, padding=padding, density=0.5, block_size=8)
    _check(layer, torch.randn(0, 16, 9, 9).contiguous(memory_format=fmt), backend)
