"""GPU checks: every available GPU backend against the reference backend (skipped without a GPU)."""

import pytest
import torch

import freetickets_kernels as ftk

from conftest import CONV_CASES, LINEAR_CASES, random_layout, random_values, run_op

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
