"""Ensemble metrics against values computed by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from freetickets_kernels.ensemble import metrics


def _logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_ensemble_probs_is_mean_of_member_softmax():
    a = [[0.9, 0.1], [0.2, 0.8]]
    b = [[0.5, 0.5], [0.6, 0.4]]
    probs = metrics.ensemble_probs(torch.stack([_logits_of(a), _logits_of(b)]))
    assert_close(probs, torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=torch.float64))


def test_accuracy_nll_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 0])
    assert metrics.accuracy(probs, targets) == pytest.approx(2 / 3)
    assert metrics.nll(probs, targets) == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.9)) / 3)


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins (13/15, 14/15] and (8/15, 9/15]
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 0])
    expected = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert metrics.ece(probs, targets) == pytest.approx(expected)
    bins = metrics.calibration_bins(probs, targets)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 3
    assert bins[13]["count"] == 2 and bins[8]["count"] == 1


def test_ece_confidence_one_lands_in_last_bin():
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert metrics.calibration_bins(probs, torch.tensor([0]))[-1]["count"] == 1
    assert metrics.ece(probs, torch.tensor([0])) == pytest.approx(0.0)


def test_disagreement_and_kl_by_hand():
    a = _logits_of([[0.9, 0.1], [0.2, 0.8]])
    b = _logits_of([[0.6, 0.4], [0.7, 0.3]])
    stack = torch.stack([a, b])
    assert metrics.disagreement(stack) == pytest.approx(0.5)
    kl_ab = (0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4) + 0.2 * math.log(0.2 / 0.7)
             + 0.8 * math.log(0.8 / 0.3)) / 2
    kl_ba = (0.6 * math.log(0.6 / 0.9) + 0.4 * math.log(0.4 / 0.1) + 0.7 * math.log(0.7 / 0.2)
             + 0.3 * math.log(0.3 / 0.8)) / 2
    assert metrics.pairwise_kl(stack) == pytest.approx((kl_ab + kl_ba) / 2)
    assert metrics.disagreement(stack[:1]) == 0.0 and metrics.pairwise_kl(stack[:1]) == 0.0


def test_ensemble_metrics_fields():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, 4)
    targets = torch.randint(0, 4, (50,))
    out = metrics.ensemble_metrics(logits, targets)
    assert len(out["member_accuracy"]) == 3
    assert 0 <= out["ece"] <= 1 and out["nll"] > 0 and 0 <= out["disagreement"] <= 1


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="member logits"):
        metrics.ensemble_probs(torch.randn(5, 3))
    with pytest.raises(ValueError, match="targets"):
        metrics.accuracy(torch.rand(5, 3), torch.zeros(4, dtype=torch.long))
