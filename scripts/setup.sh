#!/usr/bin/env bash
# Create .venv (if needed) and install vlmtrain with pinned torch/torchvision.
# Usage: bash scripts/setup.sh [extras]    e.g. bash scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# pip compiles the bytecode here (about a third of torch's install time), and it must: with
# PYTHONDONTWRITEBYTECODE set, as it is on some machines, nothing compiled on import is kept, and every
# process would compile torch again (the test suite then took half as long again)
.venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install --quiet -e ".${extras:+[$extras]}" torch==2.14.1 torchvision==0.29.1
