"""A run's models on shifted data: the corrupted test sets and the out-of-distribution set.

For one model or the members of an ensemble (the ensemble predicts the mean
of the members' softmax), in one pass over each set: accuracy, NLL and ECE
on every (corruption, severity) set, reduced to the mean over all of them
(the paper's "corrupted" figure) and to the mean per severity; and the
AUROC of telling the clean test set from the OoD set by the max softmax
probability and by the predictive entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset

from ..ensemble.evaluation import member_logits
from ..ensemble.metrics import accuracy, ece, nll
from ..ensemble.ood import ood_metrics

METRICS = ("accuracy", "nll", "ece")


@dataclass
class ShiftSets:
    """The shifted sets of a run: ``(corruption, severity, dataset)`` triples and an OoD set."""

    corrupted: List[Tuple[str, int, Dataset]] = field(default_factory=list)
    ood_name: Optional[str] = None
    ood: Optional[Dataset] = None

    def describe(self) -> str:
        names = sorted({c for c, _, _ in self.corrupted})
        severities = sorted({s for _, s, _ in self.corrupted})
        parts = [f"{len(names)} corruptions x {len(severities)} severities" if names else "no corrupted sets"]
        parts.append(f"OoD set {self.ood_name} ({len(self.ood)} images)" if self.ood is not None else "no OoD set")
        return ", ".join(parts)


def _metrics(probs: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    return {"accuracy": accuracy(probs, targets), "nll": nll(probs, targets), "ece": ece(probs, targets)}


def _mean(rows: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRICS}


def evaluate_shift(models: Sequence[nn.Module], sets: ShiftSets, clean_logits: torch.Tensor, batch_size: int,
                   device) -> List[Dict[str, object]]:
    """Shift metrics of each member of ``models`` and, for two or more, of their ensemble (last).

    ``clean_logits`` ``[M, N, K]`` are the members' logits on the clean test set (the in-distribution
    side of the OoD AUROC).  Each entry: ``c_accuracy``, ``c_nll``, ``c_ece`` (mean over every corrupted
    set), ``by_severity`` ``{severity: {accuracy, nll, ece}}`` (mean over corruptions),
    ``by_corruption`` ``{name: {...}}`` (mean over severities), ``auroc_msp``, ``auroc_entropy``.
    """
    count = len(models) + (len(models) > 1)
    per_set: List[List[Tuple[str, int, Dict[str, float]]]] = [[] for _ in range(count)]
    for name, severity, dataset in sets.corrupted:
        logits, targets = member_logits(models, dataset, batch_size, device)
        probs = logits.double().softmax(-1)
        entries = list(probs) + ([probs.mean(0)] if len(models) > 1 else [])
        for own, p in zip(per_set, entries):
            own.append((name, severity, _metrics(p, targets)))
    out: List[Dict[str, object]] = []
    for own in per_set:
        entry: Dict[str, object] = {}
        if own:
            entry.update({f"c_{k}": v for k, v in _mean([m for _, _, m in own]).items()})
            entry["by_severity"] = {s: _mean([m for _, sev, m in own if sev == s])
                                    for s in sorted({sev for _, sev, _ in own})}
            entry["by_corruption"] = {c: _mean([m for name, _, m in own if name == c])
                                      for c in sorted({name for name, _, _ in own})}
        out.append(entry)
    if sets.ood is not None:
        ood_logits, _ = member_logits(models, sets.ood, batch_size, device)
        clean, shifted = clean_logits.double().softmax(-1), ood_logits.double().softmax(-1)
        pairs = list(zip(clean, shifted)) + ([(clean.mean(0), shifted.mean(0))] if len(models) > 1 else [])
        for entry, (p_in, p_out) in zip(out, pairs):
            entry.update(ood_metrics(p_in, p_out))
    return out
