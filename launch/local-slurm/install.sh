#!/usr/bin/env bash
# Install Debian's SLURM and munge for the local test clusters, and iproute2 (`ip`) for the two-node one
# (root; about 15 s with a warm apt cache).
set -euo pipefail
if command -v slurmctld > /dev/null && command -v munged > /dev/null && command -v ip > /dev/null; then exit 0; fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge iproute2 > /dev/null
