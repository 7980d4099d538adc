"""Per-layer densities for a global density: ERK, ER and uniform.

ERK (Erdős–Rényi-Kernel, Evci et al. 2020) gives a layer with weight
``[n_out, n_in, kh, kw]`` density proportional to
``(n_out + n_in + kh + kw) / (n_out * n_in * kh * kw)``; ER drops the kernel
terms.  A layer whose density would exceed 1 is kept dense and the rest of the
budget is spread over the others, so that the total number of kept weights is
``density`` times the total (exact up to each layer's block rounding).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

# the distributions, and what each name stands for
DISTRIBUTION_NAMES: Dict[str, str] = {
    "erk": "Erdős–Rényi-Kernel",
    "er": "Erdős–Rényi",
    "uniform": "the same density in every layer",
}
DISTRIBUTIONS = tuple(DISTRIBUTION_NAMES)


def _raw_score(shape: Sequence[int], distribution: str) -> float:
    n_out, n_in = shape[0], shape[1]
    kernel = list(shape[2:])
    if distribution == "erk":
        return (n_out + n_in + sum(kernel)) / (n_out * n_in * math.prod(kernel))
    return (n_out + n_in) / (n_out * n_in)  # er


def layer_densities(shapes: Dict[str, Sequence[int]], density: float, distribution: str = "erk") -> Dict[str, float]:
    """Density of each named weight shape so that the kept fraction overall is ``density``."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if not shapes:
        return {}
    if distribution == "uniform" or density == 1:
        return {name: float(density) for name in shapes}
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: _raw_score(shape, distribution) for name, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense: List[str] = []
    while True:
        sparse = [n for n in shapes if n not in dense]
        left = budget - sum(sizes[n] for n in dense)
        eps = left / sum(raw[n] * sizes[n] for n in sparse)
        over = [n for n in sparse if eps * raw[n] > 1]
        if not over:
            break
        dense.append(max(over, key=lambda n: raw[n]))  # the densest first, then re-spread
    return {n: (1.0 if n in dense else eps * raw[n]) for n in shapes}
