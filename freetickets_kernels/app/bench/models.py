"""Model suite: dense vs sparse single vs sparse ensemble, latency and FLOPs, in one run.

For each model (ResNet-18, ResNet-50, WRN-28-10), block size and ERK
density: inference latency and training-step latency (forward, backward,
SGD step, plus the DST update amortised over ``--update-interval`` steps) of
the dense model, one sparse model and an ensemble of ``--members`` sparse
models, against the dense model measured in the same run; our FLOPs beside
``FlopCounterMode``'s; parameters and checkpoint size on disk.

    freetickets bench models                          # the full suite (long on a CPU)
    freetickets bench models --quick                  # one small configuration
    freetickets bench models --models resnet18 --densities 0.1 --block-sizes 32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ...dst import DynamicSparseTraining
from ...flops import count_flops, parameter_count
from ...nn.sparsify import sparsify
from ..progress import Progress
from ..results import markdown_table, write_results
from ..timing import interleaved_median_seconds, median_seconds

# name -> (builder, default image size, classes)
MODEL_SPECS = {
    "resnet18": ("resnet18", 224, 1000),
    "resnet50": ("resnet50", 224, 1000),
    "wrn-28-10": ("wrn-28-10", 32, 10),
}
DENSITIES = [0.5, 0.2, 0.1, 0.05]
BLOCK_SIZES = [16, 32]
COLUMNS = ["model", "block", "density", "kind", "infer_ms", "dense_infer_ms", "infer_speedup", "train_step_ms",
           "dense_train_step_ms", "train_speedup", "ideal", "gflops", "gflops_counter", "params_M", "checkpoint_MB"]


def _build(name: str) -> nn.Module:
    from ...models import build_model

    builder, size, classes = MODEL_SPECS[name]
    return build_model(builder, classes, 3, size)


def _checkpoint_mb(model: nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2 ** 20


def _counter_gflops(model: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def _precision(precision: str):
    """The forward's context: bf16 autocast (fp32 master weights, as ``freetickets train --precision bf16``)."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _inference(models: List[nn.Module], x: torch.Tensor, precision: str):
    """One batch through each of ``models`` in turn (an ensemble's inference)."""
    for m in models:
        m.eval()

    @torch.inference_mode()
    def infer():
        with _precision(precision):
            for m in models:
                m(x)

    return infer


def _train_step(m: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str):
    """A training step of ``m`` (forward, backward, SGD), and its RigL update's extra cost (0.0 if dense)."""
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with _precision(precision):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()

    def update_cost(step_s: float, repeats: int) -> float:
        if not any(hasattr(mod, "layout") for mod in m.modules()):
            return 0.0
        dst = DynamicSparseTraining(m, opt, update_interval=10 ** 9, prune_rate=0.3, prune_rate_schedule="constant")

        def update():  # an armed step plus prune/regrow, minus the step itself
            dst.arm_gradient_capture()
            step()
            dst.update()

        return max(median_seconds(update, max(1, repeats // 3), warmup=0) - step_s, 0.0)

    return step, update_cost


def _timings(groups: List[List[nn.Module]], x: torch.Tensor, y: torch.Tensor, repeats: int,
             update_interval: int, precision: str = "fp32") -> List[Dict[str, float]]:
    """Inference and training step of each group (one model or an ensemble), all timed interleaved:
    each round runs every group once, so a drift of the machine's speed reaches them alike and their
    ratios stay fair.  A group's training step is its members' steps plus their amortised DST updates."""
    infer = interleaved_median_seconds([_inference(g, x, precision) for g in groups], repeats)
    models = list({id(m): m for g in groups for m in g}.values())  # an ensemble's first member is the single model
    steps = [_train_step(m, x, y, precision) for m in models]
    step_s = dict(zip((id(m) for m in models), interleaved_median_seconds([s for s, _ in steps], repeats, warmup=1)))
    per_model = {id(m): step_s[id(m)] + cost(step_s[id(m)], repeats) / update_interval
                 for m, (_, cost) in zip(models, steps)}
    return [{"infer": t, "train_step": sum(per_model[id(m)] for m in g)} for t, g in zip(infer, groups)]


@dataclass
class _DenseCase:
    """One model's inputs and dense measurements, which every sparse row is compared against."""

    name: str
    base: dict
    x: torch.Tensor
    y: torch.Tensor
    model: nn.Module
    forward_flops: float


def _row(case: _DenseCase, dense: Dict[str, float], group: List[nn.Module], kind: str, block, density: float,
         timings: Dict[str, float], forward_flops: float, args: argparse.Namespace) -> dict:
    """One table row for ``group`` (one model or an ensemble), against ``dense``: the dense model of ``case``
    timed in the same interleaved rounds."""
    m, x = len(group), case.x
    return dict(case.base, block=block, density=density, kind=kind, infer_ms=timings["infer"] * 1e3,
                infer_speedup=dense["infer"] / timings["infer"], train_step_ms=timings["train_step"] * 1e3,
                train_speedup=dense["train_step"] / timings["train_step"],
                dense_infer_ms=dense["infer"] * 1e3, dense_train_step_ms=dense["train_step"] * 1e3,
                ideal=case.forward_flops / (forward_flops * m), gflops=forward_flops * m * args.batch_size / 1e9,
                gflops_counter=sum(_counter_gflops(g, x) for g in group),
                params_M=sum(parameter_count(g)["params"] for g in group) / 1e6,
                checkpoint_MB=sum(_checkpoint_mb(g) for g in group))


def _in_format(t, args: argparse.Namespace):
    """A model or an input batch in the run's memory format (``--channels-last``)."""
    return t.to(memory_format=torch.channels_last) if args.channels_last else t


def _dense_case(name: str, args: argparse.Namespace) -> Tuple[_DenseCase, dict]:
    _, default_size, classes = MODEL_SPECS[name]
    size = args.image_size or default_size
    g = torch.Generator().manual_seed(0)
    x = _in_format(torch.randn(args.batch_size, 3, size, size, generator=g), args)
    y = torch.randint(0, classes, (args.batch_size,), generator=g)
    torch.manual_seed(0)
    dense = _in_format(_build(name), args)
    timings, = _timings([[dense]], x, y, args.repeats, args.update_interval, args.precision)
    case = _DenseCase(name, {"model": name, "image": size, "batch": args.batch_size, "precision": args.precision},
                      x, y, dense, count_flops(dense, x).forward)
    return case, _row(case, timings, [dense], "dense", "-", 1.0, timings, case.forward_flops, args)


def _sparse_rows(case: _DenseCase, block: int, density: float, args: argparse.Namespace) -> List[dict]:
    """A sparse single model and an ensemble of ``args.members`` (the first member is that single model)."""
    members = []
    for seed in range(args.members):
        torch.manual_seed(seed)
        member = _build(case.name) if seed else copy.deepcopy(case.model)
        sparsify(member, density, block, "erk", criterion="random")
        members.append(_in_format(member, args))
    forward_flops = count_flops(members[0], case.x).forward
    # the dense model again, interleaved with these: each row's speedups are against its own run's dense
    groups = {"dense": [case.model], "sparse": members[:1], f"ensemble x{args.members}": members}
    timings = dict(zip(groups, _timings(list(groups.values()), case.x, case.y, args.repeats,
                                        args.update_interval, args.precision)))
    return [_row(case, timings["dense"], group, kind, block, density, timings[kind], forward_flops, args)
            for kind, group in groups.items() if kind != "dense"]


def plot(rows: List[dict], path: str, members: int) -> None:
    """Speedup vs density per block size (with the ideal line), and ensemble vs dense latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7.5), squeeze=False)
    for col, name in enumerate(models):
        mine = [r for r in rows if r["model"] == name and r["kind"] == "sparse"]
        ax = axes[0][col]
        for block in sorted({r["block"] for r in mine}):
            pts = sorted((r["density"], r["infer_speedup"]) for r in mine if r["block"] == block)
            ax.plot(*zip(*pts), "o-", label=f"block {block}, inference")
            pts = sorted((r["density"], r["train_speedup"]) for r in mine if r["block"] == block)
            ax.plot(*zip(*pts), "s--", label=f"block {block}, training step")
        dens = sorted({r["density"] for r in mine})
        if dens:
            ax.plot(dens, [1 / d for d in dens], "k:", label="ideal 1/density")
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="density", ylabel="speedup over dense", title=name)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        ens = [r for r in rows if r["model"] == name and r["kind"].startswith("ensemble")]
        labels = ["dense"] + [f"d={r['density']}\nb={r['block']}" for r in ens]
        dense_ms = next(r["infer_ms"] for r in rows if r["model"] == name and r["kind"] == "dense")
        ax.bar(labels, [dense_ms] + [r["infer_ms"] for r in ens],
               color=["grey"] + ["tab:blue"] * len(ens))
        ax.set(ylabel="inference ms (one batch)", title=f"{name}: ensemble of {members} vs one dense")
        ax.tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def headline(rows: List[dict], members: int) -> List[str]:
    """One sentence per model: the ensemble at density 0.1 against one dense model."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        ens = [r for r in rows if r["model"] == name and r["kind"].startswith("ensemble") and r["density"] == 0.1]
        if not ens:
            continue
        best = min(ens, key=lambda r: r["infer_ms"])
        lines.append(f"a {members}-member sparse ensemble at 90% sparsity (block {best['block']}) runs "
                     f"{name} inference in {1 / best['infer_speedup']:.2f}x "
                     f"the time of one dense {name}")
    return lines


def add_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_SPECS), default=list(MODEL_SPECS))
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES, help="ERK densities, in (0, 1]")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=BLOCK_SIZES)
    parser.add_argument("--members", type=int, default=3, help="ensemble size (default 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, help="default: 224 for ResNets, 32 for WRN")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is kept")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: every model (dense and sparse) under torch.autocast('cpu', bfloat16)")
    parser.add_argument("--channels-last", action="store_true",
                        help="inputs and every model (dense and sparse) in channels_last memory format")
    parser.add_argument("--update-interval", type=int, default=100,
                        help="DST update amortised over this many training steps (default 100)")
    parser.add_argument("--quick", action="store_true",
                        help="resnet18 at 64x64, batch 2, density 0.1, block 32: checks the suite runs")
    parser.add_argument("--out", default=out_default, help="directory for JSON, Markdown and PNG")
    parser.add_argument("--name", default=None, help="result file name (default: models[_quick])")


def check_arguments(args: argparse.Namespace) -> None:
    unknown = [m for m in args.models if m not in MODEL_SPECS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; choose from {sorted(MODEL_SPECS)}")
    for d in args.densities:
        if not 0 < d <= 1:
            raise ValueError(f"density must be in (0, 1], got {d}")
    for b in args.block_sizes:
        if b <= 0:
            raise ValueError(f"block size must be positive, got {b}")
    for key in ("members", "batch_size", "threads", "repeats", "update_interval"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.image_size is not None and args.image_size < 32:
        raise ValueError(f"--image-size must be at least 32, got {args.image_size}")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.models, args.densities, args.block_sizes = ["resnet18"], [0.1], [32]
        args.batch_size, args.image_size, args.repeats = 2, 64, 2
    check_arguments(args)
    torch.set_num_threads(args.threads)
    # one job per model's dense baseline (None), then one per (block, density) against it
    jobs = [(name, config) for name in args.models
            for config in [None, *itertools.product(args.block_sizes, args.densities)]]
    rows: List[dict] = []
    cases: Dict[str, _DenseCase] = {}
    for name, config in Progress(jobs, "model suite"):
        if config is None:
            cases[name], row = _dense_case(name, args)
            rows.append(row)
        else:
            rows += _sparse_rows(cases[name], *config, args)
    name = args.name or ("models_quick" if args.quick else "models")
    lines = headline(rows, args.members)
    precision = "float32" if args.precision == "fp32" else "bf16 autocast (fp32 master weights)"
    layout = ", channels_last" if args.channels_last else ""
    notes = (f"{precision}{layout}, {args.threads} threads, batch {args.batch_size}, median of {args.repeats}; ERK densities; "
             "each sparse row's speedups are against the dense model timed interleaved with it (dense_*_ms: "
             "each round runs dense, sparse and ensemble once, so the machine's drift reaches them alike); "
             f"train step = forward + backward + SGD step + one RigL update / {args.update_interval} steps; "
             "ideal = dense FLOPs / sparse FLOPs (ours); gflops_counter = torch FlopCounterMode on the same "
             "forward.\n\n" + "\n".join(f"- {line}" for line in lines))
    paths = write_results(name, rows, COLUMNS, args.out, notes)
    png = os.path.join(args.out, f"{name}.png")
    plot(rows, png, args.members)
    print(markdown_table(rows, COLUMNS))
    for line in lines:
        print(line)
    print(f"\nwrote {paths['json']}, {paths['md']} and {png}")
    return 0
