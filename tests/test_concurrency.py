"""Ops called from several Python threads at once give the single-threaded results."""

import threading

import pytest
import torch

import freetickets_kernels as ftk

from conftest import random_layout, random_values, run_op

BACKENDS = [b for b in ("reference", "cpu") if b in ftk.available_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_are_thread_safe(backend):
    torch.manual_seed(0)
    jobs = []
    for i in range(6):  # different shapes per thread: scratch buffers must not be shared
        lin = random_layout((40 + 8 * i, 30 + 4 * i), (8, 8), 0.5, seed=i)
        conv = random_layout((16 + 4 * i, 8 + 2 * i, 3, 3), (4, 4), 0.5, seed=i)
        jobs.append([
            (lambda x, v, lay=lin: ftk.block_sparse_linear(x, v, lay),
             [torch.randn(20 + i, lin.in_features), random_values(lin, torch.float32, seed=i)]),
            (lambda x, v, lay=conv: ftk.block_sparse_conv2d(x, v, lay, None, 1, 1),
             [torch.randn(2, conv.in_features, 9 + i, 8), random_values(conv, torch.float32, seed=i)]),
        ])
    expected = [[run_op(backend, fn, inputs) for fn, inputs in job] for job in jobs]
    results, errors = [None] * len(jobs), []

    def worker(k):
        try:
            with ftk.use_backend(backend):  # per-thread setting
                results[k] = [[run_op(backend, fn, inputs) for fn, inputs in jobs[k]] for _ in range(5)]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for k, runs in enumerate(results):
        for run in runs:
            for got_op, want_op in zip(run, expected[k]):
                for g, w in zip(got_op, want_op):
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
