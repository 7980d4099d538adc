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

from conftest import assert_close_scaled, random_layout, random_values, run_op

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
