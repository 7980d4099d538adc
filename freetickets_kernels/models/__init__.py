"""Models the FreeTickets experiments use, by name (``build_model``)."""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .mlp import MLP
from .small_resnet import SmallResNet
from .wide_resnet import WideResNet, wrn28_10

__all__ = ["MLP", "SmallResNet", "WideResNet", "wrn28_10", "MODELS", "build_model"]


def _torchvision(name: str) -> Callable[[int, int, int], nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return model
    return build


def _wrn(depth: int, widen: int) -> Callable[[int, int, int], nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        if in_channels != 3:
            raise ValueError("the Wide ResNets take 3-channel images (CIFAR)")
        return WideResNet(depth, widen, num_classes)
    return build


# each builder takes (num_classes, in_channels, image_size)
MODELS: Dict[str, Callable[[int, int, int], nn.Module]] = {
    "mlp": lambda classes, channels, size: MLP(channels * size * size, classes),
    "small-resnet": lambda classes, channels, size: SmallResNet(classes, channels, width=64, blocks=2),
    "tiny-resnet": lambda classes, channels, size: SmallResNet(classes, channels, width=16, blocks=1),
    "wrn-16-8": _wrn(16, 8),
    "wrn-28-10": _wrn(28, 10),
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
}


def build_model(name: str, num_classes: int, in_channels: int, image_size: int = 8) -> nn.Module:
    """A fresh model by name (one of ``MODELS``) for ``in_channels`` x ``image_size`` x ``image_size`` inputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes, in_channels, image_size)
