"""Loading sparse checkpoints: into a freshly built dense model, or as a plain dense state_dict.

A block-sparse layer's state_dict holds ``values [nnzb, Bo, Bi]`` (so the
block size) and ``slot_map [R, C]`` (the mask and where each block lives);
the dense weight's shape also travels, in the state_dict's metadata (kept by
``torch.save``).  So a checkpoint is enough to rebuild its sparse layers:

* :func:`load_sparse` ``(model, state_dict)``: ``model`` built dense (or
  sparsified with other arguments) becomes the saved sparse model: every
  module sparse in the state_dict is converted through the conversion
  registry (so ``nn.Linear``, ``nn.Conv2d``, ``nn.Conv1d``,
  ``nn.MultiheadAttention`` and registered types) with the saved block sizes
  and masks, every layer dense there is made dense, then the state is loaded
  (strictly, by default)::

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
from .attention import ATTENTION_METADATA, SparseMultiheadAttention
from .base import BlockSparseModule
from .conversions import ORIGIN_METADATA, conversion_for, conversion_named, conversion_of_sparse, tag
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


def _inside(name: str, names) -> List[str]:
    """The names in ``names`` that are ``name`` or below it (all of them for the root ``""``)."""
    return sorted(n for n in names if not name or n == name or n.startswith(name + "."))


def _is_sparse_container(module: nn.Module) -> bool:
    return isinstance(module, (BlockSparseModule, SparseMultiheadAttention)) or \
        conversion_of_sparse(module) is not None


def _dense_of(module: nn.Module) -> nn.Module:
    """The dense module a block-sparse one (or sparse attention) came from: the registered
    conversion's ``to_dense`` when sparsify tagged it, else its own ``to_dense``."""
    conv = conversion_of_sparse(module)
    dense = conv.to_dense(module) if conv is not None else module.to_dense()
    dense.train(module.training)
    return dense


def _describe(module: nn.Module) -> str:
    w = getattr(module, "weight", None)
    shape = f" {tuple(w.shape)}" if isinstance(w, torch.Tensor) else ""
    return f"{type(module).__name__}{shape}"


class _Misfit(ValueError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def _adopt(part: BlockSparseModule, state_dict, name: str) -> None:
    """Give the block-sparse ``part`` the saved mask of ``name`` (values zero: load_state_dict fills them)."""
    bs = _saved_block_size(state_dict, name)
    lay = part.layout
    layout = BlockSparseLayout(state_dict[_key(name, "slot_map")].to(part.values.device), lay.out_features,
                               lay.in_features, bs, lay.kernel_size)
    part.set_layout(layout, torch.zeros(layout.values_shape, device=part.values.device,
                                        dtype=part.values.dtype))


def _convert_from_saved(module: nn.Module, conv, state_dict, name: str, saved: List[str],
                        tag_it: bool = True) -> nn.Module:
    """``module`` (dense, of a registered type) converted by ``conv`` with the saved block sizes and
    masks of the block-sparse layers ``saved`` (``name`` itself, or parts of it: an attention's
    projections); a part dense in the state_dict stays dense."""
    shapes = conv.weight_shapes(module)
    rel = {s: "" if s == name else s[len(name) + 1:] for s in saved}
    unknown = [s for s, r in rel.items() if r not in shapes]
    if unknown:
        raise _Misfit(unknown[0], f"a {type(module).__name__} has no block-sparse layer "
                                  f"{rel[unknown[0]] or '<itself>'} (its layers: {', '.join(map(repr, shapes))})")
    first = saved[0]
    try:
        bs = _saved_block_size(state_dict, first)
        density = 1e-9 if list(shapes) == [""] else {s: (1e-9 if s in rel.values() else 1.0) for s in shapes}
        new = conv.to_sparse(module, density, bs, "random")
    except (ValueError, TypeError, RuntimeError) as exc:
        raise _Misfit(first, f"the saved mask does not fit the model's {_describe(module)}: {exc}") from exc
    for full, r in rel.items():
        part = new.get_submodule(r) if r else new
        target = module.get_submodule(r) if r and isinstance(getattr(module, r, None), nn.Module) else module
        try:
            if not isinstance(part, BlockSparseModule):
                raise ValueError(f"the conversion made a {type(part).__name__} there, not a block-sparse layer")
            if tuple(part.block_size) != _saved_block_size(state_dict, full):  # parts saved with other blocks
                dense = _dense_of(part)
                part = _convert_from_saved(dense, conversion_for(dense), state_dict, full, [full], tag_it=False)
                _replace(new, r, part)
            _adopt(part, state_dict, full)
        except _Misfit:
            raise
        except (ValueError, TypeError, RuntimeError) as exc:
            raise _Misfit(full, f"the saved mask does not fit the model's {_describe(target)}: {exc}") from exc
    if tag_it:
        tag(new, conv.module_type)
    new.train(module.training)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _planned(name: str, plan) -> bool:
    return name in plan or _under(name, plan)


def _under(name: str, prefixes) -> bool:
    parts = name.split(".")
    return bool(name) and any(".".join(parts[:i]) in prefixes for i in range(0 if "" in prefixes else 1,
                                                                              len(parts)))


def load_sparse(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Load a (sparse) checkpoint into ``model`` built with the same architecture; returns ``model``.

    ``model`` may be dense as torch builds it, or sparsified with other
    arguments (another density, distribution or block size): each module of a
    type :func:`~freetickets_kernels.nn.sparsify` converts (``nn.Linear``,
    ``nn.Conv2d``, ``nn.Conv1d``, ``nn.MultiheadAttention``, and the types
    added by :func:`~freetickets_kernels.nn.register_conversion`) whose state is
    block-sparse in ``state_dict`` is converted, with the saved block size and
    mask (an attention's projections each their own); each block-sparse layer
    (or sparse attention) whose state is dense becomes dense again; then
    ``model.load_state_dict(state_dict, strict)`` runs.  A layer that cannot
    take its saved state (another shape, a module of another kind) raises a
    ``ValueError`` naming every such layer, before anything is changed.
    """
    modules = dict(model.named_modules())
    sparse_names = set(_sparse_prefixes(state_dict))
    plan: Dict[str, nn.Module] = {}  # name -> the module that replaces it
    problems: List[str] = []
    handled: set = set()

    # dense modules of a registered type whose state is block-sparse (a layer, or an attention's projections)
    for name, module in modules.items():
        if _planned(name, plan) or _is_sparse_container(module):
            continue
        conv = conversion_for(module)
        saved = _inside(name, sparse_names - handled) if conv is not None else []
        if not saved:
            continue
        handled.update(saved)
        if not name:
            problems.append("<root>: the model itself is the saved layer and cannot be replaced in place; "
                            "convert it (ftk.SparseLinear.from_dense, ...) and call load_state_dict")
            continue
        try:
            plan[name] = _convert_from_saved(module, conv, state_dict, name, saved)
        except _Misfit as exc:
            problems.append(f"{exc.name}: {exc}")

    # block-sparse layers of the model (sparsified with other arguments) whose state is block-sparse
    for name in sorted(sparse_names - handled):
        module = modules.get(name)
        if module is None or _planned(name, plan):
            if module is None and not _planned(name, plan):
                problems.append(f"{name or '<root>'}: block-sparse in the state_dict, but the model has no such "
                                "module")
            continue
        if not isinstance(module, BlockSparseModule):
            problems.append(f"{name or '<root>'}: block-sparse in the state_dict, but the model's "
                            f"{type(module).__name__} is of no type sparsify converts (register_conversion "
                            "adds one)")
            continue
        if tuple(module.block_size) == _saved_block_size(state_dict, name):
            continue  # loads as is (another block count is adopted by the layer)
        if not name:
            problems.append("<root>: the model itself is the saved layer and cannot be replaced in place; "
                            "build it with the saved block size and call load_state_dict")
            continue
        try:
            dense = _dense_of(module)
            conv = conversion_for(dense)
            if conv is None:
                raise _Misfit(name, f"no conversion for {type(dense).__name__}")
            plan[name] = _convert_from_saved(dense, conv, state_dict, name, [name],
                                             tag_it=conversion_of_sparse(module) is not None)
        except _Misfit as exc:
            problems.append(f"{exc.name}: {exc}")

    # sparse modules of the model whose state is dense
    for name, module in modules.items():
        if _planned(name, plan) or not _is_sparse_container(module) or _inside(name, sparse_names):
            continue
        if not any(k.startswith(name + ".") or not name for k in state_dict):
            continue
        try:
            dense = _dense_of(module)
        except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
            if _key(name, "weight") in state_dict:
                problems.append(f"{name or '<root>'}: dense in the state_dict, but the model's "
                                f"{type(module).__name__} has no dense twin this call knows ({exc})")
            continue
        keys = [_key(name, k) for k in dense.state_dict()]
        if not (keys and all(k in state_dict for k in keys)):
            continue
        if not name:
            problems.append("<root>: the model itself is block-sparse but the state_dict is dense: "
                            "load it into model.to_dense()")
            continue
        plan[name] = dense

    # the shapes the model will have once the plan is done, against the state_dict's
    current = {k: tuple(v.shape) for k, v in model.state_dict().items() if not _under(k, plan)}
    for name, new in plan.items():
        current.update({_key(name, k): tuple(v.shape) for k, v in new.state_dict().items()})
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
    shapes = {k[: -len("weight")].rstrip("."): tuple(v.shape) for k, v in like.items()
              if k == "weight" or k.endswith(".weight")}
    for k, v in like.items():  # nn.MultiheadAttention's projections, as a sparse attention's layers
        name, _, attr = k.rpartition(".")
        if attr == "in_proj_weight" and v.dim() == 2:
            for q in _QKV:
                shapes[_key(name, q)] = (v.shape[0] // 3, v.shape[1])
        elif attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            shapes[_key(name, attr[: -len("_weight")])] = tuple(v.shape)
    return shapes


_QKV = ("q_proj", "k_proj", "v_proj")
_BUILTIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


def _registered_to_dense(out: "OrderedDict", state_dict, metadata, sparse) -> "OrderedDict":
    """The block-sparse linear layers that a registered conversion made from another module type
    (GPT-2's transposed ``Conv1D``, say), named in the metadata: rebuilt from the state_dict and
    written as that conversion's ``to_dense`` module's state (the keys and shapes its type expects)."""
    dense_states: Dict[str, "OrderedDict"] = {}
    for name in sparse:
        meta = metadata.get(name, {})
        conv = conversion_named(meta[ORIGIN_METADATA]) if ORIGIN_METADATA in meta else None
        weight = out.get(_key(name, "weight"))
        if conv is None or conv.module_type in _BUILTIN or weight is None or weight.dim() != 2:
            continue
        bias = out.get(_key(name, "bias"))
        bs = _saved_block_size(state_dict, name)
        values = state_dict[_key(name, "values")].detach()
        layer = SparseLinear(weight.shape[1], weight.shape[0], bias is not None, device=values.device,
                             dtype=values.dtype, density=1e-9, block_size=bs)
        layout = BlockSparseLayout(state_dict[_key(name, "slot_map")].to(values.device), int(weight.shape[0]),
                                   int(weight.shape[1]), bs)
        layer.set_layout(layout, values)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        dense_states[name] = conv.to_dense(layer).state_dict()
    if not dense_states:
        return out
    result = OrderedDict()
    for key, value in out.items():
        name, _, attr = key.rpartition(".")
        if name in dense_states and attr in ("weight", "bias"):
            written = dense_states[name]
            if written is not None:  # at the first of the layer's keys
                result.update((_key(name, k), v) for k, v in written.items())
                dense_states[name] = None
            continue
        result[key] = value
    return result


def _pack_attention(out: "OrderedDict", metadata, like) -> "OrderedDict":
    """A sparse attention's ``q_proj``/``k_proj``/``v_proj`` entries as ``nn.MultiheadAttention``'s:
    ``in_proj_weight`` (or ``q_proj_weight``, ... when kdim/vdim differ) and ``in_proj_bias``.
    The attentions are those marked in the metadata (by SparseMultiheadAttention), or, without it,
    those where ``like`` has ``in_proj_weight`` / ``q_proj_weight``."""
    packed: Dict[str, bool] = {}
    for name, meta in metadata.items():
        if isinstance(meta, Mapping) and ATTENTION_METADATA in meta:
            packed[name] = bool(meta[ATTENTION_METADATA].get("packed_qkv", True))
    if like is not None:
        like_keys = like.state_dict().keys() if isinstance(like, nn.Module) else like.keys()
        for key in like_keys:
            name, _, attr = key.rpartition(".")
            if attr in ("in_proj_weight", "q_proj_weight") and name not in packed:
                packed[name] = attr == "in_proj_weight"
    packed = {n: p for n, p in packed.items() if all(_key(_key(n, q), "weight") in out for q in _QKV)}
    if not packed:
        return out
    owner = {}
    for name in packed:
        for q in _QKV:
            for attr in ("weight", "bias"):
                owner[_key(_key(name, q), attr)] = name
    result = OrderedDict()
    for key, value in out.items():
        name = owner.get(key)
        if name is None:
            result[key] = value
            continue
        if _key(name, "in_proj_bias") in result or _key(name, "in_proj_weight") in result \
                or _key(name, "q_proj_weight") in result:
            continue  # written at the first of its keys
        ws = [out[_key(_key(name, q), "weight")] for q in _QKV]
        if packed[name]:
            result[_key(name, "in_proj_weight")] = torch.cat(ws)
        else:
            for q, w in zip(_QKV, ws):
                result[_key(name, f"{q}_weight")] = w
        biases = [out.get(_key(_key(name, q), "bias")) for q in _QKV]
        if all(b is not None for b in biases):
            result[_key(name, "in_proj_bias")] = torch.cat(biases)
    return result


def densify_state_dict(state_dict: Mapping[str, torch.Tensor],
                       like: Optional[Union[nn.Module, Mapping[str, torch.Tensor]]] = None) -> "OrderedDict":
    """A sparse checkpoint as a plain dense state_dict: each layer's ``values``/``slot_map`` become
    its ``weight`` (zeros outside the live blocks); every other entry is kept as it is.

    ``model.load_state_dict(ftk.densify_state_dict(state))`` then loads it into the dense model
    of the architecture (torchvision's, say), with the same outputs.  The weight shapes come
    from the state_dict's metadata (written by the sparse layers, kept by ``torch.save``); a
    state_dict rebuilt without it (e.g. by a dict comprehension) needs ``like``: the dense
    model, or its state_dict, whose weight shapes are used.

    A sparse attention's ``q_proj``/``k_proj``/``v_proj`` become ``nn.MultiheadAttention``'s
    ``in_proj_weight``/``in_proj_bias`` (``q_proj_weight``, ... when kdim/vdim differ); a layer
    made by a registered conversion (from the metadata) is written as its ``to_dense`` module's
    state (GPT-2's ``Conv1D``: weight ``[in, out]``).  Without the metadata, ``like`` tells the
    attentions apart, but not the registered conversions.
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
    out = _registered_to_dense(out, state_dict, metadata, sparse)
    out = _pack_attention(out, metadata, like)
    if metadata:
        out._metadata = type(metadata)(metadata)  # keeps the other modules' versions (BatchNorm's, say)
    return out
