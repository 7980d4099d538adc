"""A wide multilayer perceptron: the default model of ``freetickets train`` on the 8x8 digits.

Why an MLP and not a ConvNet there: on 8x8 inputs every convolution of a small
ResNet is a few thousand output pixels, too little work for a block-sparse
kernel to beat the dense one on two CPU cores (the small ResNet's sparse
training step is no faster than its dense step).  Hidden layers of 1024
units make the block-sparse matmul the whole cost of a step, so the
measured training time shows what the FLOPs promise.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then ``depth`` x (Linear, BatchNorm1d, ReLU) of ``width`` units, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, width: int = 1024, depth: int = 3) -> None:
        super().__init__()
        if min(in_features, num_classes, width, depth) <= 0:
            raise ValueError("in_features, num_classes, width and depth must be positive")
        layers, cin = [], in_features
        for _ in range(depth):
            layers += [nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU()]
            cin = width
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(x.flatten(1)))
