"""Atomic checkpoints, clear errors for damaged ones, and no half-loaded models."""

import os

import pytest
import torch
from torch import nn

import freetickets_kernels as ftk
from freetickets_kernels.app.checkpoint import CheckpointError, load, load_model_state, save


def _model():
    torch.manual_seed(0)
    return nn.Sequential(ftk.SparseLinear(16, 16, density=0.5, block_size=4), nn.ReLU(),
                         ftk.SparseLinear(16, 4, density=0.5, block_size=4))


def test_round_trip_of_model_optimizer_and_dst(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=2, growth="random", total_steps=10)
    x = torch.randn(8, 16)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        dst.step()
    path = tmp_path / "run" / "ckpt.pt"
    save({"model": model.state_dict(), "opt": opt.state_dict(), "dst": dst.state_dict()}, path)
    state = load(path)
    fresh = _model()
    load_model_state(fresh, state["model"])
    assert torch.equal(fresh(x), model(x))
    assert state["dst"]["steps"] == 3
    assert os.listdir(path.parent) == ["ckpt.pt"]  # no temporary files left


def test_truncated_or_garbage_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    save(_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(path)):
        load(path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")


class _Explodes:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save({"version": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        save({"version": 2, "boom": _Explodes()}, path)
    assert load(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_state_that_does_not_fit_leaves_the_model_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _model().state_dict()
    with torch.no_grad():
        state["0.values"] += 1.0  # would load fine ...
    state["2.slot_map"] = torch.zeros(2, 2, dtype=torch.int64)  # ... but this layer's layout is broken
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        load_model_state(model, state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_modules_refuse_density_zero():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ftk.SparseLinear(4, 4, density=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ftk.SparseConv2d(4, 4, 3, density=1.5)
