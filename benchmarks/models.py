"""The models suite (`freetickets bench models`), writing to benchmarks/results/ by default.

    python benchmarks/models.py [--quick] [--help]
"""

from common import run_suite

from freetickets_kernels.app.bench import models  # noqa: E402  (common puts the checkout on the path)

if __name__ == "__main__":
    run_suite(models)
