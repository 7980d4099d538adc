"""GPU kernel suite: Triton (and CUDA, when built) block-sparse ops vs cuBLAS/cuDNN and torch.sparse BSR.

In one invocation, for every row: run each GPU backend and the dense op on the
same inputs, check the backend's output and gradients against the dense
result (the run fails if one is off), then time both with CUDA events
(median of --repeats).  Linear forward rows also time torch.sparse's Triton
``bsr_dense_mm`` on the same weight.  Dense = ``F.linear``/``F.conv2d`` on the
densified weight, same dtype; conv inputs are channels_last (cuDNN's fast
layout, and ours).  "fwd+bwd" times forward + backward to input and weights.

    freetickets bench gpu                       # full suite (fp16 + bf16; a few minutes on an H100)
    freetickets bench gpu --quick               # a few rows: checks the suite and kernels work
    python benchmarks/gpu_kernels.py            # the same, writing to benchmarks/results/

Without a GPU, under TRITON_INTERPRET=1, ``--quick`` runs tiny shapes on the
CPU through Triton's interpreter: it checks the plumbing, its times mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from typing import Dict, List

import torch
import torch.nn.functional as F

import freetickets_kernels as ftk

from ...layout import BlockSparseLayout
from ..progress import Progress
from ..results import markdown_table, write_results
from ..timing import median_seconds

DENSITIES = [0.5, 0.3, 0.2, 0.1, 0.05]
GPU_BACKENDS = ("triton", "cuda")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (tokens, in, out)
LINEAR_SHAPES = [(8192, 8192, 8192), (4096, 4096, 4096), (4096, 1024, 4096)]
# (name, batch, cin, cout, kernel, hw, stride, padding): ResNet-50's 3x3 layers at batch 128
CONV_SHAPES = [
    ("r50 64->64 3x3 @56", 128, 64, 64, 3, 56, 1, 1),
    ("r50 128->128 3x3 @28", 128, 128, 128, 3, 28, 1, 1),
    ("r50 256->256 3x3 @14", 128, 256, 256, 3, 14, 1, 1),
    ("r50 512->512 3x3 @7", 128, 512, 512, 3, 7, 1, 1),
]
QUICK_LINEAR = [(1024, 1024, 1024)]
QUICK_CONV = [("r50 256->256 3x3 @14", 32, 256, 256, 3, 14, 1, 1)]
# tiny shapes for the CPU interpreter (plumbing check only)
INTERPRETER_LINEAR = [(32, 64, 64)]
INTERPRETER_CONV = [("tiny 32->32 3x3 @6", 2, 32, 32, 3, 6, 1, 1)]
# largest |ours - dense| / max|dense| accepted (both sides accumulate in fp32)
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-3}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


class _Case:
    """One op on one shape: our block-sparse call and the dense one, with their leaves."""

    def __init__(self, op: str, spec, block: int, density: float, dtype, device):
        self.op = op
        if op == "linear":
            tokens, inn, out = spec
            weight_shape, x_shape, self.geo = (out, inn), (tokens, inn), ()
        else:
            _, batch, cin, cout, k, hw, stride, padding = spec
            weight_shape, x_shape, self.geo = (cout, cin, k, k), (batch, cin, hw, hw), (stride, padding)
        values, layout = BlockSparseLayout.from_dense(torch.randn(weight_shape), block, density=density)
        self.layout = layout.to(device)
        self.values = values.to(device, dtype)
        self.weight = self.layout.unpack(self.values)
        x = torch.randn(x_shape, device=device, dtype=dtype)
        self.x = x.contiguous(memory_format=torch.channels_last) if op == "conv2d" else x
        self.grad = None

    def ours(self, x, values):
        if self.op == "linear":
            return ftk.block_sparse_linear(x, values, self.layout)
        return ftk.block_sparse_conv2d(x, values, self.layout, None, *self.geo)

    def dense(self, x, weight):
        return F.linear(x, weight) if self.op == "linear" else F.conv2d(x, weight, None, *self.geo)

    def step(self, fn, weight_like, backward: bool):
        """A closure running ``fn`` (forward, or forward + backward to x and the weight)."""
        if not backward:
            return lambda: fn(self.x, weight_like)
        xg, wg = self.x.detach().clone().requires_grad_(), weight_like.detach().clone().requires_grad_()

        def run():
            xg.grad = wg.grad = None
            y = fn(xg, wg)
            y.backward(self._grad_like(y))
            return y, xg.grad, wg.grad

        return run

    def _grad_like(self, y):
        if self.grad is None or self.grad.shape != y.shape:
            g = torch.randn(y.shape, device=y.device, dtype=y.dtype)
            self.grad = g.contiguous(memory_format=torch.channels_last) if y.dim() == 4 else g
        return self.grad

    def check(self, backend: str, backward: bool) -> float:
        """Largest relative error of a backend's outputs against the dense op's."""
        with ftk.use_backend(backend):
            got = self.step(self.ours, self.values, backward)()
        want = self.step(self.dense, self.weight, backward)()
        if not backward:
            return _rel_err(got, want)
        y, dx, dv = got
        wy, wdx, dw = want
        return max(_rel_err(y, wy), _rel_err(dx, wdx), _rel_err(dv, self.layout.pack(dw)))

    def bsr_step(self, block: int):
        """torch.sparse's Triton BSR kernel on the same weight: ``(W_bsr @ x.T).T``."""
        from torch.sparse._triton_ops import bsr_dense_mm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.sparse BSR is "beta"
            w_bsr = self.weight.to_sparse_bsr((block, block))
        xt = self.x.t().contiguous()
        return lambda: bsr_dense_mm(w_bsr, xt)


def bench_row(op, spec, block, density, dtype_name, backward, backends, repeats, device, dense_cache) -> Dict:
    dtype = DTYPES[dtype_name]
    case = _Case(op, spec, block, density, dtype, device)
    key = (op, spec, dtype_name, backward)
    if key not in dense_cache:
        dense_cache[key] = median_seconds(case.step(case.dense, case.weight, backward), repeats, device=device)
    dense = dense_cache[key]
    shape = "x".join(map(str, spec)) if op == "linear" else f"{spec[0]} b{spec[1]}"
    row = dict(op=op, shape=shape, dtype=dtype_name, **{"pass": "fwd+bwd" if backward else "fwd"},
               block=block, density=density, layout_density=round(case.layout.density, 4),
               dense_ms=dense * 1e3, ideal=1 / density)
    errors = []
    for name in backends:
        err = case.check(name, backward)
        errors.append(err)
        if err > TOLERANCE[dtype]:
            raise RuntimeError(f"{name} is wrong on {op} {shape} {dtype_name} block {block} density {density} "
                               f"({row['pass']}): relative error {err:.3g} > {TOLERANCE[dtype]}")
        with ftk.use_backend(name):
            t = median_seconds(case.step(case.ours, case.values, backward), repeats, device=device)
        row[f"{name}_ms"] = t * 1e3
        row[f"{name}_x"] = dense / t
    row["max_rel_err"] = max(errors)
    if op == "linear" and not backward and device.type == "cuda":
        t = median_seconds(case.bsr_step(block), repeats, device=device)
        row["bsr_ms"], row["bsr_x"] = t * 1e3, dense / t
    return row


def add_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement; the median is kept")
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--ops", nargs="+", choices=["linear", "conv2d"], default=["linear", "conv2d"])
    parser.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--backends", nargs="+", choices=GPU_BACKENDS, default=None,
                        help="GPU backends to measure (default: every available one)")
    parser.add_argument("--quick", action="store_true", help="one small shape per op: checks the suite runs")
    parser.add_argument("--out", default=out_default, help="directory for JSON + Markdown (default %(default)s)")
    parser.add_argument("--name", default=None, help="result file name (default: gpu_kernels[_quick])")


def _device_and_backends(args) -> tuple:
    from ...backends import triton_interpreted

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif triton_interpreted() and args.quick:
        device = torch.device("cpu")
    else:
        raise ValueError("no CUDA GPU is visible (for a plumbing check without one: "
                         "TRITON_INTERPRET=1 freetickets bench gpu --quick)")
    available = [b for b in GPU_BACKENDS if b in ftk.available_backends()]
    wanted = args.backends or available
    missing = [b for b in wanted if b not in available]
    if missing or not wanted:
        raise ValueError(f"backend(s) {missing or list(GPU_BACKENDS)} not available here "
                         f"(available: {ftk.available_backends()}); see `freetickets info`")
    return device, wanted


def _shapes(args, device) -> tuple:
    if device.type == "cpu":
        return INTERPRETER_LINEAR, INTERPRETER_CONV
    return (QUICK_LINEAR, QUICK_CONV) if args.quick else (LINEAR_SHAPES, CONV_SHAPES)


def run(args: argparse.Namespace) -> int:
    for d in args.densities:
        if not 0 < d <= 1:
            raise ValueError(f"density must be in (0, 1], got {d}")
    if args.repeats <= 0:
        raise ValueError("--repeats must be positive")
    device, backends = _device_and_backends(args)
    repeats = 1 if device.type == "cpu" else args.repeats
    torch.manual_seed(0)
    linear_shapes, conv_shapes = _shapes(args, device)
    jobs = []
    for dtype, backward in itertools.product(args.dtypes, [p == "fwd+bwd" for p in args.passes]):
        if "linear" in args.ops:
            blocks = (32,) if device.type == "cpu" else (16, 32, 64)
            jobs += [("linear", s, b, d, dtype, backward)
                     for s, b, d in itertools.product(linear_shapes, blocks, args.densities)]
        if "conv2d" in args.ops:
            blocks = (16,) if device.type == "cpu" else (32, 64)
            jobs += [("conv2d", s, b, d, dtype, backward)
                     for s, b, d in itertools.product(conv_shapes, blocks, args.densities)]
    rows: List[Dict] = []
    dense_cache: Dict = {}
    for job in Progress(jobs, "gpu kernels"):
        rows.append(bench_row(*job, backends, repeats, device, dense_cache))
    columns = ["op", "shape", "dtype", "pass", "block", "density", "dense_ms"]
    for name in backends:
        columns += [f"{name}_ms", f"{name}_x"]
    columns += ["bsr_x", "ideal", "max_rel_err"]
    notes = _notes(device, repeats, backends)
    name = args.name or ("gpu_kernels_quick" if args.quick else "gpu_kernels")
    paths = write_results(name, rows, columns, args.out, notes)
    print(markdown_table(rows, columns))
    print(f"\nwrote {paths['json']} and {paths['md']}")
    return 0


def _notes(device: torch.device, repeats: int, backends) -> str:
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter (times meaningless)"
    tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
    return (f"{where}; {versions}; median of {repeats} (CUDA events); backends {', '.join(backends)}; "
            f"dense = F.linear/F.conv2d (cuBLAS/cuDNN) on the densified weight, same dtype; conv inputs "
            f"channels_last; x = dense_ms / backend_ms; bsr_x = torch.sparse bsr_dense_mm vs dense "
            f"(linear forward); fp32 tf32 {tf32}; every row checked against the dense result first.")
