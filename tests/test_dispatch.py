"""Backend selection: forced by use_backend / FREETICKETS_BACKEND, clear errors, no silent fallback."""

import threading

import pytest
import torch

import freetickets_kernels as ftk
from freetickets_kernels import backends

from conftest import random_layout, random_values


def _linear_inputs(dtype=torch.float32):
    layout = random_layout((8, 8), (4, 4), 0.5)
    return torch.randn(2, 8, dtype=dtype), random_values(layout, dtype=dtype), layout


def test_reference_is_always_available():
    assert "reference" in ftk.available_backends()
    assert set(ftk.available_backends()) <= set(backends.BACKENDS)


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with ftk.use_backend("fast"):
            pass


def test_forcing_an_unavailable_backend_raises():
    unavailable = [n for n in backends.BACKENDS if n not in ftk.available_backends()]
    if not unavailable:
        pytest.skip("every backend is available here")
    x, v, layout = _linear_inputs()
    with ftk.use_backend(unavailable[0]):
        with pytest.raises(ftk.BackendUnavailableError, match="not available"):
            ftk.block_sparse_linear(x, v, layout)


def test_forced_backend_that_does_not_handle_the_device_raises():
    # triton/cuda handle CUDA tensors only (triton also CPU ones under TRITON_INTERPRET=1);
    # when available they must refuse the tensors they do not handle
    for name in ("triton", "cuda"):
        cpu_ok = backends.BACKENDS[name].supports(torch.device("cpu"), torch.float32)
        if name in ftk.available_backends() and not cpu_ok:
            x, v, layout = _linear_inputs()
            with ftk.use_backend(name), pytest.raises(ValueError, match="does not handle"):
                ftk.block_sparse_linear(x, v, layout)


@pytest.mark.skipif("cpu" not in ftk.available_backends(), reason="C++ CPU extension not built")
def test_forced_cpu_backend_refuses_float64():
    x, v, layout = _linear_inputs(torch.float64)
    with ftk.use_backend("cpu"), pytest.raises(ValueError, match="does not handle torch.float64"):
        ftk.block_sparse_linear(x, v, layout)


def test_environment_variable_forces_backend(monkeypatch):
    x, v, layout = _linear_inputs()
    monkeypatch.setenv("FREETICKETS_BACKEND", "reference")
    assert backends.select(torch.device("cpu"), torch.float32).name == "reference"
    monkeypatch.setenv("FREETICKETS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FREETICKETS_BACKEND"):
        ftk.block_sparse_linear(x, v, layout)
    with ftk.use_backend(None):  # use_backend(None) overrides the variable
        ftk.block_sparse_linear(x, v, layout)


def test_use_backend_nests_and_restores():
    with ftk.use_backend("reference"):
        assert backends.forced_backend()[0] == "reference"
        with ftk.use_backend(None):
            assert backends.forced_backend()[0] is None
        assert backends.forced_backend()[0] == "reference"
    assert backends.forced_backend()[0] in (None, backends.forced_backend()[0])


def test_use_backend_is_per_thread():
    seen = {}

    def worker():
        seen["other"] = backends.forced_backend()[0]

    with ftk.use_backend("reference"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert seen["other"] is None


def test_default_selection_by_device():
    name = backends.select(torch.device("cpu"), torch.float32).name
    assert name == ("cpu" if "cpu" in ftk.available_backends() else "reference")
    assert backends.select(torch.device("cpu"), torch.float64).name == "reference"


def test_describe_lists_every_backend_with_a_reason():
    rows = {r["backend"]: r for r in backends.describe()}
    assert set(rows) == {"reference", "cpu", "triton", "cuda"}
    for row in rows.values():
        assert row["status"]
        if row["available"] == "no":
            assert row["status"] != "available"
    if not torch.cuda.is_available():
        assert rows["cuda"]["available"] == "no"
