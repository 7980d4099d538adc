"""Property-based fuzzing: every available non-reference backend against the reference.

Hypothesis draws shapes, block sizes, densities, stride/padding/dilation and
batch sizes; forward, grad-input, grad-values and grad-bias must match the
float64 reference.  CI runs a fixed, derandomized budget; ``pytest --long``
runs a deeper one.
"""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import freetickets_kernels as ftk
from freetickets_kernels.backends import BACKENDS

from conftest import random_layout, random_values, run_op


def _targets():
    """(backend, device) for every available backend besides the reference: each new backend
    is fuzzed as soon as it is available, on CPU tensors or, with a GPU, on CUDA tensors."""
    out = []
    for name in ftk.available_backends():
        backend = BACKENDS[name]
        if name == "reference":
            continue
        if backend.supports(torch.device("cpu"), torch.float32):
            out.append((name, "cpu"))
        elif torch.cuda.is_available() and backend.supports(torch.device("cuda"), torch.float32):
            out.append((name, "cuda"))
    return out


TARGETS = _targets()
pytestmark = pytest.mark.skipif(not TARGETS, reason="no backend besides the reference is available")


def _interpreted(backend, device):
    """Triton on CPU tensors runs in Triton's interpreter: about a second per small case."""
    return backend == "triton" and device == "cpu"


@pytest.fixture(scope="module")
def budget(request):
    return 300 if request.config.getoption("--long") else 30


def _fuzz_settings(budget, backend, device):
    if _interpreted(backend, device):
        budget = max(1, budget // 4)
    return settings(max_examples=budget, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


def _small_enough(backend, device, layout):
    # the interpreter runs one program per block row/column: keep its grids small
    if _interpreted(backend, device):
        assume(layout.grid_shape[0] * layout.grid_shape[1] <= 48)


def _check(backend, device, fn, inputs):
    ref = run_op("reference", fn, [t.double() if t is not None else None for t in inputs])
    got = run_op(backend, fn, [t.to(device) if t is not None else None for t in inputs])
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g.double().cpu(), r, rtol=2e-4, atol=2e-4)


densities = st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.8, 1.0])


@st.composite
def linear_case(draw):
    out, inn = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    block = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    lead = draw(st.lists(st.integers(1, 20), min_size=1, max_size=2))
    return out, inn, block, draw(densities), tuple(lead), draw(st.booleans()), draw(st.integers(0, 2**16))


@st.composite
def conv_case(draw):
    cout, cin = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    block = (draw(st.integers(1, 20)), draw(st.integers(1, 20)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # spatial size at least the dilated kernel minus padding, so the output is non-empty
    hw = tuple(
        draw(st.integers(max(1, dilation[i] * (kernel[i] - 1) + 1 - 2 * padding[i]), 12)) for i in range(2)
    )
    batch = draw(st.integers(1, 3))
    channels_last = draw(st.booleans())
    return (cout, cin, kernel, block, draw(densities), batch, hw, stride, padding, dilation,
            draw(st.booleans()), channels_last, draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend,device", TARGETS)
def test_fuzz_linear(backend, device, budget):
    @_fuzz_settings(budget, backend, device)
    @given(linear_case())
    def run(case):
        out, inn, block, density, lead, with_bias, seed = case
        layout = random_layout((out, inn), block, density, seed=seed)
        _small_enough(backend, device, layout)
        values = random_values(layout, dtype=torch.float32, seed=seed + 1)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*lead, inn, generator=g)
        bias = torch.randn(out, generator=g) if with_bias else None
        _check(backend, device, lambda x, v, b: ftk.block_sparse_linear(x, v, layout.to(x.device), b),
               [x, values, bias])

    run()


@pytest.mark.parametrize("backend,device", TARGETS)
def test_fuzz_conv2d(backend, device, budget):
    @_fuzz_settings(budget, backend, device)
    @given(conv_case())
    def run(case):
        (cout, cin, kernel, block, density, batch, hw, stride, padding, dilation,
         with_bias, channels_last, seed) = case
        layout = random_layout((cout, cin, *kernel), block, density, seed=seed)
        _small_enough(backend, device, layout)
        values = random_values(layout, dtype=torch.float32, seed=seed + 1)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, cin, *hw, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bias = torch.randn(cout, generator=g) if with_bias else None
        geo = (stride, padding, dilation)
        _check(backend, device, lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout.to(x.device), b, *geo),
               [x, values, bias])

    run()
