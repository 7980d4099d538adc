"""Checkpoints detect corruption (a SHA-256 of the payload beside it), every damaged file is a
CheckpointError that names it, old files still load, and files follow the umask."""

import logging
import os
import pickle

import pytest
import torch
from torch import nn

import freetickets_kernels as ftk
from freetickets_kernels.app import checkpoint
from freetickets_kernels.app.checkpoint import CheckpointError, load, save
from freetickets_kernels.app.results import write_results, write_text_atomic


def _state():
    torch.manual_seed(0)
    model = nn.Sequential(ftk.SparseConv2d(4, 8, 3, density=0.5, block_size=4), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4, 6, 6)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": torch.get_rng_state(),
            "epoch": 3, "members": [{"name": "m", "val_accuracy": 0.5}]}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save(_state(), path)
    return path, path.read_bytes()


def test_byte_flips_anywhere_are_refused(saved):
    path, data = saved
    offsets = [int(i * (len(data) - 16) / 38) for i in range(39)] + [0, 9, 20, 70, len(data) - 16]
    for offset in offsets:
        damaged = bytearray(data)
        for i in range(offset, offset + 16):
            damaged[i] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=str(path)) as info:
            load(path)
        assert "weights_only" not in str(info.value)
    path.write_bytes(data)
    assert load(path)["epoch"] == 3


def test_a_single_flipped_bit_is_refused(saved):
    path, data = saved
    damaged = bytearray(data)
    damaged[len(data) * 3 // 4] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="checksum"):
        load(path)


def test_truncation_at_any_length_is_refused_with_the_name(saved):
    path, data = saved
    lengths = sorted(set(range(0, 100)) | {len(data) * i // 50 for i in range(50)} | {len(data) - 1})
    for n in lengths:
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=str(path)):
            load(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load(path)


def test_old_files_without_a_checksum_still_load_with_one_warning(tmp_path, caplog):
    path = tmp_path / "old.pt"
    torch.save(_state(), path)
    with caplog.at_level(logging.WARNING, logger=checkpoint.logger.name):
        assert load(path)["epoch"] == 3
        assert load(path)["epoch"] == 3
    warnings = [r for r in caplog.records if "without a checksum" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    data = path.read_bytes()
    for n in (1, len(data) // 2, len(data) - 1):  # truncated old files: named, not a raw OSError
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=str(path)):
            load(path)


def test_a_directory_is_a_checkpoint_error(tmp_path):
    (tmp_path / "ckpt.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        load(tmp_path / "ckpt.pt")


class Payload:
    def __reduce__(self):
        return (print, ("this ran from a checkpoint",))


def test_refused_payloads_never_suggest_weights_only_false(tmp_path):
    path = tmp_path / "evil.pt"
    save({"x": Payload()}, path)
    with pytest.raises(CheckpointError, match=str(path)) as info:
        load(path)
    assert "weights_only=False" not in str(info.value) and "weights_only" not in str(info.value)
    path.write_bytes(pickle.dumps(Payload(), protocol=2))  # a plain pickle, no torch container
    with pytest.raises(CheckpointError, match=str(path)) as info:
        load(path)
    assert "weights_only" not in str(info.value)


def test_a_whole_pickled_model_says_what_it_is(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError, match="whole pickled model") as info:
        load(path)
    message = str(info.value)
    assert "Sequential" in message and "state_dict" in message and "weights_only" not in message


def test_a_save_removes_temporaries_a_killed_save_left(tmp_path):
    path = tmp_path / "checkpoint.pt"
    stale = tmp_path / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / ".results.json.k1ll3d.tmp"  # another file's: not ours to remove
    other.write_bytes(b"half")
    save({"epoch": 1}, path)
    assert not stale.exists() and other.exists()
    assert sorted(os.listdir(tmp_path)) == [".results.json.k1ll3d.tmp", "checkpoint.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save({"epoch": 1}, tmp_path / "checkpoint.pt")
        write_text_atomic(str(tmp_path / "summary.md"), "# hi\n")
        paths = write_results("bench", [{"a": 1}], ["a"], str(tmp_path))
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("reference")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("checkpoint.pt", "summary.md", "plain.txt", paths["json"], paths["md"]):
        assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name
