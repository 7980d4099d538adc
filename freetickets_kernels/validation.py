"""Argument checks shared by every public op, so each backend sees clean input.

Every error names the argument, what was given and what is allowed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import BlockSparseLayout, IntPair, pair


def check_layout(layout: object, op: str, conv: bool) -> BlockSparseLayout:
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"{op}: layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if layout.is_conv != conv:
        want = "a conv layout (built with kernel_size)" if conv else "a linear layout (no kernel_size)"
        raise ValueError(f"{op}: needs {want}, got {layout.describe()}")
    return layout


def autocast_casts(*tensors: torch.Tensor) -> bool:
    """Whether an autocast region on these tensors' device will cast them all to one dtype
    (freetickets_kernels/autocast.py; float64 is never cast), so differing dtypes are fine."""
    device_type = tensors[0].device.type
    return (device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
            and all(t.dtype != torch.float64 for t in tensors))


def check_operands(
    op: str,
    x: object,
    values: object,
    layout: BlockSparseLayout,
    bias: Optional[object] = None,
) -> None:
    """Types, dtypes, devices and shapes of the tensors every op takes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: input must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: input must be a floating-point tensor, got {x.dtype}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: values must be a tensor, got {type(values).__name__}")
    if values.dtype != x.dtype and not autocast_casts(x, values):
        raise TypeError(
            f"{op}: input is {x.dtype} but values are {values.dtype}; cast one of them "
            "(e.g. module.to(input.dtype))"
        )
    if values.device != x.device:
        raise ValueError(
            f"{op}: input is on {x.device} but values are on {values.device}; move them together"
        )
    if layout.device != x.device:
        raise ValueError(
            f"{op}: input is on {x.device} but the layout's indices are on {layout.device}; "
            "use layout.to(input.device) (modules move it with .to())"
        )
    layout.check_values(values)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be a tensor or None, got {type(bias).__name__}")
        if (bias.dtype != x.dtype and not autocast_casts(x, bias)) or bias.device != x.device:
            raise TypeError(
                f"{op}: bias is {bias.dtype} on {bias.device} but input is {x.dtype} on {x.device}"
            )
        if tuple(bias.shape) != (layout.out_features,):
            raise ValueError(
                f"{op}: bias has shape {tuple(bias.shape)}, expected ({layout.out_features},)"
            )


def check_linear_input(x: torch.Tensor, layout: BlockSparseLayout, op: str) -> None:
    if x.dim() < 1 or x.shape[-1] != layout.in_features:
        raise ValueError(
            f"{op}: input has shape {tuple(x.shape)}; its last dimension must be "
            f"in_features={layout.in_features}"
        )


def conv_geometry(
    stride: IntPair, padding: IntPair, dilation: IntPair, op: str
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    s, p, d = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if min(s) <= 0:
        raise ValueError(f"{op}: stride must be positive, got {s}")
    if min(p) < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {p}")
    if min(d) <= 0:
        raise ValueError(f"{op}: dilation must be positive, got {d}")
    return s, p, d


def conv_output_size(
    hw: Tuple[int, int], kernel_size, stride, padding, dilation
) -> Tuple[int, int]:
    return tuple(
        (hw[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )  # type: ignore[return-value]


def check_conv_input(
    x: torch.Tensor, layout: BlockSparseLayout, stride, padding, dilation, op: str
) -> None:
    if x.dim() != 4:
        raise ValueError(f"{op}: input must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != layout.in_features:
        raise ValueError(
            f"{op}: input has {x.shape[1]} channels but the layout expects "
            f"in_channels={layout.in_features}"
        )
    out_hw = conv_output_size(tuple(x.shape[2:]), layout.kernel_size, stride, padding, dilation)
    if min(out_hw) <= 0:
        raise ValueError(
            f"{op}: input of spatial size {tuple(x.shape[2:])} is too small for kernel "
            f"{layout.kernel_size} with padding {padding} and dilation {dilation}"
        )


def conv_memory_format(t: torch.Tensor) -> torch.memory_format:
    """Memory format of a conv op's output: channels_last when ``t`` is strictly
    channels_last (as torch's own conv does), else contiguous.  Every backend
    and the fake kernels follow this one rule (csrc/cpu mirrors it)."""
    strictly_cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if strictly_cl else torch.contiguous_format

