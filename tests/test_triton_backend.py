"""The Triton backend against the reference backend.

Without a GPU these run in Triton's CPU interpreter (conftest sets
``TRITON_INTERPRET=1``), so shapes stay small; with a GPU the same tests run
compiled kernels on CUDA tensors.
"""

import pytest
import torch

import freetickets_kernels as ftk
from freetickets_kernels.backends import BACKENDS

from conftest import CONV_CASES, LINEAR_CASES, assert_close_scaled, random_layout, random_values, run_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not BACKENDS["triton"].supports(torch.device(DEVICE), torch.float32)
    or "triton" not in ftk.available_backends(),
    reason="Triton backend unavailable (no GPU and TRITON_INTERPRET unset, or triton missing)",
)

# fp32 results match a float64 reference closely; half types to a few output ulps
TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def _compare(fn, inputs, dtype=torch.float32):
    ref = run_op("reference", fn, [t.double() if t is not None else None for t in inputs])
    got = run_op("triton", fn, [t.to(DEVICE, dtype) if t is not None else None for t in inputs])
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.device.type == DEVICE
        assert_close_scaled(g, r, **TOLERANCE[dtype])


def _linear(layout):
    return lambda x, v, b: ftk.block_sparse_linear(x, v, layout.to(x.device), b)


def _conv(layout, stride, padding, dilation):
    return lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout.to(x.device), b, stride, padding, dilation)


@pytest.mark.parametrize("out,inn,block,density,batch", LINEAR_CASES)
def test_linear(out, inn, block, density, batch):
    layout = random_layout((out, inn), block, density)
    values = random_values(layout, dtype=torch.float32)
    _compare(_linear(layout), [torch.randn(batch, inn), values, torch.randn(out)])


@pytest.mark.parametrize("cout,cin,kernel,block,density,batch,hw,stride,padding,dilation", CONV_CASES)
def test_conv2d(cout, cin, kernel, block, density, batch, hw, stride, padding, dilation):
    layout = random_layout((cout, cin, *kernel), block, density)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(batch, cin, *hw)
    _compare(_conv(layout, stride, padding, dilation), [x, values, torch.randn(cout)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_fp32(dtype):
    layout = random_layout((40, 24, 3, 3), (16, 8), 0.5)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(2, 24, 6, 6)
    _compare(_conv(layout, 2, 1, 1), [x, values, torch.randn(40)], dtype)
    lin = random_layout((48, 40), (16, 16), 0.5)
    _compare(_linear(lin), [torch.randn(9, 40), random_values(lin, dtype=torch.float32), torch.randn(48)], dtype)


def test_channels_last_and_strided_inputs_are_read_in_place():
    layout = random_layout((32, 24, 3, 3), (16, 8), 0.5)
    values = random_values(layout, dtype=torch.float32).to(DEVICE)
    x = torch.randn(2, 24, 7, 7, device=DEVICE).to(memory_format=torch.channels_last)
    with ftk.use_backend("triton"):
        y = ftk.block_sparse_conv2d(x, values, layout.to(DEVICE), None, 1, 1)
    assert y.is_contiguous(memory_format=torch.channels_last)  # as torch's own conv
    _compare(_conv(layout, 1, 1, 1), [x, values, None])
    xt = torch.randn(2, 7, 24, 7).transpose(1, 2)  # neither NCHW nor NHWC
    _compare(_conv(layout, 1, 1, 1), [xt, values, None])
    lin = random_layout((20, 30), (8, 8), 0.5)
    xs = torch.randn(30, 6).t()  # a transposed (column-major) linear input
    _compare(_linear(lin), [xs, random_values(lin, dtype=torch.float32), None])


def test_grad_values_split_over_pixels():
    # one live block and many rows: the reduction is split across programs
    from freetickets_kernels.backends.implicit_gemm import split_count

    layout = random_layout((16, 16), (16, 16), 1.0)
    assert split_count(layout.nnzb, 4096, torch.device(DEVICE)) > 1
    values = random_values(layout, dtype=torch.float32)
    _compare(_linear(layout), [torch.randn(4096, 16), values, torch.randn(16)])


@pytest.mark.parametrize("rows,features,block", [(5, (33, 17), (8, 4)), (4096, (16, 20), (16, 16))])
def test_dense_grad_block_norms(rows, features, block):  # the second case splits the reduction
    layout = random_layout((20, 12, 3, 3), (8, 8), 0.4)
    x, gy = torch.randn(2, 12, 7, 6), torch.randn(2, 20, 4, 3)
    with ftk.use_backend("reference"):
        ref = ftk.ops.dense_grad_block_norms(x.double(), gy.double(), layout, 2, 1)
    with ftk.use_backend("triton"):
        got = ftk.ops.dense_grad_block_norms(x.to(DEVICE), gy.to(DEVICE), layout.to(DEVICE), 2, 1)
    torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-4, atol=1e-4)

    lin = random_layout(features, block, 0.6)
    x, gy = torch.randn(rows, features[1]), torch.randn(rows, features[0])
    with ftk.use_backend("reference"):
        ref = ftk.ops.dense_grad_block_norms(x.double(), gy.double(), lin)
    with ftk.use_backend("triton"):
        got = ftk.ops.dense_grad_block_norms(x.to(DEVICE), gy.to(DEVICE), lin.to(DEVICE))
    torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_blocks_wider_than_a_tile_and_128_wide():
    # PBO/PBI of 128 (and 96x80 padded to 128x128): one program's accumulator spans the whole block
    for shape, block, batch in (((256, 200), (128, 100), 9), ((130, 96), (96, 80), 5)):
        layout = random_layout(shape, block, 0.6)
        _compare(_linear(layout), [torch.randn(batch, shape[1]), random_values(layout, dtype=torch.float32),
                                   torch.randn(shape[0])])


def test_tuning_key_buckets_pixels_and_tells_memory_formats_apart():
    from freetickets_kernels.backends import triton as backend
    from freetickets_kernels.backends.triton import kernels

    nchw = torch.empty(2, 8, 5, 5)
    nhwc = nchw.to(memory_format=torch.channels_last)
    assert backend._tuning_args(50, nchw) == {"M_BUCKET": 64, "CHANNELS_INNER": 0}
    assert backend._tuning_args(33, nhwc) == {"M_BUCKET": 64, "CHANNELS_INNER": 1}
    assert backend._tuning_args(64, torch.empty(64, 8)) == {"M_BUCKET": 64, "CHANNELS_INNER": 1}
    assert backend._tuning_args(7, torch.empty(8, 7).t()) == {"M_BUCKET": 8, "CHANNELS_INNER": 0}
    with pytest.raises(ValueError, match="split the batch"):
        backend._tuning_args(2 ** 31, nchw)
    for kernel in (kernels.forward_kernel, kernels.grad_input_kernel, kernels.grad_blocks_kernel):
        assert {"M_BUCKET", "CHANNELS_INNER", "KH", "KW", "SH", "SW", "BO", "BI"} <= set(kernel.keys)
        assert "M" not in kernel.keys  # a new batch size reuses its bucket's tile
    assert "HAS_BIAS" in kernels.forward_kernel.keys


def test_autotuning_can_be_switched_off(monkeypatch):
    import triton

    from freetickets_kernels.backends.triton import tuning

    monkeypatch.setattr(tuning, "interpreted", lambda: False)  # as on a GPU
    configs = tuning.forward_configs()
    args = {"PBO": 32, "PBI": 32}
    assert len(tuning.prune(configs, args)) == len(configs)
    monkeypatch.setenv("FREETICKETS_TRITON_AUTOTUNE", "0")
    assert tuning.prune(configs, args) == configs[:1]
    monkeypatch.setenv("FREETICKETS_TRITON_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        tuning.prune(configs, args)
    assert isinstance(configs[0], triton.Config)


def test_empty_batch():
    layout = random_layout((16, 8, 3, 3), (8, 8), 0.5)
    values = random_values(layout, dtype=torch.float32).to(DEVICE)
    x = torch.randn(0, 8, 5, 5, device=DEVICE, requires_grad=True)
    v = values.clone().requires_grad_()
    with ftk.use_backend("triton"):
        y = ftk.block_sparse_conv2d(x, v, layout.to(DEVICE), None, 1, 1)
        y.sum().backward()
    assert y.shape == (0, 16, 5, 5)
    torch.testing.assert_close(v.grad, torch.zeros_like(values))


def test_refuses_float64():
    layout = random_layout((16, 16), (8, 8), 0.5)
    values = random_values(layout, dtype=torch.float64).to(DEVICE)
    with ftk.use_backend("triton"), pytest.raises(ValueError, match="does not handle torch.float64"):
        ftk.block_sparse_linear(torch.randn(2, 16, dtype=torch.float64, device=DEVICE), values,
                                layout.to(DEVICE))


def test_fp32_precision_follows_torch_tf32_flag():
    from freetickets_kernels.backends.triton.tuning import dot_precision

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.float16) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
