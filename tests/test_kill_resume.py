"""SIGKILL a tiny ``freetickets train`` run at chosen moments (between a checkpoint's temp write and its
rename, right after a member file is written, in the middle of the report), resume it with
``--resume``: the results equal those of an uninterrupted run, and no temporary file is left."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from freetickets_kernels.app.cli import main

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = ["train", "--model", "tiny-resnet", "--epochs", "3", "--explore-epochs", "1", "--members", "2",
        "--block-size", "8", "--update-interval", "5", "--method", "edst", "--latency-repeats", "1", "--quiet", "--threads", "1"]

# runs ``freetickets`` and SIGKILLs itself at the KILL_NTH rename onto a file named KILL_FILE,
# just before it (KILL_WHEN=before: the temporary file is written and synced) or just after it
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from freetickets_kernels.app import checkpoint
    from freetickets_kernels.app.cli import main
    name, nth, when = os.environ["KILL_FILE"], int(os.environ["KILL_NTH"]), os.environ["KILL_WHEN"]
    seen, replace = [0], os.replace
    def killing_replace(src, dst):
        hit = os.path.basename(dst) == name
        if hit:
            seen[0] += 1
        if hit and seen[0] == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)
        if hit and seen[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.os.replace = killing_replace
    sys.exit(main(sys.argv[1:]))
""")

# the parts of results.json that training decides (latency and seconds are measured, not computed)
MEASURED = ("latency_ms", "latency_x_dense", "train_s", "train_s_x_dense")


def _computed(results):
    rows = [{k: v for k, v in r.items() if k not in MEASURED} for r in results["rows"]]
    return rows, results["diversity"], results["calibration"], results["counters"], results["config"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("uninterrupted")
    try:
        assert main(TINY + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "results.json").read_text())


def test_run_files_follow_the_umask(reference):
    out, _ = reference
    mask = os.umask(0)
    os.umask(mask)
    for name in ("results.json", "summary.md", "reliability.png", "edst/checkpoint.pt", "dense/checkpoint.pt",
                 "edst/members/refine-1.pt"):
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.parametrize("kill_file, nth, when", [
    ("checkpoint.pt", 2, "before"),   # the dense baseline's 2nd epoch: written, synced, not renamed
    ("refine-1.pt", 1, "after"),      # EDST's first member is on disk, the checkpoint does not list it yet
    ("summary.md", 1, "before"),      # the report: results.json written, summary.md not
])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, reference, kill_file, nth, when):
    env = dict(os.environ, KILL_FILE=kill_file, KILL_NTH=str(nth), KILL_WHEN=when, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER] + TINY + ["--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if when == "before":
        assert any(name.endswith(".tmp") for _, _, names in os.walk(tmp_path) for name in names)
    threads = torch.get_num_threads()
    try:
        assert main(TINY + ["--out", str(tmp_path), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert _computed(resumed) == _computed(reference[1])
    assert not [name for _, _, names in os.walk(tmp_path) for name in names if name.endswith(".tmp")]
    assert (tmp_path / "summary.md").exists() and (tmp_path / "reliability.png").exists()
