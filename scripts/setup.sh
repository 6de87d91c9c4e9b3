#!/usr/bin/env bash
# Create .venv (if needed) and install vlmtrain with pinned torch/torchvision.
# Usage: bash scripts/setup.sh [extras]    e.g. bash scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/pip install --quiet --no-compile -e ".${extras:+[$extras]}" torch==2.14.1 torchvision==0.29.1
# Bytecode: pip compiles every file of every package, one at a time (half the install's time). Here only
# what vlmtrain imports is compiled, by importing it once with bytecode writing on. It must be compiled:
# with PYTHONDONTWRITEBYTECODE set, as it is on some machines, nothing compiled on import is kept, and
# every process would compile torch again (the test suite then took half as long again).
PYTHONDONTWRITEBYTECODE= .venv/bin/python scripts/compile_imports.py
