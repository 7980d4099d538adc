"""Block-sparse layout shared by every backend, for linear and conv2d weights.

A weight is viewed as a GEMM matrix whose rows are output features/channels.
Linear: ``[out, in]``.  Conv2d: ``[Cout, kh*kw*Cin]`` with columns ordered
(tap, input channel), so one column block is ``Bi`` input channels at one tap
and ragged channel edges are padded per tap.

The canonical state is ``slot_map [R, C]`` (int64 on the host side of the
computation, -1 for a dead block).  Everything the kernels read is derived from
it: BSR indices ``row_ptr/col_idx/slot`` and the transposed (column-major)
indices ``col_ptr/row_idx/tslot``, all int32.  ``values[slot]`` holds one block;
a block keeps its slot while alive, so optimizer state never needs permuting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Tuple[int, int], Sequence[int]]

INDEX_DTYPE = torch.int32
_INT32_MAX = 2**31 - 1


def cdiv(a: int, b: int) -> int:
    """Ceiling division of ints (and of torch's symbolic ints, unlike math.ceil(a / b))."""
    return -(-a // b)


def pair(value: IntPair, name: str) -> Tuple[int, int]:
    """Turn an int or a pair of ints into a pair, refusing anything else."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return items  # type: ignore[return-value]


def block_size_pair(block_size: IntPair) -> Tuple[int, int]:
    bo, bi = pair(block_size, "block_size")
    if bo <= 0 or bi <= 0:
        raise ValueError(
            f"block_size must be positive, got {(bo, bi)}; use (1, 1) for unstructured sparsity"
        )
    return bo, bi


@dataclass(frozen=True)
class BsrIndices:
    """The int32 index tensors the kernels read (names follow torch.sparse BSR)."""

    row_ptr: torch.Tensor  # [R + 1]
    col_idx: torch.Tensor  # [nnzb], BSR (row-major) order
    slot: torch.Tensor  # [nnzb], values slot of each BSR entry
    col_ptr: torch.Tensor  # [C + 1]
    row_idx: torch.Tensor  # [nnzb], column-major order
    tslot: torch.Tensor  # [nnzb], values slot of each column-major entry

    def as_tuple(self) -> Tuple[torch.Tensor, ...]:
        return (self.row_ptr, self.col_idx, self.slot, self.col_ptr, self.row_idx, self.tslot)


def _build_indices(slot_map: torch.Tensor) -> BsrIndices:
    live = slot_map >= 0
    rows, cols = live.nonzero(as_tuple=True)  # row-major: BSR order
    tcols, trows = live.t().nonzero(as_tuple=True)  # column-major order
    row_ptr = torch.zeros(slot_map.shape[0] + 1, dtype=torch.int64, device=slot_map.device)
    row_ptr[1:] = live.sum(1).cumsum(0)
    col_ptr = torch.zeros(slot_map.shape[1] + 1, dtype=torch.int64, device=slot_map.device)
    col_ptr[1:] = live.sum(0).cumsum(0)
    as_index = lambda t: t.to(INDEX_DTYPE).contiguous()  # noqa: E731
    return BsrIndices(
        row_ptr=as_index(row_ptr),
        col_idx=as_index(cols),
        slot=as_index(slot_map[rows, cols]),
        col_ptr=as_index(col_ptr),
        row_idx=as_index(trows),
        tslot=as_index(slot_map[trows, tcols]),
    )


class BlockSparseLayout:
    """Which blocks of a weight are alive, and where each one's values live.

    Build one with :meth:`from_block_mask` (slots assigned in BSR order) or
    :meth:`from_dense` (keep the blocks with the largest L2 norm); move one
    between devices with :meth:`to`.  Instances are immutable:
    :meth:`replace_blocks` returns a new layout.
    """

    def __init__(
        self,
        slot_map: torch.Tensor,
        out_features: int,
        in_features: int,
        block_size: IntPair,
        kernel_size: Optional[IntPair] = None,
    ) -> None:
        self.block_size = block_size_pair(block_size)
        self.kernel_size = None if kernel_size is None else pair(kernel_size, "kernel_size")
        for name, value in (("out_features", out_features), ("in_features", in_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.kernel_size is not None and min(self.kernel_size) <= 0:
            raise ValueError(f"kernel_size must be positive, got {self.kernel_size}")
        self.out_features = out_features
        self.in_features = in_features  # input channels per tap for conv
        expected = self.grid_shape
        if not isinstance(slot_map, torch.Tensor) or slot_map.dim() != 2:
            raise ValueError(f"slot_map must be a 2-D tensor of shape {expected}")
        if tuple(slot_map.shape) != expected:
            raise ValueError(
                f"slot_map has shape {tuple(slot_map.shape)} but a {self.describe()} "
                f"needs a block grid of {expected}"
            )
        if slot_map.dtype.is_floating_point or slot_map.dtype == torch.bool:
            raise TypeError(f"slot_map must be an integer tensor, got {slot_map.dtype}")
        slot_map = slot_map.to(torch.int64)
        live_slots = slot_map[slot_map >= 0]
        if (slot_map < -1).any():
            raise ValueError("slot_map entries must be -1 (dead block) or a slot index >= 0")
        nnzb = live_slots.numel()
        if nnzb and not torch.equal(
            live_slots.sort().values, torch.arange(nnzb, device=slot_map.device)
        ):
            raise ValueError("the live slots of slot_map must be a permutation of 0..nnzb-1")
        if nnzb * self.block_size[0] * self.block_size[1] > _INT32_MAX or max(expected) > _INT32_MAX:
            raise ValueError(
                f"layout with {nnzb} blocks of {self.block_size} is too large for int32 "
                "indices; split the layer or use a larger block size"
            )
        self.slot_map = slot_map
        self.indices = _build_indices(slot_map)

    # ---------------------------------------------------------------- geometry
    @property
    def is_conv(self) -> bool:
        return self.kernel_size is not None

    @property
    def taps(self) -> int:
        return 1 if self.kernel_size is None else self.kernel_size[0] * self.kernel_size[1]

    @property
    def blocks_per_tap(self) -> int:
        return math.ceil(self.in_features / self.block_size[1])

    @property
    def grid_shape(self) -> Tuple[int, int]:
        """(R, C): block rows and block columns."""
        return (math.ceil(self.out_features / self.block_size[0]), self.taps * self.blocks_per_tap)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        if self.kernel_size is None:
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def values_shape(self) -> Tuple[int, int, int]:
        return (self.nnzb, *self.block_size)

    @property
    def nnzb(self) -> int:
        return self.indices.col_idx.numel()

    @property
    def device(self) -> torch.device:
        return self.slot_map.device

    @property
    def block_mask(self) -> torch.Tensor:
        """Bool ``[R, C]``: which blocks are alive."""
        return self.slot_map >= 0

    @property
    def density(self) -> float:
        """Fraction of the weight's elements inside live blocks (ragged edges counted exactly)."""
        rows_ok, cols_ok, _ = self._valid_extents()
        return (rows_ok * cols_ok).sum().item() / math.prod(self.weight_shape)

    def describe(self) -> str:
        kind = "linear" if self.kernel_size is None else f"conv {self.kernel_size[0]}x{self.kernel_size[1]}"
        return f"{kind} layout {self.weight_shape} with blocks {self.block_size}"

    def __repr__(self) -> str:
        r, c = self.grid_shape
        return (
            f"BlockSparseLayout(weight={self.weight_shape}, block_size={self.block_size}, "
            f"grid={r}x{c}, nnzb={self.nnzb}, device={self.device})"
        )

    def to(self, device: Union[str, torch.device]) -> "BlockSparseLayout":
        if torch.device(device) == self.device:
            return self
        return self.with_slot_map(self.slot_map.to(device))

    def with_slot_map(self, slot_map: torch.Tensor) -> "BlockSparseLayout":
        """A layout of the same geometry with another ``slot_map`` (validated)."""
        return BlockSparseLayout(
            slot_map, self.out_features, self.in_features, self.block_size, self.kernel_size
        )

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask(
        cls,
        block_mask: torch.Tensor,
        out_features: int,
        in_features: int,
        block_size: IntPair,
        kernel_size: Optional[IntPair] = None,
    ) -> "BlockSparseLayout":
        """Layout whose live blocks are ``block_mask``'s True entries, slots in BSR order."""
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError("block_mask must be a bool tensor of shape [R, C]")
        slot_map = torch.full(block_mask.shape, -1, dtype=torch.int64, device=block_mask.device)
        slot_map[block_mask] = torch.arange(int(block_mask.sum()), device=block_mask.device)
        return cls(slot_map, out_features, in_features, block_size, kernel_size)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        block_size: IntPair,
        density: float = 1.0,
        block_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, "BlockSparseLayout"]:
        """Pack a dense ``nn.Linear``/``nn.Conv2d`` weight into ``(values, layout)``.

        Keeps ``block_mask`` if given, else the ``round(density * R * C)`` blocks
        with the largest L2 norm.
        """
        if weight.dim() not in (2, 4):
            raise ValueError(
                f"weight must be [out, in] (linear) or [Cout, Cin, kh, kw] (conv2d), got {tuple(weight.shape)}"
            )
        kernel_size = None if weight.dim() == 2 else tuple(weight.shape[2:])
        out_features, in_features = weight.shape[0], weight.shape[1]
        bs = block_size_pair(block_size)
        grid = cls.grid_for(tuple(weight.shape), bs)
        if block_mask is None:
            check_density(density)
            norms = block_norms(to_gemm_blocks(weight.detach(), bs))
            keep = round(density * norms.numel())
            block_mask = torch.zeros(grid, dtype=torch.bool, device=weight.device)
            if keep:
                top = norms.flatten().topk(keep).indices
                block_mask.view(-1)[top] = True
        elif tuple(block_mask.shape) != grid:
            raise ValueError(f"block_mask has shape {tuple(block_mask.shape)}, expected {grid}")
        layout = cls.from_block_mask(block_mask, out_features, in_features, block_size, kernel_size)
        return layout.pack(weight), layout

    @staticmethod
    def grid_for(weight_shape: Sequence[int], block_size: IntPair) -> Tuple[int, int]:
        """(R, C) block grid of a linear ``[out, in]`` or conv ``[Cout, Cin, kh, kw]`` weight."""
        bo, bi = block_size_pair(block_size)
        taps = math.prod(weight_shape[2:]) if len(weight_shape) == 4 else 1
        return (math.ceil(weight_shape[0] / bo), taps * math.ceil(weight_shape[1] / bi))

    @classmethod
    def from_element_mask(
        cls, element_mask: torch.Tensor, block_size: IntPair
    ) -> "BlockSparseLayout":
        """Layout whose blocks are alive where any element of ``element_mask`` is True."""
        if element_mask.dim() not in (2, 4):
            raise ValueError("element_mask must have the weight's shape: [out, in] or [Cout, Cin, kh, kw]")
        blocks = to_gemm_blocks(element_mask.to(torch.float32), block_size_pair(block_size))
        kernel_size = None if element_mask.dim() == 2 else tuple(element_mask.shape[2:])
        return cls.from_block_mask(
            blocks.amax(dim=(2, 3)) > 0,
            element_mask.shape[0],
            element_mask.shape[1],
            block_size,
            kernel_size,
        )

    # ------------------------------------------------------------- conversion
    def _block_coords(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, cols = self.block_mask.nonzero(as_tuple=True)
        return rows, cols, self.slot_map[rows, cols]

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """Dense weight -> ``values [nnzb, Bo, Bi]`` holding its live blocks (ragged padding zero)."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(
                f"weight has shape {tuple(weight.shape)} but the layout is for {self.weight_shape}"
            )
        blocks = to_gemm_blocks(weight, self.block_size)
        rows, cols, slots = self._block_coords()
        rows, cols, slots = rows.to(weight.device), cols.to(weight.device), slots.to(weight.device)
        values = weight.new_zeros(self.values_shape)
        values[slots] = blocks[rows, cols]
        return values

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """``values [nnzb, Bo, Bi]`` -> dense weight with zeros outside live blocks."""
        self.check_values(values)
        r, c = self.grid_shape
        blocks = values.new_zeros((r, c, *self.block_size))
        rows, cols, slots = self._block_coords()
        rows, cols, slots = rows.to(values.device), cols.to(values.device), slots.to(values.device)
        blocks[rows, cols] = values[slots]
        return from_gemm_blocks(blocks, self.weight_shape)

    def _valid_extents(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per live block (BSR order): real rows, real columns (ragged edges), slot."""
        rows, cols, slots = self._block_coords()
        bo, bi = self.block_size
        rows_ok = (self.out_features - rows * bo).clamp(max=bo)
        cols_ok = (self.in_features - (cols % self.blocks_per_tap) * bi).clamp(max=bi)
        return rows_ok, cols_ok, slots

    def valid_mask(self) -> torch.Tensor:
        """Bool ``[nnzb, Bo, Bi]`` in slot order: True where a value covers a real weight
        element, False in the ragged-edge padding (which must stay zero)."""
        rows_ok, cols_ok, slots = self._valid_extents()
        bo, bi = self.block_size
        r = torch.arange(bo, device=self.device)[None, :, None] < rows_ok[:, None, None]
        c = torch.arange(bi, device=self.device)[None, None, :] < cols_ok[:, None, None]
        out = torch.empty(self.values_shape, dtype=torch.bool, device=self.device)
        out[slots] = r & c
        return out

    def element_mask(self) -> torch.Tensor:
        """Bool tensor of the weight's shape: True inside live blocks."""
        ones = torch.ones(self.values_shape, dtype=torch.float32, device=self.device)
        return self.unpack(ones) > 0

    def check_values(self, values: torch.Tensor) -> None:
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a tensor, got {type(values).__name__}")
        if tuple(values.shape) != self.values_shape:
            raise ValueError(
                f"values has shape {tuple(values.shape)} but the {self.describe()} "
                f"holds {self.nnzb} blocks: expected {self.values_shape}"
            )

    # ---------------------------------------------------------------- editing
    def replace_blocks(self, drop: torch.Tensor, grow: torch.Tensor) -> "BlockSparseLayout":
        """New layout with the ``drop`` blocks dead and the ``grow`` blocks alive.

        ``drop`` and ``grow`` are bool ``[R, C]`` masks with the same number of
        True entries; ``drop`` must be live blocks and ``grow`` dead ones.  Grown
        blocks take the freed slots, so every surviving block keeps its slot.
        """
        grid = self.grid_shape
        for name, m in (("drop", drop), ("grow", grow)):
            if m.dtype != torch.bool or tuple(m.shape) != grid:
                raise ValueError(f"{name} must be a bool tensor of shape {grid}")
        drop, grow = drop.to(self.device), grow.to(self.device)
        live = self.block_mask
        if (drop & ~live).any():
            raise ValueError("drop names blocks that are not alive")
        if (grow & live & ~drop).any():
            raise ValueError("grow names blocks that are already alive")
        if int(drop.sum()) != int(grow.sum()):
            raise ValueError(
                f"drop ({int(drop.sum())}) and grow ({int(grow.sum())}) must name the same "
                "number of blocks: the block count of a layer is constant"
            )
        freed = self.slot_map[drop]
        slot_map = self.slot_map.clone()
        slot_map[drop] = -1
        slot_map[grow] = freed.sort().values
        return self.with_slot_map(slot_map)

    # ----------------------------------------------------------- persistence
    def state(self) -> dict:
        """Everything needed to rebuild the layout (for ``state_dict``)."""
        return {
            "slot_map": self.slot_map.cpu(),
            "out_features": self.out_features,
            "in_features": self.in_features,
            "block_size": self.block_size,
            "kernel_size": self.kernel_size,
        }

    @classmethod
    def from_state(cls, state: dict) -> "BlockSparseLayout":
        try:
            return cls(
                state["slot_map"],
                state["out_features"],
                state["in_features"],
                state["block_size"],
                state["kernel_size"],
            )
        except KeyError as missing:
            raise ValueError(f"layout state is missing {missing}; was it saved by BlockSparseLayout.state()?") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockSparseLayout):
            return NotImplemented
        return (
            self.weight_shape == other.weight_shape
            and self.block_size == other.block_size
            and self.kernel_size == other.kernel_size
            and torch.equal(self.slot_map.cpu(), other.slot_map.cpu())
        )

    __hash__ = None  # type: ignore[assignment]


# ------------------------------------------------------------------ helpers


def check_density(density: float, allow_zero: bool = True) -> None:
    """Layouts may be empty (density 0); layers must keep something (density in (0, 1])."""
    ok = isinstance(density, (int, float)) and not isinstance(density, bool)
    low_ok = ok and (density >= 0 if allow_zero else density > 0)
    if not (low_ok and density <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"density must be a number in {interval}, got {density!r}")


def to_gemm_blocks(weight: torch.Tensor, block_size: Tuple[int, int]) -> torch.Tensor:
    """Dense weight -> padded block tensor ``[R, C, Bo, Bi]`` in the layout's GEMM order."""
    bo, bi = block_size
    out = weight.shape[0]
    if weight.dim() == 4:  # [Cout, Cin, kh, kw] -> [Cout, taps, Cin]
        cin = weight.shape[1]
        gemm = weight.permute(0, 2, 3, 1).reshape(out, -1, cin)
    else:
        cin = weight.shape[1]
        gemm = weight.reshape(out, 1, cin)
    pad_o = -out % bo
    pad_i = -cin % bi
    gemm = torch.nn.functional.pad(gemm, (0, pad_i, 0, 0, 0, pad_o))
    r, taps = gemm.shape[0] // bo, gemm.shape[1]
    blocks_per_tap = gemm.shape[2] // bi
    return gemm.reshape(r, bo, taps * blocks_per_tap, bi).permute(0, 2, 1, 3)


def from_gemm_blocks(blocks: torch.Tensor, weight_shape: Tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_gemm_blocks`: ``[R, C, Bo, Bi]`` -> weight, padding cropped."""
    r, c, bo, bi = blocks.shape
    out, cin = weight_shape[0], weight_shape[1]
    taps = 1 if len(weight_shape) == 2 else weight_shape[2] * weight_shape[3]
    gemm = blocks.permute(0, 2, 1, 3).reshape(r * bo, taps, (c // taps) * bi)[:out, :, :cin]
    if len(weight_shape) == 2:
        return gemm.reshape(out, cin)
    kh, kw = weight_shape[2], weight_shape[3]
    return gemm.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


def expand_ptr(ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """Compressed pointer ``[n + 1]`` with ``nnz`` entries -> each entry's outer index (int64).

    ``expand_ptr(row_ptr, nnzb)`` is every BSR entry's block row,
    ``expand_ptr(col_ptr, nnzb)`` every column-major entry's block column.
    Giving ``nnz`` spares a GPU the host sync of computing it.
    """
    counts = (ptr[1:] - ptr[:-1]).long()
    outer = torch.arange(counts.numel(), device=ptr.device)
    return torch.repeat_interleave(outer, counts, output_size=nnz)


def block_norms(blocks: torch.Tensor) -> torch.Tensor:
    """L2 norm of every block of a ``[..., Bo, Bi]`` tensor."""
    return torch.linalg.vector_norm(blocks, dim=(-2, -1))
