"""What a bfloat16 CPU path could save at most: the time of the bytes it would halve.

CPUs without bf16 arithmetic (AVX2, AVX-512F) would widen bf16 to float32
and multiply in float32, as our float32 kernels do; all a bf16 path could
gain is moving half the bytes of the op's operands (input, live values,
result).  For the kernel suite's shapes (block 32, density 0.1, forward),
this times, as medians in the same run: our float32 op, one copy of each
operand in float32 and in bfloat16 (their warm, cache-resident state, as
the op meets them), and the widening of the bf16 input a boundary cast would
add.  `bound` = (float32 copies - bf16 copies) / float32 op.

    python benchmarks/cpu_bf16_headroom.py           # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import ROOT, median_seconds, progress, report

import freetickets_kernels as ftk  # noqa: E402
from freetickets_kernels.app.bench import kernels  # noqa: E402
from freetickets_kernels.layout import BlockSparseLayout  # noqa: E402


def _copy_ms(tensors, dtype, repeats) -> float:
    pairs = [(t.to(dtype), torch.empty_like(t, dtype=dtype)) for t in tensors]

    def copy():
        for src, dst in pairs:
            dst.copy_(src)

    return median_seconds(copy, repeats) * 1e3


def _row(name, op, tensors, widen_src, repeats):
    ours = median_seconds(op, repeats) * 1e3
    f32, bf16 = _copy_ms(tensors, torch.float32, repeats), _copy_ms(tensors, torch.bfloat16, repeats)
    src16, dst32 = widen_src.to(torch.bfloat16), torch.empty_like(widen_src)
    widen = median_seconds(lambda: dst32.copy_(src16), repeats) * 1e3
    mb = sum(t.numel() for t in tensors) * 4 / 2**20
    return dict(shape=name, operands_mb=mb, ours_fp32_ms=ours, copy_fp32_ms=f32, copy_bf16_ms=bf16,
                widen_input_ms=widen, bound=(f32 - bf16) / ours)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per median (default 11)")
    parser.add_argument("--out", default=f"{ROOT}/results", help="where to write cpu_bf16_headroom.{json,md}")
    args = parser.parse_args(argv)
    if args.repeats <= 0:
        parser.error("--repeats must be positive")
    block, density = 32, 0.1
    jobs = [("linear", s) for s in kernels.LINEAR_SHAPES] + [("conv", s) for s in kernels.CONV_SHAPES]
    rows = []
    for kind, spec in progress(jobs, "bf16 headroom"):
        torch.manual_seed(0)
        if kind == "linear":
            tokens, inn, out = spec
            values, layout = BlockSparseLayout.from_dense(torch.randn(out, inn), block, density=density)
            x = torch.randn(tokens, inn)
            op = lambda: ftk.block_sparse_linear(x, values, layout, None)  # noqa: E731
            name = f"linear {tokens} x {inn} -> {out}"
        else:
            name, batch, cin, cout, k, hw, stride, padding = spec
            values, layout = BlockSparseLayout.from_dense(torch.randn(cout, cin, k, k), block, density=density)
            x = torch.randn(batch, cin, hw, hw)
            op = lambda: ftk.block_sparse_conv2d(x, values, layout, None, stride, padding)  # noqa: E731
            name = f"conv {name}, NCHW"
        with torch.no_grad():
            y = op()
            rows.append(_row(name, op, [x, values, y], x, args.repeats))
    columns = ["shape", "operands_mb", "ours_fp32_ms", "copy_fp32_ms", "copy_bf16_ms", "widen_input_ms", "bound"]
    notes = (f"float32 op: forward, block {block}, density {density}, {torch.get_num_threads()} threads, median of "
             f"{args.repeats}.  copy_*: one copy of the op's input, live values and result in that dtype; "
             "widen_input: the input cast from bf16 to float32; bound = (copy_fp32 - copy_bf16) / ours_fp32, "
             "the most a bf16 path without bf16 arithmetic could save.")
    return report("cpu_bf16_headroom", rows, columns, args.out, notes)


if __name__ == "__main__":
    sys.exit(main())
