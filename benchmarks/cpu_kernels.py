"""The kernels suite (`freetickets bench kernels`), writing to benchmarks/results/ by default.

    python benchmarks/cpu_kernels.py [--quick] [--help]
"""

from common import run_suite

from freetickets_kernels.app.bench import kernels  # noqa: E402  (common puts the checkout on the path)

if __name__ == "__main__":
    run_suite(kernels)
