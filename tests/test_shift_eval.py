"""The shift evaluation of a run's models: corrupted-set metrics reduced over sets and severities,
the ensemble as the mean softmax, and the OoD AUROC, each against a direct computation."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from freetickets_kernels.app.shift_eval import ShiftSets, evaluate_shift
from freetickets_kernels.ensemble.metrics import accuracy, ece, nll
from freetickets_kernels.ensemble.ood import ood_metrics


def _sets(seed=0, n=40, features=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    make = lambda scale: TensorDataset(torch.randn(n, features, generator=g) * scale,  # noqa: E731
                                       torch.randint(0, classes, (n,), generator=g))
    corrupted = [(name, sev, make(1 + sev)) for name in ("noise", "blur") for sev in (1, 2, 3)]
    return make(1.0), ShiftSets(corrupted, "far", make(5.0))


def _models(count, features=6, classes=4):
    torch.manual_seed(1)
    return [nn.Linear(features, classes) for _ in range(count)]


def _direct(probs_of, sets, clean, targets_of):
    per = {(c, s): {"accuracy": accuracy(probs_of(d), targets_of(d)), "nll": nll(probs_of(d), targets_of(d)),
                    "ece": ece(probs_of(d), targets_of(d))} for c, s, d in sets.corrupted}
    ood = ood_metrics(probs_of(clean), probs_of(sets.ood))
    return per, ood


@pytest.mark.parametrize("count", [1, 3])
def test_shift_metrics_match_a_direct_computation(count):
    clean, sets = _sets()
    models = _models(count)
    with torch.no_grad():
        clean_logits = torch.stack([m(clean.tensors[0]) for m in models])
        got = evaluate_shift(models, sets, clean_logits, batch_size=7, device="cpu")
    assert len(got) == count + (count > 1)
    targets_of = lambda d: d.tensors[1]  # noqa: E731
    for i, entry in enumerate(got):
        if i < count:
            probs_of = lambda d, m=models[i]: m(d.tensors[0]).double().softmax(-1)  # noqa: E731
        else:  # the ensemble: the mean of the members' softmax
            probs_of = lambda d: torch.stack([m(d.tensors[0]) for m in models]).double().softmax(-1).mean(0)  # noqa: E731
        with torch.no_grad():
            per, ood = _direct(probs_of, sets, clean, targets_of)
        for metric in ("accuracy", "nll", "ece"):
            assert entry[f"c_{metric}"] == pytest.approx(sum(v[metric] for v in per.values()) / len(per))
            for sev in (1, 2, 3):
                assert entry["by_severity"][sev][metric] == pytest.approx(
                    (per[("noise", sev)][metric] + per[("blur", sev)][metric]) / 2)
            assert entry["by_corruption"]["blur"][metric] == pytest.approx(
                sum(per[("blur", s)][metric] for s in (1, 2, 3)) / 3)
        assert entry["auroc_msp"] == pytest.approx(ood["auroc_msp"])
        assert entry["auroc_entropy"] == pytest.approx(ood["auroc_entropy"])


def test_no_shift_sets_give_no_shift_metrics():
    clean, _ = _sets()
    models = _models(2)
    with torch.no_grad():
        logits = torch.stack([m(clean.tensors[0]) for m in models])
    assert evaluate_shift(models, ShiftSets(), logits, 16, "cpu") == [{}, {}, {}]
    assert ShiftSets().describe() == "no corrupted sets, no OoD set"
