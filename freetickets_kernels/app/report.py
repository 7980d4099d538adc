"""The result of ``freetickets train``: two tables, and results.json, summary.md, reliability.png,
robustness.png.

Rows: the dense baseline, every member, the ensemble; with several methods
(:func:`combine`), the dense baseline and each method's ensemble, every
member's row kept per method.  Quality: test accuracy,
NLL, ECE, their means over the corrupted test sets and the OoD-detection AUROC.
Cost: training FLOPs and measured training time, inference FLOPs, parameters
and the inference latency measured in this run, each with its ratio to dense.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from ..ensemble.evaluation import member_logits
from ..ensemble.metrics import calibration_bins, ensemble_metrics, single_metrics
from ..flops import count_flops, parameter_count
from .checkpoint import remove_stale_temporaries
from .machine import machine_info
from .results import markdown_table, write_text_atomic
from .shift_eval import ShiftSets, evaluate_shift
from .timing import inference_latency
from .training import PlanRunner, RunResult, precision_context

# two tables: what the models predict (clean test set, corrupted sets, OoD detection), and what they cost
QUALITY = {"model": "model", "accuracy": "acc", "nll": "NLL", "ece": "ECE", "c_accuracy": "C-acc",
           "c_nll": "C-NLL", "c_ece": "C-ECE", "auroc_msp": "OoD AUROC (MSP)", "auroc_entropy": "(entropy)"}
COST = {"model": "model", "train_flops": "train FLOPs", "train_flops_x_dense": "(x dense)", "train_s": "train s",
        "train_s_x_dense": "(x dense)", "inference_flops": "infer FLOPs/sample", "inference_flops_x_dense": "(x dense)",
        "params": "params", "latency_ms": "latency ms", "latency_x_dense": "(x dense)"}
RATIOS = {"train_flops": "train_flops_x_dense", "train_s": "train_s_x_dense",
          "inference_flops": "inference_flops_x_dense", "latency_ms": "latency_x_dense"}
# the ensemble row's name: "dense ensemble", not "dense-ensemble ensemble"
ENSEMBLE_NAMES = {"dense-ensemble": "dense"}
# methods whose members are independent runs: each member paid its own share of the cost
INDEPENDENT = ("dst", "dense-ensemble")


def _ratio(value: Optional[float], dense: Optional[float]) -> Optional[float]:
    return None if value is None or not dense else value / dense


def _per_epoch(run: RunResult) -> Optional[float]:
    """Mean wall-clock seconds of one training epoch (with its validation pass) of ``run``."""
    return run.seconds / len(run.history) if run.history else None


@dataclass
class DenseBaseline:
    """The dense baseline of one seed, evaluated once for every method's summary: its run, its model
    (timed again beside each method's members), its row without latency, its calibration bins."""

    run: RunResult
    model: nn.Module
    row: dict
    calibration: List[dict]


def evaluate_dense(dense: RunResult, dense_runner: PlanRunner, test: Dataset, example: torch.Tensor,
                   shift: Optional[ShiftSets] = None) -> DenseBaseline:
    """The dense baseline on ``test`` and the ``shift`` sets, its FLOPs on ``example`` and its size."""
    shift = shift or ShiftSets()
    device, batch = dense_runner.device, dense_runner.config.batch_size
    model = dense_runner.member_model(dense.members[0])
    with precision_context(device, dense.config.precision):
        logits, targets = member_logits([model], test, batch, device)
        shifted = evaluate_shift([model], shift, logits, batch, device)[0]
    flops = count_flops(model, example)
    row = {"model": "dense", **single_metrics(logits[0], targets), **shifted,
           "train_flops": flops.training(dense.counters["samples"]), "train_s": dense.seconds,
           "inference_flops": flops.forward, **parameter_count(model)}
    return DenseBaseline(dense, model, row, calibration_bins(logits[0].double().softmax(-1), targets))


def summarize(ensemble: RunResult, ensemble_runner: PlanRunner, test: Dataset, example: torch.Tensor,
              baseline: Optional[DenseBaseline] = None, latency_repeats: int = 20,
              shift: Optional[ShiftSets] = None) -> Dict[str, object]:
    """Evaluate the members on ``test`` and on the ``shift`` sets beside the dense ``baseline``
    (:func:`evaluate_dense`); count FLOPs and time inference on ``example`` (one batch)."""
    shift = shift or ShiftSets()
    dense = baseline.run if baseline is not None else None
    device = ensemble_runner.device
    batch = ensemble_runner.config.batch_size
    members = [ensemble_runner.member_model(m) for m in ensemble.members]
    in_precision = lambda: precision_context(device, ensemble.config.precision)  # noqa: E731
    with in_precision():
        logits, targets = member_logits(members, test, batch, device)
        shifted = evaluate_shift(members, shift, logits, batch, device)
    metrics = ensemble_metrics(logits, targets)
    flops = [count_flops(m, example) for m in members]
    params = [parameter_count(m) for m in members]
    method, m = ensemble.config.method, len(members)
    train_flops = flops[0].training(ensemble.counters["samples"], ensemble.counters["dense_gradient_samples"])
    timed = {f"member {i + 1}": [mod] for i, mod in enumerate(members)}
    timed["ensemble"] = members
    rows: List[dict] = []
    calibration = {"ensemble": metrics["calibration"]}
    dense_row = None
    if baseline is not None:
        calibration["dense"] = baseline.calibration
        timed = {"dense": [baseline.model], **timed}
        dense_row = dict(baseline.row)  # this summary's copy: its latency and ratios are its own
    with in_precision():
        latency = inference_latency(timed, example.to(device), repeats=latency_repeats)
    if dense_row is not None:
        rows.append(dense_row)
    for i, (f, p) in enumerate(zip(flops, params)):
        row = {"model": f"member {i + 1} ({ensemble.members[i]['name']}, epoch {ensemble.members[i]['epoch']})",
               **single_metrics(logits[i], targets), **shifted[i], "inference_flops": f.forward, **p}
        if method in INDEPENDENT:  # independent runs: each member paid its own share
            row["train_flops"] = train_flops / m
            row["train_s"] = ensemble.seconds / m
        rows.append(row)
    rows.append({"model": f"{ENSEMBLE_NAMES.get(method, method)} ensemble (M={m})", "accuracy": metrics["accuracy"],
                 "nll": metrics["nll"], "ece": metrics["ece"], **shifted[-1], "train_flops": train_flops,
                 "train_s": ensemble.seconds,
                 "inference_flops": sum(f.forward for f in flops),
                 "params": sum(p["params"] for p in params),
                 "dense_params": sum(p["dense_params"] for p in params)})
    for row, key in zip(rows, list(timed)):
        row["latency_ms"] = latency[key] * 1e3
    for row in rows:
        for col, ratio in RATIOS.items():
            row[ratio] = _ratio(row.get(col), dense_row.get(col) if dense_row else None)
    return {
        "method": method, "members": m, "config": vars(ensemble.config).copy(), "rows": rows,
        "diversity": {"disagreement": metrics["disagreement"], "kl": metrics["kl"],
                      "member_accuracy": metrics["member_accuracy"]},
        "calibration": calibration, "counters": {"ensemble": ensemble.counters,
                                                 "dense": dense.counters if dense else None},
        "train_seconds": {"ensemble": ensemble.seconds, "dense": dense.seconds if dense else None},
        "checkpoint_seconds": {"ensemble": ensemble.checkpoint_seconds,
                               "dense": dense.checkpoint_seconds if dense else None},
        "epoch_seconds": {"ensemble": _per_epoch(ensemble), "dense": _per_epoch(dense) if dense else None},
        "latency_batch": list(example.shape), "machine": machine_info(),
        "shift": {"corrupted_sets": [[c, sev, len(d)] for c, sev, d in shift.corrupted], "ood": shift.ood_name,
                  "ood_samples": len(shift.ood) if shift.ood is not None else 0},
    }


def combine(by_method: Dict[str, Dict[str, object]]) -> Dict[str, object]:
    """One summary of several methods' summaries (each already over its seeds): the dense row once, then
    each method's ensemble row; each method's whole summary (every member's row) under ``by_method``.

    Each method's ratios are to the dense model as measured in that method's own evaluation (latency
    is timed there, beside the method's members); the dense row shown is the first method's."""
    if len(by_method) == 1:
        return next(iter(by_method.values()))
    first = next(iter(by_method.values()))
    rows = [first["rows"][0]] if first["rows"][0]["model"] == "dense" else []
    rows += [s["rows"][-1] for s in by_method.values()]
    calibration = {"dense": first["calibration"]["dense"]} if "dense" in first["calibration"] else {}
    calibration.update({s["rows"][-1]["model"].split(" (")[0]: s["calibration"]["ensemble"]
                        for s in by_method.values()})
    combined = {"methods": list(by_method), "members": first["members"],
                "config": {**first["config"], "method": list(by_method)}, "rows": rows, "calibration": calibration,
                "latency_batch": first["latency_batch"], "machine": first["machine"], "shift": first["shift"],
                "by_method": by_method}
    if first.get("seeds"):
        combined["seeds"] = first["seeds"]
    return combined


def _by_method(summary: Dict[str, object]) -> Dict[str, Dict[str, object]]:
    return summary.get("by_method") or {summary["method"]: summary}


def _cell(v, col: str) -> str:
    if v is None:
        return "-"
    if col in ("accuracy", "nll", "ece", "c_accuracy", "c_nll", "c_ece", "auroc_msp", "auroc_entropy"):
        return f"{v:.4f}"
    if col.endswith("x_dense"):
        return f"{v:.2f}x"
    if col in ("train_flops", "inference_flops"):
        return f"{v:.3g}"
    if col == "latency_ms":
        return f"{v:.2f}"
    if col == "train_s":
        return f"{v:.1f}"
    if col in ("params", "dense_params"):
        return str(round(v))
    return str(v)


def _with_spread(row: dict, col: str) -> str:
    text = _cell(row.get(col), col)
    spread = row.get(f"{col}_std")
    return text if not spread or col == "params" else f"{text}±{_cell(spread, col).rstrip('x')}"


def _text_table(rows: List[dict], columns: Dict[str, str]) -> List[str]:
    cells = [[_with_spread(r, c) for c in columns] for r in rows]
    heads = list(columns.values())
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    line = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return [line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells]


def format_table(summary: Dict[str, object]) -> str:
    rows, shift = summary["rows"], summary.get("shift") or {}
    out = _text_table(rows, QUALITY)
    sets = shift.get("corrupted_sets") or []
    if sets:
        names = sorted({c for c, _, _ in sets})
        out.append(f"C-: mean over {len(sets)} corrupted test sets ({len(names)} corruptions x "
                   f"{len(sets) // len(names)} severities: {', '.join(names)})")
    if shift.get("ood"):
        out.append(f"OoD: clean test set against {shift['ood']} ({shift['ood_samples']} images); "
                   "AUROC 1 = always told apart, 0.5 = chance")
    methods = _by_method(summary)
    for method, s in methods.items():
        div = s["diversity"]
        out.append(f"{method}: members disagree on {div['disagreement']:.2%} of test samples; mean pairwise KL "
                   f"{div['kl']:.4f}")
    if summary.get("seeds"):
        out.append(f"mean ± std over {len(summary['seeds'])} training seeds {summary['seeds']} "
                   "(same data split and shifted sets)")
    out += [""] + _text_table(rows, COST)
    out.append(f"latency: one batch of {summary['latency_batch'][0]} samples, median of repeats, this machine; "
               f"precision {summary['config'].get('precision', 'fp32')}")
    # every method's runs, and the dense baseline once (each method's summary holds the same one)
    written = [s.get("checkpoint_seconds") or {} for s in methods.values()]
    writing = [w.get("ensemble") or 0 for w in written] + [written[0].get("dense") or 0]
    out.append("train s: measured wall-clock of the whole training (every epoch and its validation pass, not the "
               f"checkpoint writing: {sum(writing):.1f} s in all{', per seed' if summary.get('seeds') else ''}), "
               "this machine, one run after the other")
    dense_epoch = next(iter(methods.values())).get("epoch_seconds", {}).get("dense")
    epochs = []
    for method, s in methods.items():
        mine = s.get("epoch_seconds", {}).get("ensemble")
        if dense_epoch and mine:
            speed = f"{dense_epoch / mine:.2f}x faster" if mine <= dense_epoch else f"{mine / dense_epoch:.2f}x slower"
            epochs.append(f"{method} {mine:.2f} s ({speed} than dense)")
    if epochs:
        out.append(f"one epoch: dense {dense_epoch:.2f} s; " + "; ".join(epochs))
    return "\n".join(out)


def reliability_png(calibration: Dict[str, List[dict]], path: str) -> None:
    """Reliability diagram: accuracy against confidence per bin, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(calibration), figsize=(4.2 * len(calibration), 4), squeeze=False)
    for ax, (name, bins) in zip(axes[0], calibration.items()):
        width = bins[0]["hi"] - bins[0]["lo"]
        lefts = [b["lo"] for b in bins]
        ax.bar(lefts, [b["accuracy"] if b["count"] else 0 for b in bins], width=width, align="edge",
               edgecolor="black", label="accuracy")
        ax.bar(lefts, [abs(b["confidence"] - b["accuracy"]) if b["count"] else 0 for b in bins], width=width,
               bottom=[min(b["accuracy"], b["confidence"]) for b in bins], align="edge", color="tab:red",
               alpha=0.3, label="|confidence - accuracy|")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=name)
        ax.legend(loc="upper left")
    fig.tight_layout()
    _save_png(fig, path)


def _save_png(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    remove_stale_temporaries(path)  # a report killed while plotting
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def robustness_png(rows: List[dict], path: str) -> None:
    """Accuracy, NLL and ECE against corruption severity (0 = clean) for the dense model and each
    ensemble (members thin, dashed): the paper's robustness figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for row in rows:
        if not row.get("by_severity"):
            continue
        severities = sorted(row["by_severity"], key=int)
        member = row["model"].startswith("member")
        for ax, metric in zip(axes, ("accuracy", "nll", "ece")):
            values = [row[metric]] + [row["by_severity"][s][metric] for s in severities]
            ax.plot([0] + [int(s) for s in severities], values, marker="" if member else "o",
                    linestyle="--" if member else "-", linewidth=0.8 if member else 2,
                    alpha=0.5 if member else 1, label=row["model"].split(" (")[0] if not member else None)
    for ax, label in zip(axes, ("accuracy", "NLL", "ECE")):
        ax.set(xlabel="corruption severity (0 = clean)", ylabel=label, title=f"{label} under corruption")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    _save_png(fig, path)


def write_outputs(summary: Dict[str, object], out_dir: str) -> Dict[str, str]:
    """results.json, summary.md, reliability.png and (with corrupted sets) robustness.png under ``out_dir``;
    returns their paths."""
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "summary.md"),
             "png": os.path.join(out_dir, "reliability.png")}
    if any(r.get("by_severity") for r in summary["rows"]):
        paths["robustness"] = os.path.join(out_dir, "robustness.png")
    write_text_atomic(paths["json"], json.dumps(summary, indent=2, default=str))
    info, methods = summary["machine"], _by_method(summary)
    md = [f"# freetickets train: {', '.join(methods)} {'ensemble' if len(methods) == 1 else 'ensembles'}, "
          f"M={summary['members']}", ""]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += ["", "```", format_table(summary), "```", "", markdown_table(summary["rows"], list(QUALITY)), "",
           markdown_table(summary["rows"], list(COST)), "", "![reliability diagram](reliability.png)", ""]
    if "robustness" in paths:
        md += ["![accuracy, NLL and ECE against corruption severity](robustness.png)", ""]
    if len(methods) > 1:  # every member's row, per method
        for method, s in methods.items():
            md += [f"## {method}: every member", "", markdown_table(s["rows"], list(QUALITY)), "",
                   markdown_table(s["rows"], list(COST)), ""]
    write_text_atomic(paths["md"], "\n".join(md))
    reliability_png(summary["calibration"], paths["png"])
    if "robustness" in paths:
        robustness_png(summary["rows"], paths["robustness"])
    return paths
