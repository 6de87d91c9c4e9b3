#!/usr/bin/env bash
# Create .venv (if needed) and install vlmtrain with pinned torch/torchvision.
# Usage: bash scripts/setup.sh [extras]    e.g. bash scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# --no-compile: Python compiles a module's bytecode when it is first imported, so only what runs pays;
# compiling every file of torch and its CUDA libraries here took a third of torch's install time
.venv/bin/pip install --quiet --no-compile torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install --quiet --no-compile -e ".${extras:+[$extras]}" torch==2.14.1 torchvision==0.29.1
