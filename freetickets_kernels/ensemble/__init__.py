"""FreeTickets: DST Ensemble and EDST Ensemble training, and the ensemble metrics."""

from .evaluation import inference_latency, member_logits, predict
from .metrics import (accuracy, calibration_bins, disagreement, ece, ensemble_metrics, ensemble_probs, nll,
                      pairwise_kl, single_metrics)
from .schedules import Phase, dense_plan, dst_ensemble_plan, edst_plan, step_lrs
from .training import METHODS, PlanRunner, RunResult, TrainConfig

__all__ = [
    "Phase", "dense_plan", "dst_ensemble_plan", "edst_plan", "step_lrs",
    "TrainConfig", "PlanRunner", "RunResult", "METHODS",
    "predict", "member_logits", "inference_latency",
    "accuracy", "nll", "ece", "calibration_bins", "disagreement", "pairwise_kl", "ensemble_probs",
    "ensemble_metrics", "single_metrics",
]
