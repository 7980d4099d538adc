"""Training plans: the phases of a dense run, a DST Ensemble and an EDST Ensemble.

A plan is a list of :class:`Phase`; each lists the learning rate of each of
its epochs, whether it starts a fresh model, whether it starts with EDST's
global exploration, and whether its best-validation checkpoint is an
ensemble member.  Plans are plain data, so tests and ``--help`` can show
exactly what a run will do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class Phase:
    name: str
    lrs: Tuple[float, ...]  # learning rate of each epoch
    new_run: bool           # fresh model, optimizer and DST engine (seeded with ``seed``)
    seed: int
    explore: bool = False   # EDST global exploration before the first epoch
    member: bool = True     # the best-validation checkpoint of this phase joins the ensemble

    @property
    def epochs(self) -> int:
        return len(self.lrs)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def step_lrs(epochs: int, lr: float) -> Tuple[float, ...]:
    """The usual CIFAR schedule: ``lr``, divided by 10 at 50% and again at 75% of the epochs."""
    _positive("epochs", epochs)
    return tuple(lr * (0.1 ** ((e >= epochs / 2) + (e >= 3 * epochs / 4))) for e in range(epochs))


def dense_plan(epochs: int, lr: float = 0.1, seed: int = 0) -> List[Phase]:
    """One dense (or single sparse) training of ``epochs`` epochs."""
    return [Phase("dense", step_lrs(epochs, lr), new_run=True, seed=seed)]


def dst_ensemble_plan(epochs: int, members: int, lr: float = 0.1, seed: int = 0) -> List[Phase]:
    """DST Ensemble: ``members`` independent DST runs of ``epochs`` epochs, seeds ``seed + i``."""
    _positive("members", members)
    return [Phase(f"member-{i + 1}", step_lrs(epochs, lr), new_run=True, seed=seed + i) for i in range(members)]


def edst_plan(epochs: int, explore_epochs: int, members: int, explore_lr: float = 0.1,
              refine_lr: float = 0.01, final_lr: float = 0.001, seed: int = 0) -> List[Phase]:
    """EDST Ensemble in ``epochs`` epochs in all (the cost of one training).

    Exploration: ``explore_epochs`` at ``explore_lr``.  Then ``members``
    refinement phases of ``(epochs - explore_epochs) / members`` epochs each,
    at ``refine_lr`` for the first half and ``final_lr`` for the second; every
    refinement phase after the first starts with a global exploration (and the
    learning rate back at ``refine_lr``).  Each refinement phase yields one
    member: its best-validation checkpoint.
    """
    _positive("epochs", epochs)
    _positive("explore_epochs", explore_epochs)
    _positive("members", members)
    refine, left = divmod(epochs - explore_epochs, members)
    if refine <= 0 or left:
        raise ValueError(
            f"epochs - explore_epochs = {epochs - explore_epochs} must be a positive multiple of "
            f"members = {members} (each refinement phase gets the same number of epochs)")
    plan = [Phase("explore", (explore_lr,) * explore_epochs, new_run=True, seed=seed, member=False)]
    lrs = tuple(refine_lr if e < refine / 2 else final_lr for e in range(refine))
    plan += [Phase(f"refine-{m + 1}", lrs, new_run=False, seed=seed, explore=m > 0) for m in range(members)]
    return plan
