"""Forward and backward never build a dense weight: peak memory of a big sparse layer vs its dense twin.

Each measurement runs in a fresh process, whose peak resident set size
(VmHWM) is compared against the same process, warmed up, before the layer
is built; construction counts too (the values are initialized in place).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import freetickets_kernels as ftk

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import freetickets_kernels as ftk

    def peak_kib():  # this process's own high-water mark (ru_maxrss is inherited across exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    kind, backend = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    with ftk.use_backend(backend):  # one-time start-up (imports, thread pools) is not the layer's
        small = ftk.SparseLinear(64, 64, density=0.5, block_size=32)
        small(torch.randn(16, 64, requires_grad=True)).sum().backward()
        torch.nn.Linear(64, 64)(torch.randn(16, 64)).sum().backward()
    x = torch.randn(16, 6144, requires_grad=True)
    base = peak_kib()
    if kind == "dense":
        layer = torch.nn.Linear(6144, 6144, bias=False)
    else:
        layer = ftk.SparseLinear(6144, 6144, bias=False, density=0.05, block_size=32)
    with ftk.use_backend(backend):
        for _ in range(2):
            layer(x).sum().backward()
    peak = peak_kib()
    print(json.dumps({"growth_kib": peak - base}))
""")


def _growth_kib(kind, backend):
    out = subprocess.run([sys.executable, "-c", SCRIPT, kind, backend], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_kib"]


@pytest.mark.skipif("cpu" not in ftk.available_backends(), reason="C++ CPU extension not built")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for VmHWM")
def test_sparse_layer_never_allocates_a_dense_weight():
    dense_weight_kib = 6144 * 6144 * 4 // 1024  # 144 MiB
    dense = _growth_kib("dense", "cpu")
    sparse = _growth_kib("sparse", "cpu")
    # the dense layer holds its weight and its gradient; the sparse one ~5% of each
    assert dense > 1.5 * dense_weight_kib
    assert sparse < 0.5 * dense_weight_kib, (sparse, dense)
