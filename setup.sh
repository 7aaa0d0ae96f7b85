#!/usr/bin/env bash
# Creates .venv with the pinned stack (CPU torch, DeepSpeed without prebuilt ops). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import deepspeed, hydra, transformers, gguf, datasets" 2>/dev/null \
   || ! cmp -s requirements.txt .venv/.requirements; then
  DS_BUILD_OPS=0 .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.requirements
fi
