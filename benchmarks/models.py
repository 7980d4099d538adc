"""Model suite (``freetickets bench models``), writing to benchmarks/results/ by default.

    python benchmarks/models.py [--quick] [--help]
"""

import argparse
import os
import sys

from common import ROOT

from freetickets_kernels.bench import models  # noqa: E402  (common puts the checkout on the path)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=models.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_arguments(parser, os.path.join(ROOT, "results"))
    args = parser.parse_args()
    try:
        sys.exit(models.run(args))
    except ValueError as exc:
        parser.error(str(exc))
