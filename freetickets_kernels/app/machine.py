"""What a benchmark, a result file or a bug report records about the machine."""

from __future__ import annotations

import platform

import torch

from .._version import __version__


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a benchmark or a bug report needs to know about this machine."""
    info = {
        "freetickets_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
