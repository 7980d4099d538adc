"""EDST / DST Ensemble training: the plan, the run, checkpoints and resume (tiny, CPU)."""

import os
import time

import pytest
import torch
from torch.utils.data import TensorDataset

from freetickets_kernels.app import checkpoint
from freetickets_kernels.app.training import PlanRunner, TrainConfig, baseline_twin, first_member_run
from freetickets_kernels.ensemble import edst_plan, step_lrs
from freetickets_kernels.models import SmallResNet


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].sum((1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].sum((1, 2)) > 0).long()
    return TensorDataset(x, y)


TRAIN, VAL = _data(96, 0), _data(32, 1)


def _config(**kw):
    base = dict(method="edst", epochs=7, explore_epochs=3, members=2, batch_size=32, density=0.3,
                block_size=4, update_interval=3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _runner(cfg, out):
    return PlanRunner(cfg, lambda: SmallResNet(4, 1, width=8), TRAIN, VAL, str(out), progress=False,
                      log=lambda s: None)


def test_edst_plan_phases_and_lrs():
    plan = edst_plan(epochs=10, explore_epochs=4, members=3, seed=5)
    assert [p.name for p in plan] == ["explore", "refine-1", "refine-2", "refine-3"]
    assert [p.epochs for p in plan] == [4, 2, 2, 2]
    assert plan[0].lrs == (0.1,) * 4 and not plan[0].member and plan[0].new_run
    for i, p in enumerate(plan[1:]):
        assert p.lrs == (0.01, 0.001) and p.member and not p.new_run
        assert p.explore == (i > 0)
    with pytest.raises(ValueError, match="multiple of members"):
        edst_plan(epochs=10, explore_epochs=3, members=3)


def test_step_lrs_drop_at_half_and_three_quarters():
    assert step_lrs(8, 0.1) == pytest.approx((0.1,) * 4 + (0.01,) * 2 + (0.001,) * 2)


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="lottery")
    with pytest.raises(ValueError, match="density"):
        TrainConfig(density=1.5)
    with pytest.raises(ValueError, match="block"):
        TrainConfig(block_size=0)


def test_edst_run_schedule(tmp_path, monkeypatch):
    calls = []
    from freetickets_kernels.dst import DynamicSparseTraining

    real = DynamicSparseTraining.explore
    monkeypatch.setattr(DynamicSparseTraining, "explore",
                        lambda self, q, growth=None: calls.append(q) or real(self, q, growth))
    result = _runner(_config(), tmp_path).run()
    assert [m["name"] for m in result.members] == ["refine-1", "refine-2"]
    assert calls == [0.8]                                   # one exploration: before refine-2
    assert result.counters["explorations"] == 1
    lrs = [(row["phase"], row["lr"]) for row in result.history]
    assert lrs == [("explore", 0.1)] * 3 + [("refine-1", 0.01), ("refine-1", 0.001), ("refine-2", 0.01),
                                             ("refine-2", 0.001)]
    # 3 steps per epoch, 21 steps, an update every 3 strictly before the end: steps 3, 6, ..., 18
    assert result.counters["steps"] == 21 and result.counters["updates"] == 6
    assert result.counters["dense_gradient_samples"] == 6 * 32 + 32   # + the exploration batch
    for member in result.members:
        assert os.path.exists(tmp_path / "members" / f"{member['name']}.pt")
    assert checkpoint.load(tmp_path / "checkpoint.pt")["done"]


def test_members_are_distinct_sparse_networks(tmp_path):
    runner = _runner(_config(), tmp_path)
    result = runner.run()
    a, b = (runner.member_model(m) for m in result.members)
    masks = [(name, m.layout.block_mask) for name, m in a.named_modules() if hasattr(m, "layout")]
    other = dict((name, m.layout.block_mask) for name, m in b.named_modules() if hasattr(m, "layout"))
    assert masks and any(not torch.equal(mask, other[name]) for name, mask in masks)


def test_dst_ensemble_members_are_independent_runs(tmp_path):
    result = _runner(_config(method="dst", epochs=2, members=2), tmp_path).run()
    assert [m["name"] for m in result.members] == ["member-1", "member-2"]
    assert result.counters["explorations"] == 0
    assert result.counters["steps"] == 2 * 2 * 3


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    whole = _runner(_config(), tmp_path / "whole").run()

    class Stop(Exception):
        pass

    def interrupt(row):
        if row["phase"] == "refine-1" and row["epoch"] == 1:  # mid-phase, before the first member
            raise Stop

    with pytest.raises(Stop):
        _runner(_config(), tmp_path / "cut").run(on_epoch_end=interrupt)
    seen = []
    resumed = _runner(_config(), tmp_path / "cut").run(resume=True, on_epoch_end=seen.append)
    assert [r["phase"] for r in seen] == ["refine-1", "refine-2", "refine-2"]
    assert len(resumed.members) == len(whole.members) == 2
    assert resumed.counters == whole.counters
    for a, b in zip(whole.members, resumed.members):
        assert a["epoch"] == b["epoch"]
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])
        for key in a["state"]:
            torch.testing.assert_close(a["state"][key], b["state"][key], rtol=1e-4, atol=1e-5)


def test_resume_after_a_member_keeps_it(tmp_path):
    class Stop(Exception):
        pass

    def interrupt(row):
        if row["phase"] == "refine-2":
            raise Stop

    with pytest.raises(Stop):
        _runner(_config(), tmp_path).run(on_epoch_end=interrupt)
    assert [m["name"] for m in checkpoint.load(tmp_path / "checkpoint.pt")["members"]] == ["refine-1"]
    result = _runner(_config(), tmp_path).run(resume=True)
    assert [m["name"] for m in result.members] == ["refine-1", "refine-2"]
    again = _runner(_config(), tmp_path).run(resume=True)  # a finished run is not redone
    assert [m["name"] for m in again.members] == ["refine-1", "refine-2"]


def test_existing_run_is_not_overwritten(tmp_path):
    _runner(_config(method="dense", epochs=1), tmp_path).run()
    with pytest.raises(FileExistsError, match="--resume"):
        _runner(_config(method="dense", epochs=1), tmp_path).run()


def test_resume_with_other_settings_is_refused(tmp_path):
    _runner(_config(method="dense", epochs=1), tmp_path).run()
    with pytest.raises(ValueError, match="density: saved 0.3, now 0.5"):
        _runner(_config(method="dense", epochs=1, density=0.5), tmp_path).run(resume=True)


def test_training_clock_leaves_out_checkpoint_writing(tmp_path, monkeypatch):
    # the time charged to a method is its training: a slow disk (every save 0.2 s) shows up in
    # checkpoint_seconds, not in seconds or the epochs' clock
    real_save, saves = checkpoint.save, []

    def slow_save(*args, **kwargs):
        saves.append(1)
        time.sleep(0.2)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    began = time.perf_counter()
    result = _runner(_config(method="dst", epochs=2), tmp_path).run()
    wall = time.perf_counter() - began
    assert len(saves) == 2 * 2 + 2  # a checkpoint per epoch, and each member's file
    assert result.checkpoint_seconds >= 0.2 * len(saves)
    assert result.seconds <= wall - 0.2 * len(saves)
    assert [row["seconds"] for row in result.history] == sorted(row["seconds"] for row in result.history)
    assert result.history[-1]["seconds"] <= result.seconds


def test_dense_baseline_is_the_dense_ensembles_first_member(tmp_path):
    # trained once: the baseline cut from a dense ensemble equals a dense run of the same settings
    ensemble = _runner(_config(method="dense-ensemble", epochs=2), tmp_path / "ens").run()
    dense_cfg = baseline_twin(ensemble.config)
    assert dense_cfg == _config(method="dense", epochs=2)
    cut = first_member_run(ensemble)
    alone = _runner(dense_cfg, tmp_path / "dense").run()
    assert cut.config == alone.config and cut.counters == alone.counters
    assert len(cut.history) == len(alone.history) == 2
    for key, value in alone.members[0]["state"].items():
        torch.testing.assert_close(cut.members[0]["state"][key], value, rtol=0, atol=0)
    assert 0 < cut.seconds < ensemble.seconds
    assert baseline_twin(_config(method="dst")) is None
    with pytest.raises(ValueError, match="does not hold the dense baseline"):
        first_member_run(alone)
