"""Which blocks a DST update moves: the ``k`` live blocks it prunes and the ``k`` it grows.

Pruning drops the live blocks with the smallest L2 norm.  Growth picks among
the blocks dead after pruning (a just-pruned block may come straight back):
``random`` (SET) uniformly at random, ``gradient`` (RigL) those with the
largest dense-gradient block norm.  Both return bool block masks of the
layer's grid; the engine installs them.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..layout import BlockSparseLayout

# the growth criteria, and what each is called in the literature
GROWTH_METHODS: Dict[str, str] = {
    "random": "SET (uniformly at random)",
    "gradient": "RigL (the largest dense-gradient block norms)",
}
GROWTH = tuple(GROWTH_METHODS)


def prune_blocks(layout: BlockSparseLayout, norms: torch.Tensor, k: int) -> torch.Tensor:
    """Bool block mask of the ``k`` live blocks with the smallest ``norms`` (by slot; ties: lowest
    position first)."""
    live = layout.block_mask
    live_slots = layout.slot_map[live]
    order = torch.argsort(norms.to(live_slots.device)[live_slots], stable=True)[:k]
    drop = torch.zeros_like(live)
    drop.view(-1)[live.view(-1).nonzero().squeeze(1)[order]] = True
    return drop


def grow_blocks(layout: BlockSparseLayout, drop: torch.Tensor, k: int, growth: str,
                scores: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bool block mask of the ``k`` blocks grown once ``drop`` is pruned: among the dead ones, at random
    (``growth="random"``, drawn from ``generator``) or those with the largest ``scores`` ``[R, C]``
    (``growth="gradient"``)."""
    live = layout.block_mask
    candidates = ~(live & ~drop)
    if growth == "random":
        cand_idx = candidates.view(-1).nonzero().squeeze(1)
        pick = cand_idx[torch.randperm(cand_idx.numel(), generator=generator)[:k].to(cand_idx.device)]
    elif growth == "gradient":
        score = scores.to(live.device).masked_fill(~candidates, float("-inf")).view(-1)
        pick = torch.topk(score, k, sorted=False).indices
    else:
        raise ValueError(f"growth must be one of {GROWTH}, got {growth!r}")
    grow = torch.zeros_like(live)
    grow.view(-1)[pick] = True
    return grow
