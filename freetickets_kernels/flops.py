"""FLOPs of dense and block-sparse models: one forward, one training step, a whole run.

Conventions (those of the DST literature, made explicit):

- a multiply-add is 2 FLOPs; only Linear, Conv1d and Conv2d layers (dense or
  block-sparse) and attention projections are counted: normalisation,
  activations, pooling and the attention's score products are left out, as
  they are in the FreeTickets and RigL papers;
- a block-sparse layer costs its live blocks, whole, as the kernels compute
  them (``nnzb * Bo * Bi`` multiply-adds per output position); with block size
  (1, 1) that is the paper's unstructured count;
- a training step costs forward + backward, backward = 2 x forward (input
  gradient and weight gradient, each on the live blocks only);
- each RigL update and each EDST exploration adds one dense weight-gradient
  pass (the dense forward cost of every sparse layer) over the batch that
  drives growth.

The same counts are registered with ``torch.utils.flop_counter`` for this
package's custom ops, so ``FlopCounterMode`` counts a sparse model by its
live blocks too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from .nn.base import BlockSparseModule
from .nn.conv import SparseConv2d
from .nn.conv1d import SparseConv1d
from .nn.linear import SparseLinear

__all__ = ["LayerFlops", "FlopsReport", "count_flops", "parameter_count"]


@dataclass
class LayerFlops:
    """Per-sample forward FLOPs of one layer, and what its dense twin would cost."""

    name: str
    kind: str
    forward: float
    dense_forward: float

    @property
    def sparse(self) -> bool:
        return self.kind.startswith("Sparse")


@dataclass
class FlopsReport:
    """Per-sample FLOPs of a model (see the module docstring for the conventions)."""

    layers: List[LayerFlops] = field(default_factory=list)

    @property
    def forward(self) -> float:
        """Inference FLOPs of one sample."""
        return sum(layer.forward for layer in self.layers)

    @property
    def dense_forward(self) -> float:
        """Inference FLOPs of one sample through the dense twin of the model."""
        return sum(layer.dense_forward for layer in self.layers)

    @property
    def dense_gradient(self) -> float:
        """FLOPs of RigL's dense weight-gradient pass, per sample of the batch that drives growth."""
        return sum(layer.dense_forward for layer in self.layers if layer.sparse)

    def training(self, samples: int, dense_gradient_samples: int = 0) -> float:
        """FLOPs of training on ``samples`` samples, with ``dense_gradient_samples`` of them
        also passed through the dense gradient (RigL updates, EDST explorations)."""
        return 3 * self.forward * samples + self.dense_gradient * dense_gradient_samples

    def as_rows(self) -> List[dict]:
        return [{"layer": layer.name, "kind": layer.kind, "forward_flops": layer.forward,
                 "dense_forward_flops": layer.dense_forward,
                 "ratio": layer.forward / layer.dense_forward if layer.dense_forward else 1.0}
                for layer in self.layers]


def _live_block_macs(module: BlockSparseModule) -> int:
    return math.prod(module.layout.values_shape)


def count_flops(model: nn.Module, example_input: torch.Tensor) -> FlopsReport:
    """Per-sample FLOPs of ``model`` on inputs shaped like ``example_input`` (its batch
    dimension is ignored; one sample is run, without gradients, in eval mode).

    Counted: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and their block-sparse layers, and the
    q/k/v/out projections of ``nn.MultiheadAttention`` (a :class:`SparseMultiheadAttention`'s are
    its linear layers); the attention's score and weighted-sum products are left out, as
    activations are (``FlopCounterMode`` counts them too).
    """
    report = FlopsReport()
    handles = []

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, SparseLinear):
                tokens = output.numel() // module.out_features
                forward, dense = _live_block_macs(module), module.in_features * module.out_features
            elif isinstance(module, (SparseConv2d, SparseConv1d)):
                tokens = output.numel() // module.out_channels  # N x output positions
                forward = _live_block_macs(module)
                dense = module.in_channels * module.out_channels * math.prod(module.kernel_size)
            elif isinstance(module, nn.Linear):
                tokens = output.numel() // module.out_features
                forward = dense = module.weight.numel()
            elif isinstance(module, nn.MultiheadAttention):
                _record_attention(report, name, module, inputs)
                return
            else:  # nn.Conv1d / nn.Conv2d: weight [O, C / groups, *kernel]
                tokens = output.numel() // module.out_channels
                forward = dense = module.weight.numel()
            report.layers.append(LayerFlops(name, type(module).__name__, 2.0 * forward * tokens,
                                            2.0 * dense * tokens))
        return record

    counted = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, SparseLinear, SparseConv1d, SparseConv2d)
    attention = set()
    for name, module in model.named_modules():
        if any(name.startswith(a + ".") for a in attention):
            continue  # out_proj: its weight is used by the attention's function, not its forward
        if isinstance(module, nn.MultiheadAttention):
            attention.add(name)
        if isinstance(module, counted):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return report


def _record_attention(report: FlopsReport, name: str, mha: nn.MultiheadAttention, inputs) -> None:
    """The q/k/v/out projections of a dense ``nn.MultiheadAttention`` (called with query, key, value)."""
    if len(inputs) < 3:
        raise ValueError(f"{name}: count_flops needs the attention's query, key and value passed positionally")
    query, key, value = inputs[:3]
    e = mha.embed_dim
    macs = (query.numel() // e) * e * e * 2 + (key.numel() // mha.kdim) * mha.kdim * e \
        + (value.numel() // mha.vdim) * mha.vdim * e  # q and out on the queries, k and v on the keys
    report.layers.append(LayerFlops(name, type(mha).__name__, 2.0 * macs, 2.0 * macs))


def parameter_count(model: nn.Module) -> dict:
    """``{"params": weights that can be non-zero, "dense_params": the dense twin's}``.

    A block-sparse layer counts the weight elements inside its live blocks
    (block padding at ragged edges excluded); every other parameter counts whole.
    """
    params = dense = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, BlockSparseModule) and name == "values":
                weights = math.prod(module.layout.weight_shape)
                params += round(module.density * weights)
                dense += weights
            else:
                params += p.numel()
                dense += p.numel()
    return {"params": params, "dense_params": dense}


# --------------------------------------------- torch.utils.flop_counter hooks
# FlopCounterMode passes every tensor argument as its shape.

def _blocks(values_shape) -> int:
    return values_shape[0] * values_shape[1] * values_shape[2]


@register_flop_formula(torch.ops.freetickets.linear_forward)
def _linear_forward_flops(x_shape, values_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * _blocks(values_shape)


@register_flop_formula(torch.ops.freetickets.linear_grad_input)
def _linear_grad_input_flops(grad_shape, values_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * grad_shape[0] * _blocks(values_shape)


@register_flop_formula(torch.ops.freetickets.linear_grad_values)
def _linear_grad_values_flops(grad_shape, x_shape, row_ptr, col_idx_shape, slot, block_size,
                                  out_shape=None, **kwargs) -> int:
    return 2 * grad_shape[0] * col_idx_shape[0] * block_size[0] * block_size[1]


@register_flop_formula(torch.ops.freetickets.conv2d_forward)
def _conv2d_forward_flops(x_shape, values_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * out_shape[0] * out_shape[2] * out_shape[3] * _blocks(values_shape)


@register_flop_formula(torch.ops.freetickets.conv2d_grad_input)
def _conv2d_grad_input_flops(grad_shape, values_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * grad_shape[0] * grad_shape[2] * grad_shape[3] * _blocks(values_shape)


@register_flop_formula(torch.ops.freetickets.conv2d_grad_values)
def _conv2d_grad_values_flops(grad_shape, x_shape, row_ptr, col_idx_shape, slot, block_size,
                                  *args, out_shape=None, **kwargs) -> int:
    return 2 * grad_shape[0] * grad_shape[2] * grad_shape[3] * col_idx_shape[0] * block_size[0] * block_size[1]


@register_flop_formula(torch.ops.freetickets.linear_grad_block_norms)
def _linear_grad_norms_flops(grad_shape, x_shape, block_size, out_shape=None, **kwargs) -> int:
    return 2 * grad_shape[0] * grad_shape[1] * x_shape[1]


@register_flop_formula(torch.ops.freetickets.conv2d_grad_block_norms)
def _conv2d_grad_norms_flops(grad_shape, x_shape, block_size, kernel_size, *args, out_shape=None,
                             **kwargs) -> int:
    n, o, oh, ow = grad_shape
    return 2 * n * oh * ow * o * x_shape[1] * kernel_size[0] * kernel_size[1]
