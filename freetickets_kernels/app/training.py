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
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..dst import DynamicSparseTraining
from ..dst.growth import GROWTH
from ..ensemble.evaluation import predict
from ..ensemble.schedules import Phase, dense_plan, dst_ensemble_plan, edst_plan
from ..layout import block_size_pair, check_density
from ..nn.densities import DISTRIBUTIONS
from ..nn.sparsify import sparsify
from . import checkpoint
from .progress import Progress

# dense: one dense model; dense-ensemble: M independent dense models (the deep-ensemble baseline);
# dst: M independent sparse runs (DST Ensemble); edst: one sparse run, M members (EDST Ensemble)
METHODS = ("dense", "dense-ensemble", "dst", "edst")
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
        for name in ("epochs", "explore_epochs", "members", "batch_size", "update_interval"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name, lo, hi, closed in (("prune_rate", 0, 1, True), ("explore_fraction", 0, 1, True),
                                     ("momentum", 0, 1, False)):
            value = getattr(self, name)
            if not _is_real(value) or not (lo <= value <= hi if closed else lo <= value < hi):
                raise ValueError(f"{name} must be in [{lo}, {hi}{']' if closed else ')'}, got {value!r}")
        if not _is_real(self.lr) or not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _is_real(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if self.growth not in GROWTH:
            raise ValueError(f"growth must be one of {GROWTH}, got {self.growth!r}")
        self.plan()  # validates epochs / explore_epochs / members

    @property
    def sparse(self) -> bool:
        return self.method in ("dst", "edst")

    def plan(self) -> List[Phase]:
        if self.method == "dense":
            return dense_plan(self.epochs, self.lr, self.seed)
        if self.method in ("dst", "dense-ensemble"):
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
    seconds: float               # training wall-clock: epochs and validation passes, not checkpoint writing
    checkpoint_seconds: float = 0.0  # writing checkpoints and members (grows with the members a checkpoint holds)


def baseline_twin(config: TrainConfig) -> Optional[TrainConfig]:
    """The dense baseline that is ``config``'s first member, or None: a dense ensemble's first member is
    the baseline's training exactly (same settings, seed, learning rates and batches), so a run of both
    trains it once (:func:`first_member_run`)."""
    if config.method != "dense-ensemble":
        return None
    dense = replace(config, method="dense")
    mine, theirs = config.plan()[0], dense.plan()[0]
    return dense if (mine.lrs, mine.seed, mine.new_run) == (theirs.lrs, theirs.seed, theirs.new_run) else None


def first_member_run(run: RunResult) -> RunResult:
    """The dense baseline's run cut from ``run``, a dense ensemble's: its first member, the epochs that
    trained it (their training clock) and their share of the counters.  Its checkpoint writing is the
    ensemble's (``checkpoint_seconds`` 0), so a sum over the methods counts it once."""
    dense = baseline_twin(run.config)
    if dense is None:
        raise ValueError(f"a {run.config.method} run does not hold the dense baseline's training")
    epochs, m = dense.plan()[0].epochs, run.config.members
    history = run.history[:epochs]
    counters = {k: v // m for k, v in run.counters.items()}
    return RunResult(dense, run.members[:1], counters, history, history[-1]["seconds"])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


COUNTERS = ("samples", "dense_gradient_samples", "steps", "updates", "explorations")


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
        # each run its own loss scale (independent DST members do not inherit one; a resume at a
        # run's start matches an uninterrupted run)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
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
            self.scaler.scale(loss).backward()  # RigL scores in fp32: the scale changes no ranking
            self.optimizer.zero_grad(set_to_none=True)
            counters["samples"] += len(y) * world
            counters["dense_gradient_samples"] += len(y) * world
        entry = self.dst.explore(fraction)
        if entry["kind"] == "skipped":  # a non-finite (e.g. overflowed fp16) gradient: no blocks moved
            self.log(f"{self.plan[phase_index].name}: global exploration skipped: {entry['why']}")
            return
        counters["explorations"] += 1
        changed = sum(layer["changed"] for layer in entry["layers"].values())
        self.log(f"{self.plan[phase_index].name}: global exploration moved {changed} blocks "
                 f"({fraction:.0%} of the live blocks of every layer)")

    # ---------------------------------------------------------- checkpoint
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, CHECKPOINT)

    def member_path(self, name: str) -> str:
        return os.path.join(self.out_dir, "members", f"{name}.pt")

    def _save(self, phase_index: int, epoch: int, best, members, counters, history, seconds, done: bool,
              checkpoint_seconds: float = 0.0) -> None:
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
            "seconds": seconds, "checkpoint_seconds": checkpoint_seconds, "done": done,
        }
        checkpoint.save(state, self.checkpoint_path)

    def _bad(self, field_name: str, why: str) -> checkpoint.CheckpointError:
        why = " ".join(why.split())
        return checkpoint.CheckpointError(f"cannot resume {self.checkpoint_path}: field '{field_name}' {why}; "
                                          "the file is damaged or was not written by this run")

    def _check_member(self, field_name: str, member, name: str, max_epoch: int) -> None:
        if not isinstance(member, dict):
            raise self._bad(field_name, f"must be a member dict, got {type(member).__name__}")
        for key, ok in (("name", lambda v: v == name),
                        ("epoch", lambda v: _is_int(v) and 1 <= v <= max_epoch),
                        ("val_accuracy", lambda v: _is_real(v) and 0 <= v <= 1),
                        ("val_nll", lambda v: _is_real(v) and v >= 0),
                        ("state", lambda v: isinstance(v, dict))):
            if key not in member:
                raise self._bad(f"{field_name}.{key}", "is missing")
            if not ok(member[key]):
                raise self._bad(f"{field_name}.{key}", f"has an impossible value {_short(member[key])}")

    def _check_fields(self, state) -> None:
        """Every field of a loaded checkpoint, against this run's plan (a CheckpointError naming the field)."""
        if not isinstance(state, dict):
            raise checkpoint.CheckpointError(f"cannot resume {self.checkpoint_path}: it holds a "
                                             f"{type(state).__name__}, not a training checkpoint")
        for key in ("format", "config", "phase", "epoch", "model", "optimizer", "dst", "best", "members",
                    "counters", "history", "seconds", "done"):
            if key not in state:
                raise self._bad(key, "is missing")
        if state["format"] != FORMAT:
            raise checkpoint.CheckpointError(f"{self.checkpoint_path} has format {state['format']!r}, "
                                             f"this version reads {FORMAT}")
        if not isinstance(state["config"], dict):
            raise self._bad("config", f"must be a dict, got {type(state['config']).__name__}")
        # runs saved before --precision existed trained in fp32
        saved, mine = {"precision": "fp32", **state["config"]}, asdict(self.config)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume {self.checkpoint_path}: the run was started with other settings "
                             f"({changes}); rerun with the saved settings or use another --out")
        plan, done = self.plan, state["done"]
        if not isinstance(done, bool):
            raise self._bad("done", f"must be true or false, got {_short(done)}")
        phase, epoch = state["phase"], state["epoch"]
        if not _is_int(phase) or not (phase == len(plan) if done else 0 <= phase < len(plan)):
            raise self._bad("phase", f"has an impossible value {_short(phase)} (the plan has {len(plan)} phases"
                            f"{', and the run is finished' if done else ''})")
        top = 0 if done else plan[phase].epochs - 1
        if not _is_int(epoch) or not 0 <= epoch <= top:
            raise self._bad("epoch", f"has an impossible value {_short(epoch)} (expected 0..{top})")
        members = state["members"]
        names = [p.name for p in plan[:phase] if p.member]
        if not isinstance(members, list) or len(members) != len(names):
            raise self._bad("members", f"must be a list of the {len(names)} members found before phase {phase}, "
                            f"got {_short(members)}")
        for i, (member, name) in enumerate(zip(members, names)):
            epochs = next(p.epochs for p in plan if p.name == name)
            self._check_member(f"members[{i}]", member, name, epochs)
        best = state["best"]
        if not done and plan[phase].member and epoch > 0:
            self._check_member("best", best, plan[phase].name, epoch)
        elif best is not None:
            raise self._bad("best", "must be empty outside a member phase's first epochs")
        counters = state["counters"]
        if not isinstance(counters, dict) or set(counters) != set(COUNTERS) or not all(
                _is_int(v) and v >= 0 for v in counters.values()):
            raise self._bad("counters", f"must map {', '.join(COUNTERS)} to non-negative integers, "
                            f"got {_short(counters)}")
        epochs_done = sum(p.epochs for p in plan[:phase]) + epoch
        history = state["history"]
        if not isinstance(history, list) or len(history) != epochs_done or not all(
                isinstance(row, dict) for row in history):
            raise self._bad("history", f"must hold one row per finished epoch ({epochs_done}), got {_short(history)}")
        if counters["steps"] != epochs_done * self._steps_per_epoch():
            raise self._bad("counters.steps", f"is {counters['steps']}, but {epochs_done} epochs of "
                            f"{self._steps_per_epoch()} steps were trained")
        for key in ("seconds", "checkpoint_seconds"):  # checkpoint_seconds: absent in older checkpoints
            value = state.get(key, 0.0)
            if not _is_real(value) or value < 0:
                raise self._bad(key, f"has an impossible value {_short(value)}")
        if not done:
            for key in ("model", "optimizer"):
                if not isinstance(state[key], dict):
                    raise self._bad(key, f"must be a state dict, got {type(state[key]).__name__}")
            if self.config.sparse and not isinstance(state["dst"], dict):
                raise self._bad("dst", f"must be a DST state dict, got {type(state['dst']).__name__}")
            if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
                raise self._bad("scaler", f"must be a dict, got {type(state['scaler']).__name__}")

    def _restore(self, state: dict, phase_index: int, epoch: int) -> None:
        """Build the run the checkpoint's phase belongs to and load model, optimizer, DST engine and loss
        scale into it: a state that does not fit is a CheckpointError naming the field."""
        run_start = phase_index
        while not self.plan[run_start].new_run:
            run_start -= 1
        self._new_run(run_start)
        try:
            checkpoint.load_model_state(self.model, state["model"])
        except checkpoint.CheckpointError as exc:
            raise self._bad("model", f"does not fit the model ({exc})") from None
        fresh_groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                        for g in self.optimizer.state_dict()["param_groups"]]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
            raise self._bad("optimizer", f"does not fit the optimizer ({_clip(str(exc))})") from None
        loaded_groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                         for g in self.optimizer.state_dict()["param_groups"]]
        if loaded_groups != fresh_groups:
            raise self._bad("optimizer.param_groups", f"are {loaded_groups}, this run's are {fresh_groups}")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, param in enumerate(params):
            for key, value in self.optimizer.state.get(param, {}).items():
                if key == "step":
                    continue
                if not torch.is_tensor(value) or value.shape != param.shape or not value.is_floating_point() \
                        or not torch.isfinite(value).all():
                    raise self._bad(f"optimizer.state[{i}].{key}", f"does not fit parameter {i} "
                                    f"(shape {tuple(param.shape)})")
        if self.dst is not None:
            try:
                self.dst.load_state_dict(state["dst"])
            except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
                raise self._bad("dst", f"does not fit the DST engine ({_clip(str(exc))})") from None
            trained = sum(p.epochs for p in self.plan[run_start:phase_index]) + epoch
            expected = trained * self._steps_per_epoch()
            if not _is_int(self.dst.steps) or self.dst.steps != expected:
                raise self._bad("dst.steps", f"is {_short(self.dst.steps)}, but this run trained {expected} steps")
        if state.get("scaler"):  # fp16's loss scale, as it had grown
            try:
                self.scaler.load_state_dict(state["scaler"])
            except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
                raise self._bad("scaler", f"does not fit ({_clip(str(exc))})") from None
            if not self.scaler.is_enabled() or not 0 < self.scaler.get_scale() < math.inf:
                raise self._bad("scaler", "holds an impossible loss scale")

    def _load(self) -> dict:
        """The checkpoint, every field checked (CheckpointError / ValueError naming what is wrong)."""
        state = checkpoint.load(self.checkpoint_path)
        self._check_fields(state)
        return state

    def prepare(self, resume: bool = False) -> Optional[dict]:
        """Everything ``run(resume)`` checks before it trains, done without training: refuses to start over
        an existing run, loads and checks a checkpoint to resume (every field, and a trial load into a
        fresh model, optimizer and DST engine), or builds the model and DST engine a new run starts with.
        Returns the checkpoint (None for a new run).  Leaves the random number generators as they were."""
        exists = os.path.lexists(self.checkpoint_path)
        if exists and not resume:
            raise FileExistsError(f"{self.checkpoint_path} already holds a run: pass --resume to continue it, "
                                  "or choose another --out")
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            state = None
            if exists:
                state = self._load()
                if not state["done"] and not (state["epoch"] == 0 and self.plan[state["phase"]].new_run):
                    self._restore(state, state["phase"], state["epoch"])
            else:  # what the library would refuse (e.g. no sparse layer left) fails here, not after a baseline
                try:
                    self._new_run(0)
                except ValueError as exc:
                    raise ValueError(f"cannot start the {self.config.method} run with these settings "
                                     f"(density {self.config.density}, blocks {self.config.block_size}): "
                                     f"{exc}") from None
            self.model = self.optimizer = self.dst = self.trained = None
        self._prepared = (resume, state)
        return state

    def _repair_members(self, members: List[dict]) -> None:
        """Check ``members/*.pt`` against the checkpoint's members; rewrite a missing or damaged one."""
        for member in members:
            path = self.member_path(member["name"])
            checkpoint.remove_stale_temporaries(path)
            why = None
            try:
                saved = checkpoint.load(path)
                if not _same_member(saved, member):
                    why = "differs from the checkpoint's copy"
            except FileNotFoundError:
                why = "is missing"
            except checkpoint.CheckpointError as exc:
                why = f"is damaged ({exc})"
            if why:
                self._save_member(member, quiet=True)
                self.log(f"{path} {why}: rewritten from {self.checkpoint_path}")

    # ----------------------------------------------------------------- run
    def run(self, resume: bool = False, on_epoch_end: Optional[Callable[[dict], None]] = None) -> RunResult:
        """Train the whole plan (or what is left of it with ``resume=True``)."""
        prepared = getattr(self, "_prepared", None)
        state = prepared[1] if prepared is not None and prepared[0] == resume else self.prepare(resume)
        self._prepared = None
        phase_index, epoch, best, members, history, seconds, io_seconds = 0, 0, None, [], [], 0.0, 0.0
        counters = dict.fromkeys(COUNTERS, 0)
        if self.main:
            checkpoint.remove_stale_temporaries(self.checkpoint_path)
        if state is not None:
            phase_index, epoch, best = state["phase"], state["epoch"], state["best"]
            members, counters, history = state["members"], state["counters"], state["history"]
            seconds, io_seconds = state["seconds"], state.get("checkpoint_seconds", 0.0)
            if self.main:
                self._repair_members(members)
            if state["done"]:
                self.log(f"{self.checkpoint_path}: run already complete ({len(members)} members)")
                return RunResult(self.config, members, counters, history, seconds, io_seconds)
            self.log(f"resuming {self.checkpoint_path}: phase {self.plan[phase_index].name}, "
                     f"epoch {epoch}/{self.plan[phase_index].epochs}, {len(members)} members found")
        elif resume:
            self.log(f"{self.checkpoint_path}: no checkpoint yet, starting from the beginning")
        # the training clock: ``start`` moves forward by every checkpoint write, so the time charged to a
        # method is its training, not the disk traffic of the members its checkpoint carries
        start = time.perf_counter() - seconds
        # the model, optimizer and DST engine the resumed phase had
        resumed_new_run = epoch == 0 and self.plan[phase_index].new_run  # rebuilt below anyway
        if state is not None and not resumed_new_run:
            self._restore(state, phase_index, epoch)
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
                writing = time.perf_counter()
                if last and phase.member:
                    members.append(best)
                    self._save_member(best)
                    best = None
                next_phase, next_epoch = (pi + 1, 0) if last else (pi, e + 1)
                done = last and pi + 1 == len(self.plan)
                self._save(next_phase, next_epoch, best, members, counters, history, writing - start,
                           done, io_seconds + time.perf_counter() - writing)
                wrote = time.perf_counter() - writing
                io_seconds, start = io_seconds + wrote, start + wrote
                if on_epoch_end is not None:
                    on_epoch_end(row)
            epoch = 0
        return RunResult(self.config, members, counters, history, time.perf_counter() - start, io_seconds)

    def _save_member(self, member: dict, quiet: bool = False) -> None:
        if self.main:
            path = self.member_path(member["name"])
            checkpoint.save(dict(member, config=asdict(self.config)), path)
            if not quiet:
                self.log(f"member {member['name']}: epoch {member['epoch']}, val accuracy "
                         f"{member['val_accuracy']:.4f} -> {path}")


def _clip(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _short(value, limit: int = 60) -> str:
    return _clip(repr(value), limit)


def _same_member(saved, member: dict) -> bool:
    if not isinstance(saved, dict):
        return False
    for key in ("name", "epoch", "val_accuracy", "val_nll"):
        if saved.get(key) != member.get(key):
            return False
    a, b = saved.get("state"), member["state"]
    if not isinstance(a, dict) or set(a) != set(b):
        return False
    return all(torch.is_tensor(a[k]) == torch.is_tensor(b[k]) and
               (torch.equal(a[k], b[k]) if torch.is_tensor(b[k]) else a[k] == b[k]) for k in b)
