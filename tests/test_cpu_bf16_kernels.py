"""The bf16 kernels of the C++ CPU backend (csrc/cpu/bf16_*): AMX, AVX512-BF16
and the scalar emulation of the AMX tile program, each forced in turn.

Every op's forward and both gradients against float64 from the same bf16
operands; tolerances of one bf16 rounding of the result.  The emulation runs
on every CPU, so the tile program's tiling and index math are checked where
AMX is absent; AMX and AVX512-BF16 run where the CPU has them.
"""

import warnings

import pytest
import torch

import freetickets_kernels as ftk

from conftest import assert_close_scaled, random_conv_problem, random_layout, random_values, run_op

pytestmark = pytest.mark.skipif(
    "cpu" not in ftk.available_backends(), reason="C++ CPU extension not built"
)

TOL = dict(rtol=2e-2, atol=2e-2)


def _kernels():
    if "cpu" not in ftk.available_backends():
        return ["amx_emulated"]
    from freetickets_kernels.backends import cpu

    return cpu.build_info().split("bf16_kernels=")[1].split()[0].split(",")


def _compare(fn, inputs):
    low = [t.bfloat16() if t is not None else None for t in inputs]
    ref = run_op("reference", fn, [t.double() if t is not None else None for t in low])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftk.ReferenceBackendWarning)
        got = run_op("cpu", fn, low)
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
            continue
        assert g.dtype == torch.bfloat16 and g.shape == r.shape
        assert_close_scaled(g, r, **TOL)


LINEAR_CASES = [
    # (out, in, block, density, batch): whole and ragged blocks, batch 1 and 0,
    # several row tiles and a tail, wide and tall blocks, density 0 and 1
    (64, 96, (32, 32), 0.5, 33),
    (100, 70, (32, 64), 0.6, 5),
    (256, 256, (64, 32), 0.3, 70),
    (64, 64, (32, 32), 0.0, 3),
    (96, 64, (32, 32), 1.0, 1),
    (64, 64, (32, 32), 1.0, 0),
    (128, 160, (64, 64), 0.4, 17),
    # sides that are multiples of 16, not 32: 16-wide sub-blocks, 16-deep terms, ragged edges and mixed sides
    (64, 96, (16, 16), 0.5, 33),
    (70, 50, (16, 16), 0.6, 5),
    (96, 80, (32, 16), 0.5, 17),
    (80, 64, (16, 32), 0.5, 40),
    (96, 96, (48, 16), 0.4, 9),
    # x smaller than the live blocks (most cases above with few tokens too): the weights-first forward,
    # two token tiles, the second of 8 tokens; an odd number of features (the last pair half padding)
    # and tokens that fill no whole 4 x 4 transpose of x's pairs
    (128, 64, (32, 32), 0.8, 40),
    (96, 45, (32, 32), 0.8, 3),
    (64, 77, (32, 32), 0.9, 21),
    # long reductions (600 tokens: 19 terms) over many blocks (about 150), and blocks of 64 (two channel
    # chunks of grad-values' B per block, 2 x 2 groups of rows and columns)
    (512, 512, (32, 32), 0.6, 600),
    (128, 192, (64, 64), 0.7, 700),
]


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("out,inn,block,density,batch", LINEAR_CASES)
def test_linear(kernel, out, inn, block, density, batch):
    from freetickets_kernels.backends import cpu

    assert cpu.set_isa(kernel) == kernel
    assert f"bf16={kernel}" in cpu.build_info()
    layout = random_layout((out, inn), block, density)
    values = random_values(layout, dtype=torch.float32)
    _compare(lambda x, v, b: ftk.block_sparse_linear(x, v, layout, b),
             [torch.randn(batch, inn), values, torch.randn(out)])


@pytest.mark.parametrize("kernel", _kernels())
def test_linear_strided_input(kernel):
    from freetickets_kernels.backends import cpu

    cpu.set_isa(kernel)
    layout = random_layout((64, 64), (32, 32), 0.5)
    values = random_values(layout, dtype=torch.float32)
    x = torch.randn(10, 128)[:, ::2]  # a column-strided view
    _compare(lambda x, v: ftk.block_sparse_linear(x, v, layout), [x, values])


def test_unavailable_kernels_say_why():
    from freetickets_kernels.backends import cpu

    lines = [line for line in torch.ops.freetickets_cpu.bf16_unavailable().splitlines() if line]
    for line in lines:
        name, why = line.split(": ", 1)
        assert name in ("amx", "avx512_bf16", "amx_emulated") and why
        with pytest.raises(RuntimeError, match=f"no '{name}' bf16 kernel here"):
            cpu.set_isa(name)


def test_float32_isa_widens_bf16():
    from freetickets_kernels.backends import cpu

    cpu.set_isa("portable")
    assert "bf16=widened" in cpu.build_info()


CONV_CASES = [
    # (cout, cin, kernel, block, density, batch, hw, stride, padding, dilation)
    (64, 64, (3, 3), (32, 32), 0.5, 2, (7, 6), (1, 1), (1, 1), (1, 1)),
    (64, 32, (3, 3), (32, 32), 0.6, 1, (9, 8), (2, 2), (1, 1), (1, 1)),
    # long reductions (2 x 22 x 22 padded pixels: 31 terms), stride 1 and 2, 16-wide input blocks (B's
    # columns at a chunk's second half)
    (64, 64, (3, 3), (32, 32), 0.6, 2, (20, 20), (1, 1), (1, 1), (1, 1)),
    (64, 32, (3, 3), (32, 16), 0.6, 2, (30, 29), (2, 2), (1, 1), (1, 1)),
    (40, 50, (3, 2), (32, 32), 0.6, 2, (8, 9), (2, 1), (0, 2), (2, 1)),
    (64, 96, (1, 1), (32, 32), 1.0, 2, (5, 5), (1, 1), (0, 0), (1, 1)),
    (96, 64, (1, 1), (32, 64), 0.7, 3, (6, 6), (2, 2), (0, 0), (1, 1)),
    # grad-input per stride phase of dx: phases no tap reaches (stride 3 > kernel 2: zero pixels), padding
    # past the kernel's reach (stride 1, one phase), dilation with stride
    (32, 32, (2, 2), (32, 32), 0.8, 1, (9, 10), (3, 3), (0, 1), (1, 1)),
    # a phase of one tap at offset 0 with fewer pixels than grad_out (not read in place: one row per pixel)
    (32, 32, (2, 2), (32, 32), 1.0, 2, (4, 4), (2, 2), (1, 1), (1, 1)),
    (32, 64, (1, 1), (32, 32), 0.8, 2, (5, 6), (1, 1), (1, 1), (1, 1)),
    (64, 32, (3, 3), (32, 16), 0.7, 1, (11, 10), (2, 3), (2, 1), (2, 2)),
    # strided 1x1s: the stride-1 conv of every stride-th pixel, grad-input into those pixels of a zeroed dx
    (64, 32, (1, 1), (32, 32), 0.6, 2, (7, 9), (2, 3), (0, 0), (1, 1)),
    (48, 64, (1, 1), (16, 32), 0.7, 1, (8, 5), (3, 1), (0, 0), (1, 1)),
    # live blocks that read some of the channel chunks only, the ragged last one among them, and empty
    # block rows (seed 0: rows 2 and 4; chunks 0, 1, 4 unread): each op's B and A hold the read chunks only
    (160, 200, (1, 1), (32, 32), 0.15, 2, (9, 9), (1, 1), (0, 0), (1, 1)),
    (96, 200, (3, 3), (32, 32), 0.05, 1, (7, 7), (1, 1), (1, 1), (1, 1)),
    (32, 32, (3, 3), (32, 32), 0.0, 1, (5, 5), (1, 1), (1, 1), (1, 1)),
    (70, 40, (3, 3), (64, 32), 0.5, 3, (9, 9), (1, 1), (2, 2), (2, 2)),
    (64, 64, (5, 5), (32, 32), 0.4, 1, (12, 11), (1, 1), (2, 2), (1, 1)),
    (32, 32, (3, 3), (32, 32), 1.0, 1, (1, 1), (1, 1), (1, 1), (1, 1)),
    # grad-values' grid a whole number of chunks (2 x 16 x 16 padded pixels) and taps of odd offset,
    # which read grad_out one pixel early: the lead and the last pixel of the reduction
    (64, 64, (3, 3), (32, 32), 0.6, 2, (14, 14), (1, 1), (1, 1), (1, 1)),
    # few input channels: cin * kw <= 32 folds a kernel row's taps into one reduction chunk
    # (ResNet's stem; dilated, ragged, strided, 64-wide blocks, exactly 32, one over)
    (64, 3, (7, 7), (32, 32), 0.5, 2, (23, 19), (2, 2), (3, 3), (1, 1)),
    (40, 4, (3, 5), (32, 32), 0.6, 1, (9, 11), (1, 1), (1, 2), (2, 1)),
    (64, 3, (3, 3), (64, 32), 0.7, 1, (10, 13), (2, 3), (1, 2), (1, 2)),
    (32, 16, (1, 2), (32, 32), 1.0, 1, (6, 7), (1, 2), (0, 1), (1, 1)),
    (32, 5, (3, 7), (32, 32), 0.6, 2, (9, 12), (1, 1), (1, 3), (1, 1)),
    # sides that are multiples of 16, not 32 (one-half sub-blocks, 16-deep terms; grad-values' 16-row
    # groups and channels at a chunk's second half): 3x3 stride 1 and 2, ragged, 1x1, mixed sides, stem
    (64, 64, (3, 3), (16, 16), 0.5, 2, (7, 6), (1, 1), (1, 1), (1, 1)),
    (48, 32, (3, 3), (16, 16), 0.6, 1, (9, 8), (2, 2), (1, 1), (1, 1)),
    (40, 50, (3, 2), (16, 16), 0.6, 2, (8, 9), (2, 1), (0, 2), (2, 1)),
    (64, 96, (1, 1), (16, 32), 0.7, 2, (5, 5), (1, 1), (0, 0), (1, 1)),
    (96, 64, (3, 3), (32, 16), 0.5, 1, (6, 6), (1, 1), (1, 1), (1, 1)),
    (96, 48, (1, 1), (48, 16), 0.6, 2, (6, 7), (1, 1), (0, 0), (1, 1)),
    (32, 3, (7, 7), (16, 16), 0.6, 1, (17, 15), (2, 2), (3, 3), (1, 1)),
]


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cout,cin,ksize,block,density,batch,hw,stride,padding,dilation", CONV_CASES)
def test_conv2d(kernel, fmt, cout, cin, ksize, block, density, batch, hw, stride, padding, dilation):
    from freetickets_kernels.backends import cpu

    cpu.set_isa(kernel)
    layout, values, x = random_conv_problem(cout, cin, ksize, block, density, batch, hw, fmt)
    geo = (stride, padding, dilation)
    _compare(lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout, b, *geo), [x, values, torch.randn(cout)])


STRIDED_VIEWS = {
    # name: (weight shape, stride, padding, channels-last base input, the view of it the op gets)
    "every_other_row": ((32, 32, 3, 3), 1, 1, (2, 32, 12, 12), lambda t: t[:, :, ::2]),
    "cropped": ((32, 32, 3, 3), 1, 1, (2, 32, 12, 12), lambda t: t[..., 1:7]),
    # NCHW bases (cropped, stride 1: channels by pixels, channel pairs zipped through the strides; every
    # other column, stride 2: the padded copy transposes planes with no unit stride at all)
    "nchw cropped": ((64, 48, 3, 3), 1, 1, (2, 48, 12, 40), lambda t: t.contiguous()[..., 1:37]),
    "nchw every_other_column": ((32, 32, 3, 3), 2, 1, (2, 32, 12, 24), lambda t: t.contiguous()[..., ::2]),
    "strided 1x1 cropped": ((64, 32, 1, 1), 2, 0, (2, 32, 12, 14), lambda t: t[..., 1:12]),
    "nchw strided 1x1 cropped": ((64, 32, 1, 1), 2, 0, (2, 32, 12, 14), lambda t: t.contiguous()[..., 1:12]),
    # few channels: the folded copy gathers through the strides (cropped: channels-last runs)
    "stem every_other_column": ((32, 3, 7, 7), 2, 3, (2, 3, 17, 24), lambda t: t[..., ::2]),
    "stem cropped": ((32, 3, 7, 7), 2, 3, (2, 3, 17, 24), lambda t: t[:, :, 2:15, 1:12]),
}


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("view", sorted(STRIDED_VIEWS))
def test_conv2d_strided_views(kernel, view):
    # a strided view is read through its strides; the output takes the float32 op's layout
    from freetickets_kernels.backends import cpu

    cpu.set_isa(kernel)
    weight_shape, stride, padding, base_shape, pick = STRIDED_VIEWS[view]
    layout = random_layout(weight_shape, (32, 32), 0.6)
    v = random_values(layout, dtype=torch.float32).bfloat16()
    base = torch.randn(base_shape).bfloat16().to(memory_format=torch.channels_last)
    x = pick(base)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    with ftk.use_backend("cpu"):
        got = ftk.block_sparse_conv2d(x, v, layout, None, stride, padding)
        layout_of_fp32 = ftk.block_sparse_conv2d(pick(base.float()), v.float(), layout, None, stride, padding).stride()
    with ftk.use_backend("reference"):
        want = ftk.block_sparse_conv2d(x.double(), v.double(), layout, None, stride, padding)
    assert got.dtype == torch.bfloat16 and got.stride() == layout_of_fp32
    assert_close_scaled(got, want, **TOL)


@pytest.mark.parametrize("kernel", _kernels())
def test_pointwise_conv_read_in_place_and_streamed_results(kernel):
    # a channels-last 1x1 conv whose channels fill its blocks is read in place; a result of more than
    # 4 MB is written with streaming stores where the kernel streams (AVX512-BF16; AMX stores plainly);
    # most output blocks have no live block (bias only)
    from freetickets_kernels.backends import cpu

    cpu.set_isa(kernel)
    layout, values, x = random_conv_problem(640, 64, (1, 1), (32, 32), 0.1, 4, (33, 31), "channels_last")
    assert layout.nnzb > 0 and 4 * 33 * 31 * 640 * 2 > 4 << 20
    _compare(lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout, b), [x, values, torch.randn(640)])
    # the same weights over views that are not the dense channels-last input: padded copies instead
    # (NCHW: a result of NCHW planes, its 32-pixel runs streamed where a line aligns)
    for view in (x[:, :, 1:], x[:, :, :, ::2], x.contiguous()):
        _compare(lambda x, v: ftk.block_sparse_conv2d(x, v, layout), [view, values])
