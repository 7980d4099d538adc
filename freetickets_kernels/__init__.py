"""freetickets-kernels: block-sparse kernels that make sparse networks fast,
and FreeTickets ensembles trained on top of them.

This package root is the library core's front: it never imports the
application (``freetickets_kernels.app``: the ``freetickets`` command, the
benchmark suites, training runs with checkpoints and result files).
"""

from ._version import __version__

# flops: registers our ops' formulas with torch.utils.flop_counter on import
from . import flops, ops
from .backends import (
    BackendUnavailableError,
    ReferenceBackendWarning,
    available_backends,
    use_backend,
)
from .dst import DynamicSparseTraining
from .layout import BlockSparseLayout
from .nn import (SparseConv1d, SparseConv2d, SparseLinear, SparseMultiheadAttention, densify,
                 register_conversion, sparsify)
from .nn.loading import densify_state_dict, load_sparse
from .ops import block_sparse_conv2d, block_sparse_linear, dense_grad_block_norms

__all__ = [
    "BackendUnavailableError",
    "BlockSparseLayout",
    "DynamicSparseTraining",
    "ReferenceBackendWarning",
    "SparseConv1d",
    "SparseConv2d",
    "SparseLinear",
    "SparseMultiheadAttention",
    "__version__",
    "available_backends",
    "block_sparse_conv2d",
    "block_sparse_linear",
    "dense_grad_block_norms",
    "densify",
    "densify_state_dict",
    "flops",
    "load_sparse",
    "ops",
    "register_conversion",
    "sparsify",
    "use_backend",
]
