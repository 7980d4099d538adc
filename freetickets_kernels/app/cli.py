"""The ``freetickets`` command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

from .. import backends
from .._version import __version__
from . import bench_command, train_command
from .checkpoint import CheckpointError
from .machine import machine_info


def cmd_info(args: argparse.Namespace) -> int:
    rows = backends.describe()
    info = machine_info()
    for name in backends.available_backends():
        module = backends.BACKENDS[name].module
        if hasattr(module, "build_info"):
            info[f"{name}_backend_build"] = module.build_info()
        for line in getattr(module, "bf16_unavailable", lambda: "")().splitlines():
            kernel, why = line.split(": ", 1)  # one line per bf16 kernel this machine cannot run
            info[f"{name}_no_{kernel}"] = why
    if args.json:
        print(json.dumps({"machine": info, "backends": rows}, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:>20}: {value}")
    print()
    print(f"{'backend':<10} {'available':<10} {'handles':<34} status")
    for row in rows:
        print(f"{row['backend']:<10} {row['available']:<10} {row['handles']:<34} {row['status']}")
    forced, source = backends.forced_backend()
    print()
    if forced:
        print(f"forced backend: {forced} (by {source})")
    else:
        cpu_pick = backends.select(torch.device("cpu"), torch.float32).name
        print(f"float32 CPU tensors run on: {cpu_pick}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freetickets",
        description=(
            "Block-sparse kernels that make sparse networks fast, and FreeTickets "
            "ensembles trained on top of them."
        ),
        epilog=("Run 'freetickets info' first: it shows which kernel backends this machine can use. "
                "Then 'freetickets train' trains a FreeTickets ensemble; 'freetickets COMMAND --help' explains each."),
    )
    parser.add_argument("--version", action="version", version=f"freetickets-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser(
        "info",
        help="show the machine and which backends are available (and why the others are not)",
        description=(
            "List the kernel backends (reference, cpu, triton, cuda), whether each can run "
            "here and, if not, why: not built, no GPU, triton missing.  Set "
            "FREETICKETS_BACKEND=name to force one for every op."
        ),
    )
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=cmd_info)
    train_command.add_parser(sub)
    bench_command.add_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """An error as one line, argparse style (torch's messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nfreetickets: interrupted; the last epoch's checkpoint is kept: rerun the same command "
              "with --resume to continue", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, ImportError, CheckpointError,
            backends.BackendUnavailableError) as exc:
        print(f"freetickets: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a full disk while writing a checkpoint: one line, not a traceback
        print(f"freetickets: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
