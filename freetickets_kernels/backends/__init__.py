"""Backend registry and per-call selection.

Every backend module exposes the same functions (see ``reference.py``).  The
ops ask :func:`select` for one per call, by the tensors' device and dtype:

* forced, by :func:`use_backend` (a context manager, per thread/task) or the
  ``FREETICKETS_BACKEND`` environment variable: that backend or a clear error;
* otherwise the first available backend that handles the device and dtype, in
  the order ``triton > cuda > reference`` for CUDA tensors (Triton first
  until a GPU measurement shows the CUDA kernels faster; see
  docs/gpu-backends.md) and
  ``cpu > reference`` for CPU tensors.  Landing on the reference backend when
  a faster one exists for the device is announced once with a
  :class:`ReferenceBackendWarning`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

ENV_VAR = "FREETICKETS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that is not built, has no device, or lacks a dependency."""


class ReferenceBackendWarning(UserWarning):
    """The reference backend (dense-speed) was chosen because no faster one applies."""


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: Optional[Tuple[str, ...]]  # None: any device
    dtypes: Optional[Tuple[torch.dtype, ...]]  # None: any floating dtype
    load: Callable[[], ModuleType]  # raises BackendUnavailableError(reason)
    description: str
    cpu_when_interpreted: bool = False  # Triton's interpreter runs kernels on CPU tensors too

    @functools.cached_property
    def _loaded(self) -> Tuple[Optional[ModuleType], str]:
        try:
            return self.load(), "available"
        except BackendUnavailableError as exc:
            return None, str(exc)

    @property
    def module(self) -> ModuleType:
        module, reason = self._loaded
        if module is None:
            raise BackendUnavailableError(f"backend {self.name!r} is not available: {reason}")
        return module

    def availability(self) -> Tuple[bool, str]:
        module, reason = self._loaded
        return module is not None, reason

    def devices(self) -> Optional[Tuple[str, ...]]:
        """Device types handled now (read per call: TRITON_INTERPRET may be set after import)."""
        if self.cpu_when_interpreted and self.device_types is not None and triton_interpreted():
            return self.device_types + ("cpu",)
        return self.device_types

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        devices = self.devices()
        device_ok = devices is None or device.type in devices
        dtype_ok = dtype.is_floating_point if self.dtypes is None else dtype in self.dtypes
        return device_ok and dtype_ok

    def handles(self) -> str:
        devices = "any device" if self.devices() is None else "/".join(self.devices())
        dtypes = (
            "any float dtype"
            if self.dtypes is None
            else ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
        )
        return f"{devices}; {dtypes}"


# ------------------------------------------------------------------ loaders


def _load_reference() -> ModuleType:
    return importlib.import_module(f"{__name__}.reference")


def _load_cpu() -> ModuleType:
    try:
        return importlib.import_module(f"{__name__}.cpu")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"not built: the C++ extension freetickets_kernels._cpu could not be loaded ({exc}); "
            "reinstall with a C++ compiler present: pip install --no-build-isolation -e ."
        ) from None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _load_triton() -> ModuleType:
    try:
        importlib.import_module("triton")
    except ImportError:
        raise BackendUnavailableError("triton missing: pip install triton") from None
    if not torch.cuda.is_available() and not triton_interpreted():
        raise BackendUnavailableError(
            "no CUDA GPU is visible (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
        )
    return importlib.import_module(f"{__name__}.triton")


def _load_cuda() -> ModuleType:
    try:
        importlib.import_module("freetickets_kernels._cuda")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"not built ({exc}): install on a machine with a visible GPU, or with FORCE_CUDA=1 "
            "(CUDA_HOME set), using pip install --no-build-isolation -e ."
        ) from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("built, but no CUDA GPU is visible")
    return importlib.import_module(f"{__name__}.cuda")


BACKENDS: Dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", None, None, _load_reference, "pure torch oracle (dense-speed)"),
        Backend("cpu", ("cpu",), (torch.float32, torch.bfloat16, torch.float16), _load_cpu,
                "C++ OpenMP/SIMD kernels (bf16/fp16: widened to fp32 at op entry)"),
        Backend("triton", ("cuda",), (torch.float16, torch.bfloat16, torch.float32), _load_triton,
                "Triton GPU kernels", cpu_when_interpreted=True),
        Backend("cuda", ("cuda",), (torch.float16, torch.bfloat16, torch.float32), _load_cuda,
                "CUDA C++ tensor-core kernels"),
    )
}

PRIORITY: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


# ---------------------------------------------------------------- selection

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "freetickets_backend", default=None
)


def _check_name(name: str, source: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"{source} names unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every op inside the ``with`` block onto backend ``name``.

    ``None`` restores automatic selection (it also overrides
    ``FREETICKETS_BACKEND``).  The setting is per thread and per asyncio task.
    """
    if name is not None:
        _check_name(name, "use_backend()")
    token = _forced.set(name if name is not None else "")
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Tuple[Optional[str], str]:
    """The forced backend name (or None) and what forced it; unknown names raise."""
    name = _forced.get()
    if name is not None:
        return (name or None), "use_backend()"
    env = os.environ.get(ENV_VAR, "").strip()
    source = f"the {ENV_VAR} environment variable"
    if env:
        _check_name(env, source)
    return (env or None), source


def available_backends() -> List[str]:
    """Names of the backends that can run on this machine now."""
    return [name for name, b in BACKENDS.items() if b.availability()[0]]


_warned: set = set()


def select(device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs an op on tensors of ``device`` and ``dtype``."""
    name, source = forced_backend()
    if name is not None:
        backend = BACKENDS[name]
        ok, reason = backend.availability()
        if not ok:
            raise BackendUnavailableError(
                f"backend {name!r} was forced by {source} but is not available: {reason}. "
                f"Available backends: {available_backends()}"
            )
        if not backend.supports(device, dtype):
            raise ValueError(
                f"backend {name!r} (forced by {source}) does not handle {dtype} tensors on "
                f"{device.type}; it handles {backend.handles()}"
            )
        return backend
    skipped = []
    for candidate in PRIORITY.get(device.type, ("reference",)):
        backend = BACKENDS[candidate]
        ok, reason = backend.availability()
        if ok and backend.supports(device, dtype):
            if candidate == "reference" and skipped and (device.type, dtype) not in _warned:
                _warned.add((device.type, dtype))
                warnings.warn(
                    f"freetickets_kernels: running {dtype} ops on {device.type} with the reference "
                    f"backend (dense speed) because {'; '.join(skipped)}",
                    ReferenceBackendWarning,
                    stacklevel=3,
                )
            return backend
        skipped.append(f"{candidate}: {reason if not ok else 'does not handle ' + str(dtype)}")
    raise BackendUnavailableError(f"no backend handles {dtype} on {device.type}: {'; '.join(skipped)}")


def describe() -> List[Dict[str, str]]:
    """One row per backend for ``freetickets info``."""
    rows = []
    for name, backend in BACKENDS.items():
        ok, reason = backend.availability()
        rows.append(
            {
                "backend": name,
                "available": "yes" if ok else "no",
                "handles": backend.handles(),
                "what": backend.description,
                "status": reason,
            }
        )
    return rows
