"""sparsify(model) / densify(model): swap dense layers for block-sparse ones and back.

Which module types convert, and how, is the registry of :mod:`.conversions`
(built in: ``nn.Linear`` and its subclasses that keep ``Linear.forward``,
``nn.Conv2d``, ``nn.Conv1d``, ``nn.MultiheadAttention``; more with
:func:`~freetickets_kernels.nn.register_conversion`).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

from torch import nn

from ..layout import IntPair, block_size_pair
from .attention import SparseMultiheadAttention, _unsupported as _mha_unsupported, projection_shapes
from .base import BlockSparseModule
from .conv import SparseConv2d
from .conv1d import SparseConv1d, conv1d_unsupported
from .conversions import Conversion, _register_builtin, conversion_for, conversion_of_sparse, tag
from .densities import layer_densities
from .linear import SparseLinear


# ------------------------------------------------------------ built-in conversions
def _linear_check(module: nn.Linear) -> Optional[str]:
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} overrides Linear.forward (its function is not a plain linear)"
    return None


def _conv2d_check(module: nn.Conv2d) -> Optional[str]:
    if type(module).forward is not nn.Conv2d.forward:
        return f"{type(module).__name__} overrides Conv2d.forward"
    return f"groups={module.groups}" if module.groups != 1 else None


def _conv1d_check(module: nn.Conv1d) -> Optional[str]:
    if type(module).forward is not nn.Conv1d.forward:
        return f"{type(module).__name__} overrides Conv1d.forward"
    return conv1d_unsupported(module)


def _mha_check(module: nn.MultiheadAttention) -> Optional[str]:
    if type(module).forward is not nn.MultiheadAttention.forward:
        return f"{type(module).__name__} overrides MultiheadAttention.forward"
    return _mha_unsupported(module)


def _single(module: nn.Module) -> Dict[str, tuple]:
    return {"": tuple(module.weight.shape)}


_register_builtin(Conversion(nn.Linear, SparseLinear.from_dense, lambda s: s.to_dense(), _single, _linear_check))
_register_builtin(Conversion(nn.Conv2d, SparseConv2d.from_dense, lambda s: s.to_dense(), _single, _conv2d_check))
_register_builtin(Conversion(nn.Conv1d, SparseConv1d.from_dense, lambda s: s.to_dense(),
                             lambda m: {"": (m.out_channels, m.in_channels, 1, m.kernel_size[0])}, _conv1d_check))
_register_builtin(Conversion(nn.MultiheadAttention, SparseMultiheadAttention.from_dense, lambda s: s.to_dense(),
                             projection_shapes, _mha_check))

_SPARSE_CONTAINERS = (BlockSparseModule, SparseMultiheadAttention)


# ------------------------------------------------------------------------ report
@dataclass
class SparsifyReport:
    """What :func:`sparsify` did to every weight matrix (parameter with ``dim >= 2``) of the model.

    Each row: ``name``, ``shape``, ``params``, ``density`` (kept fraction; 1 for
    dense), ``status`` (``"sparse"`` or ``"dense: <reason>"``) and ``counted``
    (False for a second owner of a tied weight: it is counted once).  Weights
    of modules no conversion knows (Embedding, Conv3d, ConvTranspose2d, ...)
    and bare parameters (a ViT's class token and position embedding) are rows
    too, ``"dense: not considered: ..."``; 1-d parameters (biases, norm scales)
    are not weight matrices and are left out.
    """

    rows: List[dict] = field(default_factory=list)

    @property
    def sparse_layers(self) -> List[str]:
        return [r["name"] for r in self.rows if r["status"] == "sparse"]

    @property
    def dense_layers(self) -> Dict[str, str]:
        """{name: reason} of every weight matrix left dense."""
        return {r["name"]: r["status"][len("dense: "):] for r in self.rows if r["status"] != "sparse"}

    def global_density(self) -> float:
        """Kept weights over all the weight matrices of the model (dense ones count fully, a tied one once):
        the model's true fraction of stored weights."""
        counted = [r for r in self.rows if r.get("counted", True)]
        kept = sum(r["params"] * r["density"] for r in counted)
        return kept / max(sum(r["params"] for r in counted), 1)

    def __str__(self) -> str:
        lines = [f"{'layer':<40} {'shape':<22} {'density':>8}  status"]
        for r in self.rows:
            note = "" if r.get("counted", True) else " (counted once, with its other owner)"
            lines.append(f"{r['name']:<40} {str(tuple(r['shape'])):<22} {r['density']:>8.4f}  {r['status']}{note}")
        lines.append(f"kept fraction of all the model's weight matrices: {self.global_density():.4f}")
        return "\n".join(lines)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _under(name: str, prefixes: Set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def _row_name(module_name: str, param_name: str) -> str:
    """A weight is named by its module (``attn.out_proj``), another parameter in full (``attn.in_proj_weight``)."""
    sub, _, leaf = param_name.rpartition(".")
    base = ".".join(n for n in (module_name, sub) if n)
    return base if leaf == "weight" else ".".join(n for n in (base, leaf) if n)


def sparsify(model: nn.Module, density: float, block_size: IntPair = 32, distribution: str = "erk",
             exclude: Iterable[str] = (), criterion: str = "magnitude") -> SparsifyReport:
    """Replace the convertible layers of ``model`` in place by block-sparse ones; returns a report.

    Converted: ``nn.Linear`` (and subclasses that keep ``Linear.forward``) to
    :class:`SparseLinear`, ``nn.Conv2d`` / ``nn.Conv1d`` (groups=1) to
    :class:`SparseConv2d` / :class:`SparseConv1d`, ``nn.MultiheadAttention`` to
    :class:`SparseMultiheadAttention` (its q/k/v/out projections each a
    layer), and the types added by :func:`register_conversion`.  ``density``
    is the kept fraction over all these layers' weights, spread by
    ``distribution`` ("erk", "er" or "uniform").  Left dense, with the reason
    in the report: layers named by an ``exclude`` pattern (fnmatch on the
    qualified name, e.g. ``"conv1"`` or ``"fc*"``), unsupported configurations
    (grouped convs, ...), layers whose weight is tied to another module's (an
    output head sharing an embedding's weight: converting would untie them),
    and layers whose ERK density reaches 1.  ``criterion`` picks the kept
    blocks of each layer: largest L2 norm ("magnitude") or "random".
    The report lists every weight matrix of the model, so its
    :meth:`~SparsifyReport.global_density` is the model's true kept fraction.
    """
    block_size_pair(block_size)
    patterns = list(exclude)
    report = SparsifyReport()
    owners: Dict[int, List[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)

    claimed: Set[str] = set()  # modules a conversion handled (their descendants are theirs)
    covered: Set[int] = set()  # parameters the rows of claimed modules account for
    candidates: List[Tuple[str, nn.Module, Conversion, Dict[str, tuple], List[str]]] = []
    for name, module in model.named_modules():
        if isinstance(module, _SPARSE_CONTAINERS):
            raise ValueError(f"{name or 'the model'} is already block-sparse: densify(model) first")
        if _under(name, claimed):
            continue
        conv = conversion_for(module)
        if conv is None:
            continue
        if not name:  # sparsify swaps children in place: it cannot replace the object it was given
            hint = {nn.Linear: "ftk.SparseLinear.from_dense(layer, density, block_size)",
                    nn.Conv2d: "ftk.SparseConv2d.from_dense(layer, density, block_size)",
                    nn.Conv1d: "ftk.SparseConv1d.from_dense(layer, density, block_size)",
                    nn.MultiheadAttention: "ftk.SparseMultiheadAttention.from_dense(layer, density, block_size)"}
            raise ValueError(f"sparsify: the model itself is an {type(module).__name__}, which cannot be "
                             f"replaced in place; use {hint.get(conv.module_type, 'the conversion directly')}")
        claimed.add(name)
        weights = [(pn, p) for pn, p in module.named_parameters() if p.dim() >= 2]
        tied = sorted({o for _, p in weights for o in owners[id(p)] if not o.startswith(name + ".")})
        reason = conv.reason_to_keep_dense(module)
        if reason is None and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            reason = "excluded"
        if reason is None and tied:
            reason = f"weight tied to {', '.join(tied)} (left dense so it stays tied)"
        if reason is not None:
            for pn, p in weights:
                report.rows.append(dict(name=_row_name(name, pn), shape=tuple(p.shape), params=p.numel(),
                                        density=1.0, status=f"dense: {reason}", counted=id(p) not in covered))
                covered.add(id(p))
            continue
        covered.update(id(p) for _, p in weights)
        shapes = conv.weight_shapes(module)
        parts = {}  # a part of a multi-weight module (an attention projection) may be excluded by name
        for suffix, shape in shapes.items():
            full = f"{name}.{suffix}" if suffix else name
            excluded = bool(suffix) and any(fnmatch.fnmatchcase(full, p) for p in patterns)
            if not excluded:
                parts[suffix] = shape
            report.rows.append(dict(name=full, shape=tuple(shape), params=math.prod(shape), density=1.0,
                                    status="dense: excluded" if excluded else "sparse"))
        candidates.append((name, module, conv, parts, list(shapes)))

    # weight matrices no conversion claimed: listed dense, a shared one counted once
    seen = covered
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.dim() < 2 or _under(pname, claimed):
            continue
        mod_name, _, leaf = pname.rpartition(".")
        owner = model.get_submodule(mod_name)
        if leaf == "weight":
            why = f"not considered: no conversion for {type(owner).__name__}"
        else:
            why = f"not considered: {leaf}, a parameter of {type(owner).__name__}, is not a layer weight"
        others = [o for o in owners[id(p)] if o != pname]
        if others:
            why += f" (shared with {', '.join(others)})"
        report.rows.append(dict(name=_row_name(mod_name, leaf), shape=tuple(p.shape), params=p.numel(),
                                density=1.0, status=f"dense: {why}", counted=id(p) not in seen))
        seen.add(id(p))

    flat = {f"{n}.{s}" if s else n: shape for n, _, _, parts, _ in candidates for s, shape in parts.items()}
    densities = layer_densities(flat, density, distribution) if flat else {}
    by_name = {r["name"]: r for r in report.rows}
    for name, module, conv, parts, suffixes in candidates:
        keys = {s: (f"{name}.{s}" if s else name) for s in suffixes}
        ds = {s: densities.get(k, 1.0) for s, k in keys.items()}
        for s in parts:
            k = keys[s]
            by_name[k]["density"] = ds[s]
            if ds[s] >= 1.0:
                by_name[k]["status"] = f"dense: {distribution} density reaches 1"
        if all(d >= 1.0 for d in ds.values()):
            continue
        new = conv.to_sparse(module, ds[""] if list(ds) == [""] else ds, block_size, criterion)
        tag(new, conv.module_type)
        new.train(module.training)
        for s, k in keys.items():  # what the block rounding kept
            part = new if not s else getattr(new, s, None)
            if ds[s] < 1.0 and part is not None and hasattr(part, "density"):
                by_name[k]["density"] = float(part.density)
        _replace(model, name, new)
    return report


def densify(model: nn.Module) -> nn.Module:
    """Replace every block-sparse layer (and sparse attention) of ``model`` in place by the equivalent
    dense torch module (or the type a registered conversion came from)."""
    replaced: Set[str] = set()
    for name, module in list(model.named_modules()):
        if _under(name, replaced):
            continue
        conv = conversion_of_sparse(module)
        if conv is None and not isinstance(module, _SPARSE_CONTAINERS):
            continue
        if not name:
            raise ValueError("the model itself is a block-sparse layer: use model.to_dense()")
        dense = conv.to_dense(module) if conv is not None else module.to_dense()
        dense.train(module.training)
        _replace(model, name, dense)
        replaced.add(name)
    return model
