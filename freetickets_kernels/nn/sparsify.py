"""sparsify(model) / densify(model): swap nn.Linear/nn.Conv2d for block-sparse layers and back."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, List, Tuple

from torch import nn

from ..layout import IntPair, block_size_pair
from .base import BlockSparseModule
from .conv import SparseConv2d
from .densities import layer_densities
from .linear import SparseLinear


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did to each Linear/Conv2d layer."""

    rows: List[dict] = field(default_factory=list)

    @property
    def sparse_layers(self) -> List[str]:
        return [r["name"] for r in self.rows if r["status"] == "sparse"]

    def global_density(self) -> float:
        """Kept weights over all weights of the layers considered (dense ones count fully)."""
        kept = sum(r["params"] * r["density"] for r in self.rows)
        return kept / max(sum(r["params"] for r in self.rows), 1)

    def __str__(self) -> str:
        lines = [f"{'layer':<40} {'shape':<22} {'density':>8}  status"]
        for r in self.rows:
            lines.append(f"{r['name']:<40} {str(tuple(r['shape'])):<22} {r['density']:>8.4f}  {r['status']}")
        lines.append(f"kept fraction of all these weights (dense layers included): {self.global_density():.4f}")
        return "\n".join(lines)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(model: nn.Module, density: float, block_size: IntPair = 32, distribution: str = "erk",
             exclude: Iterable[str] = (), criterion: str = "magnitude") -> SparsifyReport:
    """Replace the ``nn.Linear``/``nn.Conv2d`` layers of ``model`` in place by block-sparse ones.

    ``density`` is the kept fraction over all the layers that can be
    sparsified, spread by ``distribution`` ("erk", "er" or "uniform").  Layers
    named by an ``exclude`` pattern (fnmatch on the qualified name, e.g.
    ``"conv1"`` or ``"fc*"``), grouped convs and subclasses (such as
    MultiheadAttention's projection, which bypasses ``forward``) stay dense; so
    do layers whose ERK density reaches 1.  ``criterion`` picks the kept blocks
    of each layer: largest L2 norm ("magnitude") or "random".
    Returns a report of every layer considered.
    """
    block_size_pair(block_size)
    patterns = list(exclude)
    report = SparsifyReport()
    candidates: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, BlockSparseModule):
            raise ValueError(f"{name} is already block-sparse: densify(model) first")
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if not name:  # sparsify swaps children in place: it cannot replace the object it was given
            cls = "SparseLinear" if isinstance(module, nn.Linear) else "SparseConv2d"
            raise ValueError(f"sparsify: the model itself is an nn.{type(module).__name__}, which cannot be "
                             f"replaced in place; use ftk.{cls}.from_dense(layer, density, block_size)")
        row = dict(name=name, shape=tuple(module.weight.shape), params=module.weight.numel(), density=1.0)
        if type(module) not in (nn.Linear, nn.Conv2d):
            report.rows.append(dict(row, status=f"dense: {type(module).__name__} is not a plain Linear/Conv2d"))
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            report.rows.append(dict(row, status=f"dense: groups={module.groups}"))
        elif any(fnmatch.fnmatchcase(name, p) for p in patterns):
            report.rows.append(dict(row, status="dense: excluded"))
        else:
            candidates.append((name, module))
            report.rows.append(dict(row, status="sparse"))
    densities = layer_densities({n: tuple(m.weight.shape) for n, m in candidates}, density, distribution)
    by_name = {r["name"]: r for r in report.rows}
    for name, module in candidates:
        d = densities[name]
        by_name[name]["density"] = d
        if d >= 1.0:
            by_name[name]["status"] = f"dense: {distribution} density reaches 1"
            continue
        cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
        new = cls.from_dense(module, d, block_size, criterion)
        new.train(module.training)
        by_name[name]["density"] = new.density  # what the block rounding kept
        _replace(model, name, new)
    return report


def densify(model: nn.Module) -> nn.Module:
    """Replace every block-sparse layer of ``model`` in place by the equivalent dense torch layer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BlockSparseModule):
            dense = module.to_dense()
            dense.train(module.training)
            if name:
                _replace(model, name, dense)
            else:
                raise ValueError("the model itself is a block-sparse layer: use model.to_dense()")
    return model
