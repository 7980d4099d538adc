"""Loading sparse checkpoints: into a freshly built dense model, or as a plain dense state_dict.

A block-sparse layer's state_dict holds ``values [nnzb, Bo, Bi]`` (so the
block size) and ``slot_map [R, C]`` (the mask and where each block lives);
the dense weight's shape also travels, in the state_dict's metadata (kept by
``torch.save``).  So a checkpoint is enough to rebuild its sparse layers:

* :func:`load_sparse` ``(model, state_dict)``: ``model`` built dense (or
  sparsified with other arguments) becomes the saved sparse model: every
  layer sparse in the state_dict is made block-sparse with the saved block
  size and mask, every layer dense there is made dense, then the state is
  loaded (strictly, by default)::

      model = ftk.load_sparse(torchvision.models.resnet18(), torch.load("sparse.pt"))

* :func:`densify_state_dict` ``(state_dict)``: the same checkpoint as a plain
  dense state_dict (zeros outside the live blocks), for a model that knows
  nothing of this package::

      torchvision.models.resnet18().load_state_dict(ftk.densify_state_dict(torch.load("sparse.pt")))
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..layout import BlockSparseLayout
from .base import BlockSparseModule
from .conv import SparseConv2d
from .linear import SparseLinear


def _sparse_prefixes(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Module names (``""`` for the root) whose block-sparse state is in ``state_dict``."""
    out = []
    for key in state_dict:
        if key == "slot_map" or key.endswith(".slot_map"):
            name = key[: -len("slot_map")].rstrip(".")
            if _key(name, "values") in state_dict:
                out.append(name)
    return out


def _key(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def _saved_block_size(state_dict, name: str) -> Tuple[int, int]:
    values = state_dict[_key(name, "values")]
    if values.dim() != 3:
        raise ValueError(f"{_key(name, 'values')} has shape {tuple(values.shape)}, not [nnzb, Bo, Bi]")
    return int(values.shape[1]), int(values.shape[2])


def _dense_twin(module: nn.Module) -> Optional[nn.Module]:
    """The plain dense Linear/Conv2d ``module`` is, or is the block-sparse version of (else None)."""
    if type(module) in (nn.Linear, nn.Conv2d):
        return module
    if type(module) in (SparseLinear, SparseConv2d):
        return module.to_dense()
    return None


def _sparse_from_saved(dense: nn.Module, state_dict, name: str) -> BlockSparseModule:
    """A block-sparse layer with ``dense``'s geometry and the saved block size and mask."""
    bs = _saved_block_size(state_dict, name)
    slot_map = state_dict[_key(name, "slot_map")]
    w = dense.weight
    factory = dict(device=w.device, dtype=w.dtype)
    if isinstance(dense, nn.Linear):
        new = SparseLinear(dense.in_features, dense.out_features, dense.bias is not None, **factory,
                           density=1e-9, block_size=bs)
        layout = BlockSparseLayout(slot_map.to(w.device), dense.out_features, dense.in_features, bs)
    else:
        new = SparseConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, dense.padding,
                           dense.dilation, dense.groups, dense.bias is not None, dense.padding_mode, **factory,
                           density=1e-9, block_size=bs)
        layout = BlockSparseLayout(slot_map.to(w.device), dense.out_channels, dense.in_channels, bs,
                                   dense.kernel_size)
    new.set_layout(layout, torch.zeros(layout.values_shape, **factory))  # load_state_dict fills the values
    new.train(dense.training)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def load_sparse(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Load a (sparse) checkpoint into ``model`` built with the same architecture; returns ``model``.

    ``model`` may be dense as torch builds it, or sparsified with other
    arguments (another density, distribution or block size): each
    ``nn.Linear``/``nn.Conv2d`` whose state is block-sparse in ``state_dict``
    becomes a :class:`SparseLinear`/:class:`SparseConv2d` with the saved block
    size and mask, each block-sparse layer whose state is dense becomes dense
    again, then ``model.load_state_dict(state_dict, strict)`` runs.  A layer
    that cannot take its saved state (another shape, a module of another
    kind) raises a ``ValueError`` naming every such layer, before anything
    is changed.
    """
    modules = dict(model.named_modules())
    sparse_names = set(_sparse_prefixes(state_dict))
    plan: Dict[str, Union[str, nn.Module]] = {}  # name -> "sparse" | "dense" conversion to do
    problems: List[str] = []
    for name in sorted(sparse_names):
        module = modules.get(name)
        if module is None:
            problems.append(f"{name or '<root>'}: block-sparse in the state_dict, but the model has no such module")
            continue
        if isinstance(module, BlockSparseModule) and type(module) in (SparseLinear, SparseConv2d) and \
                tuple(module.block_size) == _saved_block_size(state_dict, name):
            continue  # loads as is (another block count is adopted by the layer)
        dense = _dense_twin(module)
        if dense is None:
            problems.append(f"{name or '<root>'}: block-sparse in the state_dict, but the model's "
                            f"{type(module).__name__} is not an nn.Linear/nn.Conv2d (or their sparse layers)")
            continue
        if not name:
            problems.append("<root>: the model itself is the saved layer and cannot be replaced in place; "
                            "build it with ftk.SparseLinear/ftk.SparseConv2d and call load_state_dict")
            continue
        try:
            plan[name] = _sparse_from_saved(dense, state_dict, name)
        except (ValueError, TypeError) as exc:
            problems.append(f"{name}: the saved mask does not fit the model's {type(dense).__name__} "
                            f"{tuple(dense.weight.shape)}: {exc}")
    for name, module in modules.items():
        if name in sparse_names or not isinstance(module, BlockSparseModule):
            continue
        if _key(name, "weight") in state_dict:
            if type(module) not in (SparseLinear, SparseConv2d):
                problems.append(f"{name}: dense in the state_dict, but the model's {type(module).__name__} "
                                "has no dense twin this call knows")
            elif not name:
                problems.append("<root>: the model itself is block-sparse but the state_dict is dense: "
                                "load it into model.to_dense()")
            else:
                plan[name] = module.to_dense()
                plan[name].train(module.training)
    current = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, value in state_dict.items():
        name, _, attr = key.rpartition(".")
        if name in sparse_names and attr in ("values", "slot_map"):
            continue
        if key in current and isinstance(value, torch.Tensor) and tuple(value.shape) != current[key]:
            problems.append(f"{name or '<root>'}: {attr} is {tuple(value.shape)} in the state_dict, "
                            f"{current[key]} in the model")
    if problems:
        raise ValueError("load_sparse: these layers of the model differ from the state_dict:\n  "
                         + "\n  ".join(problems))
    for name, new in plan.items():
        _replace(model, name, new)
    model.load_state_dict(state_dict, strict=strict)
    return model


def _layer_shapes(like) -> Dict[str, Tuple[int, ...]]:
    """``{module name: weight shape}`` of a dense model or state_dict."""
    if isinstance(like, nn.Module):
        like = like.state_dict()
    return {k[: -len("weight")].rstrip("."): tuple(v.shape) for k, v in like.items()
            if k == "weight" or k.endswith(".weight")}


def densify_state_dict(state_dict: Mapping[str, torch.Tensor],
                       like: Optional[Union[nn.Module, Mapping[str, torch.Tensor]]] = None) -> "OrderedDict":
    """A sparse checkpoint as a plain dense state_dict: each layer's ``values``/``slot_map`` become
    its ``weight`` (zeros outside the live blocks); every other entry is kept as it is.

    ``model.load_state_dict(ftk.densify_state_dict(state))`` then loads it into the dense model
    of the architecture (torchvision's, say), with the same outputs.  The weight shapes come
    from the state_dict's metadata (written by the sparse layers, kept by ``torch.save``); a
    state_dict rebuilt without it (e.g. by a dict comprehension) needs ``like``: the dense
    model, or its state_dict, whose weight shapes are used.
    """
    metadata = getattr(state_dict, "_metadata", None) or {}
    shapes = _layer_shapes(like) if like is not None else {}
    out = OrderedDict()
    problems = []
    sparse = set(_sparse_prefixes(state_dict))
    for key, value in state_dict.items():
        name, _, attr = key.rpartition(".")
        if name not in sparse or attr not in ("values", "slot_map"):
            out[key] = value
            continue
        if attr == "slot_map":
            continue
        meta = metadata.get(name, {})
        dense_shape = tuple(meta["ftk_weight_shape"]) if "ftk_weight_shape" in meta else shapes.get(name)
        layout_shape = tuple(meta["ftk_layout_shape"]) if "ftk_layout_shape" in meta else dense_shape
        if dense_shape is None:
            problems.append(f"{name or '<root>'}: its weight shape is not in the state_dict's metadata: "
                            "pass like=<the dense model>")
            continue
        try:
            bs = _saved_block_size(state_dict, name)
            kernel = tuple(layout_shape[2:]) if len(layout_shape) == 4 else None
            layout = BlockSparseLayout(state_dict[_key(name, "slot_map")].to(value.device), int(layout_shape[0]),
                                       int(layout_shape[1]), bs, kernel)
            out[_key(name, "weight")] = layout.unpack(value.detach()).reshape(dense_shape)
        except (ValueError, TypeError, RuntimeError) as exc:
            problems.append(f"{name or '<root>'}: {exc}")
    if problems:
        raise ValueError("densify_state_dict: these layers cannot be unpacked:\n  " + "\n  ".join(problems))
    if metadata:
        out._metadata = type(metadata)(metadata)  # keeps the other modules' versions (BatchNorm's, say)
    return out
