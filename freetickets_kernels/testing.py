"""Checking one backend against another: what the tests and benchmarks/gpu_correctness.py (run on a
GPU machine that may have no pytest) share."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from .backends import use_backend


def upstream_grad(shape, seed: int = 7) -> torch.Tensor:
    """The float64 gradient every check feeds a backward with: seeded, so two backends get the same one."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_op(backend: str, fn: Callable, inputs: Sequence[Optional[torch.Tensor]],
           grad_seed: int = 7) -> List[Optional[torch.Tensor]]:
    """Forward and backward of ``fn(*inputs)`` on ``backend``; returns (out, grads...)."""
    leaves = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) if t is not None else None
              for t in inputs]
    with use_backend(backend):
        out = fn(*leaves)
        out.backward(upstream_grad(out.shape, grad_seed).to(out.device, out.dtype))
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
    """``assert_close`` with ``atol`` scaled by max(1, max|ref|): half-type outputs are
    rounded sums whose error grows with their magnitude."""
    if ref.numel() == 0:
        assert got.numel() == 0
        return
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.cpu().double(), ref, rtol=rtol, atol=atol * scale)
