"""Autocast rules for the ``freetickets`` custom ops, on ``cpu`` and ``cuda``.

Inside ``torch.autocast(device_type, dtype)`` every op casts its floating
operands on that device (input, ``values``, bias, gradients) to the autocast
dtype and runs with autocast off, as ``nn.Linear``/``nn.Conv2d`` do: outputs
come out in the autocast dtype, and ``values`` stay fp32 master weights
whose gradients arrive in fp32 through the cast.  The dtype is read from the
autocast state at each call (``torch.get_autocast_dtype``), so bf16 and fp16
regions both work; float64 operands are left alone, as torch leaves them.
Outside autocast the rules do nothing and mixed dtypes stay an error.
"""

from __future__ import annotations

from typing import Iterable

import torch

DEVICE_TYPES = ("cpu", "cuda")

_LIB = torch.library.Library("freetickets", "IMPL")  # noqa: TOR901  (lives as long as the module)


def _cast(arg, device_type: str, dtype: torch.dtype):
    if (isinstance(arg, torch.Tensor) and arg.is_floating_point() and arg.device.type == device_type
            and arg.dtype != torch.float64):
        return arg.to(dtype)
    return arg


def _rule(op: torch._ops.OpOverload, device_type: str):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(_cast(a, device_type, dtype) for a in args))

    return kernel


def register(names: Iterable[str]) -> None:
    """Give each ``freetickets::<name>`` op its autocast rule on every device type in DEVICE_TYPES."""
    for name in names:
        op = getattr(torch.ops.freetickets, name).default
        for device_type in DEVICE_TYPES:
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            _LIB.impl(name, _rule(op, device_type), key, with_keyset=True)
