"""``freetickets bench kernels|gpu|models|all``: the benchmark suites, from the command line."""

from __future__ import annotations

import argparse

import torch

from .bench import gpu_kernels, kernels, models
from .results import check_out_dir

EPILOG = """\
examples:
  freetickets bench kernels --quick             # a few kernel rows: checks the suite runs
  freetickets bench gpu --dtypes fp16           # Triton/CUDA vs cuBLAS/cuDNN and torch.sparse BSR
  freetickets bench models --models resnet18 --densities 0.1 0.05 --block-sizes 32
  freetickets bench all --out bench-results     # both suites, full size (long on a CPU)

Every speedup is a ratio of medians measured in the same run, same shapes,
dtype and threads.  Results: JSON + Markdown (+ PNG for models) in --out."""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark suites: kernels, gpu, models, or all",
                       description="Measure block-sparse kernels and whole sparse models against dense PyTorch.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    suites = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    k = suites.add_parser("kernels", help="linear and conv2d ops vs dense torch and torch.sparse BSR",
                          description=kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_arguments(k, "bench-results")
    k.set_defaults(func=lambda args: _checked(kernels.run, args))
    g = suites.add_parser("gpu", help="Triton/CUDA ops vs cuBLAS/cuDNN and torch.sparse BSR, on a GPU",
                          description=gpu_kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu_kernels.add_arguments(g, "bench-results")
    g.set_defaults(func=lambda args: _checked(gpu_kernels.run, args))
    m = suites.add_parser("models", help="ResNet-18/50, WRN-28-10: dense vs sparse vs sparse ensemble",
                          description=models.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_arguments(m, "bench-results")
    m.set_defaults(func=lambda args: _checked(models.run, args))
    a = suites.add_parser("all", help="every suite this machine can run (gpu only with a GPU), defaults or --quick")
    a.add_argument("--quick", action="store_true", help="the small configuration of each suite")
    a.add_argument("--out", default="bench-results", help="directory for the result files (default %(default)s)")
    a.set_defaults(func=run_all)


def _checked(run, args: argparse.Namespace) -> int:
    check_out_dir(args.out)  # before a suite runs, not after it
    return run(args)


def _defaults(add_arguments, argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, "bench-results")
    return parser.parse_args(argv)


def run_all(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    extra = ["--out", args.out] + (["--quick"] if args.quick else [])
    suites = [kernels, models] + ([gpu_kernels] if torch.cuda.is_available() else [])
    for suite in suites:
        code = suite.run(_defaults(suite.add_arguments, extra))
        if code:
            return code
    return 0
