"""GPU checks: every available GPU backend against the reference backend (skipped without a GPU)."""

import pytest
import torch

import freetickets_kernels as ftk

from conftest import CONV_CASES, LINEAR_CASES, assert_close_scaled, random_layout, random_values, run_op

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_BACKENDS = ["reference"] + [b for b in ("triton", "cuda") if b in ftk.available_backends()]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("out,inn,block,density,batch", LINEAR_CASES)
def test_linear_on_gpu(backend, out, inn, block, density, batch):
    layout = random_layout((out, inn), block, density)
    values = random_values(layout, dtype=torch.float32)
    x, bias = torch.randn(batch, inn), torch.randn(out)
    fn = lambda x, v, b: ftk.block_sparse_linear(x, v, layout.to(x.device), b)  # noqa: E731
    ref = run_op("reference", fn, [x.double(), values.double(), bias.double()])
    got = run_op(backend, fn, [x.cuda(), values.cuda(), bias.cuda()])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cout,cin,kernel,block,density,batch,hw,stride,padding,dilation", CONV_CASES)
def test_conv2d_on_gpu(backend, cout, cin, kernel, block, density, batch, hw, stride, padding, dilation):
    layout = random_layout((cout, cin, *kernel), block, density)
    values = random_values(layout, dtype=torch.float32)
    x, bias = torch.randn(batch, cin, *hw), torch.randn(cout)
    geo = (stride, padding, dilation)
    fn = lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout.to(x.device), b, *geo)  # noqa: E731
    ref = run_op("reference", fn, [x.double(), values.double(), bias.double()])
    got = run_op(backend, fn, [x.cuda(), values.cuda(), bias.cuda()])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-3, atol=1e-3)


FAST = [b for b in GPU_BACKENDS if b != "reference"]
# rtol, and atol per unit of max|ref| (see assert_close_scaled): half types round every stored output
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-4}


def _close(got, ref, dtype):
    assert_close_scaled(got, ref, rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (32, 48), (96, 80)])
def test_linear_larger_shapes_all_dtypes(backend, dtype, block):
    _linear_matches_reference(backend, dtype, random_layout((300, 520), block, 0.3), tokens=333)


def _linear_matches_reference(backend, dtype, layout, tokens):
    values = random_values(layout, dtype=torch.float32)
    x, bias = torch.randn(tokens, layout.in_features), torch.randn(layout.out_features)
    fn = lambda x, v, b: ftk.block_sparse_linear(x, v, layout.to(x.device), b)  # noqa: E731
    ref = run_op("reference", fn, [x.double(), values.double(), bias.double()])
    got = run_op(backend, fn, [t.cuda().to(dtype) for t in (x, values, bias)])
    for g, r in zip(got, ref):
        assert g.dtype == dtype
        _close(g, r, dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_conv2d_larger_shapes_all_dtypes(backend, dtype, channels_last, stride, dilation):
    layout = random_layout((96, 72, 3, 3), (32, 16), 0.3)
    values = random_values(layout, dtype=torch.float32)
    x, bias = torch.randn(4, 72, 21, 19), torch.randn(96)
    fn = lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout.to(x.device), b, stride, 1, dilation)  # noqa: E731
    ref = run_op("reference", fn, [x.double(), values.double(), bias.double()])
    xc = x.cuda().to(dtype)
    if channels_last:
        xc = xc.contiguous(memory_format=torch.channels_last)
    got = run_op(backend, fn, [xc, values.cuda().to(dtype), bias.cuda().to(dtype)])
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    for g, r in zip(got, ref):
        _close(g, r, dtype)


@pytest.mark.parametrize("backend", FAST)
def test_dense_grad_block_norms_on_gpu(backend):
    layout = random_layout((96, 72, 3, 3), (32, 16), 0.3)
    x, gy = torch.randn(4, 72, 21, 19), torch.randn(4, 96, 11, 10)
    with ftk.use_backend("reference"):
        ref = ftk.ops.dense_grad_block_norms(x.double(), gy.double(), layout, 2, 1)
    with ftk.use_backend(backend):
        got = ftk.ops.dense_grad_block_norms(x.cuda(), gy.cuda(), layout.to("cuda"), 2, 1)
    torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_cuda_tensors_prefer_triton_then_cuda():
    from freetickets_kernels.backends import select

    expected = next(b for b in ("triton", "cuda", "reference") if b in ftk.available_backends())
    assert select(torch.device("cuda"), torch.float16).name == expected


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grad_blocks_split_over_pixels_on_gpu(backend, dtype):
    # few live blocks, many pixels: grad-values and the block norms reduce in split pixel ranges
    from freetickets_kernels.backends.implicit_gemm import split_count

    layout = random_layout((64, 32), (32, 32), 0.5)
    assert split_count(max(layout.nnzb, 1), 16384, torch.device("cuda")) > 1
    _linear_matches_reference(backend, dtype, layout, tokens=16384)
