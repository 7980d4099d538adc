"""Drop-in block-sparse layers, whole-model conversion and the per-layer densities it spreads."""

from .attention import SparseMultiheadAttention
from .base import BlockSparseModule
from .conv import SparseConv2d
from .conv1d import SparseConv1d
from .conversions import register_conversion, unregister_conversion
from .densities import DISTRIBUTIONS, layer_densities
from .linear import SparseLinear
from .loading import densify_state_dict, load_sparse
from .sparsify import SparsifyReport, densify, sparsify

__all__ = ["BlockSparseModule", "DISTRIBUTIONS", "SparseConv1d", "SparseConv2d", "SparseLinear",
           "SparseMultiheadAttention", "SparsifyReport", "densify", "densify_state_dict", "layer_densities",
           "load_sparse", "register_conversion", "sparsify", "unregister_conversion"]
