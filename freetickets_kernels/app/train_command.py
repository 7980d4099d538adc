"""``freetickets train``: the dense baseline and a FreeTickets ensemble, then one table."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace
from typing import Dict, List

import torch

from .. import distributed
from ..dst.growth import GROWTH, GROWTH_METHODS
from ..models import MODELS, build_model
from ..nn.densities import DISTRIBUTION_NAMES, DISTRIBUTIONS
from .data import DATASETS, load_splits
from .results import check_out_dir
from .seeds import aggregate, training_seeds
from .shift_data import OOD_DATASETS, corrupted_sets, ood_set
from .shift_eval import ShiftSets
from .training import METHODS, PRECISIONS, PlanRunner, TrainConfig, baseline_twin, first_member_run

# What an unflagged run uses per data set: the digits values keep the default
# run at a few minutes on two CPU cores with a model whose sparse training is
# faster than its dense training there (models/mlp.py says why an MLP); the
# CIFAR ones are the paper's recipe (WRN-28-10).
PRESETS = {
    "digits": {"epochs": 60, "explore_epochs": 30, "batch_size": 64, "update_interval": 25,
               "model": "mlp", "block_size": [32, 32]},
    "cifar10": {"epochs": 250, "explore_epochs": 100, "batch_size": 128, "update_interval": 1000,
                "model": "wrn-28-10", "block_size": [16, 16]},
    "cifar100": {"epochs": 250, "explore_epochs": 100, "batch_size": 128, "update_interval": 1000,
                 "model": "wrn-28-10", "block_size": [16, 16]},
    # a user's small folder of images: a short run of a small ResNet
    "imagefolder": {"epochs": 30, "explore_epochs": 15, "batch_size": 32, "update_interval": 25,
                    "model": "small-resnet", "block_size": [16, 16]},
}
DEFAULT_DATASET = "digits"
# the paper's comparison in one run: the dense baseline beside a dense deep ensemble, a DST and an EDST
# Ensemble (the baseline is the dense ensemble's first member, trained once)
DEFAULT_METHODS = ["dense-ensemble", "dst", "edst"]
# every other default is TrainConfig's, so the command and the Python API cannot drift apart
DEFAULTS = TrainConfig()

EXAMPLES = f"""\
examples:
  freetickets train                                  # dense vs dense / DST / EDST ensembles (M={DEFAULTS.members}), digits, ~3 min on 2 CPU cores
  freetickets train --method edst                    # the dense baseline and an EDST Ensemble only, ~1 min
  freetickets train --method dst --members 5         # DST Ensemble: 5 independent sparse runs
  freetickets train --seeds 3                        # the default comparison with 3 training seeds: mean ± std
  freetickets train --resume --out runs/compare-digits  # continue an interrupted run
  freetickets train --dataset cifar10 --data-dir ~/data --download \\
      --density 0.2 --device cuda                    # the paper's CIFAR-10 setting, on a GPU
  torchrun --nproc-per-node 2 -m freetickets_kernels.app.cli train   # two processes (DDP)

The run directory (--out) gets, per method, checkpoint.pt after every epoch and
members/*.pt as members are found, then results.json, summary.md (every
member's row too), reliability.png and robustness.png."""


def _block_size(text: str):
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be N or BoxBi (e.g. 16 or 32x16), got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"block size must be positive: N or BoxBi, got {text!r}")
    return parts * 2 if len(parts) == 1 else parts


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def _momentum(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def preset_default(key: str) -> str:
    """What ``--<key>`` defaults to, read from :data:`PRESETS`: e.g. "60 on digits; 250 on cifar10, cifar100"
    (the default data set first)."""
    by_value = {}
    for dataset in sorted(PRESETS, key=lambda d: d != DEFAULT_DATASET):
        value = PRESETS[dataset][key]
        by_value.setdefault("x".join(map(str, value)) if isinstance(value, list) else value, []).append(dataset)
    return "; ".join(f"{value} on {', '.join(datasets)}" for value, datasets in by_value.items())


def _choices_help(names: dict) -> str:
    return "; ".join(f"{name}: {what}" for name, what in names.items())


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a dense baseline and a DST / EDST ensemble, and compare them",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description=(
            "Train the dense baseline and a FreeTickets ensemble of block-sparse networks, then print two "
            "tables (dense single vs each member vs the ensemble): accuracy, NLL and ECE on the test set and on "
            "its corrupted copies, OoD-detection AUROC; training FLOPs and measured training time, inference "
            "FLOPs, parameters and measured inference latency.  With no flags: scikit-learn's handwritten "
            "digits (shipped with scikit-learn, no download) and a wide MLP."))
    g = p.add_argument_group("what to train")
    g.add_argument("--method", nargs="+", choices=METHODS, default=DEFAULT_METHODS, metavar="METHOD",
                   help="one or more of: edst: one run, M members; dst: M independent sparse runs; dense-ensemble: M "
                        "independent dense runs (the deep-ensemble baseline); dense: the baseline alone.  Several "
                        "give one table, each ensemble beside the one dense baseline "
                        f"(default {' '.join(DEFAULT_METHODS)})")
    g.add_argument("--model", choices=sorted(MODELS), help=f"(default {preset_default('model')})")
    g.add_argument("--dataset", choices=DATASETS, default=DEFAULT_DATASET, help="default: %(default)s")
    g.add_argument("--data-dir", default="./data", help="where CIFAR lives, or the imagefolder's folder (class "
                   "subfolders, or train/ and test/ holding them) (default %(default)s)")
    g.add_argument("--download", action="store_true", help="download CIFAR into --data-dir if missing")
    g.add_argument("--image-size", type=_positive, help="imagefolder: resize images to N x N (default 32)")
    g.add_argument("--no-baseline", action="store_true", help="skip the dense baseline")
    g = p.add_argument_group("distribution shift (evaluated after training)")
    g.add_argument("--corruptions-dir", help="CIFAR: read the published CIFAR-10-C / CIFAR-100-C .npy files "
                   "(one per corruption, 5 severities, and labels.npy) from here; without it the corrupted test "
                   "sets (8 corruptions x 5 severities) are built in code from the test split")
    g.add_argument("--ood-dataset", choices=OOD_DATASETS,
                   help="the out-of-distribution set: patches (of scikit-learn's two sample photographs, scaled like "
                        "the images; default for digits and imagefolder), or svhn / cifar10 / cifar100 "
                        "(torchvision, fetched with --download; default svhn for CIFAR)")
    g.add_argument("--no-shift", action="store_true", help="skip the corrupted and OoD evaluation")
    g = p.add_argument_group("sparsity")
    g.add_argument("--density", type=_density, default=DEFAULTS.density,
                   help="kept fraction of the weights (default %(default)s)")
    g.add_argument("--block-size", type=_block_size,
                   help=f"N or BoxBi (default {preset_default('block_size')})")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, default=DEFAULTS.distribution,
                   help=f"per-layer densities: {_choices_help(DISTRIBUTION_NAMES)} (default %(default)s)")
    g.add_argument("--growth", choices=GROWTH, default=DEFAULTS.growth,
                   help=f"{_choices_help(GROWTH_METHODS)} (default %(default)s)")
    g.add_argument("--update-interval", type=_positive, help="iterations between DST updates "
                   f"(default {preset_default('update_interval')})")
    g.add_argument("--prune-rate", type=_fraction, default=DEFAULTS.prune_rate,
                   help="initial prune rate, cosine-decayed (default %(default)s)")
    g.add_argument("--explore-fraction", type=_fraction, default=DEFAULTS.explore_fraction,
                   help="EDST global exploration: fraction of live blocks moved (default %(default)s)")
    g = p.add_argument_group("schedule")
    g.add_argument("--members", type=_positive, default=DEFAULTS.members, help="ensemble size M (default %(default)s)")
    g.add_argument("--epochs", type=_positive, help="epochs of one training; EDST's whole run "
                   f"(default {preset_default('epochs')})")
    g.add_argument("--explore-epochs", type=_positive,
                   help=f"EDST exploration epochs (default {preset_default('explore_epochs')})")
    g.add_argument("--batch-size", type=_positive, help=f"per process (default {preset_default('batch_size')})")
    g.add_argument("--lr", type=_positive_float, default=DEFAULTS.lr, help="peak learning rate (default %(default)s)")
    g.add_argument("--momentum", type=_momentum, default=DEFAULTS.momentum, help="default %(default)s")
    g.add_argument("--weight-decay", type=_non_negative, default=DEFAULTS.weight_decay, help="default %(default)s")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed, help="default %(default)s")
    g.add_argument("--seeds", type=_positive, default=1,
                   help="repeat the comparison with N training seeds (--seed, --seed + 1000, ...) and report "
                        "mean ± std of every column (default %(default)s)")
    g = p.add_argument_group("running")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:N] (default: cuda when available)")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default=DEFAULTS.precision,
                   help="autocast dtype of training and evaluation: bf16 (CPU with bf16 support, or GPU), "
                        "fp16 (autocast + loss scaling; GPU, or CPU), fp32 (no autocast; default %(default)s)")
    g.add_argument("--threads", type=_positive, help="CPU threads (default: torch's)")
    g.add_argument("--out", help="run directory (default runs/<method>-<dataset>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    g.add_argument("--latency-repeats", type=_positive, default=20,
                   help="timed forwards per model (default %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _check_requirements(dataset: str) -> None:
    missing = []
    needs = {"digits": ("sklearn", "the digits data set"), "imagefolder": ("torchvision", "ImageFolder")}
    for module, why in (("matplotlib", "the reliability diagram"), needs.get(dataset, ("torchvision", "CIFAR"))):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} ({why})")
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: pip install 'freetickets-kernels[train]'")


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda[:N], got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {text!r}")
    return device


def _methods(asked: List[str], no_baseline: bool) -> List[str]:
    """``--method``'s list, each once, in order; ``dense`` beside ensembles is their baseline."""
    methods = list(dict.fromkeys(asked))
    if len(methods) > 1 and "dense" in methods:
        if no_baseline:
            raise ValueError("--method dense is the dense baseline, and --no-baseline skips it: drop one of them")
        methods.remove("dense")
    return methods


def _plan(configs: Dict[str, TrainConfig], with_baseline: bool, runner):
    """One seed's runners: ``({method: runner}, baseline)``, the baseline being its own runner, the name of
    the method whose first member it is (a dense ensemble's), or None."""
    ensembles = {m: runner(cfg) for m, cfg in configs.items()}
    if not with_baseline:
        return ensembles, None
    for m, cfg in configs.items():
        if baseline_twin(cfg) is not None:
            return ensembles, m
    return ensembles, runner(replace(next(iter(configs.values())), method="dense"))


def run(args: argparse.Namespace) -> int:
    from .report import combine, evaluate_dense, format_table, summarize, write_outputs

    _check_requirements(args.dataset)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if distributed.init_from_env(device.type) and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    preset = PRESETS[args.dataset]
    for key in preset:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    methods = _methods(args.method, args.no_baseline)
    out = args.out or os.path.join("runs", f"{methods[0] if len(methods) == 1 else 'compare'}-{args.dataset}")
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                  weight_decay=args.weight_decay, density=args.density, block_size=args.block_size,
                  distribution=args.distribution, growth=args.growth, update_interval=args.update_interval,
                  prune_rate=args.prune_rate, explore_fraction=args.explore_fraction,
                  explore_epochs=args.explore_epochs, members=args.members, precision=args.precision)
    # every check before any training: settings, the run directory, the checkpoints to resume
    seeds = training_seeds(args.seed, args.seeds)
    with_baseline = methods != ["dense"] and not args.no_baseline
    configs = [{m: TrainConfig(method=m, seed=seed, **common) for m in methods} for seed in seeds]
    if distributed.is_main():
        check_out_dir(out)
    if args.resume and not os.path.isdir(out):
        raise FileNotFoundError(f"--resume: {out} holds no run to continue (no such directory); "
                                "drop --resume to start a new run there")
    if args.image_size is not None and args.dataset != "imagefolder":
        raise ValueError(f"--image-size applies to --dataset imagefolder only ({args.dataset} has a fixed size)")
    splits = load_splits(args.dataset, args.data_dir, args.download, seed=args.seed, image_size=args.image_size)
    shift = ShiftSets()
    if not args.no_shift:  # built (and every file checked) before any training
        shift.corrupted = corrupted_sets(splits, args.seed, corruptions_dir=args.corruptions_dir)
        shift.ood_name, shift.ood = ood_set(splits, args.dataset, args.seed, ood_dataset=args.ood_dataset,
                                            data_dir=args.data_dir, download=args.download)
    elif args.corruptions_dir or args.ood_dataset:
        raise ValueError("--no-shift skips the shifted sets: drop --corruptions-dir / --ood-dataset, or --no-shift")
    model_fn = lambda: build_model(args.model, splits.num_classes, splits.in_channels, splits.image_size)  # noqa: E731
    say = print if distributed.is_main() else (lambda *a, **k: None)

    def runner(cfg: TrainConfig) -> PlanRunner:
        where = out if len(seeds) == 1 else os.path.join(out, f"seed-{cfg.seed}")
        return PlanRunner(cfg, model_fn, splits.train, splits.val, os.path.join(where, cfg.method), device,
                          progress=not args.quiet)

    say(f"freetickets train: {', '.join(methods)} on {args.dataset} ({len(splits.train)} train / "
        f"{len(splits.val)} val / {len(splits.test)} test), model {args.model}, density {args.density}, blocks "
        f"{args.block_size[0]}x{args.block_size[1]}, {args.precision}, {distributed.world_size()} process(es), "
        f"{device}, training seed(s) {seeds}; run directory {out}; after training: {shift.describe()}")
    plans = [_plan(by_method, with_baseline, runner) for by_method in configs]
    for ensembles, baseline in plans:  # every checkpoint checked before the first epoch
        for r in list(ensembles.values()) + ([baseline] if isinstance(baseline, PlanRunner) else []):
            r.prepare(resume=args.resume)
    example = torch.stack([splits.test[i][0] for i in range(min(args.batch_size, len(splits.test)))])
    per_method = {m: [] for m in methods}
    for ensembles, baseline in plans:
        dense_runner = baseline if isinstance(baseline, PlanRunner) else None
        dense = dense_runner.run(resume=args.resume) if dense_runner is not None else None
        runs = {m: r.run(resume=args.resume) for m, r in ensembles.items()}
        if isinstance(baseline, str):  # the dense ensemble's first member
            dense, dense_runner = first_member_run(runs[baseline]), ensembles[baseline]
        if distributed.is_main():  # the dense baseline evaluated once, beside every method's members
            base = evaluate_dense(dense, dense_runner, splits.test, example, shift) if dense is not None else None
            for m, r in ensembles.items():
                per_method[m].append(summarize(runs[m], r, splits.test, example, base,
                                               latency_repeats=args.latency_repeats, shift=shift))
    if not distributed.is_main():
        return 0
    summary = combine({m: aggregate(summaries, seeds) for m, summaries in per_method.items()})
    print()
    print(format_table(summary))
    paths = write_outputs(summary, out)
    print(f"\nwrote {', '.join(paths.values())}", file=sys.stderr)
    return 0
