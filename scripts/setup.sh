#!/usr/bin/env bash
# Create .venv (if needed) and install vlmtrain with pinned torch/torchvision.
# Usage: bash scripts/setup.sh [extras]    e.g. bash scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install --quiet -e ".${extras:+[$extras]}" torch==2.14.1 torchvision==0.29.1
