"""Drop-in block-sparse layers, whole-model conversion and the per-layer densities it spreads."""

from .base import BlockSparseModule
from .conv import SparseConv2d
from .densities import DISTRIBUTIONS, layer_densities
from .linear import SparseLinear
from .sparsify import SparsifyReport, densify, sparsify

__all__ = ["BlockSparseModule", "DISTRIBUTIONS", "SparseConv2d", "SparseLinear", "SparsifyReport", "densify",
           "layer_densities", "sparsify"]
