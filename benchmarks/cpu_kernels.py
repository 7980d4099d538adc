"""CPU kernel suite (``freetickets bench kernels``), writing to benchmarks/results/ by default.

    python benchmarks/cpu_kernels.py [--quick] [--help]
"""

import argparse
import os
import sys

from common import ROOT

from freetickets_kernels.bench import kernels  # noqa: E402  (common puts the checkout on the path)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_arguments(parser, os.path.join(ROOT, "results"))
    args = parser.parse_args()
    try:
        sys.exit(kernels.run(args))
    except ValueError as exc:
        parser.error(str(exc))
