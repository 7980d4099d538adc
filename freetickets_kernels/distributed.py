"""torch.distributed glue: which rank logs, how data is sharded, how DST decisions agree.

Everything here is a no-op in a single process.  Under ``torchrun`` (or any
initialised default process group with more than one rank):

- training wraps the model in ``DistributedDataParallel``.  The packed
  ``values`` parameter of a sparse layer never changes shape or identity
  (DST updates write into it in place, and ``slot_map`` is copied in place
  too), so DDP's gradient buckets and broadcast buffers stay valid across
  mask updates: a re-indexing changes which weight each value stands for,
  not the tensor DDP reduces;
- RigL growth averages each layer's dense weight gradient over the ranks
  before scoring blocks (the score of the global batch, as in one process);
- every DST update ends by broadcasting rank 0's prune / grow choice, so all
  ranks install bit-identical layouts whatever happened to floating point.
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, checkpoints and writes results."""
    return rank() == 0


def shard_size(n: int) -> int:
    """Samples each rank sees per epoch (DistributedSampler pads to a multiple of the world size)."""
    return -(-n // world_size())


def sampler(dataset: Dataset, seed: int, shuffle: bool) -> Optional[DistributedSampler]:
    if not active():
        return None
    return DistributedSampler(dataset, shuffle=shuffle, seed=seed)


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed, else ``model`` itself."""
    if not active():
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the ranks, in place."""
    if active():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s, in place."""
    if active():
        dist.broadcast(tensor, src)
    return tensor


def init_from_env(device_type: str, timeout_s: float = 600.0) -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on CUDA.  ``timeout_s`` bounds every collective, so a
    rank that dies does not leave the others waiting forever.  Returns
    whether a group was initialised.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
