#!/usr/bin/env bash
# From a fresh clone: install, write the synthetic shards, train a small CLIP on the CPU, evaluate, export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
data="${VLMTRAIN_CACHE:-$PWD/data}/synthetic-quickstart"
run="runs/quickstart-$(date +%Y%m%d-%H%M%S)"

vlmtrain-data synthetic --out "$data" --train-samples 20000 --val-samples 1000
vlmtrain-train experiment=quickstart run_dir="$run" data.synthetic=null \
  data.train_shards="$data/train" data.val_shards="$data/val" data.zeroshot_dir="$data/classification"
vlmtrain-export "$run" --out "$run/export"   # an open_clip local-dir: folder (open_clip, CLIP_benchmark)
vlmtrain-eval checkpoint="$run/export" zeroshot_dir="$data/classification"   # the export scores the same
vlmtrain-runs runs                          # every run under runs/: state, loss, eval, what differs
echo "curves: $run/curves.png"
