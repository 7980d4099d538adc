"""Cost of one DST update (prune + regrow in every layer) against one training step.

Sparsifies torchvision's ResNet-50 (ERK), trains with SGD, and times, as
medians in the same run: a training step (forward, backward, optimizer step)
and a mask update of all layers (RigL: dense-gradient block norms + prune +
grow + optimizer-state reset; SET: random growth).  Issue target: < 1 step.

    python benchmarks/dst_update.py                  # batch 8 at 224x224, density 0.1, block 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common import ROOT, progress, report

import freetickets_kernels as ftk  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=f"{ROOT}/results")
    args = parser.parse_args(argv)
    if not 0 < args.density <= 1:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    if min(args.batch, args.image_size, args.block_size, args.repeats) <= 0:
        parser.error("--batch, --image-size, --block-size and --repeats must be positive")
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=100)
    ftk.sparsify(model, args.density, args.block_size, exclude=["conv1"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 100, (args.batch,))
    rows = []
    for growth in progress(["gradient", "random"], "dst update"):
        dst = ftk.DynamicSparseTraining(model, opt, update_interval=10**9, growth=growth,
                                        prune_rate=0.3, prune_rate_schedule="constant")
        steps, updates = [], []
        for _ in range(args.repeats + 1):  # the first of each is a warm-up
            if growth == "gradient":
                dst.arm_gradient_capture()
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            dst.update()
            updates.append(time.perf_counter() - start)
        step, update = statistics.median(steps[1:]), statistics.median(updates[1:])
        rows.append(dict(model="resnet50", growth=growth, batch=args.batch, image=args.image_size,
                         density=args.density, block=args.block_size, step_ms=step * 1e3,
                         update_ms=update * 1e3, update_over_step=update / step))
    columns = ["model", "growth", "batch", "image", "density", "block", "step_ms", "update_ms", "update_over_step"]
    notes = (f"float32, {torch.get_num_threads()} threads, median of {args.repeats}; a step is forward + backward "
             "+ SGD; an update prunes 30% of every sparse layer's blocks and regrows as many "
             "(gradient: RigL, from the captured batch; random: SET).")
    return report("dst_update", rows, columns, args.out, notes)


if __name__ == "__main__":
    sys.exit(main())
