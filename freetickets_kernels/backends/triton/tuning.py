"""Tile configurations the Triton kernels are autotuned over, and numeric precision.

Each kernel is tuned per key (kernels.TUNE_KEY: pixels bucketed to a power of
two, channels, kernel size, stride, memory format, block, dtype); Triton keeps
the winner in memory and, with ``cache_results``, on disk under
``TRITON_CACHE_DIR`` so later processes skip the search.  Under
``TRITON_INTERPRET=1`` (CPU correctness runs) one small config is used: the
interpreter's speed says nothing about a GPU's.  ``FREETICKETS_TRITON_AUTOTUNE=0``
uses each kernel's first config without a search (a correctness run on a GPU:
one compilation per kernel instead of one per config).
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
import triton

from .. import triton_interpreted as interpreted


_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)
AUTOTUNE_ENV = "FREETICKETS_TRITON_AUTOTUNE"


def autotuning() -> bool:
    """Whether the kernels search their configs (``FREETICKETS_TRITON_AUTOTUNE``, default on)."""
    value = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1, got {value!r}")
    return value in ("1", "true", "on", "yes")


def _configs(shapes: List[tuple]) -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in shapes]


def forward_configs() -> List[triton.Config]:
    # BLOCK_M pixels x PBO channels per program; the K loop runs over a row's live blocks
    return _configs([(64, 4, 3), (128, 4, 3), (128, 8, 3), (128, 4, 4), (256, 8, 3), (64, 4, 4)])


def grad_input_configs() -> List[triton.Config]:
    return _configs([(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3)])


def grad_blocks_configs() -> List[triton.Config]:
    # BLOCK_M is the reduction step over pixels here
    return _configs([(32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3)])


def prune(configs: List[triton.Config], named_args: Dict, **kwargs) -> List[triton.Config]:
    """Drop tiles too big for the block (registers); one config in the interpreter, and the first
    kept one with autotuning off."""
    if interpreted():
        return [_INTERPRETER_CONFIG]
    pbo, pbi = named_args.get("PBO", kwargs.get("PBO")), named_args.get("PBI", kwargs.get("PBI"))
    big = pbo is not None and pbi is not None and pbo * pbi >= 128 * 128
    kept = [c for c in configs if not (big and c.kwargs["BLOCK_M"] > 128)] or configs[:1]
    return kept if autotuning() else kept[:1]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 follows ``torch.backends.cuda.matmul.allow_tf32``
    (off by default, as in torch, so fp32 results match cuBLAS's fp32); fp16/bf16
    always multiply on tensor cores with fp32 accumulation."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def padded(block: int) -> int:
    """Block extent padded to a power of two of at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(block))
