"""SparseConv2d: nn.Conv2d (groups=1) with a block-sparse weight."""

from __future__ import annotations

from typing import Dict, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import BlockSparseLayout, IntPair, block_size_pair, check_density, pair
from ..ops import block_sparse_conv2d
from .base import BlockSparseModule, dense_init_bias, init_values, random_block_mask

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class SparseConv2d(BlockSparseModule):
    """Drop-in ``nn.Conv2d`` (groups=1) whose weight keeps a ``density`` fraction of its blocks.

    Same arguments and forward semantics as ``nn.Conv2d``, plus ``density`` and
    ``block_size``: a block is ``Bo`` output channels by ``Bi`` input channels
    at one kernel tap.  ``groups > 1`` is refused (use a dense conv there).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, density: float = 0.1,
                 block_size: IntPair = 32) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(f"SparseConv2d supports groups=1 only, got groups={groups}; keep grouped convs dense")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        check_density(density, allow_zero=False)
        bs = block_size_pair(block_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride, self.dilation = pair(stride, "stride"), pair(dilation, "dilation")
        self.groups, self.padding_mode = 1, padding_mode
        self.padding = self._resolve_padding(padding)
        factory = dict(device=device, dtype=dtype)
        grid = BlockSparseLayout.grid_for((out_channels, in_channels, *self.kernel_size), bs)
        layout = BlockSparseLayout.from_block_mask(random_block_mask(grid, density, device), out_channels,
                                                   in_channels, bs, self.kernel_size)
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_sparse(layout, init_values(layout, fan_in, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        dense_init_bias(self.bias, in_channels * self.kernel_size[0] * self.kernel_size[1])

    def _resolve_padding(self, padding):
        """Per-side padding (top, bottom, left, right), as nn.Conv2d resolves 'same' and 'valid'."""
        if isinstance(padding, str):
            if padding == "valid":
                return (0, 0)
            if padding != "same":
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            self._same_pad = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
            return "same"
        return pair(padding, "padding")

    def _explicit_padding(self):
        """(F.pad amounts or None, padding passed to the op)."""
        if self.padding == "same":
            l, r, t, b = self._same_pad
            if l == r and t == b and self.padding_mode == "zeros":
                return None, (t, l)
            return (l, r, t, b), (0, 0)
        if self.padding_mode == "zeros":
            return None, self.padding
        ph, pw = self.padding
        return (pw, pw, ph, ph), (0, 0)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, density: float, block_size: IntPair = 32,
                   criterion: str = "magnitude") -> "SparseConv2d":
        """A SparseConv2d keeping ``density`` of ``module``'s blocks (largest L2 norm, or random)."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"from_dense needs an nn.Conv2d, got {type(module).__name__}")
        w = module.weight
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode,
                  device=w.device, dtype=w.dtype, density=density, block_size=block_size)
        return new._take_dense(module, density, criterion)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing exactly the same function."""
        v = self.values
        return self._fill_dense(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                          self.padding, self.dilation, 1, self.bias is not None,
                                          self.padding_mode, device=v.device, dtype=v.dtype))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        pad, padding = self._explicit_padding()
        if pad is not None:
            input = F.pad(input, pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        out = block_sparse_conv2d(input, self.values, self.layout, self.bias, self.stride, padding, self.dilation)
        self._observe_op(input, out)
        return out

    def op_geometry(self) -> Dict[str, object]:
        _, padding = self._explicit_padding()
        return {"stride": self.stride, "padding": padding, "dilation": self.dilation}

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.bias is None:
            s += ", bias=False"
        return f"{s}, {self._sparse_repr()}"
