"""SparseLinear: nn.Linear with a block-sparse weight."""

from __future__ import annotations

import torch
from torch import nn

from ..layout import BlockSparseLayout, IntPair, block_size_pair, check_density
from ..ops import block_sparse_linear
from .base import BlockSparseModule, dense_init_bias, init_values, random_block_mask


class SparseLinear(BlockSparseModule):
    """Drop-in ``nn.Linear`` whose weight keeps only a ``density`` fraction of its blocks.

    Same arguments and forward semantics as ``nn.Linear``, plus ``density``
    (fraction of ``block_size`` blocks kept, chosen at random here; use
    :meth:`from_dense` to keep the largest blocks of a trained layer) and
    ``block_size`` (int or ``(out, in)`` pair; ``(1, 1)`` is unstructured).
    The trainable parameter is ``values``; ``weight`` is a dense copy for inspection.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 density: float = 0.1, block_size: IntPair = 32) -> None:
        super().__init__()
        check_density(density, allow_zero=False)
        bs = block_size_pair(block_size)
        self.in_features, self.out_features = in_features, out_features
        factory = dict(device=device, dtype=dtype)
        grid = BlockSparseLayout.grid_for((out_features, in_features), bs)
        layout = BlockSparseLayout.from_block_mask(random_block_mask(grid, density, device), out_features,
                                                   in_features, bs)
        self._init_sparse(layout, init_values(layout, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        dense_init_bias(self.bias, in_features)

    @classmethod
    def from_dense(cls, module: nn.Linear, density: float, block_size: IntPair = 32,
                   criterion: str = "magnitude") -> "SparseLinear":
        """A SparseLinear keeping ``density`` of ``module``'s blocks: the largest by L2 norm
        (``criterion="magnitude"``) or uniformly at random (``"random"``)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"from_dense needs an nn.Linear, got {type(module).__name__}")
        w = module.weight
        new = cls(module.in_features, module.out_features, module.bias is not None,
                  device=w.device, dtype=w.dtype, density=density, block_size=block_size)
        return new._take_dense(module, density, criterion)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing exactly the same function."""
        v = self.values
        return self._fill_dense(nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                          device=v.device, dtype=v.dtype))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = block_sparse_linear(input, self.values, self.layout, self.bias)
        self._observe_op(input, out)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._sparse_repr()}")
