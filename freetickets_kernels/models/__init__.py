"""Models the FreeTickets experiments use that torchvision does not ship."""

from .wide_resnet import WideResNet, wrn28_10

__all__ = ["WideResNet", "wrn28_10"]
