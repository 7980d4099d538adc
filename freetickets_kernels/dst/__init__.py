"""Dynamic sparse training: per-layer densities and the prune/grow engine (SET, RigL)."""

from .densities import DISTRIBUTIONS, layer_densities
from .engine import DynamicSparseTraining

__all__ = ["DISTRIBUTIONS", "DynamicSparseTraining", "layer_densities"]
