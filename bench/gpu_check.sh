#!/usr/bin/env bash
# GPU acceptance in under 8 minutes on one GPU: one table of what only CUDA can show (the
# CUDA-only tests, mamba-ssm's kernels against the torch scan, fbi_130m and fbi_1p3b bf16
# step times and MFU, the 1-bit sign route on CUDA tensors, distillation online vs cache).
#
#   bash bench/gpu_check.sh            # in the image: docker run --gpus 1 --entrypoint bash fbi:test bench/gpu_check.sh
#
# Arguments go to bench/gpu_check.py (--seq-len, --batch-130m, --batch-1p3b, --steps, --only).
# On a machine without a GPU it says so and exits 2 without measuring anything.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$(command -v python || echo "$repo/.venv/bin/python")}
[ -x "$repo/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && python=$repo/.venv/bin/python
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Bounded: a hang shows up as a timeout with the checks done so far, not as a stuck job.
exec timeout --signal=INT "${GPU_CHECK_TIMEOUT:-480}" "$python" "$repo/bench/gpu_check.py" "$@"
