"""The GEMM view the GPU backends share (backends/implicit_gemm.py): geometry, entries, splits."""

import re
from pathlib import Path

import pytest
import torch

from freetickets_kernels.backends.implicit_gemm import ConvProblem, Entries, split_count, stride_args, strides

from conftest import random_layout


def test_geometry_matches_the_kernels_arguments():
    prob = ConvProblem(n=2, cin=20, h=9, w=8, cout=12, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                       dilation=(1, 2))
    assert prob.out_hw == (5, 6)
    assert prob.out_pixels == 2 * 5 * 6 and prob.in_pixels == 2 * 9 * 8
    assert prob.blocks_per_tap(8) == 3
    # the Triton kernels' geometry arguments, by name (csrc/cuda's ConvGeometry fields, in lower case)
    assert prob.kernel_args(8) == dict(CIN=20, H=9, W=8, COUT=12, OH=5, OW=6, KH=3, KW=2, BLOCKS_PER_TAP=3,
                                       SH=2, SW=1, PH=1, PW=0, DH=1, DW=2)
    assert prob.conv_args() == dict(kernel_size=[3, 2], stride=[2, 1], padding=[1, 0], dilation=[1, 2])
    assert prob.block_grid((8, 8)) == (2, 6 * 3)


def test_one_geometry_vocabulary_in_python_triton_and_cuda():
    prob = ConvProblem(n=1, cin=4, h=3, w=3, cout=4)
    names = list(prob.kernel_args(2))
    # csrc/cuda/geometry.h declares the same fields once, in the same order, read off the tensors
    source = (Path(__file__).parents[1] / "csrc" / "cuda" / "geometry.h").read_text()
    struct = re.search(r"struct ConvGeometry \{(.*?)\};", source, re.S).group(1)
    fields = re.search(r"^\s*int (n, [^;]*);", struct, re.M).group(1).split(", ")
    assert fields == ["n"] + [name.lower() for name in names]
    assert re.search(r"int64_t sx\[4\];", struct) and re.search(r"int64_t sy\[4\];", struct)
    assert stride_args("x", torch.empty(2, 3)) == dict(sxn=3, sxc=1, sxh=0, sxw=0)
    triton_kernels = pytest.importorskip("freetickets_kernels.backends.triton.kernels")
    for kernel in (triton_kernels.forward_kernel, triton_kernels.grad_input_kernel,
                   triton_kernels.grad_blocks_kernel):
        args = kernel.arg_names
        geometry = [a for a in args if a in names]
        assert geometry == names, kernel  # every geometry argument, in the same order
        assert {f"s{side}{d}" for side in "xy" for d in "nchw"} <= set(args)


def test_linear_activations_are_one_by_one_images():
    x = torch.randn(5, 7)
    assert strides(x) == (7, 1, 0, 0)
    assert strides(x.t().contiguous().t()) == (1, 5, 0, 0)
    cl = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert strides(cl) == cl.stride()


def test_entries_list_live_blocks_in_bsr_order_and_every_block():
    layout = random_layout((40, 30), (8, 10), 0.5, seed=4)
    row_ptr, col_idx, slot = layout.indices.as_tuple()[:3]
    live = Entries.live(row_ptr, col_idx, slot)
    mask = layout.block_mask
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(live.rows.long(), rows) and torch.equal(live.cols.long(), cols)
    assert torch.equal(live.outs.long(), layout.slot_map[rows, cols])
    every = Entries.every((5, 3), "cpu")
    assert every.rows.tolist() == [r for r in range(5) for _ in range(3)]
    assert every.cols.tolist() == [0, 1, 2] * 5 and every.outs.tolist() == list(range(15))


def test_split_only_when_blocks_are_few_and_reductions_long():
    cpu = torch.device("cpu")  # stands in for a 4-processor GPU
    assert split_count(1000, 10**6, cpu) == 1  # enough blocks to fill the device
    assert split_count(1, 500, cpu) == 1  # too few pixels to split
    assert split_count(1, 4096, cpu) == 4  # a 1024-pixel floor per split
    assert split_count(2, 10**6, cpu) == 8  # 4 x processors programs in all
