"""SparseConv1d: nn.Conv1d (groups=1, zero padding) as a block-sparse conv on ``[N, C, 1, L]``."""

from __future__ import annotations

from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import BlockSparseLayout, IntPair, block_size_pair, check_density
from ..ops import block_sparse_conv2d
from .base import BlockSparseModule, dense_init_bias, init_values, random_block_mask


def _one(value, name: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise ValueError(f"{name} must be an int or a 1-tuple, got {value!r}")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def conv1d_unsupported(module: nn.Conv1d) -> Union[str, None]:
    """Why ``module`` cannot become a SparseConv1d (None: it can)."""
    if module.groups != 1:
        return f"groups={module.groups}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (SparseConv1d supports 'zeros' only)"
    return None


class SparseConv1d(BlockSparseModule):
    """Drop-in ``nn.Conv1d`` (groups=1, ``padding_mode="zeros"``) with a block-sparse weight.

    Runs :func:`~freetickets_kernels.ops.block_sparse_conv2d` on the input
    viewed as ``[N, C, 1, L]`` with kernel ``(1, k)``: the layout (and so DST)
    sees a conv weight ``[out, in, 1, k]``; ``weight`` and ``mask`` show it in
    ``nn.Conv1d``'s ``[out, in, k]``.  Inputs are ``[N, C, L]`` or unbatched ``[C, L]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, density: float = 0.1,
                 block_size: IntPair = 32) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(f"SparseConv1d supports groups=1 only, got groups={groups}; keep grouped convs dense")
        if padding_mode != "zeros":
            raise ValueError(f"SparseConv1d supports padding_mode='zeros' only, got {padding_mode!r}")
        check_density(density, allow_zero=False)
        bs = block_size_pair(block_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (_one(kernel_size, "kernel_size"),)
        self.stride, self.dilation = (_one(stride, "stride"),), (_one(dilation, "dilation"),)
        self.groups, self.padding_mode = 1, "zeros"
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1,):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv1d)")
            self.padding = padding
        else:
            self.padding = (_one(padding, "padding"),)
        k = self.kernel_size[0]
        factory = dict(device=device, dtype=dtype)
        grid = BlockSparseLayout.grid_for((out_channels, in_channels, 1, k), bs)
        layout = BlockSparseLayout.from_block_mask(random_block_mask(grid, density, device), out_channels,
                                                   in_channels, bs, (1, k))
        self._init_sparse(layout, init_values(layout, in_channels * k, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        dense_init_bias(self.bias, in_channels * k)

    def _pads(self) -> Tuple[Union[Tuple[int, int], None], int]:
        """(F.pad amounts on L or None, padding passed to the op along L)."""
        if self.padding == "valid":
            return None, 0
        if self.padding == "same":
            total = self.dilation[0] * (self.kernel_size[0] - 1)
            left = total // 2
            if total - left == left:
                return None, left
            return (left, total - left), 0
        return None, self.padding[0]

    @classmethod
    def from_dense(cls, module: nn.Conv1d, density: float, block_size: IntPair = 32,
                   criterion: str = "magnitude") -> "SparseConv1d":
        """A SparseConv1d keeping ``density`` of ``module``'s blocks (largest L2 norm, or random)."""
        if not isinstance(module, nn.Conv1d):
            raise TypeError(f"from_dense needs an nn.Conv1d, got {type(module).__name__}")
        w = module.weight
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode,
                  device=w.device, dtype=w.dtype, density=density, block_size=block_size)
        return new._take_dense(module, density, criterion, weight=w.unsqueeze(2))

    def to_dense(self) -> nn.Conv1d:
        """An ``nn.Conv1d`` computing exactly the same function."""
        v = self.values
        dense = nn.Conv1d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, 1, self.bias is not None, "zeros", device=v.device, dtype=v.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.layout.unpack(v.detach()).squeeze(2))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def dense_weight_shape(self):
        """``nn.Conv1d``'s weight shape ``[out, in, k]`` (the layout's is ``[out, in, 1, k]``)."""
        return (self.out_channels, self.in_channels, self.kernel_size[0])

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``[out, in, k]``, for inspection: the base class's read-only copy, viewed
        in ``nn.Conv1d``'s shape (zeros outside live blocks)."""
        return BlockSparseModule.weight.fget(self).reshape(self.dense_weight_shape())

    @property
    def mask(self) -> torch.Tensor:
        """Bool element mask ``[out, in, k]`` (a new tensor)."""
        return self.layout.element_mask().reshape(self.dense_weight_shape())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in (2, 3):
            raise ValueError(f"SparseConv1d expects [N, C, L] or [C, L] input, got shape {tuple(input.shape)}")
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(0)
        pad, p = self._pads()
        if pad is not None:
            input = F.pad(input, pad)
        x = input.unsqueeze(2)  # [N, C, 1, L]
        out = block_sparse_conv2d(x, self.values, self.layout, self.bias, (1, self.stride[0]), (0, p),
                                  (1, self.dilation[0]))
        self._observe_op(x, out)
        out = out.squeeze(2)
        return out.squeeze(0) if unbatched else out

    def op_geometry(self) -> Dict[str, object]:
        _, p = self._pads()
        return {"stride": (1, self.stride[0]), "padding": (0, p), "dilation": (1, self.dilation[0])}

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1,):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return f"{s}, {self._sparse_repr()}"
