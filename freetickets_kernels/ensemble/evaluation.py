"""Evaluating members and ensembles: logits over a data set, and measured inference latency."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..timing import median_seconds


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


def inference_latency(models: Dict[str, Sequence[nn.Module]], batch: torch.Tensor, repeats: int = 20,
                      warmup: int = 3) -> Dict[str, float]:
    """Median seconds of one forward of ``batch`` through each entry's models, one after another
    (an ensemble entry runs all of its members), measured in this one run."""
    device = batch.device
    out = {}
    for name, group in models.items():
        for m in group:
            m.eval()

        @torch.inference_mode()
        def forward(group=group):
            for m in group:
                m(batch)

        out[name] = median_seconds(forward, repeats, warmup, device)
    return out
