#!/usr/bin/env bash
# GPU acceptance: one table of what a GPU node must show before a long run (bench/gpu_check.py;
# the rows are in bench/gpu_rows.py, their criteria in docs/clusters.md "GPU acceptance").
#
#   bash bench/gpu_check.sh --out DIR                 # on a GPU node, in the image or a venv
#   bash bench/gpu_check.sh --wheels WHEELS --out DIR # a bare offline node with its own torch
#   bash bench/gpu_check.sh --device cpu --out DIR    # every row's code on CPU (the test suite)
#
# --wheels: install what the check needs beyond torch from a wheelhouse that
# bench/gpu_wheels.sh wrote, with pip --no-index, keeping the node's torch. Other arguments go
# to bench/gpu_check.py (--only, --row-limit, --seq-len, --steps). Writes DIR/gpu_check.json
# and DIR/gpu_check.md; exits non-zero on any FAIL or ERROR. The whole check is bounded by
# GPU_CHECK_TIMEOUT seconds (default 480 on a GPU, 1800 on CPU): SIGTERM, then SIGKILL 20 s
# later, so a hang in NCCL or CUDA ends as a table with an ERROR row, not as a stuck job.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$(command -v python3 || command -v python)}
[ -x "$repo/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && python=$repo/.venv/bin/python
wheels="" device=cuda args=()
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) wheels=$2; shift 2 ;;
    --device) device=$2; args+=("$1" "$2"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  [ -f "$wheels/requirements.txt" ] || { echo "gpu_check: $wheels/requirements.txt missing: write the wheelhouse with bash bench/gpu_wheels.sh $wheels" >&2; exit 2; }
  torch_version=$("$python" -c "import torch; print(torch.__version__)") || {
    echo "gpu_check: --wheels needs the node's torch importable by $python (set PYTHON=...)" >&2; exit 2; }
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==$torch_version" > "$constraints"  # pip may not replace the node's torch
  "$python" -m pip install --no-index --find-links "$wheels" -c "$constraints" -r "$wheels/requirements.txt"
  # DeepSpeed's sdist, built against this torch (no isolation: no torch download); its ops
  # build on first use (the deepspeed_ops row). Python 3.12's venvs have no setuptools.
  "$python" -c "import setuptools, wheel" 2> /dev/null \
    || "$python" -m pip install --no-index --find-links "$wheels" setuptools wheel
  DS_BUILD_OPS=0 "$python" -m pip install --no-index --find-links "$wheels" -c "$constraints" \
    --no-build-isolation "deepspeed==$(cat "$wheels/deepspeed.version")"
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
# DeepSpeed compiles its ops into a cache keyed by name only: one per checkout, so that
# checkouts do not rebuild each other's (nor wait on each other's lock).
ext=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/fbi-torch-ext-$(printf %s "$repo" | sha1sum | cut -c1-8)}
export TORCH_EXTENSIONS_DIR=$ext HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
default_limit=480
[ "$device" = cpu ] && default_limit=1800
timeout --preserve-status -k 20 "${GPU_CHECK_TIMEOUT:-$default_limit}" "$python" "$repo/bench/gpu_check.py" "${args[@]}"
