"""Checkpoints that are never half-written and never half-loaded.

:func:`save` writes to a temporary file in the same directory, syncs it and
renames it over the target, so a crash leaves the previous checkpoint intact.
:func:`load` turns a truncated or corrupted file into a :class:`CheckpointError`
that names the file.  :func:`load_model_state` checks a state dict against a
copy of the model before touching the model itself.
"""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
import zipfile
from typing import Any, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupted, or does not fit the model."""


def save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically (temp file + fsync + rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load`` (weights only) with a clear error for a damaged file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted and was not loaded: {exc}") from None


def load_model_state(model: nn.Module, state: dict, strict: bool = True) -> None:
    """``model.load_state_dict(state)``, but all or nothing: a state that does not fit
    (wrong keys, shapes or layouts) raises :class:`CheckpointError` and leaves ``model`` as it was."""
    trial = copy.deepcopy(model)
    try:
        trial.load_state_dict(state, strict=strict)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint does not fit the model; nothing was loaded: {exc}") from None
    model.load_state_dict(state, strict=strict)
