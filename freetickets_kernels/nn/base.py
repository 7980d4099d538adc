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


_WRITE_HELP = (
    "the trainable parameter is `values` (the live blocks, packed); `weight` is a read-only dense copy, so "
    "writing to it would change nothing. To initialise the weight under the mask use layer.init_(fn), e.g. "
    "layer.init_(nn.init.zeros_) or layer.init_(lambda w: w.copy_(new_weight)); layer.reset_parameters() "
    "redoes torch's default init; layer.load_dense(weight, density) picks a new mask from a dense weight")

_INPLACE_DUNDERS = frozenset({"__setitem__", "__set__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                              "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                              "__ilshift__", "__irshift__", "__imatmul__"})
_HARMLESS = frozenset({"requires_grad_", "retain_grad", "share_memory_"})


class DenseWeightCopy(torch.Tensor):
    """What a block-sparse layer's ``weight`` returns: a dense copy that refuses writes.

    Reading works as on any tensor (results are plain tensors).  Every write to it, or to a view
    of it (``.data``, ``w[0]``, ``w.view(...)``), raises: an in-place op (``zero_``, ``mul_``,
    ``copy_``, ``nn.init.*_``), ``out=``, item assignment.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__")
                                               and name not in _HARMLESS)
        # the target of an in-place op: self, or (torch.nn.init dispatches by keyword) `tensor=`
        target = args[0] if args else kwargs.get("tensor", kwargs.get("input", kwargs.get("self")))
        if (inplace and isinstance(target, cls)) or _holds(kwargs.get("out"), cls):
            raise RuntimeError(f"{name} on a block-sparse layer's weight: {_WRITE_HELP}")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        sources = [a for a in args if isinstance(a, cls)]
        return _mark_aliases(out, sources, cls)


def _holds(value, cls) -> bool:
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, cls) for v in value)
    return isinstance(value, cls)


def _storage_ptr(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _mark_aliases(out, sources, cls):
    """Results that alias the copy (views, ``.data``) stay read-only; every other result is a plain tensor."""
    if isinstance(out, (tuple, list)):
        return type(out)(_mark_aliases(o, sources, cls) for o in out)
    if not isinstance(out, torch.Tensor):
        return out
    ptr = _storage_ptr(out)
    if ptr is not None and any(_storage_ptr(s) == ptr for s in sources):
        return out if isinstance(out, cls) else out.as_subclass(cls)
    return out.as_subclass(torch.Tensor) if isinstance(out, cls) else out


class BlockSparseModule(nn.Module):
    """Base of the block-sparse layers (not used directly).

    The weight is initialised and re-initialised through the layer, not through ``weight``
    (a read-only dense copy): :meth:`reset_parameters` redoes torch's default init,
    :meth:`init_` applies any init function to the dense view under the mask.  The usual
    init loop over a model, for dense and sparse convs alike::

        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, ftk.SparseConv2d):  # not an nn.Conv2d
                m.init_(lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"))
    """

    values: nn.Parameter
    slot_map: torch.Tensor

    def _init_sparse(self, layout: BlockSparseLayout, values: torch.Tensor) -> None:
        self.values = nn.Parameter(values)
        self.register_buffer("slot_map", layout.slot_map.clone())
        self._layout = layout
        self._op_observer = None  # see observe_op
        self.register_state_dict_post_hook(_record_weight_shape)

    def dense_weight_shape(self):
        """The shape of the dense twin's weight (what :meth:`to_dense` returns holds it)."""
        return self._layout.weight_shape

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

    def _take_dense(self, module: nn.Module, density: float, criterion: str,
                    weight: Optional[torch.Tensor] = None) -> "BlockSparseModule":
        """Keep ``density`` of a dense twin's weight blocks (``weight``: its weight in this layer's
        shape, where that differs), and its bias."""
        self.load_dense((module.weight if weight is None else weight).detach(), density, criterion)
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
        """The dense weight, for inspection: a read-only copy (a :class:`DenseWeightCopy`), zeros outside
        the live blocks.

        Writes raise a ``RuntimeError`` rather than silently changing nothing: in-place ops on it or
        on its views (``nn.init.zeros_(layer.weight)``, ``layer.weight.data.mul_(0)``), and assigning
        ``layer.weight = ...`` (an ``AttributeError``).  Initialise through the layer instead:
        :meth:`init_` (``layer.init_(nn.init.zeros_)``, ``layer.init_(lambda w: w.copy_(new))``)
        or :meth:`reset_parameters`.  (Being a tensor subclass, ``torch.testing.assert_close`` compares
        it with plain tensors, not with an ``nn.Parameter``: pass ``param.detach()``.)
        """
        return self._layout.unpack(self.values.detach()).as_subclass(DenseWeightCopy)

    def __setattr__(self, name, value):
        if name == "weight":
            raise AttributeError(f"cannot assign {type(self).__name__}.weight: {_WRITE_HELP}")
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_(self, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> "BlockSparseModule":
        """Initialise the weight with ``fn`` applied to its dense view, then keep what lies under the mask.

        ``fn`` gets the dense weight (the dense twin's shape, e.g. ``[out, in, kh, kw]``; today's
        values, zeros outside the live blocks) and changes it in place or returns a tensor of that
        shape, as ``torch.nn.init`` functions do, so fan-in/fan-out are those of the dense layer;
        the live blocks take the result, the rest is dropped (the mask, and the ``values``
        parameter the optimizer holds, are unchanged).  ``layer.init_(nn.init.zeros_)``,
        ``layer.init_(lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))``,
        ``layer.init_(lambda w: w.copy_(new_weight))``.  Returns the layer.
        """
        layout = self._layout
        dense = layout.unpack(self.values.detach()).reshape(self.dense_weight_shape())
        out = fn(dense)
        new = out if isinstance(out, torch.Tensor) else dense
        if tuple(new.shape) != tuple(dense.shape):
            raise ValueError(f"init_: fn returned shape {tuple(new.shape)}, the weight is {tuple(dense.shape)}")
        self.values.copy_(layout.pack(new.detach().reshape(layout.weight_shape).to(self.values.dtype)))
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """torch's default init for the layer (``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in),
        1/sqrt(fan_in))), drawn at the live blocks only, and the bias as torch does; the mask and
        the ``values`` parameter (so the optimizer's hold on it) are kept."""
        fan_in = math.prod(self._layout.weight_shape[1:])
        self.values.copy_(init_values(self._layout, fan_in, device=self.values.device, dtype=self.values.dtype))
        dense_init_bias(getattr(self, "bias", None), fan_in)

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
        if strict and slot_map is None and values is None and prefix + "weight" in state_dict:
            error_msgs.append(f"{prefix[:-1] or 'the model'} is block-sparse here but dense in the state_dict: "
                              "load it with freetickets_kernels.load_sparse(model, state_dict), which converts "
                              "the layers that differ")
        if slot_map is not None:
            try:
                layout = self._layout.with_slot_map(slot_map.to(self.slot_map.device))
                if values is not None:
                    layout.check_values(values)
            except (ValueError, TypeError) as exc:
                saved_bs = tuple(values.shape[1:]) if isinstance(values, torch.Tensor) and values.dim() == 3 else None
                hint = ""
                if saved_bs is not None and saved_bs != tuple(self.block_size):
                    hint = (f" (saved with block_size {saved_bs}, this layer has {tuple(self.block_size)}: "
                            "freetickets_kernels.load_sparse(model, state_dict) rebuilds the layer)")
                error_msgs.append(f"{prefix}slot_map/values do not form a valid layout: {exc}{hint}")
                return
            if values is not None and values.shape != self.values.shape:
                self.values.data = self.values.data.new_empty(values.shape)
            self.slot_map = self.slot_map.new_empty(slot_map.shape)
            self._layout = layout
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _record_weight_shape(module: "BlockSparseModule", state_dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the dense weight's shape travels in the state_dict's metadata (which
    ``torch.save`` keeps), so :func:`~freetickets_kernels.nn.densify_state_dict` can unpack the
    values without the model (the block grid alone leaves ragged edges ambiguous)."""
    local_metadata["ftk_weight_shape"] = [int(d) for d in module.dense_weight_shape()]
    local_metadata["ftk_layout_shape"] = [int(d) for d in module.layout.weight_shape]


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
