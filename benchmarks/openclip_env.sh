#!/usr/bin/env bash
# Create open_clip_train's own virtualenv (pip only). open_clip_train wants webdataset 0.2.86 and
# pandas, which conflict with vlmtrain's environment, so it lives beside it, outside git.
#   bash benchmarks/openclip_env.sh [VENV_DIR]     (default: .venv-openclip in the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-openclip}"
OPENCLIP_VERSION="${OPENCLIP_VERSION:-3.3.0}"   # the version vlmtrain's own environment uses

python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.14.1 torchvision==0.29.1
"$VENV/bin/pip" install "open_clip_torch==$OPENCLIP_VERSION" webdataset==0.2.86 pandas \
    braceexpand fsspec ftfy regex
"$VENV/bin/python" -c "import open_clip_train.main, open_clip, webdataset; print('open_clip', open_clip.__version__, 'webdataset', webdataset.__version__)"
