"""Drop-in block-sparse layers and whole-model conversion."""

from .base import BlockSparseModule
from .conv import SparseConv2d
from .linear import SparseLinear
from .sparsify import SparsifyReport, densify, sparsify

__all__ = ["BlockSparseModule", "SparseConv2d", "SparseLinear", "SparsifyReport", "densify", "sparsify"]
