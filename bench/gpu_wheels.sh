#!/usr/bin/env bash
# A wheelhouse for bench/gpu_check.sh on an offline GPU node that has its own CUDA torch:
# everything the check needs beyond torch, pinned as requirements.txt pins it, at most 64 MiB.
#
#   bash bench/gpu_wheels.sh DIR [--python-version 3.12] [--platform manylinux_2_28_aarch64]
#   # copy DIR to the node, then there:  bash bench/gpu_check.sh --wheels DIR --out RESULTS
#
# Run it where pip reaches the package index. Wheels are for the node's Python and platform
# (default: this machine's). DeepSpeed comes as its sdist: the node builds it against its own
# torch (pip --no-build-isolation, DS_BUILD_OPS=0), its ops on first use (the deepspeed_ops
# row). torch, triton and CUDA libraries are never downloaded (the node's torch stays).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$(command -v python3)}
[ -x "$repo/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && python=$repo/.venv/bin/python
[ $# -ge 1 ] || { echo "usage: bash bench/gpu_wheels.sh DIR [--python-version X.Y] [--platform TAG]" >&2; exit 2; }
out=$1; shift
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
platform=manylinux_2_28_$(uname -m)
while [ $# -gt 0 ]; do
  case $1 in
    --python-version) pyver=$2; shift 2 ;;
    --platform) platform=$2; shift 2 ;;
    *) echo "gpu_wheels: unknown argument $1" >&2; exit 2 ;;
  esac
done
pin() {  # the version requirements.txt pins for package $1
  local line
  line=$(grep -iE "^$1==" "$repo/requirements.txt") || { echo "gpu_wheels: $1 is not pinned in requirements.txt" >&2; exit 2; }
  echo "${line%%[[:space:]#]*}"
}
# What the check imports beyond torch (fbi's train path, the bench rows, transformers' own
# dependencies, and DeepSpeed's). Not wandb (logging.wandb=disabled), lm_eval, matplotlib, nor
# datasets (fbi reads text, jsonl and parquet itself; pyarrow alone is 54 MB).
binary=(
  pyyaml "$(pin transformers)" "$(pin tokenizers)"
  "$(pin safetensors)" "$(pin sentencepiece)" "$(pin numpy)"
  hjson ninja psutil py-cpuinfo "pydantic>=2" msgpack einops nvidia-ml-py packaging tqdm
  setuptools wheel
)
mkdir -p "$out"
platforms=(--platform "$platform" --platform "${platform/manylinux_2_28/manylinux2014}"
           --platform "${platform/manylinux_2_28/manylinux_2_17}" --platform any)
# hydra-core and omegaconf need antlr4-python3-runtime 4.9, published as an sdist only:
# fetched below with DeepSpeed's; here every other dependency, as wheels for the node.
"$python" -m pip download --quiet --dest "$out" --only-binary=:all: --python-version "$pyver" \
  "${platforms[@]}" --no-deps "$(pin hydra-core)" "$(pin omegaconf)"
"$python" -m pip download --quiet --dest "$out" --only-binary=:all: --python-version "$pyver" \
  "${platforms[@]}" "${binary[@]}"
"$python" -m pip download --quiet --dest "$out" --no-deps --no-binary=:all: \
  "$(pin deepspeed)" antlr4-python3-runtime==4.9.3
if ls "$out" | grep -qiE '^(torch|triton|nvidia_(cu|nccl|cusparse|nvjitlink))'; then
  echo "gpu_wheels: a torch/triton/CUDA wheel was pulled in: $(ls "$out" | grep -iE '^(torch|triton|nvidia_c)' | tr '\n' ' ')" >&2
  exit 1
fi
{ printf '%s\n' "${binary[@]}" | grep -v '^setuptools$\|^wheel$'; pin hydra-core; pin omegaconf
  echo antlr4-python3-runtime==4.9.3; } \
  > "$out/requirements.txt"
pin deepspeed | cut -d= -f3 > "$out/deepspeed.version"
size=$(du -cb "$out" | tail -1 | cut -f1)
echo "gpu_wheels: $(ls "$out" | wc -l) files, $((size / 2**20)) MiB in $out (Python $pyver, $platform)"
if [ "$size" -gt $((64 * 2**20)) ]; then
  echo "gpu_wheels: over the 64 MiB budget" >&2
  exit 1
fi
