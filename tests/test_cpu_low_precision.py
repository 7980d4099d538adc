"""bfloat16 / float16 CPU tensors on the C++ CPU backend (widened to fp32 at op entry).

Each op's forward and both gradients against the reference computed in fp32
(float64 here) from the same low-precision operands, on every instruction set
this CPU runs, forced one by one; tolerances are those of one rounding of the
result to the low-precision dtype.
"""

import warnings

import pytest
import torch

import freetickets_kernels as ftk

from conftest import (CONV_CASES, LINEAR_CASES, assert_close_scaled, random_conv_problem, random_layout,
                      random_values, run_op)
from test_cpu_backend import _isas

pytestmark = pytest.mark.skipif(
    "cpu" not in ftk.available_backends(), reason="C++ CPU extension not built"
)

TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=4e-3, atol=4e-3)}


def _compare(fn, inputs, dtype):
    low = [t.to(dtype) if t is not None else None for t in inputs]
    ref = run_op("reference", fn, [t.double() if t is not None else None for t in low])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftk.ReferenceBackendWarning)  # never the reference in disguise
        got = run_op("cpu", fn, low)
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype
        assert_close_scaled(g, r, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("out,inn,block,density,batch", LINEAR_CASES)
def test_linear(dtype, isa, out, inn, block, density, batch):
    from freetickets_kernels.backends import cpu

    cpu.set_isa(isa)
    layout = random_layout((out, inn), block, density)
    values = random_values(layout, dtype=torch.float32)
    _compare(lambda x, v, b: ftk.block_sparse_linear(x, v, layout, b),
             [torch.randn(batch, inn), values, torch.randn(out)], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cout,cin,kernel,block,density,batch,hw,stride,padding,dilation", CONV_CASES)
def test_conv2d(dtype, isa, fmt, cout, cin, kernel, block, density, batch, hw, stride, padding, dilation):
    from freetickets_kernels.backends import cpu

    cpu.set_isa(isa)
    layout, values, x = random_conv_problem(cout, cin, kernel, block, density, batch, hw, fmt)
    geo = (stride, padding, dilation)
    _compare(lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout, b, *geo), [x, values, torch.randn(cout)], dtype)


def test_low_precision_output_keeps_the_memory_format():
    layout = random_layout((8, 8, 3, 3), (4, 4), 0.5)
    values = random_values(layout, dtype=torch.bfloat16)
    x = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    with ftk.use_backend("cpu"):
        y = ftk.block_sparse_conv2d(x, values, layout, padding=1)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("view", ["every_other_row", "cropped", "expanded"])
def test_low_precision_strided_views_get_the_float32_layout(view):
    # the widened copy keeps a view's strides, so the float32 kernels pick the same output layout
    layout = random_layout((8, 8, 3, 3), (4, 4), 0.5)
    values = random_values(layout, dtype=torch.float32)
    views = {"every_other_row": lambda t: t[:, :, ::2], "cropped": lambda t: t[..., 1:11],
             "expanded": lambda t: t[:1, :, :6, :6].expand(3, 8, 6, 6)}
    base = torch.randn(2, 8, 12, 12).bfloat16().to(memory_format=torch.channels_last)
    x_low, x = views[view](base), views[view](base.float())  # the same view of each dtype
    assert x_low.stride() == x.stride()
    with ftk.use_backend("cpu"):
        want = ftk.block_sparse_conv2d(x, values.bfloat16().float(), layout, padding=1)
        got = ftk.block_sparse_conv2d(x_low, values.bfloat16(), layout, padding=1)
    assert got.stride() == want.stride()
    assert_close_scaled(got, want.double(), **TOL[torch.bfloat16])


def test_mixed_dtypes_are_an_error_at_the_extension_too():
    from freetickets_kernels.backends import cpu

    layout = random_layout((8, 8), (4, 4), 1.0)
    values = random_values(layout, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="x is BFloat16.*values|values is Float but x is BFloat16"):
        cpu.linear_forward(torch.randn(3, 8, dtype=torch.bfloat16), values, layout.indices.row_ptr,
                           layout.indices.col_idx, layout.indices.slot, None, 8)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpu.linear_forward(torch.randn(3, 8, dtype=torch.float64), values.double(), layout.indices.row_ptr,
                           layout.indices.col_idx, layout.indices.slot, None, 8)


def test_cpu_is_chosen_for_bf16_and_fp16_cpu_tensors():
    from freetickets_kernels import backends

    for dtype in (torch.bfloat16, torch.float16):
        assert backends.select(torch.device("cpu"), dtype).name == "cpu"
