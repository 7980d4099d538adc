"""Run a training plan: epochs, DST updates, EDST explorations, members, checkpoints, resume.

One :class:`PlanRunner` trains a dense model, a DST Ensemble or an EDST
Ensemble (the plan says which).  After every epoch it writes
``<out>/checkpoint.pt`` atomically, and every member it finds to
``<out>/members/<name>.pt``; ``run(resume=True)`` continues from the last
epoch written, so an interrupted run loses at most one epoch and never a
member.  Data order depends only on (seed, phase, epoch), so a resumed run
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..dst import DynamicSparseTraining
from ..ensemble.evaluation import predict
from ..ensemble.schedules import Phase, dense_plan, dst_ensemble_plan, edst_plan
from ..layout import block_size_pair, check_density
from ..nn.sparsify import sparsify
from . import checkpoint
from .progress import Progress

METHODS = ("dense", "dst", "edst")
# --precision: the autocast dtype of training and evaluation (fp32: no autocast);
# fp16 also scales the loss (torch.amp.GradScaler) and skips the DST update of
# a step whose gradients overflowed
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT = "checkpoint.pt"
FORMAT = 1


@dataclass
class TrainConfig:
    """Everything that decides what a run computes (saved in its checkpoint; a resume must match).

    The defaults are those of the FreeTickets EDST recipe: RigL growth, ERK
    densities, an update every 1000 iterations, prune rate 0.5 cosine-decayed
    over the whole run, global exploration of 80% of the live blocks.
    """

    method: str = "edst"
    epochs: int = 250
    explore_epochs: int = 100
    members: int = 3
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    density: float = 0.2
    block_size: List[int] = field(default_factory=lambda: [16, 16])
    distribution: str = "erk"
    growth: str = "gradient"
    update_interval: int = 1000
    prune_rate: float = 0.5
    explore_fraction: float = 0.8
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        self.block_size = list(block_size_pair(self.block_size))
        check_density(self.density, allow_zero=False)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.explore_fraction <= 1:
            raise ValueError(f"explore_fraction must be in [0, 1], got {self.explore_fraction}")
        self.plan()  # validates epochs / explore_epochs / members

    @property
    def sparse(self) -> bool:
        return self.method != "dense"

    def plan(self) -> List[Phase]:
        if self.method == "dense":
            return dense_plan(self.epochs, self.lr, self.seed)
        if self.method == "dst":
            return dst_ensemble_plan(self.epochs, self.members, self.lr, self.seed)
        return edst_plan(self.epochs, self.explore_epochs, self.members, explore_lr=self.lr,
                         refine_lr=self.lr / 10, final_lr=self.lr / 100, seed=self.seed)


@dataclass
class RunResult:
    """What a finished run hands over: its members and what training them cost."""

    config: TrainConfig
    members: List[dict]          # name, epoch, val_accuracy, val_nll, state (model state_dict)
    counters: Dict[str, int]     # samples, dense_gradient_samples, steps, updates, explorations
    history: List[dict]          # one row per epoch
    seconds: float


def _order_seed(seed: int, phase: int, epoch: int) -> int:
    return (seed * 1_000_003 + phase * 10_007 + epoch) % (2 ** 63)


def precision_context(device: torch.device, precision: str):
    """``torch.autocast`` in ``precision``'s dtype on ``device`` (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class PlanRunner:
    """Train ``config``'s plan on ``train`` data, choosing members on ``val`` data.

    ``model_fn()`` builds a fresh dense model (the runner seeds torch first and
    sparsifies it for sparse methods).  ``out_dir`` receives the checkpoint and
    the members.
    """

    def __init__(self, config: TrainConfig, model_fn: Callable[[], nn.Module], train: Dataset, val: Dataset,
                 out_dir: str, device: Union[str, torch.device] = "cpu", progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.config, self.model_fn = config, model_fn
        self.train_set, self.val_set = train, val
        self.out_dir, self.device = out_dir, torch.device(device)
        self.main = distributed.is_main()
        self.show_progress = progress and self.main
        self._log = log
        self.plan = config.plan()
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.dst: Optional[DynamicSparseTraining] = None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")

    def log(self, text: str) -> None:
        if self.main:
            self._log(text)

    # ------------------------------------------------------------- building
    def build_model(self, seed: int) -> nn.Module:
        """A fresh model of this run (sparsified for sparse methods), on the run's device."""
        torch.manual_seed(seed)
        model = self.model_fn()
        if self.config.sparse:
            sparsify(model, self.config.density, tuple(self.config.block_size), self.config.distribution)
        return model.to(self.device)

    def member_model(self, member: dict) -> nn.Module:
        """A model holding ``member``'s weights and layouts, in eval mode."""
        model = self.build_model(self.config.seed)
        checkpoint.load_model_state(model, member["state"])
        return model.eval()

    def _steps_per_epoch(self) -> int:
        per_rank = distributed.shard_size(len(self.train_set))
        return -(-per_rank // self.config.batch_size)

    def _new_run(self, phase_index: int) -> None:
        phase = self.plan[phase_index]
        run_epochs = phase.epochs
        if self.config.method == "edst":  # one DST run across every phase
            run_epochs = sum(p.epochs for p in self.plan)
        cfg = self.config
        self.model = self.build_model(phase.seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=phase.lrs[0], momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
        self.dst = None
        if cfg.sparse:
            self.dst = DynamicSparseTraining(
                self.model, self.optimizer, update_interval=cfg.update_interval, prune_rate=cfg.prune_rate,
                prune_rate_schedule="cosine", growth=cfg.growth,
                total_steps=run_epochs * self._steps_per_epoch(), seed=phase.seed)
        self.trained = distributed.wrap(self.model)

    # ------------------------------------------------------------ the loop
    def _loader(self, dataset: Dataset, seed: int, shuffle: bool) -> DataLoader:
        sampler = distributed.sampler(dataset, seed, shuffle)
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=self.config.batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, generator=generator)

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _train_epoch(self, phase_index: int, epoch: int, counters: Dict[str, int]) -> dict:
        phase = self.plan[phase_index]
        lr = phase.lrs[epoch]
        self._set_lr(lr)
        self.trained.train()
        world = distributed.world_size()
        loader = self._loader(self.train_set, _order_seed(self.config.seed, phase_index, epoch), True)
        bar = Progress(loader, f"{phase.name} epoch {epoch + 1}/{phase.epochs}", enabled=self.show_progress)
        loss_sum = correct = seen = 0.0
        for x, y in bar:
            x, y = x.to(self.device), y.to(self.device)
            with precision_context(self.device, self.config.precision):
                out = self.trained(x)
                loss = F.cross_entropy(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
            self.scaler.update()
            overflowed = self.scaler.is_enabled() and self.scaler.get_scale() < scale
            counters["samples"] += len(y) * world
            counters["steps"] += 1
            if self.dst is not None:
                entry = self.dst.step(found_inf=overflowed)
                if entry is not None:
                    if self.config.growth == "gradient":
                        counters["dense_gradient_samples"] += len(y) * world  # paid even when skipped
                    if entry["kind"] == "update":
                        counters["updates"] += 1
                    else:
                        self.log(f"step {counters['steps']}: DST update skipped: {entry['why']}")
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f} lr {lr:g}")
        return {"phase": phase.name, "epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": correct / max(seen, 1)}

    def _explore(self, phase_index: int, counters: Dict[str, int]) -> None:
        """EDST's global exploration, driven by the gradient of one training batch (RigL growth)."""
        fraction, world = self.config.explore_fraction, distributed.world_size()
        if self.config.growth == "gradient":
            loader = self._loader(self.train_set, _order_seed(self.config.seed, phase_index, -1), True)
            x, y = next(iter(loader))
            x, y = x.to(self.device), y.to(self.device)
            self.dst.arm_gradient_capture()
            self.trained.train()
            self.optimizer.zero_grad(set_to_none=True)
            with precision_context(self.device, self.config.precision):
                loss = F.cross_entropy(self.trained(x), y)
            self.scaler.scale(loss).backward()  # block norms rank the same at any scale
            self.optimizer.zero_grad(set_to_none=True)
            counters["samples"] += len(y) * world
            counters["dense_gradient_samples"] += len(y) * world
        entry = self.dst.explore(fraction)
        counters["explorations"] += 1
        changed = sum(layer["changed"] for layer in entry["layers"].values())
        self.log(f"{self.plan[phase_index].name}: global exploration moved {changed} blocks "
                 f"({fraction:.0%} of the live blocks of every layer)")

    # ---------------------------------------------------------- checkpoint
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, CHECKPOINT)

    def _save(self, phase_index: int, epoch: int, best, members, counters, history, seconds, done: bool) -> None:
        """Write the checkpoint (rank 0 only); a finished run keeps its members, not its training state."""
        if not self.main:
            return
        live = not done
        state = {
            "format": FORMAT, "config": asdict(self.config), "phase": phase_index, "epoch": epoch,
            "model": self.model.state_dict() if live else None,
            "optimizer": self.optimizer.state_dict() if live else None,
            "dst": self.dst.state_dict() if live and self.dst is not None else None,
            "scaler": self.scaler.state_dict() if live else None,
            "best": best, "members": members, "counters": counters, "history": history,
            "seconds": seconds, "done": done,
        }
        checkpoint.save(state, self.checkpoint_path)

    def _load(self) -> dict:
        state = checkpoint.load(self.checkpoint_path)
        if state.get("format") != FORMAT:
            raise checkpoint.CheckpointError(f"{self.checkpoint_path} has format {state.get('format')}, "
                                             f"this version reads {FORMAT}")
        # runs saved before --precision existed trained in fp32
        saved, mine = {"precision": "fp32", **state["config"]}, asdict(self.config)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume {self.checkpoint_path}: the run was started with other settings "
                             f"({changes}); rerun with the saved settings or use another --out")
        return state

    # ----------------------------------------------------------------- run
    def run(self, resume: bool = False, on_epoch_end: Optional[Callable[[dict], None]] = None) -> RunResult:
        """Train the whole plan (or what is left of it with ``resume=True``)."""
        exists = os.path.exists(self.checkpoint_path)
        if exists and not resume:
            raise FileExistsError(f"{self.checkpoint_path} already holds a run: pass --resume to continue it, "
                                  "or choose another --out")
        phase_index, epoch, best, members, history, seconds = 0, 0, None, [], [], 0.0
        counters = dict.fromkeys(("samples", "dense_gradient_samples", "steps", "updates", "explorations"), 0)
        state = None
        if resume and exists:
            state = self._load()
            phase_index, epoch, best = state["phase"], state["epoch"], state["best"]
            members, counters, history = state["members"], state["counters"], state["history"]
            seconds = state["seconds"]
            if state["done"]:
                self.log(f"{self.checkpoint_path}: run already complete ({len(members)} members)")
                return RunResult(self.config, members, counters, history, seconds)
            self.log(f"resuming {self.checkpoint_path}: phase {self.plan[phase_index].name}, "
                     f"epoch {epoch}/{self.plan[phase_index].epochs}, {len(members)} members found")
        start = time.perf_counter() - seconds
        # the model, optimizer and DST engine the resumed phase had
        resumed_new_run = epoch == 0 and self.plan[phase_index].new_run  # rebuilt below anyway
        if state is not None and state["model"] is not None and not resumed_new_run:
            run_start = phase_index
            while not self.plan[run_start].new_run:
                run_start -= 1
            self._new_run(run_start)
            checkpoint.load_model_state(self.model, state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.dst is not None:
                self.dst.load_state_dict(state["dst"])
            if state.get("scaler"):  # fp16's loss scale, as it had grown
                self.scaler.load_state_dict(state["scaler"])
        for pi in range(phase_index, len(self.plan)):
            phase = self.plan[pi]
            if epoch == 0:
                if phase.new_run:
                    self._new_run(pi)
                if phase.explore:
                    self._explore(pi, counters)
            for e in range(epoch, phase.epochs):
                row = self._train_epoch(pi, e, counters)
                with precision_context(self.device, self.config.precision):
                    logits, targets = predict(self.model, self.val_set, self.config.batch_size, self.device)
                val_acc = (logits.argmax(1) == targets).double().mean().item()
                val_nll = F.cross_entropy(logits.double(), targets).item()
                row.update(val_accuracy=val_acc, val_nll=val_nll, seconds=time.perf_counter() - start)
                if self.dst is not None:
                    row["density"] = sum(m.density * m.values.numel() for m in self.dst.layers.values()) / max(
                        sum(m.values.numel() for m in self.dst.layers.values()), 1)
                if phase.member and (best is None or (val_acc, -val_nll) > (best["val_accuracy"], -best["val_nll"])):
                    best = {"name": phase.name, "epoch": e + 1, "val_accuracy": val_acc, "val_nll": val_nll,
                            "state": copy.deepcopy(self.model.state_dict())}
                    row["best"] = True
                history.append(row)
                self.log(f"{phase.name} epoch {e + 1}/{phase.epochs}: val accuracy {val_acc:.4f} nll {val_nll:.4f}"
                         + ("  (best so far)" if row.get("best") else ""))
                last = e + 1 == phase.epochs
                if last and phase.member:
                    members.append(best)
                    self._save_member(best)
                    best = None
                next_phase, next_epoch = (pi + 1, 0) if last else (pi, e + 1)
                done = last and pi + 1 == len(self.plan)
                self._save(next_phase, next_epoch, best, members, counters, history, time.perf_counter() - start,
                           done)
                if on_epoch_end is not None:
                    on_epoch_end(row)
            epoch = 0
        return RunResult(self.config, members, counters, history, time.perf_counter() - start)

    def _save_member(self, member: dict) -> None:
        if self.main:
            path = os.path.join(self.out_dir, "members", f"{member['name']}.pt")
            checkpoint.save(dict(member, config=asdict(self.config)), path)
            self.log(f"member {member['name']}: epoch {member['epoch']}, val accuracy "
                     f"{member['val_accuracy']:.4f} -> {path}")
