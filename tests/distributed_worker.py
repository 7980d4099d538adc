"""One rank of the distributed DST tests (run by tests/test_distributed.py, not by pytest).

usage: python distributed_worker.py SCENARIO OUT_FILE [GROWTH]
with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment (WORLD_SIZE=1: no process group).
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import freetickets_kernels as ftk
from freetickets_kernels import distributed

GLOBAL_BATCH, STEPS = 16, 12


def model():
    torch.manual_seed(0)  # no BatchNorm: a sharded batch must give the same gradient as the whole one
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def dst(scenario_out, growth):
    rank, world = distributed.rank(), distributed.world_size()
    net = model()
    ftk.sparsify(net, 0.3, block_size=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    engine = ftk.DynamicSparseTraining(net, opt, update_interval=3, prune_rate=0.5, growth=growth,
                                       total_steps=STEPS, seed=1)
    trained = distributed.wrap(net)
    data = torch.Generator().manual_seed(42)
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=data)
        y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=data)
        xs, ys = x[rank::world], y[rank::world]          # this rank's shard of the global batch
        loss = F.cross_entropy(trained(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        engine.step()
    # EDST's global exploration, driven by one more (sharded) batch
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=data)
    y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=data)
    engine.arm_gradient_capture()
    F.cross_entropy(trained(x[rank::world]), y[rank::world]).backward()
    engine.explore(0.8)
    updates = [e for e in engine.log if e["kind"] == "update"]
    torch.save({"state": net.state_dict(), "updates": len(updates),
                "changed": sum(sum(v["changed"] for v in e["layers"].values()) for e in engine.log)}, scenario_out)


def hang(scenario_out, _):
    if distributed.rank() == 1:
        raise SystemExit(3)  # this rank dies before the collective
    try:
        dist.all_reduce(torch.ones(1))
        dist.all_reduce(torch.ones(1))
    except Exception as exc:  # the timeout, not a hang
        torch.save({"error": type(exc).__name__ + ": " + str(exc)[:200]}, scenario_out)
        raise SystemExit(4) from None


if __name__ == "__main__":
    scenario, out = sys.argv[1], sys.argv[2]
    growth = sys.argv[3] if len(sys.argv) > 3 else "gradient"
    distributed.init_from_env("cpu", timeout_s=float(os.environ.get("FT_TIMEOUT", "60")))
    {"dst": dst, "hang": hang}[scenario](out.replace("RANK", str(distributed.rank())), growth)
    print(f"rank {distributed.rank()}: {scenario} done, result saved", flush=True)  # tells a teardown crash apart
    if dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's threads racing the static destructors at exit can abort a
    # rank whose work is done and saved (seen once in CI as SIGABRT, "terminate called without an
    # active exception"); the test checks the exit codes and the saved results, not the teardown.
    os._exit(0)
