#!/usr/bin/env bash
# The first (and second) run of the GPU backends on a lent GPU, in <= 8 minutes:
#
#   bash benchmarks/gpu_check.sh OUTDIR [SECONDS]     # SECONDS: the whole budget, default 470
#
# Stages, in order of what matters most, each time-boxed (and every limit cut
# to what is left of the budget), each writing OUTDIR/<stage>.log as it goes,
# and one line per finished stage to OUTDIR/stages.tsv (name, exit status,
# seconds), so a stage that is killed still leaves what it did:
#   env          nvidia-smi, nvcc, torch / triton / CUDA versions, the Triton API the code uses
#   build        the CUDA extension for sm_90 only, in place, 16 jobs: in the background from the start
#   triton       every Triton kernel path against the float64 reference, one config per kernel (no autotuning)
#   bench-triton the benchmark subset (--preset check), rows appended to OUTDIR/bench.jsonl as measured
#   cuda         the same kernel paths on the CUDA backend, once the build is done
#   bench-cuda   the subset on the CUDA backend, in its own process (a sticky CUDA error stays there)
#   sanitizer-*  compute-sanitizer memcheck and racecheck of the short list, if the tool is present
#   pytest       tests/test_gpu.py and tests/test_triton_backend.py, if pytest is installed
#
# Without a GPU it rehearses itself: the Triton interpreter for the kernels,
# tiny shapes, no build, no sanitizer (docs/gpu-backends.md).  It reads
# nothing from the network and installs nothing: the package runs from this
# checkout (PYTHONPATH).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [SECONDS]}
deadline=$(( $(date +%s) + ${2:-470} ))
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
export py out root
: > "$out/stages.tsv"

if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  gpu=1
else
  gpu=0
  export TRITON_INTERPRET=1
  echo "no GPU visible: rehearsal (Triton interpreter, tiny shapes, no build, no sanitizer)" | tee "$out/REHEARSAL"
fi

# stage NAME SECONDS COMMAND...: run COMMAND under a time limit (cut to the budget left), log to
# OUTDIR/NAME.log, record it; a stage with under 10 s of budget left is recorded as skipped (exit 124)
stage() {
  local name=$1 limit=$2 began rc left
  shift 2
  began=$(date +%s)
  left=$(( deadline - began ))
  if [ "$left" -lt 10 ]; then
    printf '%s\t124\t0\tskipped: out of time\n' "$name" >> "$out/stages.tsv"
    echo "== $name: skipped, out of time"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s): $*"
  # through bash: a stage may be one of the functions below (exported)
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - began ))" >> "$out/stages.tsv"
  echo "   $name: exit $rc in $(( $(date +%s) - began )) s; last lines:"
  tail -n 4 "$out/$name.log" | sed 's/^/   | /'
}

environment() {
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  git -C "$root" rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
  nvidia-smi || echo "nvidia-smi: not found"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version || nvcc --version || echo "nvcc: not found"
  command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" || echo "compute-sanitizer: not found"
  "$py" - <<'EOF'
import importlib, json, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
def takes(fn, name):
    try:
        import inspect
        return name in inspect.signature(getattr(fn, "__wrapped__", fn)).parameters
    except Exception as exc:
        return f"unknown: {exc}"
try:
    import triton, triton.language as tl
    info["triton"] = triton.__version__
    # every Triton API the kernels and the benchmark use
    info["triton_api"] = {
        "triton.autotune(cache_results=)": takes(triton.autotune, "cache_results"),
        "triton.autotune(prune_configs_by=)": takes(triton.autotune, "prune_configs_by"),
        "tl.dot(input_precision=)": takes(tl.dot, "input_precision"),
        **{name: hasattr(mod, attr) for name, mod, attr in (
            ("triton.Config", triton, "Config"), ("triton.cdiv", triton, "cdiv"),
            ("triton.next_power_of_2", triton, "next_power_of_2"), ("tl.trans", tl, "trans"),
            ("tl.int64", tl, "int64"), ("tl.maximum", tl, "maximum"))}}
except Exception as exc:  # reported, not fatal: the Triton stages will say more
    info["triton"] = f"unavailable: {exc}"
info["torch.cuda._sleep"] = hasattr(torch.cuda, "_sleep")
try:
    from torch.sparse._triton_ops import bsr_dense_mm  # noqa: F401
    info["bsr_dense_mm"] = True
except Exception as exc:
    info["bsr_dense_mm"] = f"unavailable: {exc}"
import freetickets_kernels as ftk
info["freetickets_backends"] = ftk.available_backends()
print(json.dumps(info, indent=2))
EOF
}

export -f environment
stage env 30 environment

build_pid=
if [ "$gpu" = 1 ]; then
  # sm_90 only and no CPU extension: the shortest build that gives the CUDA backend
  ( began=$(date +%s)
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FREETICKETS_NO_CPU_EXT=1 \
      timeout 240 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1
    printf 'build\t%s\t%s\n' "$?" "$(( $(date +%s) - began ))" >> "$out/stages.tsv" ) &
  build_pid=$!
fi

small=$([ "$gpu" = 1 ] || echo --small)
FREETICKETS_TRITON_AUTOTUNE=0 stage triton 90 "$py" benchmarks/gpu_correctness.py --backends triton $small

bench() {
  "$py" -m freetickets_kernels.app.cli bench gpu --preset check --repeats 10 --backends "$1" \
    --jsonl "$out/bench.jsonl" --out "$out" --name "gpu_check_$1"
}
export -f bench
stage bench-triton 130 bench triton

cuda_built=0
if [ -n "$build_pid" ]; then
  wait "$build_pid"
  if "$py" -c 'import freetickets_kernels._cuda' 2>/dev/null; then
    cuda_built=1
  else
    echo "   the CUDA extension did not build: see $out/build.log (tail below)"
    tail -n 20 "$out/build.log" | sed 's/^/   | /'
  fi
fi
if [ "$cuda_built" = 1 ]; then
  stage cuda 45 "$py" benchmarks/gpu_correctness.py --backends cuda
  stage bench-cuda 60 bench cuda
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ -x "$sanitizer" ]; then
    stage sanitizer-memcheck 45 "$sanitizer" --tool memcheck --error-exitcode 9 \
      "$py" benchmarks/gpu_correctness.py --small --backends cuda triton --dtypes bf16
    stage sanitizer-racecheck 30 "$sanitizer" --tool racecheck --error-exitcode 9 \
      "$py" benchmarks/gpu_correctness.py --small --backends cuda --dtypes bf16
  fi
fi
if [ "$gpu" = 1 ] && "$py" -c 'import pytest' 2>/dev/null; then
  FREETICKETS_TRITON_AUTOTUNE=0 stage pytest 60 "$py" -m pytest -q -x -p no:cacheprovider \
    tests/test_gpu.py tests/test_triton_backend.py
fi

echo "== stages (name, exit, seconds):"
column -t -s $'\t' "$out/stages.tsv" 2>/dev/null || cat "$out/stages.tsv"
awk -F'\t' '$2 != 0 { bad = 1 } END { exit bad }' "$out/stages.tsv"
