"""Dynamic sparse training: the prune/grow engine (SET, RigL), its block scores and growth criteria.

``engine`` (:class:`DynamicSparseTraining`: schedule and the steps of an
update), ``scoring`` (gradient capture and block scores), ``growth`` (which
blocks are pruned and grown).  The per-layer densities (ERK, ER, uniform)
live in :mod:`freetickets_kernels.nn.densities`, below ``dst``, because
``sparsify`` needs them; they are re-exported here.
"""

from ..nn.densities import DISTRIBUTIONS, layer_densities
from .engine import SCHEDULES, DynamicSparseTraining
from .growth import GROWTH, GROWTH_METHODS

__all__ = ["DISTRIBUTIONS", "DynamicSparseTraining", "GROWTH", "GROWTH_METHODS", "SCHEDULES", "layer_densities"]
