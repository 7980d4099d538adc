"""Dynamic sparse training: per-layer densities (and, next, prune/grow and schedules)."""

from .densities import DISTRIBUTIONS, layer_densities

__all__ = ["DISTRIBUTIONS", "layer_densities"]
