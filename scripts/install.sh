#!/usr/bin/env bash
# The install of README.md's "Install" section, as a script: torch, the build
# tools, then this package (compiling csrc/) with every extra the main job
# (`freetickets train`: [train]) and the tests (`python -m pytest -q`: [test])
# import.  .ci/run installs through this script, and tests/test_readme.py
# checks that its pip lines are exactly the README's block: change both.
# Run it inside the virtual environment you want the package in; it creates
# nothing itself (FREETICKETS_NO_CPU_EXT=1 skips the C++ CPU extension).
set -euo pipefail
cd "$(dirname "$0")/.."

pip install torch==2.14.1 torchvision==0.29.1 "setuptools>=64" wheel ninja   # any torch >= 2.4 (with its torchvision) works
pip install --no-build-isolation -e ".[train,test]"
