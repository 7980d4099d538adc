"""``freetickets train`` end to end on a tiny configuration of the default data set."""

import json

import pytest

from freetickets_kernels.app.cli import main

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = ["train", "--model", "tiny-resnet", "--epochs", "3", "--explore-epochs", "1", "--members", "2",
        "--block-size", "8", "--update-interval", "5", "--method", "edst", "--latency-repeats", "2", "--quiet"]


def test_train_smoke(tmp_path, capsys):
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("dense", "member 1", "member 2", "edst ensemble (M=2)", "ECE", "latency ms"):
        assert text in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"].split(" (")[0] for r in results["rows"]] == ["dense", "member 1", "member 2",
                                                                     "edst ensemble"]
    ens = results["rows"][-1]
    assert 0 < ens["train_flops_x_dense"] < 1 and 0 < ens["inference_flops_x_dense"] < 2
    # measured training time: the whole run's, and one epoch's, for the dense baseline and the ensemble
    assert ens["train_s"] == results["train_seconds"]["ensemble"] > 0
    assert results["rows"][0]["train_s"] == results["train_seconds"]["dense"] > 0
    assert ens["train_s_x_dense"] == pytest.approx(ens["train_s"] / results["rows"][0]["train_s"])
    assert results["epoch_seconds"]["ensemble"] == pytest.approx(ens["train_s"] / 3)
    assert "one epoch: dense" in out
    assert (tmp_path / "summary.md").read_text().startswith("# freetickets train")
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    # a second run into the same directory is refused; --resume finds it complete
    assert main(TINY + ["--out", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(TINY + ["--out", str(tmp_path), "--resume"]) == 0


def test_dense_ensemble_baseline(tmp_path, capsys):
    # M independent dense runs: the deep-ensemble baseline, each member paying its own share
    assert main(TINY + ["--method", "dense-ensemble", "--out", str(tmp_path)]) == 0
    assert "dense ensemble (M=2)" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    dense, first, second, ens = results["rows"]
    assert ens["train_flops_x_dense"] == pytest.approx(2.0)
    assert first["train_flops"] == second["train_flops"] == pytest.approx(dense["train_flops"])
    assert ens["params"] == 2 * dense["params"] and ens["inference_flops_x_dense"] == pytest.approx(2.0)
    assert results["counters"]["ensemble"]["updates"] == 0  # no DST: dense models
    # the first member is the baseline's twin: same seed, same batches
    assert first["accuracy"] == dense["accuracy"] and first["nll"] == pytest.approx(dense["nll"])
    assert second["nll"] != dense["nll"]  # the second one is another seed


def test_several_methods_in_one_table(tmp_path, capsys):
    # the paper's comparison in one run: dense, then each ensemble; the dense baseline is the dense
    # ensemble's first member, trained once; every member's row is kept per method
    assert main(TINY + ["--method", "dense-ensemble", "edst", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("dense ensemble (M=2)", "edst ensemble (M=2)", "edst: members disagree", "one epoch: dense"):
        assert text in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["methods"] == ["dense-ensemble", "edst"]
    assert [r["model"] for r in results["rows"]] == ["dense", "dense ensemble (M=2)", "edst ensemble (M=2)"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["dense-ensemble", "edst"]  # no dense/
    by_method = results["by_method"]
    dense, first = by_method["dense-ensemble"]["rows"][:2]
    assert first["accuracy"] == dense["accuracy"] and first["nll"] == dense["nll"]
    assert results["rows"][0]["accuracy"] == dense["accuracy"]
    assert results["rows"][1]["train_flops_x_dense"] == pytest.approx(2.0)
    assert 0 < results["rows"][2]["train_flops_x_dense"] < 1
    assert [r["model"].split(" (")[0] for r in by_method["edst"]["rows"]] == ["dense", "member 1", "member 2",
                                                                           "edst ensemble"]
    assert by_method["edst"]["rows"][0]["train_s"] == results["rows"][0]["train_s"]  # one baseline
    summary = (tmp_path / "summary.md").read_text()
    assert "## edst: every member" in summary and "## dense-ensemble: every member" in summary
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    # resumed: every method's run is found complete, the same table again
    assert main(TINY + ["--method", "dense-ensemble", "edst", "--out", str(tmp_path), "--resume"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in results["rows"]]


def test_method_list_takes_dense_as_the_baseline():
    from freetickets_kernels.app.train_command import _methods

    assert _methods(["edst", "dst", "edst"], no_baseline=False) == ["edst", "dst"]
    assert _methods(["dense", "edst"], no_baseline=False) == ["edst"]
    assert _methods(["dense"], no_baseline=False) == ["dense"]
    with pytest.raises(ValueError, match="--no-baseline"):
        _methods(["dense", "edst"], no_baseline=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_in_mixed_precision(tmp_path, capsys, precision):
    # autocast through DST updates (RigL scoring), explorations, evaluation and latency
    assert main(TINY + ["--no-baseline", "--precision", precision, "--out", str(tmp_path)]) == 0
    assert f"precision {precision}" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["precision"] == precision
    assert results["counters"]["ensemble"]["updates"] > 0
    assert all(0 <= r["accuracy"] <= 1 for r in results["rows"])


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exit:  # argparse rejects a value before main() runs
        return exit.code


@pytest.mark.parametrize("flags, message", [
    (["--density", "0"], "density must be in (0, 1]"),
    (["--density", "1.5"], "density must be in (0, 1]"),
    (["--block-size", "0"], "block size must be positive"),
    (["--model", "vgg"], "invalid choice"),
    (["--precision", "fp8"], "invalid choice"),
    (["--epochs", "4", "--explore-epochs", "1", "--members", "2"], "multiple of members"),
])
def test_bad_options_fail_in_one_line(tmp_path, capsys, flags, message):
    assert _exit_code(TINY + ["--out", str(tmp_path)] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert _exit_code(TINY + ["--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_train_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for text_piece in ("--resume", "--method", "edst", "dense-ensemble", "digits", "mlp", "torchrun",
                       "reliability.png"):
        assert text_piece in text


def test_train_help_defaults_come_from_the_presets(capsys):
    import re

    from freetickets_kernels.app.train_command import PRESETS
    from freetickets_kernels.dst import DISTRIBUTIONS, GROWTH

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines wherever it likes
    options = text[text.index("what to train:"):text.index("examples:")]
    for flag, key in (("--epochs", "epochs"), ("--explore-epochs", "explore_epochs"),
                      ("--batch-size", "batch_size"), ("--update-interval", "update_interval"),
                      ("--model", "model")):
        help_text = re.search(rf"{flag} (?:[A-Z_]+|{{[^}}]*}}) (.*?)(?= --|$)", options).group(1)
        default = re.search(r"\(default ([^()]*)\)", help_text).group(1)
        shown = {dataset: value if key == "model" else int(value)
                 for value, datasets in re.findall(r"([a-z0-9-]+) on ([a-z0-9, ]+)", default)
                 for dataset in datasets.replace(",", " ").split()}
        assert shown == {dataset: preset[key] for dataset, preset in PRESETS.items()}, (flag, help_text)
    for flag, names in (("--distribution", DISTRIBUTIONS), ("--growth", GROWTH)):
        assert f"{flag} {{{','.join(names)}}}" in options


def test_shifted_sets_and_seeds(tmp_path, capsys):
    # the corrupted sets and the OoD set of the digits, in the table and results.json; two training seeds
    # give one table of means with their spread, and each seed its own run directory
    assert main(TINY + ["--seeds", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("C-acc", "OoD AUROC", "8 corruptions x 5 severities", "mean ± std over 2 training seeds"):
        assert text in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [0, 1000] and len(results["per_seed"]) == 2
    assert results["shift"]["ood"] == "patches" and len(results["shift"]["corrupted_sets"]) == 40
    for i, row in enumerate(results["rows"]):
        values = [s["rows"][i]["c_accuracy"] for s in results["per_seed"]]
        assert row["c_accuracy"] == pytest.approx(sum(values) / 2)
        assert row["c_accuracy_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert 0 <= row["auroc_msp"] <= 1 and sorted(row["by_severity"]) == ["1", "2", "3", "4", "5"]
    assert (tmp_path / "seed-1000" / "edst" / "checkpoint.pt").exists()
    assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_imagefolder_end_to_end(tmp_path, capsys):
    # a user's own images: class subfolders, resized, with the corrupted sets built from its test split
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cats", "dogs")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(15):
            pixels = (rng.random((20, 24, 3)) * 100 + 120 * c).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    args = TINY + ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"), "--image-size", "8",
                   "--batch-size", "8", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert all(0 <= r["c_accuracy"] <= 1 for r in results["rows"])
    assert _exit_code(TINY + ["--image-size", "8", "--out", str(tmp_path / "x")]) == 2
    assert "--image-size applies to --dataset imagefolder only" in capsys.readouterr().err
