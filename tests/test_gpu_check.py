"""The GPU check's pieces without a GPU: the benchmark suite's rows (failures recorded, ideal from the
real density, JSON lines as it goes) and the standalone correctness script, in Triton's interpreter."""

import json

import pytest
import torch

import freetickets_kernels as ftk
from freetickets_kernels.app.bench import gpu_kernels
from freetickets_kernels.app.cli import main

pytestmark = pytest.mark.skipif("triton" not in ftk.available_backends(),
                                reason="Triton backend unavailable (triton missing, or no GPU and no interpreter)")


def _bench(tmp_path, *extra):
    return main(["bench", "gpu", "--preset", "check", "--densities", "0.5", "--dtypes", "fp16", "--passes", "fwd",
                 "--backends", "triton", "--out", str(tmp_path), "--jsonl", str(tmp_path / "rows.jsonl"), *extra])


def test_rows_stream_as_json_lines_and_keep_their_dense_time(tmp_path, capsys):
    assert _bench(tmp_path) == 0
    lines = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "gpu_kernels_check.json").read_text())
    assert lines == results["rows"] and {r["op"] for r in lines} == {"linear", "conv2d"}
    for row in lines:
        assert row["dense_ms"] > 0 and row["triton_ms"] > 0  # dense timed in every row
        assert row["ideal"] == pytest.approx(1 / row["layout_density"])
        assert not any(k.endswith("_error") for k in row)
    assert any("1x1" in r["shape"] for r in lines) and any("3x3" in r["shape"] for r in lines)


def test_a_failing_row_is_recorded_and_the_suite_goes_on(tmp_path, capsys, monkeypatch):
    real = gpu_kernels._Case.check
    calls = []

    def broken(self, backend, backward):
        calls.append(self.op)
        if self.op == "linear":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, backend, backward)

    monkeypatch.setattr(gpu_kernels._Case, "check", broken)
    assert _bench(tmp_path) == 1
    out = capsys.readouterr().out
    assert "FAILED linear" in out and "row(s) FAILED" in out
    rows = json.loads((tmp_path / "gpu_kernels_check.json").read_text())["rows"]
    linear = [r for r in rows if r["op"] == "linear"]
    conv = [r for r in rows if r["op"] == "conv2d"]
    assert linear and all("illegal memory access" in r["triton_error"] and "triton_ms" not in r for r in linear)
    assert conv and all("triton_error" not in r and r["triton_ms"] > 0 for r in conv)  # went on


def test_ideal_comes_from_the_layouts_real_density(tmp_path):
    # a 16->16 1x1 conv with blocks of 16 at density 0.05 keeps no block: there is no ideal speedup
    row = gpu_kernels.bench_row("conv2d", ("tiny 16->16 1x1 @4", 1, 16, 16, 1, 4, 1, 0), 16, 0.05, "fp32", False,
                                ["triton"], 1, torch.device("cpu"))
    assert row["layout_density"] == 0 and row["ideal"] is None
    assert row["dense_dev_ms"] is None  # device-only times need a GPU


def test_the_check_preset_is_the_issues_subset():
    check = gpu_kernels.PRESETS["check"]
    assert check.linear == [(8192, 8192, 8192)] and check.linear_blocks == (16, 32, 64)
    assert check.densities == (0.5, 0.1, 0.05) and check.dtypes == ("bf16",) and check.conv_blocks == (32, 64)
    assert {spec[4] for spec in check.conv} == {1, 3} and {spec[1] for spec in check.conv} == {128}


def test_correctness_script_short_list_in_the_interpreter(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "gpu_correctness.py"
    spec = importlib.util.spec_from_file_location("gpu_correctness", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--small", "--backends", "triton", "--dtypes", "fp32", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "FAIL" not in out
    assert "linear 128x128 blocks" in out and "conv 1x1 NHWC" in out and "linear empty layout" in out
