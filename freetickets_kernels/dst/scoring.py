"""Block scores for DST updates: magnitude (what pruning keeps) and the dense gradient (RigL growth).

RigL grows the dead blocks whose *dense* weight gradient is largest, a
gradient the sparse backward never forms.  So on the steps that need it the
engine arms a :class:`GradientCapture` on each layer (through the layer's
:meth:`~freetickets_kernels.nn.BlockSparseModule.observe_op` seam) right after
the optimizer step before an update: every forward whose output needs a
gradient until the update contributes, once its backward has run, so with
gradient accumulation the score is that of all the micro-batches the
optimizer's gradient sums (one call: its input and output gradient are kept;
more: their dense weight gradients are summed).
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
    """A layer's op observer, armed until the update: it sums the dense weight gradient of every op call
    whose backward runs, so that with gradient accumulation RigL scores the gradient of all the
    micro-batches since the previous optimizer step (the one the optimizer sees), not one of them.

    Memory stays bounded by one call's activations or one dense weight, whichever is in use: the op
    input waits for its gradient in the backward hook's closure (dropped with the graph if that
    backward never runs); the first call's ``(input, grad)`` pair is kept as is (a single batch is
    scored exactly as before, by :func:`freetickets_kernels.ops.dense_grad_block_norms`), and a
    second call folds both into a float32 dense gradient that every later call adds to.
    """

    def __init__(self) -> None:
        self.armed = True
        self.saved: Optional[Dict[str, torch.Tensor]] = None  # {"input", "grad"}: the first call's
        self.dense: Optional[torch.Tensor] = None  # the summed dense weight gradient, from the second call on
        self.calls = 0  # op calls whose gradient arrived
        self.layer: Optional[BlockSparseModule] = None

    def __call__(self, op_input: torch.Tensor, output: torch.Tensor) -> None:
        if not (self.armed and output.requires_grad):
            return
        op_input = op_input.detach()
        # The gradient is taken where the op's own autograd node receives it, not
        # by a hook on `output`: an in-place op on the output (ReLU(inplace=True),
        # `h += 1`) or on a view of it (linear's reshape) moves the tensor to a new
        # node, and a tensor hook would then never fire.
        node = (output._base if output._base is not None else output).grad_fn
        shape = output.shape

        def keep_grad(grad_outputs):
            if self.armed and grad_outputs[0] is not None:
                self._add(op_input, grad_outputs[0].detach().reshape(shape))

        node.register_prehook(keep_grad)

    @torch.no_grad()
    def _add(self, op_input: torch.Tensor, grad: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 1:
            self.saved = {"input": op_input, "grad": grad}
            return
        if self.dense is None:
            first = self.saved
            self.saved = None
            self.dense = _dense_grad_fp32(self.layer, first["input"], first["grad"])
        self.dense += _dense_grad_fp32(self.layer, op_input, grad)


def _dense_grad_fp32(layer: BlockSparseModule, op_input: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return dense_weight_grad(layer, op_input.float(), grad.float())


def arm(layer: BlockSparseModule) -> None:
    """Sum the dense weight gradient of ``layer``'s forwards/backwards from now on (drops any earlier one)."""
    release(layer)
    capture = GradientCapture()
    capture.layer = layer
    layer.observe_op(capture)


def release(layer: BlockSparseModule) -> None:
    """Stop capturing and drop what was captured."""
    capture = layer._op_observer
    if isinstance(capture, GradientCapture):
        capture.armed = False  # a graph built before now and backpropagated later adds nothing
        capture.saved = capture.dense = None
    layer.observe_op(None)


def _capture(layer: BlockSparseModule) -> GradientCapture:
    capture = layer._op_observer
    if not isinstance(capture, GradientCapture) or not capture.calls:
        raise RuntimeError(
            "no gradient was captured: call arm_gradient_capture() before the forward and "
            "backward whose gradient should drive growth"
        )
    return capture


def captured(layer: BlockSparseModule) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(op_input, grad_output)`` of the one op call captured since :func:`arm` (see
    :func:`captured_calls`; with several calls their dense gradient is summed instead)."""
    capture = _capture(layer)
    if capture.saved is None:
        raise RuntimeError(f"{capture.calls} op calls were captured; their gradients are summed densely "
                           "(use dense_grad_block_norms)")
    return capture.saved["input"], capture.saved["grad"]


def captured_calls(layer: BlockSparseModule) -> int:
    """How many op calls (micro-batches) the gradient captured since :func:`arm` sums (0: none yet)."""
    capture = layer._op_observer
    return capture.calls if isinstance(capture, GradientCapture) else 0


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
    """Block L2 norms ``[R, C]`` of the dense weight gradient captured since :func:`arm`, summed over
    every op call whose backward ran (RigL's growth score)."""
    capture = _capture(layer)
    if capture.dense is not None:
        dense = capture.dense
        if distributed.active():
            dense = distributed.all_reduce_mean_(dense.clone())
        return block_norms(to_gemm_blocks(dense, layer.block_size))
    op_input, grad = capture.saved["input"], capture.saved["grad"]
    # Scored in at least fp32: under autocast the input may be fp32 and the gradient bf16/fp16, and
    # fp16 block norms of loss-scaled gradients overflow where no single element does.
    dtype = torch.promote_types(torch.promote_types(op_input.dtype, grad.dtype), torch.float32)
    op_input, grad = op_input.to(dtype), grad.to(dtype)
    if distributed.active():  # score the global batch: average the dense gradient over ranks first
        dense = distributed.all_reduce_mean_(dense_weight_grad(layer, op_input, grad))
        return block_norms(to_gemm_blocks(dense, layer.block_size))
    return ops.dense_grad_block_norms(op_input, grad, layer.layout, **layer.op_geometry())


def magnitude_block_norms(layer: BlockSparseModule) -> torch.Tensor:
    """L2 norm of every stored block, by slot ``[nnzb]`` (what pruning ranks), in float32."""
    return block_norms(layer.values.detach()).float()
