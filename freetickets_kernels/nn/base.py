"""What SparseLinear and SparseConv2d share: packed values, the layout, state_dict.

The trainable parameter is ``values [nnzb, Bo, Bi]``; the layout lives in the
``slot_map`` buffer (so ``.to()`` moves it and ``state_dict`` saves it) and in
a :class:`BlockSparseLayout` rebuilt from that buffer whenever it changes.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .. import backends
from ..layout import BlockSparseLayout, check_density


def random_block_mask(grid, density: float, device=None, generator=None) -> torch.Tensor:
    """Bool ``grid`` mask with exactly ``round(density * R * C)`` blocks, uniformly at random."""
    check_density(density)
    total = grid[0] * grid[1]
    keep = round(density * total)
    mask = torch.zeros(total, dtype=torch.bool, device=device)
    mask[torch.randperm(total, generator=generator, device="cpu")[:keep].to(mask.device)] = True
    return mask.view(grid)


class BlockSparseModule(nn.Module):
    """Base of the block-sparse layers (not used directly)."""

    values: nn.Parameter
    slot_map: torch.Tensor

    def _init_sparse(self, layout: BlockSparseLayout, values: torch.Tensor) -> None:
        self.values = nn.Parameter(values)
        self.register_buffer("slot_map", layout.slot_map.clone())
        self._layout = layout
        self._op_observer = None  # see observe_op

    # ------------------------------------------------------- op observation
    def observe_op(self, observer: Optional[Callable[[torch.Tensor, torch.Tensor], None]]) -> None:
        """Call ``observer(op_input, output)`` after every forward; ``None`` stops it.

        The seam through which DST captures the gradients that drive RigL growth
        (:mod:`freetickets_kernels.dst.scoring`): ``op_input`` is what the op was
        given (for a conv, after any explicit padding), which a forward hook on
        the module would not see.  The layer itself knows nothing of DST.
        """
        self._op_observer = observer

    def _observe_op(self, op_input: torch.Tensor, output: torch.Tensor) -> None:
        if self._op_observer is not None:
            self._op_observer(op_input, output)

    def op_geometry(self) -> Dict[str, object]:
        """The op's arguments besides the tensors and the layout (none for a linear layer; a conv's
        stride, padding and dilation as passed to the op): what
        :func:`freetickets_kernels.ops.dense_grad_block_norms` needs to score this layer."""
        return {}

    # ----------------------------------------------------------------- layout
    @property
    def layout(self) -> BlockSparseLayout:
        return self._layout

    def set_layout(self, layout: BlockSparseLayout, values: Optional[torch.Tensor] = None) -> None:
        """Install a new layout of the same geometry (DST updates use this).

        With the same block count the ``values`` parameter is updated in place
        (its identity, and so the optimizer's hold on it, is kept).
        """
        old = self._layout
        if layout.weight_shape != old.weight_shape or layout.block_size != old.block_size:
            raise ValueError(f"new layout {layout} does not match this layer's {old}")
        layout = layout.to(self.values.device)
        with torch.no_grad():
            if values is not None:
                layout.check_values(values)
                if values.shape == self.values.shape:
                    self.values.copy_(values)
                else:
                    self.values.data = values.to(self.values.device, self.values.dtype).clone()
            elif layout.nnzb != old.nnzb:
                raise ValueError("the block count changed: pass the new values too")
        # in place: DDP holds this buffer (and ``values``) by reference
        self.slot_map.copy_(layout.slot_map)
        self._layout = layout

    def load_dense(self, weight: torch.Tensor, density: float, criterion: str = "magnitude") -> None:
        """Keep ``density`` of the blocks of a dense ``weight`` (this layer's shape): the
        largest by L2 norm (``criterion="magnitude"``) or uniformly at random (``"random"``)."""
        if criterion == "magnitude":
            values, layout = BlockSparseLayout.from_dense(weight, self.block_size, density=density)
        elif criterion == "random":
            mask = random_block_mask(self._layout.grid_shape, density, weight.device)
            values, layout = BlockSparseLayout.from_dense(weight, self.block_size, block_mask=mask)
        else:
            raise ValueError(f"criterion must be 'magnitude' or 'random', got {criterion!r}")
        self.set_layout(layout, values)

    def _take_dense(self, module: nn.Module, density: float, criterion: str) -> "BlockSparseModule":
        """Keep ``density`` of a dense twin's weight blocks, and its bias."""
        self.load_dense(module.weight.detach(), density, criterion)
        if module.bias is not None:
            with torch.no_grad():
                self.bias.copy_(module.bias)
        return self

    def _fill_dense(self, dense: nn.Module) -> nn.Module:
        """Copy this layer's weight (zeros outside live blocks) and bias into a new dense twin."""
        with torch.no_grad():
            dense.weight.copy_(self._layout.unpack(self.values.detach()))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.slot_map.device != self._layout.device:
            self._layout = self._layout.with_slot_map(self.slot_map)
        return self

    # --------------------------------------------------------------- inspect
    @property
    def density(self) -> float:
        """Fraction of the weight's elements inside live blocks."""
        return self._layout.density

    @property
    def block_size(self):
        return self._layout.block_size

    @property
    def mask(self) -> torch.Tensor:
        """Bool element mask with the weight's shape (a new tensor: read-only view)."""
        return self._layout.element_mask()

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for inspection (a detached copy, zeros outside live blocks)."""
        return self._layout.unpack(self.values.detach())

    def _backend_name(self) -> str:
        try:
            return backends.select(self.values.device, self.values.dtype).name
        except (ValueError, backends.BackendUnavailableError) as exc:
            return f"none ({exc})"

    def _sparse_repr(self) -> str:
        return (f"density={self.density:.3g}, block_size={self.block_size}, "
                f"nnzb={self._layout.nnzb}, backend={self._backend_name()}")

    # ------------------------------------------------------------ state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The saved layout may hold another block count: adopt its shape first.
        slot_map = state_dict.get(prefix + "slot_map")
        values = state_dict.get(prefix + "values")
        if slot_map is not None:
            try:
                layout = self._layout.with_slot_map(slot_map.to(self.slot_map.device))
                if values is not None:
                    layout.check_values(values)
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"{prefix}slot_map/values do not form a valid layout: {exc}")
                return
            if values is not None and values.shape != self.values.shape:
                self.values.data = self.values.data.new_empty(values.shape)
            self.slot_map = self.slot_map.new_empty(slot_map.shape)
            self._layout = layout
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def init_values(layout: BlockSparseLayout, fan_in: int, device=None, dtype=None) -> torch.Tensor:
    """nn.Linear / nn.Conv2d's default weight init (kaiming_uniform with a=sqrt(5), which is
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))) drawn at the live blocks only: no dense weight is built."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    values = torch.empty(layout.values_shape, device=device, dtype=dtype).uniform_(-bound, bound)
    return values * layout.valid_mask().to(values.device)


def dense_init_bias(bias: Optional[torch.Tensor], fan_in: int) -> None:
    """nn.Linear / nn.Conv2d's default bias init."""
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)
