"""CPU kernel suite: block-sparse linear and conv2d vs dense torch and torch.sparse BSR.

Each row: median time of our op and of the dense torch op (F.linear / F.conv2d
on the densified weight, same threads), each timed right after the other (or,
with --interleaved, called in turn in every round), the speedup,
the ideal 1/density, and for linear rows the speedup of torch.sparse BSR.
"fwd" times the forward; "fwd+bwd" a training step of the op (forward, then
backward to the input and the weights from a fixed random upstream gradient).

    freetickets bench kernels                        # the full suite (8-20 min on 2 cores)
    freetickets bench kernels --quick                # a few rows, to check it runs
    python benchmarks/cpu_kernels.py                 # the same, writing to benchmarks/results/
"""

from __future__ import annotations

import argparse
import itertools
import warnings

import torch
import torch.nn.functional as F

import freetickets_kernels as ftk

from ...layout import BlockSparseLayout
from ..progress import Progress
from ..results import markdown_table, write_results
from ..timing import interleaved_median_seconds, median_seconds
from .gpu_kernels import DTYPES

DENSITIES = [0.5, 0.3, 0.2, 0.1, 0.05]
# (tokens, in, out)
LINEAR_SHAPES = [(32, 4096, 4096), (256, 1024, 1024), (256, 4096, 4096), (4096, 1024, 1024)]
# (name, batch, cin, cout, kernel, hw, stride, padding)
CONV_SHAPES = [
    ("wrn 160->160 3x3 @32", 32, 160, 160, 3, 32, 1, 1),
    ("wrn 320->320 3x3 @16", 32, 320, 320, 3, 16, 1, 1),
    ("wrn 640->640 3x3 @8", 32, 640, 640, 3, 8, 1, 1),
    ("resnet 64->64 3x3 @32", 32, 64, 64, 3, 32, 1, 1),
    ("resnet50 256->256 3x3 @14", 32, 256, 256, 3, 14, 1, 1),
    ("resnet50 256->1024 1x1 @14", 32, 256, 1024, 1, 14, 1, 0),
    ("resnet50 1024->256 1x1 @14", 32, 1024, 256, 1, 14, 1, 0),
]
QUICK_LINEAR = [(32, 1024, 1024)]
QUICK_CONV = [("resnet 64->64 3x3 @16", 8, 64, 64, 3, 16, 1, 1)]


def _train_step(fn, *leaves):
    """Forward + backward to every leaf, as one training step of the op does.

    The backward starts from a fixed random gradient of the output's shape and
    memory format, as a layer inside a network receives one: not from
    ``y.sum()``, whose expanded gradient each op would first materialize (a
    cost of the harness, not of the op).
    """
    upstream = []

    def step():
        for t in leaves:
            t.grad = None
        y = fn()
        if not upstream:  # the first (untimed warm-up) call
            upstream.append(torch.randn_like(y))
        y.backward(upstream[0])

    return step


def _medians(fns, repeats, interleaved):
    """Median seconds of each function: timed one after the other, each warm in
    the caches from its own previous calls; or called in turn in each round, so
    each finds the caches as the other left them (as a layer between layers does)."""
    if interleaved:
        return interleaved_median_seconds(fns, repeats)
    return [median_seconds(fn, repeats) for fn in fns]


def _our_fp32(op, x, values, p):
    """Our op on fp32 copies of the operands (forward, or a training step): what a bf16/fp16 row is
    compared with in the same rounds (``vs_our_fp32``)."""
    xf, vf = x.float().requires_grad_(p != "fwd"), values.float().requires_grad_(p != "fwd")
    return (lambda: op(xf, vf)) if p == "fwd" else _train_step(lambda: op(xf, vf), xf, vf)


def bench_linear(tokens, inn, out, block, density, passes, repeats, interleaved=False, dtype="fp32", vs_fp32=False):
    w = torch.randn(out, inn)
    values, layout = BlockSparseLayout.from_dense(w, block, density=density)
    values = values.to(DTYPES[dtype])
    wd = layout.unpack(values)
    x = torch.randn(tokens, inn, dtype=DTYPES[dtype])
    vs_fp32 = vs_fp32 and dtype != "fp32"
    rows = []
    for p in passes:
        if p == "fwd":
            fns = [lambda: ftk.block_sparse_linear(x, values, layout), lambda: F.linear(x, wd)]
            if dtype == "fp32":  # torch.sparse BSR F.linear: float32 only on CPU
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.sparse BSR is "beta"
                    w_bsr = wd.to_sparse_bsr((block, block))
                fns.append(lambda: F.linear(x, w_bsr))
        else:
            xg, vg, wg = x.clone().requires_grad_(), values.clone().requires_grad_(), wd.clone().requires_grad_()
            fns = [_train_step(lambda: ftk.block_sparse_linear(xg, vg, layout), xg, vg),
                   _train_step(lambda: F.linear(xg, wg), xg, wg)]
        if vs_fp32:
            fns.append(_our_fp32(lambda a, v: ftk.block_sparse_linear(a, v, layout), x, values, p))
        ours, dense, *more = _medians(fns, repeats, interleaved)
        ours_fp32 = more.pop() if vs_fp32 else None
        bsr = more[0] if more else None
        rows.append(dict(op="linear", shape=f"{tokens}x{inn}->{out}", dtype=dtype, block=block, density=density,
                         layout_density=round(layout.density, 4), **{"pass": p},
                         ours_ms=ours * 1e3, dense_ms=dense * 1e3, speedup=dense / ours,
                         ideal=1 / density, vs_our_fp32=ours_fp32 / ours if ours_fp32 else None,
                         bsr_speedup=(dense / bsr) if bsr else None))
    return rows


def bench_conv(spec, block, density, passes, repeats, memory_format, interleaved=False, dtype="fp32",
               vs_fp32=False):
    name, batch, cin, cout, k, hw, stride, padding = spec
    w = torch.randn(cout, cin, k, k)
    values, layout = BlockSparseLayout.from_dense(w, block, density=density)
    values = values.to(DTYPES[dtype])
    wd = layout.unpack(values)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, cin, hw, hw, dtype=DTYPES[dtype]).contiguous(memory_format=fmt)
    vs_fp32 = vs_fp32 and dtype != "fp32"
    rows = []
    for p in passes:
        if p == "fwd":
            fns = [lambda: ftk.block_sparse_conv2d(x, values, layout, None, stride, padding),
                   lambda: F.conv2d(x, wd, None, stride, padding)]
        else:
            xg, vg, wg = x.clone().requires_grad_(), values.clone().requires_grad_(), wd.clone().requires_grad_()
            fns = [_train_step(lambda: ftk.block_sparse_conv2d(xg, vg, layout, None, stride, padding), xg, vg),
                   _train_step(lambda: F.conv2d(xg, wg, None, stride, padding), xg, wg)]
        if vs_fp32:
            fns.append(_our_fp32(lambda a, v: ftk.block_sparse_conv2d(a, v, layout, None, stride, padding), x, values,
                                 p))
        ours, dense, *more = _medians(fns, repeats, interleaved)
        rows.append(dict(op="conv2d", shape=f"{name} b{batch} {memory_format}", dtype=dtype, block=block,
                         density=density,
                         layout_density=round(layout.density, 4), **{"pass": p},
                         ours_ms=ours * 1e3, dense_ms=dense * 1e3, speedup=dense / ours,
                         ideal=1 / density, vs_our_fp32=more[0] / ours if more else None, bsr_speedup=None))
    return rows


def add_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads for ours and dense alike (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement; the median is kept")
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    parser.add_argument("--ops", nargs="+", choices=["linear", "conv2d"], default=["linear", "conv2d"])
    parser.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--formats", nargs="+", choices=["nchw", "channels_last"], default=["nchw", "channels_last"],
                        help="conv input memory format; dense F.conv2d gets the same input")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32"],
                        help="precisions to time, each against the dense op in the same precision (default fp32; "
                             "bf16 runs our bf16 kernels where block sides are multiples of 16, fp16 and other bf16 "
                             "our widened-to-fp32 path; dense runs oneDNN in that precision). With fp32 among them, "
                             "each low-precision row also times our fp32 op beside ours (vs_our_fp32)")
    parser.add_argument("--blocks", type=int, nargs="+", default=None,
                        help="block sides to time (default: 16 32 64 for linear, 16 32 for conv2d)")
    parser.add_argument("--interleaved", action="store_true",
                        help="call ours and dense in turn in every timed round: each op then finds the caches as the "
                             "other left them, as a layer inside a network does (default: each op timed on its own, "
                             "warm from its previous calls)")
    parser.add_argument("--quick", action="store_true", help="one small shape per op: checks the suite runs")
    parser.add_argument("--out", default=out_default, help="directory for JSON + Markdown (default %(default)s)")
    parser.add_argument("--name", default=None, help="result file name (default: cpu_kernels[_quick])")


def check_arguments(args: argparse.Namespace) -> None:
    for d in args.densities:
        if not 0 < d <= 1:
            raise ValueError(f"density must be in (0, 1], got {d}")
    if args.threads <= 0 or args.repeats <= 0:
        raise ValueError("--threads and --repeats must be positive")
    if args.blocks and min(args.blocks) <= 0:
        raise ValueError(f"--blocks must be positive, got {args.blocks}")
    if "cpu" not in ftk.available_backends():
        raise ValueError("the C++ CPU backend is not built: pip install --no-build-isolation -e .")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    jobs = []
    if "linear" in args.ops:
        blocks = args.blocks or (16, 32, 64)
        for shape, block in itertools.product(QUICK_LINEAR if args.quick else LINEAR_SHAPES, blocks):
            jobs += [("linear", shape, block, d, t) for d in args.densities for t in args.dtypes]
    if "conv2d" in args.ops:
        blocks = args.blocks or (16, 32)
        for spec, fmt, block in itertools.product(QUICK_CONV if args.quick else CONV_SHAPES, args.formats, blocks):
            jobs += [("conv2d", (spec, fmt), block, d, t) for d in args.densities for t in args.dtypes]
    def bench(job, repeats):
        op, shape, block, density, dtype = job
        vs_fp32 = "fp32" in args.dtypes  # each low-precision row also times our fp32 op beside it
        if op == "linear":
            return bench_linear(*shape, block, density, args.passes, repeats, args.interleaved, dtype, vs_fp32)
        spec, fmt = shape
        return bench_conv(spec, block, density, args.passes, repeats, fmt, args.interleaved, dtype, vs_fp32)

    rows = []
    with ftk.use_backend("cpu"):
        # The first training steps of a process are slower (both sides: the
        # heap's mmap threshold rises as large blocks are freed): one untimed
        # pass over the first job of each op, so the first rows are not charged.
        for op in args.ops:
            first = next((job for job in jobs if job[0] == op), None)
            if first is not None:
                bench(first, 3)
        for job in Progress(jobs, "cpu kernels"):
            rows += bench(job, args.repeats)
    columns = ["op", "shape", "dtype", "pass", "block", "density", "ours_ms", "dense_ms", "speedup", "ideal",
               "vs_our_fp32", "bsr_speedup"]
    from freetickets_kernels.backends import cpu

    order = ("ours and dense (and BSR) called in turn in each round, each finding the caches as the other left "
             "them" if args.interleaved else "dense timed right after ours, each warm from its own calls")
    notes = (f"{', '.join(args.dtypes)} (dense in the same dtype), {args.threads} threads, median of {args.repeats}, {order}; dense = F.linear/F.conv2d on the "
             f"densified weight; fwd+bwd = forward + backward from a fixed random upstream gradient; "
             f"vs_our_fp32 = our op on fp32 copies of this row's operands, timed beside it, over ours; "
             f"bsr_speedup = torch.sparse BSR F.linear vs dense. cpu backend: {cpu.build_info()}")
    name = args.name or ("cpu_kernels_quick" if args.quick else "cpu_kernels")
    paths = write_results(name, rows, columns, args.out, notes)
    print(markdown_table(rows, columns))
    print(f"\nwrote {paths['json']} and {paths['md']}")
    return 0
