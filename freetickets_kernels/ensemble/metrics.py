"""Ensemble prediction and the FreeTickets metrics: accuracy, NLL, ECE, diversity.

Every function takes member *logits* ``[M, N, K]`` (or one model's ``[N, K]``)
and integer targets ``[N]``; the ensemble's prediction is the mean of the
members' softmax probabilities.
"""

from __future__ import annotations

import itertools
from typing import Dict, List

import torch

ECE_BINS = 15


def _check(probs: torch.Tensor, targets: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"expected probabilities [N, classes], got shape {tuple(probs.shape)}")
    if targets.shape != probs.shape[:1]:
        raise ValueError(f"targets must have shape [{probs.shape[0]}], got {tuple(targets.shape)}")


def ensemble_probs(member_logits: torch.Tensor) -> torch.Tensor:
    """Mean of the members' softmax probabilities: ``[M, N, K]`` logits -> ``[N, K]``."""
    if member_logits.dim() != 3 or member_logits.shape[0] == 0:
        raise ValueError(f"expected member logits [M >= 1, N, classes], got shape {tuple(member_logits.shape)}")
    return member_logits.double().softmax(-1).mean(0)


def accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    _check(probs, targets)
    return (probs.argmax(1) == targets).double().mean().item()


def nll(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood of the targets (probabilities floored at 1e-12)."""
    _check(probs, targets)
    picked = probs.double().gather(1, targets.view(-1, 1)).squeeze(1)
    return -picked.clamp_min(1e-12).log().mean().item()


def calibration_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> List[dict]:
    """Equal-width confidence bins ``(lo, hi]`` (the first also holds 0): count, mean confidence, accuracy."""
    _check(probs, targets)
    conf, pred = probs.double().max(1)
    correct = (pred == targets).double()
    index = (conf * bins).ceil().long().clamp(1, bins) - 1
    rows = []
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                     "confidence": conf[sel].mean().item() if n else 0.0,
                     "accuracy": correct[sel].mean().item() if n else 0.0})
    return rows


def ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by bin size."""
    rows = calibration_bins(probs, targets, bins)
    total = sum(r["count"] for r in rows)
    return sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / max(total, 1)


def disagreement(member_logits: torch.Tensor) -> float:
    """Mean over member pairs of the fraction of samples whose predicted class differs."""
    preds = member_logits.argmax(-1)
    pairs = list(itertools.combinations(range(preds.shape[0]), 2))
    if not pairs:
        return 0.0
    return sum((preds[i] != preds[j]).double().mean().item() for i, j in pairs) / len(pairs)


def pairwise_kl(member_logits: torch.Tensor) -> float:
    """Mean over ordered member pairs (i != j) of KL(p_i || p_j), averaged over samples."""
    logp = member_logits.double().log_softmax(-1)
    m = logp.shape[0]
    if m < 2:
        return 0.0
    total = 0.0
    for i, j in itertools.permutations(range(m), 2):
        total += (logp[i].exp() * (logp[i] - logp[j])).sum(-1).mean().item()
    return total / (m * (m - 1))


def single_metrics(logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """Accuracy, NLL and ECE of one model's logits ``[N, K]``."""
    probs = logits.double().softmax(-1)
    return {"accuracy": accuracy(probs, targets), "nll": nll(probs, targets), "ece": ece(probs, targets)}


def ensemble_metrics(member_logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, object]:
    """Everything the FreeTickets tables report about an ensemble of ``M`` members."""
    probs = ensemble_probs(member_logits)
    return {
        "accuracy": accuracy(probs, targets),
        "nll": nll(probs, targets),
        "ece": ece(probs, targets),
        "member_accuracy": [accuracy(lg.double().softmax(-1), targets) for lg in member_logits],
        "disagreement": disagreement(member_logits),
        "kl": pairwise_kl(member_logits),
        "calibration": calibration_bins(probs, targets),
    }
