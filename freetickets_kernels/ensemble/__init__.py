"""FreeTickets ensembles, the library part: the training plans of dense / DST / EDST runs, ensemble
prediction and the ensemble metrics.

The run itself (``PlanRunner``: epochs, DST updates, EDST explorations, members, checkpoints and
resume) is run bookkeeping and lives in the application, ``freetickets_kernels.app.training``; the
table and result files of ``freetickets train`` in ``freetickets_kernels.app.report``.
"""

from .corruptions import CORRUPTIONS, SEVERITIES, SEVERITY_TABLE, corrupt
from .evaluation import member_logits, predict
from .metrics import (accuracy, calibration_bins, disagreement, ece, ensemble_metrics, ensemble_probs, nll,
                      pairwise_kl, single_metrics)
from .ood import auroc, max_softmax, ood_metrics, predictive_entropy
from .schedules import Phase, dense_plan, dst_ensemble_plan, edst_plan, step_lrs

__all__ = [
    "Phase", "dense_plan", "dst_ensemble_plan", "edst_plan", "step_lrs",
    "predict", "member_logits",
    "accuracy", "nll", "ece", "calibration_bins", "disagreement", "pairwise_kl", "ensemble_probs",
    "ensemble_metrics", "single_metrics",
    "CORRUPTIONS", "SEVERITIES", "SEVERITY_TABLE", "corrupt",
    "auroc", "max_softmax", "predictive_entropy", "ood_metrics",
]
