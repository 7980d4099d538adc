"""Checkpoints that are never half-written, never half-loaded and never silently corrupted.

:func:`save` serializes with ``torch.save`` into memory, prefixes one header
line holding the payload's size and SHA-256 digest, writes both to a temporary
file in the same directory, syncs it and renames it over the target: a crash
leaves the previous checkpoint intact, and the digest travels in the same
atomic write as the payload.  :func:`load` checks the size and the digest
before unpickling (``weights_only=True``) and turns every way a file can be
damaged (truncated, flipped bytes, empty, a directory, a refused payload) into
a :class:`CheckpointError` that names the file.  Files written before the
header existed (plain ``torch.save`` output) still load, with one warning.
:func:`load_model_state` checks a state dict against a copy of the model
before touching the model itself.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import logging
import os
import pickle
import re
import sys
import tempfile
import threading
import zipfile
from typing import Any, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]

# header line: MAGIC, then "sha256=<64 hex> size=<decimal>\n"; the torch.save payload follows it
MAGIC = b"FTKCKPT1 "
_HEADER = re.compile(rb"FTKCKPT1 sha256=([0-9a-f]{64}) size=([0-9]{1,20})\n")
_HEADER_MAX = 128
logger = logging.getLogger(__name__)
_umask_lock = threading.Lock()
_warned_unverified = set()


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupted, or does not fit the model."""


def file_mode() -> int:
    """The mode a file created with ``open(path, "w")`` would get: ``0o666`` less the umask."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def temporary_pattern(path: PathLike) -> str:
    """The glob of the temporary files :func:`save` and ``results.write_text_atomic`` make for ``path``."""
    path = os.fspath(path)
    return os.path.join(glob.escape(os.path.dirname(os.path.abspath(path))),
                        f".{glob.escape(os.path.basename(path))}.*.tmp")


def remove_stale_temporaries(path: PathLike) -> list:
    """Remove temporary files a killed :func:`save` of ``path`` left behind (killed between the
    write and the rename); returns the paths removed."""
    removed = []
    for tmp in glob.glob(temporary_pattern(path)):
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def write_atomic(path: PathLike, chunks) -> None:
    """Write the byte strings ``chunks`` to ``path``: temp file + fsync + chmod (the umask's mode)
    + rename + directory fsync.  A crash or an error at any point leaves the old ``path`` intact."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; result files follow the umask
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


def save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` with a checksum header, atomically (temp file + fsync + rename)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()
    header = MAGIC + b"sha256=%s size=%d\n" % (hashlib.sha256(payload).hexdigest().encode(), len(payload))
    write_atomic(path, (header, payload))


def _refused_payload_message(path: str, exc: Exception) -> str:
    """Why ``weights_only`` refused ``path``, without torch's advice to retry unsafely."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    name = found.group(1) if found else None
    if name:
        module, _, cls = name.rpartition(".")
        # only modules already imported: importing one a file names would run its code
        target = getattr(sys.modules.get(module), cls, None)
        if isinstance(target, type) and issubclass(target, nn.Module):
            return (f"checkpoint {path} holds a whole pickled model ({name}), not a state dict; unpickling "
                    "it would run code from the file, so it was not loaded.  Where the file comes from a "
                    "source you trust, re-save it as model.state_dict() and load that into a model built in "
                    "code (freetickets_kernels.app.checkpoint.load_model_state)")
        return (f"checkpoint {path} refers to {name}, a global that a weights-only load refuses "
                "(unpickling it could run code from the file); it was not loaded.  Save tensors, numbers, "
                "strings and containers of them (e.g. a state_dict) instead")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "weights_only" in first or "Weights only load failed" in first:
        first = "its pickle holds something a weights-only load refuses"
    return f"checkpoint {path} was refused and not loaded: {first}"


def load(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load`` (weights only) of a file :func:`save` wrote, after checking its size and
    SHA-256 digest; every damaged file is a :class:`CheckpointError` that names it."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} could not be read: {exc.strerror or exc}") from None
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated or corrupted, not loaded")
    if data.startswith(MAGIC):
        end = data.find(b"\n", 0, _HEADER_MAX)
        header = _HEADER.fullmatch(data[:end + 1]) if end >= 0 else None
        if header is None:
            raise CheckpointError(f"checkpoint {path} has a damaged header: truncated or corrupted, not loaded")
        digest, size = header.group(1).decode(), int(header.group(2))
        payload = memoryview(data)[end + 1:]
        if len(payload) != size:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted and was not loaded: "
                                  f"{len(payload)} bytes of payload, its header says {size}")
        if hashlib.sha256(payload).hexdigest() != digest:
            raise CheckpointError(f"checkpoint {path} is corrupted and was not loaded: "
                                  "its SHA-256 checksum does not match its contents")
    else:
        payload = memoryview(data)
        key = os.path.abspath(path)
        if key not in _warned_unverified:
            _warned_unverified.add(key)
            logger.warning("checkpoint %s was written without a checksum (an older version); "
                           "loading it unverified", path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refused_payload_message(path, exc)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in reason:
            reason = "its pickle could not be read"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted and was not loaded: {reason}") from None


def load_model_state(model: nn.Module, state: dict, strict: bool = True) -> None:
    """``model.load_state_dict(state)``, but all or nothing: a state that does not fit
    (wrong keys, shapes or layouts) raises :class:`CheckpointError` and leaves ``model`` as it was."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint does not fit the model; nothing was loaded: a state dict must be "
                              f"a dict, got {type(state).__name__}")
    trial = copy.deepcopy(model)
    try:
        trial.load_state_dict(state, strict=strict)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint does not fit the model; nothing was loaded: {exc}") from None
    model.load_state_dict(state, strict=strict)
