"""``freetickets train`` validates every flag, the run directory and the checkpoint to resume before it
trains: each bad input exits 2 in one line, nothing trained, nothing left that blocks a new start."""

import json
from unittest import mock

import pytest
import torch

from freetickets_kernels.app import checkpoint
from freetickets_kernels.app.cli import main
from freetickets_kernels.app.training import PlanRunner

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = ["train", "--model", "tiny-resnet", "--epochs", "3", "--explore-epochs", "1", "--members", "2",
        "--block-size", "8", "--update-interval", "5", "--method", "edst", "--latency-repeats", "2", "--quiet"]


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exit:  # argparse rejects a value before main() runs
        return exit.code


def _fails_fast(argv, capsys, message):
    # fast = refused before any run starts training (a check, not a timing: CI machines vary)
    with mock.patch.object(PlanRunner, "run", side_effect=AssertionError("a run started before the refusal")):
        assert _exit_code(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert message in err[-1], err
    assert "Traceback" not in captured.err
    assert "epoch" not in captured.out  # nothing trained
    return err[-1]


@pytest.mark.parametrize("flags, message", [
    (["--prune-rate", "1.5"], "--prune-rate: must be in [0, 1]"),
    (["--prune-rate", "-1"], "--prune-rate: must be in [0, 1]"),
    (["--prune-rate", "nan"], "--prune-rate: must be a finite number"),
    (["--explore-fraction", "2"], "--explore-fraction: must be in [0, 1]"),
    (["--lr", "0"], "--lr: must be a positive number"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--momentum", "1"], "--momentum: must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay: must be a non-negative number"),
    (["--epochs", "x"], "--epochs: must be a positive integer"),
    (["--density", "abc"], "density must be in (0, 1]"),
])
def test_bad_flags_fail_before_training(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    _fails_fast(TINY + ["--out", str(out)] + flags, capsys, message)
    assert not out.exists()
    # the same directory then takes a valid run: nothing blocks it
    assert main(TINY + ["--method", "dense", "--epochs", "1", "--out", str(out)]) == 0


def test_out_that_is_a_file_or_unwritable_fails_before_training(tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    _fails_fast(TINY + ["--out", str(afile)], capsys, "is not a directory")
    _fails_fast(TINY + ["--out", str(afile / "sub")], capsys, "is not a directory")
    assert afile.read_text() == "x"
    _fails_fast(TINY + ["--out", "/proc/self/ftk-run"], capsys, "is not writable")


def test_resume_of_a_directory_that_does_not_exist_is_refused(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    _fails_fast(TINY + ["--resume", "--out", str(missing)], capsys, "holds no run to continue")
    assert not missing.exists()


def test_bench_out_that_is_a_file_fails_before_the_suite(tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    for suite in ("models", "kernels", "all"):
        _fails_fast(["bench", suite, "--quick", "--out", str(afile)], capsys, "is not a directory")


def test_changed_settings_on_resume_are_refused_before_the_baseline_trains(tmp_path, capsys):
    # an ensemble checkpoint with other settings: refused before the dense baseline trains again
    assert main(TINY + ["--no-baseline", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "results.json").unlink()
    _fails_fast(TINY + ["--resume", "--prune-rate", "0.3", "--out", str(tmp_path)], capsys,
                "prune_rate: saved 0.5, now 0.3")
    assert not (tmp_path / "dense").exists()
    # and a second start into a directory whose ensemble holds a run is refused up front
    _fails_fast(TINY + ["--out", str(tmp_path)], capsys, "--resume")
    assert not (tmp_path / "dense").exists()


# ------------------------------------------------------------ resume: every field checked
ARGS = TINY + ["--method", "dst", "--no-baseline", "--epochs", "2", "--members", "2"]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A DST run (2 members x 2 epochs) whose checkpoint is rewound to phase 1, epoch 1: mid-run."""
    out = tmp_path_factory.mktemp("interrupted")
    snapshots = []
    original = checkpoint.save

    def keep(obj, path):
        original(obj, path)
        if str(path).endswith("checkpoint.pt"):
            snapshots.append(checkpoint.load(path))

    checkpoint.save = keep
    try:
        assert main(ARGS + ["--out", str(out)]) == 0
    finally:
        checkpoint.save = original
    state = next(s for s in snapshots if s["phase"] == 1 and s["epoch"] == 1)
    return out, state


def _with(state, path, value):
    import copy

    state = copy.deepcopy(state)
    *head, last = path
    target = state
    for key in head:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return state


@pytest.mark.parametrize("path, value, field", [
    (("phase",), 99, "'phase'"),
    (("phase",), -1, "'phase'"),
    (("epoch",), -3, "'epoch'"),
    (("epoch",), 10 ** 6, "'epoch'"),
    (("epoch",), "1", "'epoch'"),
    (("config",), KeyError, "'config'"),
    (("members",), "abc", "'members'"),
    (("members",), [], "'members'"),
    (("members", 0, "state"), None, "'members[0].state'"),
    (("members", 0, "val_accuracy"), float("nan"), "'members[0].val_accuracy'"),
    (("best",), None, "'best'"),
    (("counters",), {"steps": 1}, "'counters'"),
    (("counters", "steps"), 10 ** 9, "'counters.steps'"),
    (("history",), [], "'history'"),
    (("seconds",), -1.0, "'seconds'"),
    (("done",), "no", "'done'"),
    (("model",), None, "'model'"),
    (("model", "conv1.values"), torch.zeros(1), "'model'"),
    (("optimizer",), {"state": {}, "param_groups": []}, "'optimizer'"),
    (("dst", "steps"), -10 ** 9, "'dst.steps'"),
    (("dst", "steps"), 10 ** 6, "'dst.steps'"),
    (("dst", "generator"), torch.zeros(3, dtype=torch.uint8), "'dst'"),
    (("dst",), KeyError, "'dst'"),
])
def test_each_bad_checkpoint_field_is_exit_2_naming_it(interrupted_run, tmp_path, capsys, path, value, field):
    out, state = interrupted_run
    if path == ("model", "conv1.values") and "conv1.values" not in state["model"]:
        path = ("model", next(k for k in state["model"] if k.endswith(".values")))
    bad = _with(state, path, value)
    checkpoint.save(bad, tmp_path / "dst" / "checkpoint.pt")
    message = _fails_fast(ARGS + ["--resume", "--out", str(tmp_path)], capsys, field)
    assert str(tmp_path / "dst" / "checkpoint.pt") in message
    assert _exit_code(ARGS + ["--resume", "--out", str(tmp_path)]) == 2  # still refused, file kept


def test_bad_optimizer_state_is_named(interrupted_run, tmp_path, capsys):
    out, state = interrupted_run
    bad = _with(state, ("optimizer", "state", 0, "momentum_buffer"), torch.zeros(2))
    checkpoint.save(bad, tmp_path / "dst" / "checkpoint.pt")
    _fails_fast(ARGS + ["--resume", "--out", str(tmp_path)], capsys, "'optimizer.state[0].momentum_buffer'")
    bad = _with(state, ("optimizer", "param_groups", 0, "weight_decay"), 0.5)
    checkpoint.save(bad, tmp_path / "dst" / "checkpoint.pt")
    _fails_fast(ARGS + ["--resume", "--out", str(tmp_path)], capsys, "'optimizer.param_groups'")


def test_resume_rewrites_damaged_or_missing_members_and_removes_temporaries(interrupted_run, tmp_path, capsys):
    out, state = interrupted_run
    checkpoint.save(state, tmp_path / "dst" / "checkpoint.pt")
    members = tmp_path / "dst" / "members"
    members.mkdir()
    name = state["members"][0]["name"]
    (members / f"{name}.pt").write_bytes(b"damaged")
    stale = [tmp_path / "dst" / ".checkpoint.pt.abc123.tmp", members / f".{name}.pt.xyz.tmp"]
    for tmp in stale:
        tmp.write_bytes(b"left by a kill between fsync and rename")
    assert main(ARGS + ["--resume", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"{name}.pt is damaged" in text and "rewritten from" in text
    assert not any(t.exists() for t in stale)
    saved = checkpoint.load(members / f"{name}.pt")
    assert saved["epoch"] == state["members"][0]["epoch"]
    # the resumed run ends where the uninterrupted one ended
    assert json.loads((tmp_path / "results.json").read_text())["rows"][-1]["accuracy"] == \
        json.loads((out / "results.json").read_text())["rows"][-1]["accuracy"]
    # a missing member file of a finished run is rewritten too
    (members / f"{name}.pt").unlink()
    assert main(ARGS + ["--resume", "--out", str(tmp_path)]) == 0
    assert f"{name}.pt is missing" in capsys.readouterr().out
    assert checkpoint.load(members / f"{name}.pt")["name"] == name


def test_resume_from_a_corrupted_checkpoint_is_refused(interrupted_run, tmp_path, capsys):
    out, state = interrupted_run
    path = tmp_path / "dst" / "checkpoint.pt"
    checkpoint.save(state, path)
    data = bytearray(path.read_bytes())
    at = int(len(data) * 0.3)
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    path.write_bytes(bytes(data))
    message = _fails_fast(ARGS + ["--resume", "--out", str(tmp_path)], capsys, "checksum")
    assert str(path) in message and "weights_only" not in message
    assert not (tmp_path / "results.json").exists()


def test_settings_the_library_refuses_fail_before_the_baseline(tmp_path, capsys):
    # density 1 leaves no block-sparse layer for DST: refused before the dense baseline trains
    _fails_fast(TINY + ["--density", "1", "--out", str(tmp_path / "run")], capsys, "cannot start the edst run")
    assert not (tmp_path / "run").exists()
