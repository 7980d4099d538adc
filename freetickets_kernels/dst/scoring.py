"""Block scores for DST updates: magnitude (what pruning keeps) and the dense gradient (RigL growth).

RigL grows the dead blocks whose *dense* weight gradient is largest, a
gradient the sparse backward never forms.  So on the steps that need it the
engine arms a :class:`GradientCapture` on each layer (through the layer's
:meth:`~freetickets_kernels.nn.BlockSparseModule.observe_op` seam): the next
forward whose output needs a gradient keeps the op's input, and its backward
the output gradient (one batch of activations, on update steps only).
:func:`dense_grad_block_norms` then scores every block of the layer with
:func:`freetickets_kernels.ops.dense_grad_block_norms`.  Under
``torch.distributed`` the dense gradient is averaged over the ranks first,
so the score is the global batch's, as in one process.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import distributed, ops
from ..backends import reference
from ..layout import block_norms, to_gemm_blocks
from ..nn.base import BlockSparseModule


class GradientCapture:
    """A layer's op observer: armed until the first forward whose output needs a gradient, then
    holding that op's input and, once the backward has run, its output gradient."""

    def __init__(self) -> None:
        self.armed = True
        self.saved: Optional[Dict[str, torch.Tensor]] = None  # {"input", "grad"}

    def __call__(self, op_input: torch.Tensor, output: torch.Tensor) -> None:
        if not (self.armed and output.requires_grad):
            return
        self.armed = False
        saved = {"input": op_input.detach()}
        # The gradient is taken where the op's own autograd node receives it, not
        # by a hook on `output`: an in-place op on the output (ReLU(inplace=True),
        # `h += 1`) or on a view of it (linear's reshape) moves the tensor to a new
        # node, and a tensor hook would then never fire.
        node = (output._base if output._base is not None else output).grad_fn
        shape = output.shape

        def keep_grad(grad_outputs):
            saved["grad"] = grad_outputs[0].detach().reshape(shape)

        node.register_prehook(keep_grad)
        self.saved = saved


def arm(layer: BlockSparseModule) -> None:
    """Capture the op input and output gradient of ``layer``'s next forward/backward (drops any earlier one)."""
    layer.observe_op(GradientCapture())


def release(layer: BlockSparseModule) -> None:
    """Stop capturing and drop what was captured."""
    layer.observe_op(None)


def captured(layer: BlockSparseModule) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(op_input, grad_output)`` of the batch captured since :func:`arm`."""
    capture = layer._op_observer
    saved = capture.saved if isinstance(capture, GradientCapture) else None
    if not saved or "grad" not in saved:
        raise RuntimeError(
            "no gradient was captured: call arm_gradient_capture() before the forward and "
            "backward whose gradient should drive growth"
        )
    return saved["input"], saved["grad"]


def dense_weight_grad(layer: BlockSparseModule, op_input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The dense weight gradient (the layer's weight shape) of one op call."""
    layout = layer.layout
    if layout.is_conv:
        geo = layer.op_geometry()
        return reference.conv2d_dense_weight_grad(grad_output, op_input, layout.kernel_size, geo["stride"],
                                                  geo["padding"], geo["dilation"])
    return reference.linear_dense_weight_grad(grad_output.reshape(-1, layout.out_features),
                                              op_input.reshape(-1, layout.in_features))


def dense_grad_block_norms(layer: BlockSparseModule) -> torch.Tensor:
    """Block L2 norms ``[R, C]`` of the dense weight gradient of the captured batch (RigL's growth score)."""
    op_input, grad = captured(layer)
    if distributed.active():  # score the global batch: average the dense gradient over ranks first
        dense = distributed.all_reduce_mean_(dense_weight_grad(layer, op_input, grad))
        return block_norms(to_gemm_blocks(dense, layer.block_size))
    return ops.dense_grad_block_norms(op_input, grad, layer.layout, **layer.op_geometry())


def magnitude_block_norms(layer: BlockSparseModule) -> torch.Tensor:
    """L2 norm of every stored block, by slot ``[nnzb]`` (what pruning ranks), in float32."""
    return block_norms(layer.values.detach()).float()
