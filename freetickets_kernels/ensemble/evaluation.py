"""Evaluating members and ensembles: logits over a data set.

(Measured inference latency lives with the timing code, in ``freetickets_kernels.app.timing``.)
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.inference_mode()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256,
            device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, K], targets [N])`` of ``model`` (in eval mode) over ``dataset``, on the CPU."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size):
            logits.append(model(x.to(device)).float().cpu())
            targets.append(y)
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def member_logits(models: Sequence[nn.Module], dataset: Dataset, batch_size: int = 256,
                  device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits [M, N, K], targets [N])`` of every member over ``dataset``."""
    outs = [predict(m, dataset, batch_size, device) for m in models]
    return torch.stack([o[0] for o in outs]), outs[0][1]
