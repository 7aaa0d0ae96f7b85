#!/usr/bin/env bash
# The deepspeed launcher on the hosts of a hostfile (one "host slots=N" line each): it reaches
# the other hosts over pdsh/ssh, runs one process per slot, with the first host as master.
# The repository and RUN_DIR must be at the same path on every host (shared filesystem).
#
#   launch/deepspeed_hostfile.sh hostfile experiment=fbi_7b zero=stage3_offload zero.gather_signs=false
#
# Handled here: --no_local_rank (Hydra would refuse the --local_rank argument; fbi reads
# LOCAL_RANK from the environment), and OMP_NUM_THREADS, which the launcher does not pass
# to other hosts: it goes into the DS_ENV_FILE that it exports everywhere.
# NODE_RANK=<i> instead starts only this host's processes (deepspeed --no_ssh): run the script
# on every host yourself (e.g. from a scheduler), each with its index in the hostfile.
# Environment: RUN_DIR (default runs/<date-time>), MASTER_PORT (29500), OMP_NUM_THREADS
# (default: this host's CPUs / the first host's slots; hosts alike), PYTHON.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: $0 HOSTFILE [train.py overrides]   (HOSTFILE lines: 'host slots=N')" >&2
  exit 2
fi
hostfile=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
master=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")
slots=$(awk '!/^[[:space:]]*(#|$)/ {sub(/.*slots=/, ""); print $1; exit}' "$hostfile")
if ! getent hosts "$master" > /dev/null; then
  echo "launch: the first host $master of $hostfile does not resolve here (DNS or /etc/hosts)" >&2
  exit 2
fi
hosts=$(awk '!/^[[:space:]]*(#|$)/ {n++} END {print n + 0}' "$hostfile")
if [ "$hosts" -gt 1 ] && [ -z "${NODE_RANK:-}" ] && ! command -v pdsh > /dev/null \
    && ! command -v ssh > /dev/null; then
  other=$(awk '!/^[[:space:]]*(#|$)/ {n++; if (n == 2) {print $1; exit}}' "$hostfile")
  echo "launch: the deepspeed launcher needs pdsh or ssh to reach $other and the other hosts" \
       "of $hostfile, and neither is installed here: apt-get install pdsh openssh-client" \
       "(the image has both), or run this script on every host with NODE_RANK=<its index>" >&2
  exit 2
fi
threads=$(( $(nproc) / ${slots:-1} ))
env_file=$(mktemp)
trap 'rm -f "$env_file"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS" > "$env_file"
python=${PYTHON:-$repo/.venv/bin/python}
mode=()
if [ -n "${NODE_RANK:-}" ]; then mode=(--no_ssh --node_rank "$NODE_RANK"); fi
DS_ENV_FILE=$env_file "$python" -m deepspeed.launcher.runner --hostfile "$hostfile" "${mode[@]}" \
  --master_addr "$master" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  train.py "run_dir=${RUN_DIR:-$repo/runs/$(date +%Y%m%d-%H%M%S)}" resume=auto "$@"
