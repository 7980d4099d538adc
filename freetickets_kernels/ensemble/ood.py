"""Out-of-distribution detection: how well a model's confidence separates in- from out-of-distribution inputs.

Scores follow one convention: higher = more in-distribution.  The maximum softmax
probability (Hendrycks & Gimpel, 2017) is one; the negative predictive entropy another.
``probs`` are ``[N, K]`` probabilities: one model's softmax or an ensemble's mean softmax.
"""

from __future__ import annotations

from typing import Dict

import torch


def _scores(values, side: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{side} has no scores; AUROC needs at least one in- and one out-of-distribution score")
    if torch.isnan(t).any():
        raise ValueError(f"{side} has NaN scores; check the model's outputs")
    return t


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve, in-distribution as the positive class; ties count one half.

    The Mann-Whitney U statistic from average ranks (O(n log n)): the probability that a
    random in-distribution score exceeds a random out-of-distribution one.  Equals
    ``sklearn.metrics.roc_auc_score`` with labels 1 for in, 0 for out.
    """
    pos, neg = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    values = torch.cat([pos, neg])
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    # tied values share the mean of the 1-based ranks they occupy
    first = torch.cumsum(counts, 0) - counts + 1
    mean_rank = first.double() + (counts.double() - 1) / 2
    rank_sum = mean_rank[inverse[:pos.numel()]].sum().item()
    n_pos, n_neg = pos.numel(), neg.numel()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _check_probs(probs: torch.Tensor, name: str = "probs") -> torch.Tensor:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"expected {name} [N, classes], got {shape}")
    p = probs.detach().double()
    if p.numel() and (p.min() < 0 or p.max() > 1 or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-3)):
        raise ValueError(f"{name} rows must be probabilities summing to 1; pass softmax(logits) "
                         "(or ensemble_probs(member_logits)), not logits")
    return p


def max_softmax(probs: torch.Tensor) -> torch.Tensor:
    """The maximum class probability per sample ``[N]`` (float64): high = confident = in-distribution."""
    return _check_probs(probs).amax(1)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy per sample ``[N]`` in nats (float64), with 0 * log 0 = 0: high = uncertain."""
    p = _check_probs(probs)
    return -torch.xlogy(p, p).sum(1)


def ood_metrics(in_probs: torch.Tensor, out_probs: torch.Tensor) -> Dict[str, float]:
    """AUROC of the in- vs out-of-distribution split by max softmax and by (negative) entropy."""
    _check_probs(in_probs, "in_probs")
    _check_probs(out_probs, "out_probs")
    if in_probs.shape[1] != out_probs.shape[1]:
        raise ValueError(f"in_probs has {in_probs.shape[1]} classes but out_probs {out_probs.shape[1]}; "
                         "score both sets with the same model")
    return {
        "auroc_msp": auroc(max_softmax(in_probs), max_softmax(out_probs)),
        "auroc_entropy": auroc(-predictive_entropy(in_probs), -predictive_entropy(out_probs)),
    }
