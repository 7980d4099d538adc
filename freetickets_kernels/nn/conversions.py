"""Which dense module types :func:`~freetickets_kernels.nn.sparsify` converts, and how.

The built-in conversions (``nn.Linear`` and its subclasses that keep
``Linear.forward``, ``nn.Conv2d``, ``nn.Conv1d``, ``nn.MultiheadAttention``)
are registered here like any other; :func:`register_conversion` adds one for a
module type this package does not know, e.g. GPT-2's transposed-weight
``Conv1D`` (weight ``[in, out]``, ``y = x @ W + b``)::

    def to_sparse(m, density, block_size, criterion):
        lin = nn.Linear(m.weight.shape[0], m.weight.shape[1])
        lin.weight.data, lin.bias.data = m.weight.detach().t(), m.bias.detach()
        return ftk.SparseLinear.from_dense(lin, density, block_size, criterion)

    def to_dense(sparse):
        conv = Conv1D(sparse.out_features, sparse.in_features)
        conv.weight.data, conv.bias.data = sparse.weight.t().contiguous(), sparse.bias.detach().clone()
        return conv

    ftk.register_conversion(Conv1D, to_sparse, to_dense,
                            weight_shape=lambda m: tuple(m.weight.shape[::-1]))

``sparsify`` tags the module ``to_sparse`` returns with the conversion, so
:func:`~freetickets_kernels.nn.densify` calls the matching ``to_dense``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import nn

# the attribute sparsify sets on a converted module: the dense type it came from
ORIGIN_ATTR = "_ftk_dense_type"


@dataclass(frozen=True)
class Conversion:
    module_type: type
    to_sparse: Callable  # (module, density, block_size, criterion) -> nn.Module
    to_dense: Callable  # (sparse module) -> nn.Module
    weight_shapes: Callable  # module -> {suffix: weight shape as the sparse layer sees it} ("" = the module)
    check: Optional[Callable] = None  # module -> reason to keep it dense, or None

    def reason_to_keep_dense(self, module: nn.Module) -> Optional[str]:
        return self.check(module) if self.check is not None else None


_REGISTRY: Dict[type, Conversion] = {}


def register_conversion(module_type: type, to_sparse: Callable, to_dense: Callable, *,
                        weight_shape: Optional[Callable] = None, check: Optional[Callable] = None) -> None:
    """Teach :func:`sparsify` / :func:`densify` a module type (and its subclasses, unless a
    more specific type is registered).

    ``to_sparse(module, density, block_size, criterion)`` returns the replacement (a
    block-sparse layer, or a module holding them: DST trains every
    :class:`~freetickets_kernels.nn.BlockSparseModule` inside); ``to_dense(sparse)`` rebuilds
    the dense module.  ``weight_shape(module)`` is the weight's shape as the sparse layer
    sees it (``[out, in, ...]``; default ``module.weight.shape``), used to spread the ERK
    densities; ``check(module)`` may return a reason to leave a module dense.
    Registering a type again replaces its conversion.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (callable(to_sparse) and callable(to_dense)):
        raise TypeError("to_sparse and to_dense must be callables")
    shape = weight_shape or (lambda m: tuple(m.weight.shape))
    _REGISTRY[module_type] = Conversion(module_type, to_sparse, to_dense, lambda m: {"": tuple(shape(m))}, check)


def _register_builtin(conversion: Conversion) -> None:
    _REGISTRY[conversion.module_type] = conversion


def unregister_conversion(module_type: type) -> None:
    """Forget the conversion registered for exactly ``module_type``."""
    _REGISTRY.pop(module_type, None)


def conversion_for(module: nn.Module) -> Optional[Conversion]:
    """The conversion of the most specific registered type in ``module``'s class hierarchy."""
    for cls in type(module).__mro__:
        conv = _REGISTRY.get(cls)
        if conv is not None:
            return conv
    return None


def conversion_of_sparse(module: nn.Module) -> Optional[Conversion]:
    """The conversion that made ``module`` (tagged by sparsify), if it is still registered."""
    origin = getattr(module, ORIGIN_ATTR, None)
    return _REGISTRY.get(origin) if origin is not None else None


# the state_dict metadata key naming the dense type a converted module came from (see tag)
ORIGIN_METADATA = "ftk_origin"


def type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _record_origin(module: nn.Module, state_dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the converted module's dense type travels in the state_dict's metadata,
    so :func:`~freetickets_kernels.nn.densify_state_dict` can call its registered ``to_dense``."""
    origin = getattr(module, ORIGIN_ATTR, None)
    if origin is not None:
        local_metadata[ORIGIN_METADATA] = type_name(origin)


def tag(module: nn.Module, origin: type) -> nn.Module:
    object.__setattr__(module, ORIGIN_ATTR, origin)
    if not getattr(module, "_ftk_origin_hooked", False):
        module.register_state_dict_post_hook(_record_origin)
        object.__setattr__(module, "_ftk_origin_hooked", True)
    return module


def conversion_named(name: str) -> Optional[Conversion]:
    """The registered conversion whose module type's qualified name is ``name`` (see type_name)."""
    for cls, conv in _REGISTRY.items():
        if type_name(cls) == name:
            return conv
    return None


def registered_types() -> Tuple[type, ...]:
    return tuple(_REGISTRY)
