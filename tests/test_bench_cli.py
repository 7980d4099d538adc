"""``freetickets bench``: bad options fail in one line with a non-zero exit (the suites are scripts, not tests)."""

import pytest

import freetickets_kernels as ftk

from freetickets_kernels.app.cli import main


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("argv, message", [
    (["bench", "models", "--models", "vgg16"], "invalid choice"),
    (["bench", "models", "--densities", "0"], "density must be in (0, 1]"),
    (["bench", "models", "--densities", "1.2"], "density must be in (0, 1]"),
    (["bench", "models", "--block-sizes", "0"], "block size must be positive"),
    (["bench", "models", "--members", "0"], "--members must be positive"),
    (["bench", "kernels", "--densities", "-1"], "density must be in (0, 1]"),
    (["bench"], "required"),
])
def test_bad_options(tmp_path, capsys, argv, message):
    assert _exit_code(argv + ([] if argv == ["bench"] else ["--out", str(tmp_path)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not list(tmp_path.iterdir())


def test_bench_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "models", "--help"])
    out = capsys.readouterr().out
    assert "--densities" in out and "--quick" in out and "ensemble" in out


def test_interleaved_timing_calls_each_function_in_turn(monkeypatch):
    # every round runs all functions once, in order, after the warm-up rounds; each
    # function's median is of its own times (a fake clock: each call takes its index + 1)
    from freetickets_kernels.app import timing

    calls, clock = [], [0.0]

    def make(i):
        def fn():
            calls.append(i)
            clock[0] += i + 1.0
        return fn

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    medians = timing.interleaved_median_seconds([make(0), make(1), make(2)], repeats=3, warmup=1)
    assert calls == [0, 1, 2] * 4
    assert medians == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="repeats"):
        timing.interleaved_median_seconds([make(0)], repeats=0)


@pytest.mark.parametrize("p", ["fwd", "fwd+bwd"])
def test_kernel_rows_time_our_fp32_beside_low_precision(p):
    # a bf16 row with vs_fp32 times our op on fp32 copies of its operands in the same rounds (and says
    # by how much bf16 is faster); an fp32 row has nothing to compare with
    from freetickets_kernels.app.bench import kernels

    with ftk.use_backend("reference"):
        bf16 = kernels.bench_linear(8, 64, 64, 32, 0.5, [p], 1, True, "bf16", vs_fp32=True)
        conv = kernels.bench_conv(("c", 1, 32, 32, 3, 4, 1, 1), 32, 0.5, [p], 1, "nchw", True, "bf16", vs_fp32=True)
        fp32 = kernels.bench_linear(8, 64, 64, 32, 0.5, [p], 1, True, "fp32", vs_fp32=True)
    for row in bf16 + conv:
        assert row["dtype"] == "bf16" and row["vs_our_fp32"] > 0
    assert fp32[0]["vs_our_fp32"] is None


def test_model_timings_run_under_bf16_autocast():
    # --precision bf16 times the forward under CPU bf16 autocast: the model's output is bf16
    import torch

    from freetickets_kernels.app.bench import models

    seen = []
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    net.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    x, y = torch.randn(2, 3, 2, 2), torch.tensor([0, 2])
    models._timings([[net]], x, y, repeats=1, update_interval=1, precision="bf16")
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    models._timings([[net]], x, y, repeats=1, update_interval=1)
    assert set(seen) == {torch.float32}


def test_model_timings_interleave_groups_and_share_members():
    # every group timed in the same rounds; an ensemble's step is the sum of its members' (each timed once)
    import torch

    from freetickets_kernels.app.bench import models

    calls = []
    nets = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)) for _ in range(2)]
    for i, net in enumerate(nets):
        net.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    x, y = torch.randn(2, 3, 2, 2), torch.tensor([0, 2])
    dense, single, pair = models._timings([[nets[0]], [nets[1]], nets], x, y, repeats=3, update_interval=1)
    assert calls[:8] == [0, 1, 0, 1] * 2  # each round: the first group, the second, the pair's two
    assert pair["train_step"] == pytest.approx(dense["train_step"] + single["train_step"])
    assert all(t["infer"] > 0 for t in (dense, single, pair))
