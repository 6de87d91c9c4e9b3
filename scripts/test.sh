#!/usr/bin/env bash
# From a fresh clone: install (with the test and UniBench extras) and run the whole test suite, slow tests
# included. The unibench extra pins setuptools<81 (its openai-clip dependency imports pkg_resources).
# As root on Debian it also installs SLURM, so that the SLURM tests run on a real local two-node cluster
# (tests/slurm starts it: launch/local-slurm/two-nodes.sh); elsewhere they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
slurm_install=""
if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then  # apt installs SLURM while pip installs the packages
  slurm_log="$(mktemp)"
  bash launch/local-slurm/install.sh > "$slurm_log" 2>&1 &
  slurm_install=$!
fi
bash scripts/setup.sh dev,unibench
if [ -n "$slurm_install" ]; then
  if ! wait "$slurm_install"; then
    cat "$slurm_log" >&2
    echo "SLURM could not be installed: tests/slurm will be skipped" >&2
  fi
  rm -f "$slurm_log"
fi
status=0
unset PYTHONDONTWRITEBYTECODE  # what only the tests import is compiled once, not in each process
.venv/bin/python -m pytest -q -rs -n auto --dist loadgroup "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$status"
