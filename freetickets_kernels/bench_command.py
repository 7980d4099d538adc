"""``freetickets bench kernels|models|all``: the benchmark suites, from the command line."""

from __future__ import annotations

import argparse

from .bench import kernels, models

EPILOG = """\
examples:
  freetickets bench kernels --quick             # a few kernel rows: checks the suite runs
  freetickets bench models --models resnet18 --densities 0.1 0.05 --block-sizes 32
  freetickets bench all --out bench-results     # both suites, full size (long on a CPU)

Every speedup is a ratio of medians measured in the same run, same shapes,
dtype and threads.  Results: JSON + Markdown (+ PNG for models) in --out."""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark suites: kernels, models, or all",
                       description="Measure block-sparse kernels and whole sparse models against dense PyTorch.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    suites = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    k = suites.add_parser("kernels", help="linear and conv2d ops vs dense torch and torch.sparse BSR",
                          description=kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_arguments(k, "bench-results")
    k.set_defaults(func=lambda args: kernels.run(args))
    m = suites.add_parser("models", help="ResNet-18/50, WRN-28-10: dense vs sparse vs sparse ensemble",
                          description=models.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_arguments(m, "bench-results")
    m.set_defaults(func=lambda args: models.run(args))
    a = suites.add_parser("all", help="both suites with their defaults (or --quick)")
    a.add_argument("--quick", action="store_true", help="the small configuration of each suite")
    a.add_argument("--out", default="bench-results", help="directory for the result files (default %(default)s)")
    a.set_defaults(func=run_all)


def _defaults(add_arguments, argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, "bench-results")
    return parser.parse_args(argv)


def run_all(args: argparse.Namespace) -> int:
    extra = ["--out", args.out] + (["--quick"] if args.quick else [])
    code = kernels.run(_defaults(kernels.add_arguments, extra))
    return code or models.run(_defaults(models.add_arguments, extra))
