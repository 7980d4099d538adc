"""Every GPU kernel path against the float64 reference, without pytest: gpu_check.sh's correctness stage.

    python benchmarks/gpu_correctness.py --backends triton cuda        # on a GPU
    python benchmarks/gpu_correctness.py --small --backends cuda       # the sanitizer's short list
    TRITON_INTERPRET=1 python benchmarks/gpu_correctness.py --small --backends triton   # CPU rehearsal

Each case runs forward and backward (input, values, bias) and the dense
gradient's block norms (RigL) on a backend in fp32, fp16 and bf16, and
compares them with the reference backend in float64 on the CPU.  The cases
name the paths a GPU test must reach: ragged blocks, blocks wider than one
64x64 tile (the CUDA norms spread over several thread blocks), grad-blocks
split over pixel ranges (few blocks, many pixels), empty layouts, a
column-major linear input, stride / dilation / padding, NHWC and NCHW, 1x1 and
3x3.  One line per case and dtype; the exit status is 1 if any is wrong or
raises.  Standalone (the GPU machine may have no pytest): it needs only torch
and this checkout.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NamedTuple, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

import freetickets_kernels as ftk  # noqa: E402
from freetickets_kernels.backends.implicit_gemm import split_count  # noqa: E402
from freetickets_kernels.layout import BlockSparseLayout  # noqa: E402
from freetickets_kernels.testing import assert_close_scaled, run_op, upstream_grad  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# rtol, and atol per unit of max|ref|: half types round every stored output (tests/test_gpu.py's)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


class Case(NamedTuple):
    name: str
    weight_shape: Tuple[int, ...]   # [out, in] or [cout, cin, kh, kw]
    block: Tuple[int, int]
    density: float
    input_shape: Tuple[int, ...]    # [tokens, in] or [n, cin, h, w]
    conv: Tuple = ()                # stride, padding, dilation
    layout_of_input: str = "contiguous"  # contiguous | channels_last | column_major
    small: bool = False             # in the --small list (compute-sanitizer's)


CASES = [
    Case("linear ragged 5x24 blocks", (50, 70), (5, 24), 0.5, (7, 70), small=True),
    Case("linear blocks wider than a tile (96x80)", (300, 520), (96, 80), 0.3, (333, 520)),
    Case("linear 128x128 blocks", (256, 256), (128, 128), 0.5, (64, 256), small=True),
    Case("linear grad-blocks split over pixels", (32, 32), (32, 32), 1.0, (8192, 32)),
    Case("linear empty layout", (40, 40), (16, 16), 0.0, (5, 40), small=True),
    # the CUDA tiles sized to 16-wide blocks: 256x16 (forward, grad input), 16x16 split 4 ways (grad blocks)
    Case("linear 16x16 blocks", (96, 80), (16, 16), 0.5, (300, 80)),
    Case("linear column-major input", (64, 96), (32, 32), 0.4, (33, 96), layout_of_input="column_major"),
    Case("conv 3x3 stride 2 NHWC", (96, 72, 3, 3), (32, 16), 0.3, (4, 72, 21, 19), (2, 1, 1), "channels_last",
         small=True),
    Case("conv 3x3 dilation 2 NCHW", (96, 72, 3, 3), (32, 16), 0.3, (4, 72, 21, 19), (1, 2, 2)),
    Case("conv 3x2 ragged, asymmetric", (17, 5, 3, 2), (4, 3), 0.6, (2, 5, 8, 9), ((2, 1), (0, 2), (2, 1))),
    Case("conv 3x3 16x32 blocks NHWC", (64, 64, 3, 3), (16, 32), 0.4, (2, 64, 10, 10), (1, 1, 1), "channels_last"),
    Case("conv 1x1 NHWC", (256, 64, 1, 1), (64, 64), 0.5, (8, 64, 14, 14), (1, 0, 1), "channels_last", small=True),
    Case("conv 1x1 128x128 blocks", (256, 256, 1, 1), (128, 128), 0.5, (2, 256, 7, 7), (1, 0, 1), "channels_last"),
    Case("conv empty layout", (32, 32, 3, 3), (16, 16), 0.0, (2, 32, 6, 6), (1, 1, 1), "channels_last"),
    Case("conv grad-blocks split over pixels", (32, 32, 3, 3), (32, 32), 0.2, (16, 32, 32, 32), (1, 1, 1),
         "channels_last"),
]


def _input(case: Case, gen: torch.Generator) -> torch.Tensor:
    if case.layout_of_input == "column_major":
        return torch.randn(tuple(reversed(case.input_shape)), generator=gen, dtype=torch.float64).t()
    x = torch.randn(case.input_shape, generator=gen, dtype=torch.float64)
    return x.contiguous(memory_format=torch.channels_last) if case.layout_of_input == "channels_last" else x


def _op(case: Case, layout: BlockSparseLayout) -> Callable:
    if len(case.weight_shape) == 2:
        return lambda x, v, b: ftk.block_sparse_linear(x, v, layout.to(x.device), b)
    return lambda x, v, b: ftk.block_sparse_conv2d(x, v, layout.to(x.device), b, *case.conv)


def _norms(case: Case, layout: BlockSparseLayout, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    return ftk.ops.dense_grad_block_norms(x, gy, layout.to(x.device), *case.conv)  # conv: stride, padding, dilation


def _to(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """``t`` on ``device`` in ``dtype`` with its strides (channels_last, column-major) kept."""
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device).copy_(t)


def _compare(got: torch.Tensor, ref: torch.Tensor, tol: float) -> Optional[str]:
    try:
        assert_close_scaled(got.detach(), ref, rtol=tol, atol=tol)
    except AssertionError as exc:
        return " ".join(str(exc).split())[:300] or "an empty result expected"
    return None


def check(case: Case, backend: str, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """None if ``backend`` matches the float64 reference on ``case``, else what is wrong."""
    gen = torch.Generator().manual_seed(0)
    values, layout = BlockSparseLayout.from_dense(torch.randn(case.weight_shape, generator=gen,
                                                              dtype=torch.float64), case.block,
                                                  density=case.density)
    x, bias = _input(case, gen), torch.randn(case.weight_shape[0], generator=gen, dtype=torch.float64)
    fn = _op(case, layout)
    ref = run_op("reference", fn, [x, values, bias])
    got = run_op(backend, fn, [_to(x, device, dtype), _to(values, device, dtype), _to(bias, device, dtype)])
    grad = upstream_grad(ref[0].shape)  # the one run_op fed both backwards
    with ftk.use_backend("reference"):
        ref.append(_norms(case, layout, x, grad))
    with ftk.use_backend(backend):
        got.append(_norms(case, layout, _to(x, device, dtype), _to(grad, device, dtype)))
    for what, g, r in zip(("y", "grad input", "grad values", "grad bias", "block norms"), got, ref):
        if g.device.type != device.type or g.dtype != dtype:
            return f"{what}: on {g.device} in {g.dtype}, expected {device.type} {dtype}"
        problem = _compare(g, r, TOLERANCE[dtype])
        if problem:
            return f"{what}: {problem}"
    return None


def _few_pixels(case: Case) -> Case:
    """``case`` with at most 9 tokens, or one image of at most 9x9 (for Triton's interpreter)."""
    shape = case.input_shape
    if len(shape) == 2:
        return case._replace(input_shape=(min(shape[0], 9), shape[1]))
    return case._replace(input_shape=(1, shape[1], min(shape[2], 9), min(shape[3], 9)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=sorted(DTYPES), choices=sorted(DTYPES))
    parser.add_argument("--small", action="store_true", help="the short list (for compute-sanitizer)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    missing = [b for b in args.backends if b not in ftk.available_backends()]
    if missing:
        print(f"not available here: {missing} (available: {ftk.available_backends()})", flush=True)
        return 1
    cases = [c for c in CASES if c.small or not args.small]
    if device.type == "cpu":  # the interpreter runs every program in Python: the same paths, few pixels
        cases = [_few_pixels(c) for c in cases if "split" not in c.name]
    failed = 0
    for backend in args.backends:
        for case in cases:
            for name in args.dtypes:
                try:
                    problem = check(case, backend, DTYPES[name], device)
                except Exception as exc:  # noqa: BLE001 - reported, and the next case runs
                    problem = " ".join(f"raised {type(exc).__name__}: {exc}".split())[:300]
                failed += problem is not None
                print(f"{'FAIL' if problem else 'ok  '} {backend} {name} {case.name}" +
                      (f": {problem}" if problem else ""), flush=True)
    splits = split_count(1, 8192, device)
    print(f"{failed} failed; grad-blocks split for one block over 8192 pixels on {device}: {splits}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
