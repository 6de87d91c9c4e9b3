#!/usr/bin/env bash
# Create .venv (if needed) and install vlmtrain with pinned torch/torchvision.
# Usage: bash scripts/setup.sh [extras]    e.g. bash scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/pip install --quiet --no-compile -e ".${extras:+[$extras]}" torch==2.14.1 torchvision==0.29.1
# The bytecode is compiled here, on every core (pip compiles one file at a time: half the install's
# time). It must be: with PYTHONDONTWRITEBYTECODE set, as it is on some machines, nothing compiled on
# import is kept, and every process would compile torch again (the test suite then took half as long
# again). A file that does not compile is left to its import, as pip leaves it.
site_packages="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
.venv/bin/python -m compileall -q -j 0 "$site_packages" > /dev/null || true
