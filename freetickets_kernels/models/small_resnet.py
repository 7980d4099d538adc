"""A small ResNet for tiny images (8x8 digits up to 32x32): the default model of ``freetickets train``.

Post-activation basic blocks in two stages (``width``, then ``2 * width`` at
stride 2), global average pooling and a linear classifier: the shape of a
CIFAR ResNet, small enough to train an ensemble on two CPU cores in minutes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv, ``blocks`` basic blocks at ``width`` channels, ``blocks`` at ``2 * width`` (stride 2)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, blocks: int = 1) -> None:
        super().__init__()
        if min(num_classes, in_channels, width, blocks) <= 0:
            raise ValueError("num_classes, in_channels, width and blocks must be positive")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stage1 = [_Basic(width, width, 1) for _ in range(blocks)]
        stage2 = [_Basic(width if i == 0 else 2 * width, 2 * width, 2 if i == 0 else 1) for i in range(blocks)]
        self.stage1, self.stage2 = nn.Sequential(*stage1), nn.Sequential(*stage2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage2(self.stage1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
