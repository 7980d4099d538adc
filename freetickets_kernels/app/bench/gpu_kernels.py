"""GPU kernel suite: Triton (and CUDA, when built) block-sparse ops vs cuBLAS/cuDNN and torch.sparse BSR.

For every row, on the same inputs: check each GPU backend's output and
gradients against the dense op (a row that fails is recorded with its error
and the suite goes on; the exit status is 1 at the end), then time the dense
op and each backend in that row, one after the other: the eager time (CUDA
events around each call, median of --repeats) and the device-only time (the
calls queued behind a busy kernel, so validation, dispatch and launch are
hidden: a forward under ~50 us otherwise measures them).  ``x`` columns are
device-only ratios to dense.  Linear forward rows also time torch.sparse's
Triton ``bsr_dense_mm`` on the same weight.  Dense = ``F.linear``/``F.conv2d``
on the densified weight, same dtype, ``cudnn.benchmark`` on; conv inputs are
channels_last (cuDNN's fast layout, and ours).  "fwd+bwd" times forward +
backward to input and weights.  ``ideal`` is 1 / the layout's real density
(empty for a layout with no live block).

    freetickets bench gpu                       # full suite (fp16 + bf16; several minutes on an H100)
    freetickets bench gpu --preset quick        # a few rows: checks the suite and kernels work
    freetickets bench gpu --preset check --jsonl rows.jsonl --backends triton   # benchmarks/gpu_check.sh's subset
    python benchmarks/gpu_kernels.py            # the full suite, writing to benchmarks/results/

Without a GPU, under TRITON_INTERPRET=1, every preset runs tiny shapes on the
CPU through Triton's interpreter: it checks the plumbing, its times mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import freetickets_kernels as ftk

from ...layout import BlockSparseLayout
from ..progress import Progress
from ..results import markdown_table, write_results
from ..timing import device_median_seconds, median_seconds

DENSITIES = [0.5, 0.3, 0.2, 0.1, 0.05]
GPU_BACKENDS = ("triton", "cuda")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (tokens, in, out)
LINEAR_SHAPES = [(8192, 8192, 8192), (4096, 4096, 4096), (4096, 1024, 4096)]
# (name, batch, cin, cout, kernel, hw, stride, padding): ResNet-50's 3x3 and 1x1 layers at batch 128
CONV_3X3 = [
    ("r50 64->64 3x3 @56", 128, 64, 64, 3, 56, 1, 1),
    ("r50 128->128 3x3 @28", 128, 128, 128, 3, 28, 1, 1),
    ("r50 256->256 3x3 @14", 128, 256, 256, 3, 14, 1, 1),
    ("r50 512->512 3x3 @7", 128, 512, 512, 3, 7, 1, 1),
]
CONV_1X1 = [
    ("r50 256->64 1x1 @56", 128, 256, 64, 1, 56, 1, 0),
    ("r50 64->256 1x1 @56", 128, 64, 256, 1, 56, 1, 0),
    ("r50 1024->256 1x1 @14", 128, 1024, 256, 1, 14, 1, 0),
    ("r50 512->2048 1x1 @7", 128, 512, 2048, 1, 7, 1, 0),
]


@dataclass(frozen=True)
class Preset:
    """Which rows a run measures: shapes, blocks per op, and the densities / dtypes unless given."""

    linear: Sequence[tuple]
    conv: Sequence[tuple]
    linear_blocks: Tuple[int, ...]
    conv_blocks: Tuple[int, ...]
    densities: Tuple[float, ...]
    dtypes: Tuple[str, ...]


PRESETS = {
    "full": Preset(LINEAR_SHAPES, CONV_3X3 + CONV_1X1, (16, 32, 64), (32, 64), tuple(DENSITIES), ("fp16", "bf16")),
    "quick": Preset([(1024, 1024, 1024)], [("r50 256->256 3x3 @14", 32, 256, 256, 3, 14, 1, 1)], (16, 32, 64),
                    (32, 64), tuple(DENSITIES), ("fp16", "bf16")),
    # the subset benchmarks/gpu_check.sh measures in its few minutes of GPU time
    "check": Preset([(8192, 8192, 8192)], [CONV_3X3[0], CONV_3X3[2], CONV_1X1[0], CONV_1X1[2]], (16, 32, 64),
                    (32, 64), (0.5, 0.1, 0.05), ("bf16",)),
}
# tiny shapes for the CPU interpreter (plumbing check only), whatever the preset
INTERPRETER = Preset([(32, 64, 64)], [("tiny 32->32 3x3 @6", 2, 32, 32, 3, 6, 1, 1),
                                      ("tiny 32->16 1x1 @5", 2, 32, 16, 1, 5, 1, 0)], (32,), (16,),
                     (0.5, 0.1), ("fp16",))
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
        self.live_density = layout.density  # the density the kernels see: whole blocks, maybe none
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


def _error_text(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _times(fn, repeats: int, device: torch.device) -> Tuple[float, Optional[float]]:
    """(eager seconds, device-only seconds or None) of ``fn``."""
    eager = median_seconds(fn, repeats, device=device)
    return eager, (device_median_seconds(fn, repeats) if device.type == "cuda" else None)


def bench_row(op, spec, block, density, dtype_name, backward, backends, repeats, device) -> Dict:
    """One row: every backend checked against dense, then dense and every backend timed, in this row.
    A backend that fails (an exception, or a wrong result) gets ``<backend>_error`` and no times."""
    dtype = DTYPES[dtype_name]
    case = _Case(op, spec, block, density, dtype, device)
    shape = "x".join(map(str, spec)) if op == "linear" else f"{spec[0]} b{spec[1]}"
    live = case.live_density
    row = dict(op=op, shape=shape, dtype=dtype_name, **{"pass": "fwd+bwd" if backward else "fwd"},
               block=block, density=density, layout_density=round(live, 4), ideal=1 / live if live else None)
    good, errors = [], []
    for name in backends:
        try:
            err = case.check(name, backward)
        except Exception as exc:  # noqa: BLE001 - recorded in the row; the suite goes on
            row[f"{name}_error"] = _error_text(exc)
            continue
        errors.append(err)
        if err > TOLERANCE[dtype]:
            row[f"{name}_error"] = f"wrong result: relative error {err:.3g} > {TOLERANCE[dtype]}"
        else:
            good.append(name)
    row["max_rel_err"] = max(errors) if errors else None
    dense, dense_dev = _times(case.step(case.dense, case.weight, backward), repeats, device)
    row["dense_ms"] = dense * 1e3
    row["dense_dev_ms"] = dense_dev * 1e3 if dense_dev is not None else None
    for name in good:
        try:
            with ftk.use_backend(name):
                t, t_dev = _times(case.step(case.ours, case.values, backward), repeats, device)
        except Exception as exc:  # noqa: BLE001
            row[f"{name}_error"] = _error_text(exc)
            continue
        _speed(row, name, dense, dense_dev, t, t_dev)
    if op == "linear" and not backward and device.type == "cuda":
        try:
            t, t_dev = _times(case.bsr_step(block), repeats, device)
            _speed(row, "bsr", dense, dense_dev, t, t_dev)
        except Exception as exc:  # noqa: BLE001 - torch.sparse does not take every block / dtype
            row["bsr_error"] = _error_text(exc)
    return row


def _speed(row: Dict, name: str, dense: float, dense_dev: Optional[float], t: float, t_dev: Optional[float]) -> None:
    row[f"{name}_ms"] = t * 1e3
    row[f"{name}_dev_ms"] = t_dev * 1e3 if t_dev is not None else None
    row[f"{name}_eager_x"] = dense / t
    # the ratio of device-only times; eager only where there is none (CPU interpreter)
    row[f"{name}_x"] = dense_dev / t_dev if dense_dev is not None and t_dev is not None else dense / t


def row_failed(row: Dict) -> bool:
    """A backend of ours failed in ``row`` (torch.sparse BSR refusing a shape is not a failure)."""
    return any(k.endswith("_error") and k != "bsr_error" for k in row)


def add_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="full: every shape; quick: one small shape per op; check: the subset "
                             "benchmarks/gpu_check.sh runs (default %(default)s)")
    parser.add_argument("--quick", action="store_const", const="quick", dest="preset", help="--preset quick")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement; the median is kept")
    parser.add_argument("--densities", type=float, nargs="+", help="default: the preset's")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: the preset's")
    parser.add_argument("--ops", nargs="+", choices=["linear", "conv2d"], default=["linear", "conv2d"])
    parser.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--backends", nargs="+", choices=GPU_BACKENDS, default=None,
                        help="GPU backends to measure (default: every available one)")
    parser.add_argument("--jsonl", help="also append each row to this file as one JSON line as soon as it is "
                                        "measured (a run that is killed keeps what it did)")
    parser.add_argument("--out", default=out_default, help="directory for JSON + Markdown (default %(default)s)")
    parser.add_argument("--name", default=None, help="result file name (default: gpu_kernels[_<preset>])")


def _device_and_backends(args) -> tuple:
    from ...backends import triton_interpreted

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif triton_interpreted():
        device = torch.device("cpu")
    else:
        raise ValueError("no CUDA GPU is visible (for a plumbing check without one: "
                         "TRITON_INTERPRET=1 freetickets bench gpu --preset quick)")
    available = [b for b in GPU_BACKENDS if b in ftk.available_backends()]
    wanted = args.backends or available
    missing = [b for b in wanted if b not in available]
    if missing or not wanted:
        raise ValueError(f"backend(s) {missing or list(GPU_BACKENDS)} not available here "
                         f"(available: {ftk.available_backends()}); see `freetickets info`")
    return device, wanted


def jobs(args, device: torch.device) -> List[tuple]:
    """Every row's ``(op, shape, block, density, dtype, backward)``: forward rows first, then fwd+bwd, so
    a run cut short has measured the forwards."""
    preset = PRESETS[args.preset] if device.type == "cuda" else INTERPRETER
    densities = args.densities or preset.densities
    dtypes = args.dtypes or preset.dtypes
    out = []
    for backward, dtype in itertools.product([p == "fwd+bwd" for p in sorted(args.passes, key=len)], dtypes):
        if "linear" in args.ops:
            out += [("linear", s, b, d, dtype, backward)
                    for s, b, d in itertools.product(preset.linear, preset.linear_blocks, densities)]
        if "conv2d" in args.ops:
            out += [("conv2d", s, b, d, dtype, backward)
                    for s, b, d in itertools.product(preset.conv, preset.conv_blocks, densities)]
    return out


def run(args: argparse.Namespace) -> int:
    for d in args.densities or ():
        if not 0 < d <= 1:
            raise ValueError(f"density must be in (0, 1], got {d}")
    if args.repeats <= 0:
        raise ValueError("--repeats must be positive")
    device, backends = _device_and_backends(args)
    repeats = 1 if device.type == "cpu" else args.repeats
    torch.manual_seed(0)
    rows: List[Dict] = []
    cudnn = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # the dense conv anchor at cuDNN's best algorithm
    try:
        for job in Progress(jobs(args, device), "gpu kernels"):
            rows.append(bench_row(*job, backends, repeats, device))
            if args.jsonl:
                _append_line(args.jsonl, rows[-1])
    finally:
        torch.backends.cudnn.benchmark = cudnn
    columns = ["op", "shape", "dtype", "pass", "block", "density", "dense_dev_ms"]
    for name in backends:
        columns += [f"{name}_dev_ms", f"{name}_x", f"{name}_eager_x"]
    columns += ["bsr_x", "ideal", "max_rel_err"]
    notes = _notes(device, repeats, backends)
    name = args.name or ("gpu_kernels" if args.preset == "full" else f"gpu_kernels_{args.preset}")
    paths = write_results(name, rows, columns, args.out, notes)
    print(markdown_table(rows, columns))
    failed = [r for r in rows if row_failed(r)]
    for r in failed:
        print(f"FAILED {r['op']} {r['shape']} {r['dtype']} {r['pass']} block {r['block']} density {r['density']}: "
              + "; ".join(f"{k[:-6]}: {v}" for k, v in r.items() if k.endswith("_error")))
    print(f"\nwrote {paths['json']} and {paths['md']}" + (f"; {len(failed)} row(s) FAILED" if failed else ""))
    return 1 if failed else 0


def _append_line(path: str, row: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _notes(device: torch.device, repeats: int, backends) -> str:
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter (times meaningless)"
    tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
    return (f"{where}; {versions}; median of {repeats}; backends {', '.join(backends)}; dense = "
            f"F.linear/F.conv2d (cuBLAS/cuDNN, cudnn.benchmark on) on the densified weight, same dtype, timed "
            f"in every row; conv inputs channels_last; *_dev_ms = device-only time (calls queued behind a "
            f"busy kernel); x = dense_dev_ms / backend_dev_ms, eager_x = the same of eager times (CUDA "
            f"events); bsr = torch.sparse bsr_dense_mm (linear forward); ideal = 1 / the layout's real "
            f"density; fp32 tf32 {tf32}; every row checked against the dense result first (failures in "
            f"*_error).")
