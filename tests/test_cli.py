"""The freetickets command."""

import json
import subprocess
import sys

from freetickets_kernels.app import cli


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in out
    assert "torch" in out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["backend"] for r in data["backends"]} == {"reference", "cpu", "triton", "cuda"}
    assert data["machine"]["torch"]


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out


def test_bad_forced_backend_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("FREETICKETS_BACKEND", "nonsense")
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freetickets: error:") and "unknown backend" in err


def test_console_script_module_runs():
    out = subprocess.run(
        [sys.executable, "-m", "freetickets_kernels.app.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "freetickets" in out and "info" in out
