"""Dynamic sparse training: prune and regrow blocks every ``update_interval`` steps.

At each update, per layer, the fraction ``rate`` of live blocks with the
smallest L2 norm is pruned and as many blocks are grown among the dead ones
(after pruning): at random (SET) or with the largest dense-gradient block norm
(RigL).  Grown blocks start at zero, and so does their optimizer state; the
layer's block count, and so the ``values`` parameter's shape, never changes.
``rate`` follows ``prune_rate`` decayed by ``prune_rate_schedule`` over
``total_steps``.

An update, step by step (:meth:`DynamicSparseTraining._update`): the growth
scores (:mod:`.scoring`; a non-finite one skips the whole update), then per
layer the blocks pruned and grown (:mod:`.growth`), rank 0's choice shared
(:meth:`~DynamicSparseTraining._agree`), and the new layout installed in the
freed slots with their values and optimizer state zeroed
(:meth:`~DynamicSparseTraining._install`).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import distributed
from ..nn.base import BlockSparseModule
from . import scoring
from .growth import GROWTH, grow_blocks, prune_blocks

SCHEDULES = ("cosine", "constant")


class DynamicSparseTraining:
    """Mask updates (SET / RigL) for every block-sparse layer of ``model``.

    Call :meth:`step` after each ``optimizer.step()``.  ``stop_fraction``
    stops the updates for the last part of training (RigL stops at 0.75).

    Frozen layers (``values.requires_grad=False``, at construction or later)
    are left out, said once in a warning and listed in :attr:`frozen`: their
    masks and weights never change, and the optimizer need not hold them.
    With gradient accumulation RigL scores the gradient of every micro-batch
    since the previous optimizer step (what the optimizer steps with), not
    just one of them: see :mod:`.scoring`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, update_interval: int = 100,
                 prune_rate: float = 0.3, prune_rate_schedule: str = "cosine", growth: str = "gradient",
                 total_steps: Optional[int] = None, stop_fraction: float = 1.0, seed: int = 0) -> None:
        if not isinstance(update_interval, int) or update_interval <= 0:
            raise ValueError(f"update_interval must be a positive int, got {update_interval!r}")
        if not 0 <= prune_rate <= 1:
            raise ValueError(f"prune_rate must be in [0, 1], got {prune_rate!r}")
        if prune_rate_schedule not in SCHEDULES:
            raise ValueError(f"prune_rate_schedule must be one of {SCHEDULES}, got {prune_rate_schedule!r}")
        if growth not in GROWTH:
            raise ValueError(f"growth must be one of {GROWTH} (random: SET, gradient: RigL), got {growth!r}")
        if prune_rate_schedule == "cosine" and (not isinstance(total_steps, int) or total_steps <= 0):
            raise ValueError("the cosine schedule needs total_steps, a positive int")
        if not 0 < stop_fraction <= 1:
            raise ValueError(f"stop_fraction must be in (0, 1], got {stop_fraction!r}")
        found = {name: m for name, m in model.named_modules() if isinstance(m, BlockSparseModule)}
        if not found:
            raise ValueError("the model has no block-sparse layers: call freetickets_kernels.sparsify(model, ...) first")
        # frozen layers (values.requires_grad=False) are left out: their masks and weights never change
        self.layers: Dict[str, BlockSparseModule] = {n: m for n, m in found.items() if m.values.requires_grad}
        self.frozen: List[str] = []
        self._note_frozen([n for n in found if n not in self.layers])
        if not self.layers:
            raise ValueError(f"every block-sparse layer of the model is frozen (requires_grad=False): {self.frozen}; "
                             "DST has nothing to update")
        self._check_optimizer(model, optimizer)
        self.optimizer = optimizer
        self.update_interval, self.prune_rate = update_interval, prune_rate
        self.schedule, self.growth = prune_rate_schedule, growth
        self.total_steps, self.stop_fraction = total_steps, stop_fraction
        self.steps = 0
        self.log: List[dict] = []
        self.generator = torch.Generator().manual_seed(seed)
        self._arm_if_update_next()

    def _check_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer must hold the ``values`` of every layer DST updates (frozen ones may be absent)."""
        held = {id(p): p for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, m in self.layers.items() if id(m.values) not in held]
        if not missing:
            return
        in_model = {id(p) for p in model.parameters()}
        stale = {tuple(p.shape) for i, p in held.items() if i not in in_model}
        replaced = [n for n in missing if tuple(self.layers[n].dense_weight_shape()) in stale]
        if replaced:
            # it holds tensors the model no longer has, shaped like these layers' dense weights
            raise ValueError(f"the optimizer does not hold the values of {missing} but holds dense weights of "
                             f"their shape that are no longer in the model (those sparsify() replaced, for "
                             f"{replaced}); build it after sparsify()")
        raise ValueError(f"the optimizer does not hold the values of {missing}, which train (requires_grad=True): "
                         "pass them to the optimizer, or freeze those layers (layer.requires_grad_(False)) "
                         "to leave them out of DST")

    def _note_frozen(self, names: List[str]) -> None:
        """Record layers left out of DST because they are frozen, and say so once."""
        new = [n for n in names if n not in self.frozen]
        if new:
            self.frozen.extend(new)
            warnings.warn(f"DST leaves out the frozen layers {new} (values.requires_grad=False): their masks and "
                          "weights are never changed", stacklevel=3)

    def _active(self) -> Dict[str, BlockSparseModule]:
        """The layers an update moves: those still trainable (a layer frozen after construction drops out)."""
        newly = [n for n, m in self.layers.items() if not m.values.requires_grad and n not in self.frozen]
        self._note_frozen(newly)
        return {n: m for n, m in self.layers.items() if n not in self.frozen}

    # -------------------------------------------------------------- schedule
    def rate(self, step: Optional[int] = None) -> float:
        """Prune fraction at ``step`` (default: now)."""
        step = self.steps if step is None else step
        if self.schedule == "constant":
            return self.prune_rate
        return 0.5 * self.prune_rate * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def _is_update_step(self, step: int) -> bool:
        if step % self.update_interval:
            return False
        return self.total_steps is None or step < self.stop_fraction * self.total_steps

    def _arm_if_update_next(self) -> None:
        if self.growth == "gradient" and self._is_update_step(self.steps + 1):
            self.arm_gradient_capture()

    # ---------------------------------------------------------------- update
    def step(self, found_inf: bool = False) -> Optional[dict]:
        """Count one training step; on update steps prune and regrow. Returns the update's log entry.

        With mixed precision pass ``found_inf=True`` when ``torch.amp.GradScaler``
        skipped this step (its scale dropped in ``update()``): the mask update
        is then skipped and logged, as it is whenever the gradient that would
        drive growth is not finite.
        """
        self.steps += 1
        entry = None
        if self._is_update_step(self.steps):
            if found_inf:
                entry = self._skip("the grad scaler found inf/NaN gradients")
            else:
                entry = self.update()
        self._arm_if_update_next()
        return entry

    def _skip(self, why: str) -> dict:
        self._release_capture()
        entry = {"step": self.steps, "kind": "skipped", "why": why, "layers": {}}
        self.log.append(entry)
        return entry

    def update(self, rate: Optional[float] = None) -> dict:
        """Prune ``rate`` (default: the scheduled rate) of every layer's blocks now and regrow as many."""
        return self._update(self.rate() if rate is None else rate, self.growth, kind="update")

    def explore(self, fraction: float, growth: Optional[str] = None) -> dict:
        """EDST's global exploration: prune ``fraction`` of each layer's live blocks and regrow as many.

        Gradient growth uses the gradient captured by the last armed
        forward/backward (arm it with :meth:`arm_gradient_capture`).
        """
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        growth = growth or self.growth
        if growth not in GROWTH:
            raise ValueError(f"growth must be one of {GROWTH}, got {growth!r}")
        return self._update(fraction, growth, kind="explore")

    def arm_gradient_capture(self) -> None:
        """Capture the gradients of every forward/backward from now on, in every trainable layer (before
        :meth:`explore`): with gradient accumulation, all the micro-batches until the update are summed."""
        for layer in self._active().values():
            scoring.arm(layer)

    def _release_capture(self) -> None:
        for layer in self.layers.values():
            scoring.release(layer)

    @torch.no_grad()
    def _update(self, rate: float, growth: str, kind: str) -> dict:
        """Move ``rate`` of every layer's live blocks: score, then prune, grow, agree and install per layer."""
        layers = self._active()
        moves = {name: int(rate * layer.layout.nnzb) for name, layer in layers.items()}
        scores: Dict[str, torch.Tensor] = {}
        if growth == "gradient":
            scores = self._growth_scores(moves)
            # (under torch.distributed the scores are already averaged, so every rank agrees here)
            bad = [name for name, s in scores.items() if not torch.isfinite(s).all()]
            if bad:
                entry = self._skip(f"non-finite gradient in {bad}")
                self._arm_if_update_next()
                return entry
        entry = {"step": self.steps, "kind": kind, "rate": rate, "layers": {}}
        for name, layer in layers.items():
            entry["layers"][name] = self._move_blocks(layer, moves[name], growth, scores.get(name))
        self._release_capture()
        self._arm_if_update_next()  # an explore() between steps must not disarm the next update
        self.log.append(entry)
        return entry

    def _growth_scores(self, moves: Dict[str, int]) -> Dict[str, torch.Tensor]:
        """RigL's dense-gradient block norms of the layers that move blocks (the others pay nothing)."""
        return {name: scoring.dense_grad_block_norms(self.layers[name]).float() for name, k in moves.items() if k}

    def _move_blocks(self, layer: BlockSparseModule, k: int, growth: str, scores: Optional[torch.Tensor]) -> dict:
        """Prune ``k`` of ``layer``'s blocks and grow ``k``; returns the layer's log entry."""
        if k == 0:
            return {"density": layer.density, "changed": 0}
        layout = layer.layout
        drop = prune_blocks(layout, scoring.magnitude_block_norms(layer), k)
        grow = grow_blocks(layout, drop, k, growth, scores, self.generator)
        drop, grow = self._agree(drop, grow)
        self._install(layer, drop, grow)
        return {"density": layer.density, "changed": int((grow & ~drop).sum())}

    @staticmethod
    def _agree(drop: torch.Tensor, grow: torch.Tensor):
        """Under torch.distributed every rank installs rank 0's choice, bit for bit."""
        if distributed.active():
            choice = distributed.broadcast_(torch.stack((drop, grow)).to(torch.uint8))
            drop, grow = choice[0].bool(), choice[1].bool()
        return drop, grow

    def _install(self, layer: BlockSparseModule, drop: torch.Tensor, grow: torch.Tensor) -> None:
        """The grown blocks take exactly the pruned blocks' slots, zeroed, with zeroed optimizer state."""
        layout = layer.layout
        freed = layout.slot_map[drop]
        layer.values[freed.to(layer.values.device)] = 0
        layer.set_layout(layout.replace_blocks(drop, grow))
        self._zero_optimizer_state(layer.values, freed)

    def _zero_optimizer_state(self, param: torch.Tensor, slots: torch.Tensor) -> None:
        """Zero the per-element optimizer state (momentum, Adam moments) of regrown slots."""
        state = self.optimizer.state.get(param, {})
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value[slots.to(value.device)] = 0

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """The engine's own state (layouts live in the model's state_dict, moments in the optimizer's)."""
        return {"steps": self.steps, "log": self.log, "generator": self.generator.get_state(),
                "config": {"update_interval": self.update_interval, "prune_rate": self.prune_rate,
                           "schedule": self.schedule, "growth": self.growth,
                           "total_steps": self.total_steps, "stop_fraction": self.stop_fraction}}

    def load_state_dict(self, state: dict) -> None:
        try:
            config, steps, log, gen = state["config"], state["steps"], state["log"], state["generator"]
        except KeyError as missing:
            raise ValueError(f"DST state is missing {missing}; was it saved by DynamicSparseTraining.state_dict()?") from None
        mine = self.state_dict()["config"]
        if config != mine:
            raise ValueError(f"DST state was saved with {config}, this engine has {mine}")
        self.steps, self.log = steps, list(log)
        self.generator.set_state(gen)
        self._release_capture()
        self._arm_if_update_next()
