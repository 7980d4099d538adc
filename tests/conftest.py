"""Shared helpers: random block-sparse weights, and running an op on a backend."""

import os
import subprocess
import sys


def _gpu_visible() -> bool:
    # asked in a child process: importing torch here would import Triton too early
    probe = "import torch; print(torch.cuda.is_available())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() == "True"


# Without a GPU the Triton kernels run in Triton's CPU interpreter (slowly), so
# tests/test_triton_backend.py checks them here.  Triton reads the variable when
# it is imported (torch imports it), so this precedes every import of torch.
if "TRITON_INTERPRET" not in os.environ and not _gpu_visible():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import freetickets_kernels as ftk  # noqa: E402
from freetickets_kernels.layout import BlockSparseLayout  # noqa: E402
from freetickets_kernels.testing import assert_close_scaled, run_op  # noqa: E402,F401  (the tests import them from here)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="deeper property-based fuzzing (tests/test_fuzz.py)")


def random_layout(weight_shape, block_size, density, seed=0, device="cpu"):
    """A layout over ``weight_shape`` with about ``density`` of its blocks alive, in shuffled slots."""
    g = torch.Generator().manual_seed(seed)
    kernel = tuple(weight_shape[2:]) if len(weight_shape) == 4 else None
    grid = BlockSparseLayout.grid_for(weight_shape, block_size)
    mask = torch.rand(grid, generator=g) < density
    slot_map = torch.full(grid, -1, dtype=torch.int64)
    slot_map[mask] = torch.randperm(int(mask.sum()), generator=g)  # slots need not follow BSR order
    layout = BlockSparseLayout(slot_map, weight_shape[0], weight_shape[1], block_size, kernel)
    return layout.to(device)


def random_values(layout, dtype=torch.float64, seed=1, device="cpu"):
    """Random block values with the ragged padding zero, as :meth:`pack` makes them."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(layout.weight_shape, generator=g, dtype=torch.float64)
    return layout.pack(dense.to(device)).to(dtype)


def random_conv_problem(cout, cin, kernel, block, density, batch, hw, fmt="contiguous"):
    """``(layout, fp32 values, input)`` of a random conv: ``fmt`` is "contiguous" or "channels_last"."""
    layout = random_layout((cout, cin, *kernel), block, density)
    x = torch.randn(batch, cin, *hw)
    if fmt == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return layout, random_values(layout, dtype=torch.float32), x


@pytest.fixture(autouse=True)
def _restore_cpu_isa():
    yield
    if "cpu" in ftk.available_backends():
        from freetickets_kernels.backends import cpu

        cpu.set_isa("auto")


LINEAR_CASES = [
    # (out, in, block, density, batch): ragged both ways, batch 1, density 0 and 1
    (10, 7, (4, 3), 0.5, 5),
    (64, 96, (32, 32), 0.3, 33),
    (33, 17, (8, 4), 0.6, 1),
    (48, 40, (16, 16), 1.0, 6),
    (40, 40, (16, 16), 0.0, 5),
    (50, 70, (5, 24), 0.5, 7),
    (9, 6, (1, 1), 0.4, 3),
]

CONV_CASES = [
    # (cout, cin, kernel, block, density, batch, hw, stride, padding, dilation)
    (12, 6, (3, 3), (4, 4), 0.5, 2, (7, 6), (1, 1), (1, 1), (1, 1)),
    (20, 12, (3, 3), (8, 8), 0.4, 1, (9, 8), (2, 2), (1, 1), (1, 1)),
    (17, 5, (3, 2), (4, 3), 0.6, 2, (8, 9), (2, 1), (0, 2), (2, 1)),
    (16, 16, (1, 1), (8, 8), 1.0, 2, (5, 5), (1, 1), (0, 0), (1, 1)),
    (8, 8, (3, 3), (4, 4), 0.0, 1, (5, 5), (1, 1), (1, 1), (1, 1)),
    (10, 7, (3, 3), (4, 4), 0.5, 3, (9, 9), (1, 1), (2, 2), (2, 2)),
    # 1x1 output and a single output channel: NHWC and NCHW coincide
    (1, 3, (3, 3), (1, 2), 1.0, 2, (3, 3), (1, 1), (0, 0), (1, 1)),
    (1, 1, (1, 1), (1, 1), 0.0, 1, (1, 1), (1, 1), (0, 0), (1, 1)),
]
