"""The C++ CPU backend against the reference backend, on every instruction set this CPU runs."""

import gc
import weakref

import pytest
import torch

import freetickets_kernels as ftk

from conftest import CONV_CASES, LINEAR_CASES, assert_close_scaled, random_layout, random_values, run_op

pytestmark = pytest.mark.skipif(
    "cpu" not in ftk.available_backends(), reason="C++ CPU extension not built"
)


def _isas():
    if "cpu" not in ftk.available_backends():
        return ["auto"]
    from freetickets_kernels.backends import cpu

    supported = cpu.build_info().split("supported=")[1].split()[0].split(",")
    return supported


FP32 = dict(rtol=1e-4, atol=1e-4)


def _compare(fn, inputs):
    ref = run_op("reference", fn, [t.double() if t is not None else None for t in inputs])
    got = run_op("cpu", fn, inputs)
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
            continue
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r.float(), **FP32)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("out,inn,block,density,batch", LINEAR_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(isa, out, inn, block, density, batch, with_bias):
    from freetickets_kernels.backends import cpu

    cpu.set_isa(isa)
    layout = random_layout((out, inn), block, density)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(batch, inn)
    bias = torch.randn(out) if with_bias else None
    _compare(lambda x, v, b: ftk.block_sparse_linear(x, v, layout, b), [x, values, bias])


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("cout,cin,kernel,block,density,batch,hw,stride,padding,dilation", CONV_CASES)
def test_conv2d(isa, cout, cin, kernel, block, density, batch, hw, stride, padding, dilation):
    from freetickets_kernels.backends import cpu

    cpu.set_isa(isa)
    layout = random_layout((cout, cin, *kernel), block, density)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(batch, cin, *hw)
    bias = torch.randn(cout)
    geo = (stride, padding, dilation)
    _compare(lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout, b, *geo), [x, values, bias])


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("hw,stride,padding,dilation", [
    ((3, 5), 1, 1, 1),    # rows narrower than a tile: a tile spans several rows, and images
    ((2, 25), 1, 3, 2),   # a tap's interval of inside pixels cut at both ends of a long row
    ((7, 13), 2, 2, 1),   # stride 2: a run's pixels 2 columns apart, cut by the padding
    ((5, 6), 1, 4, 1),    # padding wider than the kernel reach: whole runs read the zero row
])
def test_conv2d_tap_rows_at_the_edges(isa, hw, stride, padding, dilation):
    # forward and grad-input (NCHW read through its strides: the general path) and
    # channels_last: each tile's pixels, taps and padding as runs along the image rows
    from freetickets_kernels.backends import cpu

    cpu.set_isa(isa)
    layout = random_layout((32, 32, 3, 3), (32, 32), 0.8, seed=21)
    values = random_values(layout, dtype=torch.float32)
    for fmt in ("strided", "channels_last"):
        x = _in_format(torch.randn(3, 32, *hw), fmt)
        _compare(lambda x, v: ftk.block_sparse_conv2d(x, v, layout, None, stride, padding, dilation), [x, values])


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (32, 16), (48, 24)])
def test_linear_vector_widths_and_long_reduction(block):
    # wide blocks use the multi-vector panels; batch 600 crosses the 256-row reduction chunks
    layout = random_layout((130, 150), block, 0.5, seed=9)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(600, 150)
    _compare(lambda x, v: ftk.block_sparse_linear(x, v, layout), [x, values])


def _in_format(t, fmt):
    """``t`` in memory format ``fmt``; "strided": every other channel of a wider
    tensor, one column in: no memory format at all, read through its strides."""
    if fmt == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if fmt == "strided":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], t.shape[2], t.shape[3] + 1)
        wide[:, ::2, :, 1:] = t
        return wide[:, ::2, :, 1:]
    return t.contiguous()


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("kernel,stride,padding,hw,batch", [
    (3, 1, 1, (9, 9), 2),
    (3, 2, 1, (9, 8), 2),   # grad-input walks the transposed conv: some input pixels get no tap
    # pointwise on NCHW planes runs weights-first per image: planes of whole lines read
    # in place (reductions longer than 256 pixels); else padded, images shared out
    (1, 1, 0, (16, 20), 2),
    (1, 1, 0, (4, 5), 5),
    (1, 1, 0, (3, 3), 2),   # planes shorter than a vector: the general path
])
def test_conv2d_reads_and_writes_in_any_memory_format(isa, fmt, kernel, stride, padding, hw, batch):
    # Inputs are read in place through their strides (no NHWC copy) and results
    # written in place: NCHW through a transpose of each item's rows, channels_last directly.
    from freetickets_kernels.backends import cpu, reference

    cpu.set_isa(isa)
    layout = random_layout((40, 24, kernel, kernel), (16, 8), 0.6, seed=15)
    values = random_values(layout, dtype=torch.float32)
    idx = layout.indices
    geo = ([kernel] * 2, [stride] * 2, [padding] * 2, [1, 1])
    x = _in_format(torch.randn(batch, 24, *hw), fmt)
    bias = torch.randn(40)
    y = cpu.conv2d_forward(x, values, idx.row_ptr, idx.col_idx, idx.slot, bias, 40, *geo)
    want = reference.conv2d_forward(x.double(), values.double(), idx.row_ptr, idx.col_idx, idx.slot,
                                    bias.double(), 40, *geo)
    torch.testing.assert_close(y, want.float(), **FP32)
    channels_last = fmt == "channels_last"
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    dy = _in_format(torch.randn(y.shape), fmt)
    dx = cpu.conv2d_grad_input(dy, values, idx.col_ptr, idx.row_idx, idx.tslot, list(x.shape), *geo)
    want = reference.conv2d_grad_input(dy.double(), values.double(), idx.col_ptr, idx.row_idx, idx.tslot,
                                       list(x.shape), *geo)
    torch.testing.assert_close(dx, want.float(), **FP32)
    assert dx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    dv = cpu.conv2d_grad_values(dy, x, idx.row_ptr, idx.col_idx, idx.slot, list(layout.block_size), *geo)
    want = reference.conv2d_grad_values(dy.double(), x.double(), idx.row_ptr, idx.col_idx, idx.slot,
                                        list(layout.block_size), *geo)
    torch.testing.assert_close(dv, want.float(), **FP32)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("kernel,padding,dilation", [((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (2, 2)),
                                                     ((1, 3), (0, 1), (1, 1)), ((3, 3), (0, 0), (1, 1))])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("hw", [(12, 15), (4, 70)])
def test_conv2d_stride1_nchw_on_padded_planes(isa, kernel, padding, dilation, batch, hw):
    # stride-1 NCHW convs with fewer input channels than a block, whose maps outweigh the
    # live values, run weights-first on each image zero-padded into scratch (batch 5:
    # images shared among threads), writing each output row from its padded input rows;
    # a ragged output block, output rows (13-15 long) of no whole number of vectors, and
    # rows (68-70) longer than one column block of 64
    from freetickets_kernels.backends import cpu

    cpu.set_isa(isa)
    layout = random_layout((20, 6, *kernel), (8, 8), 0.5, seed=8)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(batch, 6, *hw)
    _compare(lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout, b, 1, padding, dilation),
             [x, values, torch.randn(20)])


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1)])
@pytest.mark.parametrize("planes", ["contiguous", "every_other"])
def test_conv2d_nchw_images_packed_channels_last(isa, stride, padding, dilation, planes):
    # With whole images per thread (5 images, 2 threads) stride-1 forwards and every
    # grad-input read each NCHW image through a channels-last copy in scratch; the
    # strided forward reads in place.  Ragged channel blocks (20 = 16 + 4, 36 = 32 + 4);
    # "every_other": a channel slice, planes twice their size apart
    from freetickets_kernels.backends import cpu, reference

    cpu.set_isa(isa)
    layout = random_layout((36, 20, 3, 3), (32, 16), 0.6, seed=22)
    values = random_values(layout, dtype=torch.float32)
    idx = layout.indices
    geo = ([3, 3], [stride] * 2, [padding] * 2, [dilation] * 2)

    def nchw(n, c, h, w):
        t = torch.randn(n, 2 * c if planes == "every_other" else c, h, w)
        return t[:, ::2] if planes == "every_other" else t

    x, bias = nchw(5, 20, 11, 13), torch.randn(36)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = cpu.conv2d_forward(x, values, idx.row_ptr, idx.col_idx, idx.slot, bias, 36, *geo)
        dy = nchw(*y.shape)
        dx = cpu.conv2d_grad_input(dy, values, idx.col_ptr, idx.row_idx, idx.tslot, list(x.shape), *geo)
    finally:
        torch.set_num_threads(before)
    want = reference.conv2d_forward(x.double(), values.double(), idx.row_ptr, idx.col_idx, idx.slot,
                                    bias.double(), 36, *geo)
    torch.testing.assert_close(y, want.float(), **FP32)
    want = reference.conv2d_grad_input(dy.double(), values.double(), idx.col_ptr, idx.row_idx, idx.tslot,
                                       list(x.shape), *geo)
    torch.testing.assert_close(dx, want.float(), **FP32)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("batch,hw", [(8, 64), (54, 24)])
def test_conv2d_large_nchw_output(isa, batch, hw):
    # 6 MB of NCHW output, more than 2 threads' L2 here.  64x64: rows of 64 on padded
    # planes, written in place; 24x24: packed channels-last, staged results written
    # out with non-temporal stores on AVX-512 (where aligned)
    from freetickets_kernels.backends import cpu

    cpu.set_isa(isa)
    layout = random_layout((48, 16, 3, 3), (16, 16), 0.5, seed=4)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(batch, 16, hw, hw)
    fn = lambda x, v: ftk.block_sparse_conv2d(x, v, layout, None, 1, 1)  # noqa: E731
    ref = run_op("reference", fn, [x.double(), values.double()])
    got = run_op("cpu", fn, [x, values])
    for g, r in zip(got, ref):  # grad-values sums 32768 products: scale atol by magnitude
        assert_close_scaled(g, r, **FP32)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_conv_grad_input_has_the_memory_format_of_x(backend):
    # y.sum()'s grad is an expanded tensor of no memory format: the backward puts it
    # in y's, so dx comes back in x's (else AccumulateGrad copies it, 3x the op's time)
    layout = random_layout((32, 16, 3, 3), (16, 16), 0.5, seed=3)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    with ftk.use_backend(backend):
        (dx,) = torch.autograd.grad(ftk.block_sparse_conv2d(x, values, layout, None, 1, 1).sum(), x)
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("grad_format", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((3, 24, 9, 9), 3, 1, 1),   # long enough to split the reduction among threads
    ((2, 24, 7, 1), (3, 1), 1, (1, 0)),  # one output column: rows step the pixels
    ((2, 24, 6, 6), 1, 1, 0),   # pointwise: the linear path over pixels
])
def test_conv2d_grad_values_reads_any_grad_out_layout(grad_format, shape, kernel, stride, padding):
    from freetickets_kernels.backends import cpu, reference

    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    pad = (padding, padding) if isinstance(padding, int) else padding
    layout = random_layout((40, 24) + kernel, (16, 8), 0.5, seed=21)
    x = torch.randn(shape)
    out_hw = [shape[2] + 2 * pad[0] - kernel[0] + 1, shape[3] + 2 * pad[1] - kernel[1] + 1]
    dy = torch.randn(shape[0], 40, *out_hw)
    if grad_format == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    elif grad_format == "strided":
        dy = torch.randn(shape[0], 80, *out_hw)[:, ::2]
    idx = layout.indices
    args = (idx.row_ptr, idx.col_idx, idx.slot, list(layout.block_size), list(kernel), [stride] * 2, list(pad), [1, 1])
    got = cpu.conv2d_grad_values(dy, x, *args)
    want = reference.conv2d_grad_values(dy.double(), x.double(), *args)
    torch.testing.assert_close(got, want.float(), **FP32)


def test_cpu_is_default_for_float32_cpu_tensors():
    from freetickets_kernels import backends

    assert backends.select(torch.device("cpu"), torch.float32).name == "cpu"
    assert backends.select(torch.device("cpu"), torch.float64).name == "reference"


def test_results_do_not_depend_on_thread_count():
    layout = random_layout((96, 80, 3, 3), (16, 16), 0.4)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(3, 80, 10, 10)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(run_op("cpu", lambda x, v: ftk.block_sparse_conv2d(x, v, layout, None, 1, 1), [x, values]))
    finally:
        torch.set_num_threads(before)
    # no races: the same sums, though a long reduction split among more threads
    # adds its partial sums in another order (fp32 rounding only)
    for a, b in zip(*outs):
        assert_close_scaled(a, b.double(), rtol=1e-5, atol=1e-5)


def test_corrupted_indices_raise_instead_of_crashing():
    layout = random_layout((16, 16), (4, 4), 0.5)
    values = random_values(layout, dtype=torch.float32)
    ix = layout.indices
    bad_col = ix.col_idx.clone()
    bad_col[0] = 99
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.freetickets_cpu.linear_forward(torch.randn(2, 16), values, ix.row_ptr, bad_col, ix.slot, None, 16)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.freetickets_cpu.linear_forward(torch.randn(2, 16), values, ix.row_ptr.long(), ix.col_idx, ix.slot, None, 16)


def test_unknown_isa_is_a_clear_error():
    from freetickets_kernels.backends import cpu

    with pytest.raises(RuntimeError, match="unknown instruction set"):
        cpu.set_isa("sse9")


@pytest.mark.parametrize("rows", [255, 256, 700])
def test_forward_transposes_values_up_front_or_on_the_fly(rows):
    # below 256 output rows the forward transposes blocks per thread, from 256 up front
    layout = random_layout((72, 40), (32, 16), 0.6, seed=12)
    values = random_values(layout, dtype=torch.float32)
    _compare(lambda x, v: ftk.block_sparse_linear(x, v, layout), [torch.randn(rows, 40), values])
    clayout = random_layout((40, 24, 3, 3), (16, 8), 0.5, seed=13)
    cvalues = random_values(clayout, dtype=torch.float32)
    side = int(rows ** 0.5) + 1  # N*OH*OW straddles the switch
    x = torch.randn(1, 24, side, side)
    _compare(lambda x, v: ftk.block_sparse_conv2d(x, v, clayout, None, 1, 1), [x, cvalues])


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("tokens", [16, 20, 64, 70])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_weights_first_path_for_few_tokens(isa, tokens, with_bias):
    # many live values: up to 64 tokens the forward computes Y^T = W X^T (values as
    # stored; 20 tokens: X^T rows padded to whole lines, a ragged vector); beyond,
    # each thread transposes its group of blocks (70 tokens)
    from freetickets_kernels.backends import cpu

    cpu.set_isa(isa)
    layout = random_layout((200, 300), (16, 16), 0.9, seed=14)
    values = random_values(layout, dtype=torch.float32)
    assert tokens * (200 + 300) < layout.nnzb * 16 * 16
    bias = torch.randn(200) if with_bias else None
    _compare(lambda x, v, b: ftk.block_sparse_linear(x, v, layout, b), [torch.randn(tokens, 300), values, bias])


@pytest.mark.parametrize("kernel,padding", [(3, 1), (1, 0)])
def test_conv_keeps_no_reference_to_its_input(kernel, padding):
    # regression: threads sharing out the images ran their views and copies above
    # autograd, so copying an input that requires grad into a scratch buffer recorded
    # history there, which kept every call's input alive (~0.1 GB per ResNet-50 step)
    conv = ftk.SparseConv2d(16, 16, kernel, padding=padding, density=0.5, block_size=8)
    x = torch.randn(8, 16, 20, 20, requires_grad=True)  # 8 images: shared out among threads
    alive = weakref.ref(x)
    conv(x).sum().backward()
    del x
    gc.collect()
    assert alive() is None


def test_scratch_first_allocated_under_inference_mode_is_reusable_outside():
    # regression: per-thread scratch first allocated inside torch.inference_mode() was an
    # inference tensor, and the next call made outside inference mode failed to write to it
    torch.manual_seed(0)
    conv = ftk.SparseConv2d(8, 8, 3, padding=1, density=0.5, block_size=4)
    big = torch.randn(64, 8, 40, 40)  # larger than anything earlier tests left in scratch
    with torch.inference_mode():
        conv(big)
    out = conv(big.requires_grad_())
    out.sum().backward()
    assert big.grad is not None


def test_nan_weights_with_padding_reach_the_padded_outputs():
    # documented in docs/library.md ("NaN and Inf in the weights, with padding"): the CPU kernels
    # multiply the zero padding (0 x NaN = NaN), torch skips padded taps; everywhere torch gives
    # NaN we do too, and without NaN the two agree
    torch.manual_seed(0)
    conv = ftk.SparseConv2d(8, 8, 3, padding=1, density=1.0, block_size=4)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        with ftk.use_backend("cpu"):
            clean = conv(x)
        torch.testing.assert_close(clean, torch.nn.functional.conv2d(x, conv.weight.clone(), conv.bias, padding=1),
                                   rtol=1e-4, atol=1e-4)
        conv.values[0, 0, 0] = float("nan")
        with ftk.use_backend("reference"):
            torch_nan = torch.isnan(conv(x))
        with ftk.use_backend("cpu"):
            ours_nan = torch.isnan(conv(x))
    assert torch_nan.any() and (ours_nan | ~torch_nan).all()  # ours covers torch's NaNs
    assert ours_nan.sum() > torch_nan.sum()                    # and the padded taps' too
