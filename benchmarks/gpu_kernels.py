"""The GPU kernel suite (`freetickets bench gpu`), writing to benchmarks/results/ by default.

    python benchmarks/gpu_kernels.py [--quick] [--help]
"""

from common import run_suite

from freetickets_kernels.app.bench import gpu_kernels  # noqa: E402  (common puts the checkout on the path)

if __name__ == "__main__":
    run_suite(gpu_kernels)
