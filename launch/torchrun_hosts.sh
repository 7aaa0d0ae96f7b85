#!/usr/bin/env bash
# torchrun on hosts you name: one torchrun per host, started over ssh, with the c10d
# rendezvous on the first host, one run directory and resume=auto. The repository (with its
# .venv) and RUN_DIR must be at the same path on every host, e.g. on a shared filesystem.
#
#   launch/torchrun_hosts.sh gpu1,gpu2 experiment=fbi_130m teacher.path=/data/smollm2
#
# Environment: RUN_DIR (default runs/<date-time>), NPROC_PER_NODE (default: each host's GPUs,
# else 1), RDZV_PORT (29400), RDZV_TIMEOUT (s, 600), MAX_RESTARTS (3), PYTHON, OMP_NUM_THREADS
# (see torchrun_node.sh), RSH (default ssh: the command that runs a shell line on a host).
#
# Ctrl-C (or TERM to this script) is forwarded as TERM to every host's torchrun, which passes
# it to its workers: they checkpoint at the next step boundary and stop. ssh without a
# terminal would otherwise leave the remote runs going.
set -euo pipefail
if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "usage: $0 HOST1,HOST2,... [train.py overrides]" >&2
  exit 2
fi
IFS=, read -r -a hosts <<< "$1"
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
head=${hosts[0]}
if ! getent hosts "$head" > /dev/null; then
  echo "launch: the first host $head does not resolve here (DNS or /etc/hosts); the other" \
       "hosts must reach it by that name to join the rendezvous" >&2
  exit 2
fi
run_dir=${RUN_DIR:-$repo/runs/$(date +%Y%m%d-%H%M%S)}
args=$(printf ' %q' "run_dir=$run_dir" resume=auto "$@")
pids=()
remote_pids=$(mktemp -d)
trap 'rm -rf "$remote_pids"' EXIT
for i in "${!hosts[@]}"; do
  # ssh passes no environment: name every variable the node script reads.
  vars="NNODES=${#hosts[@]} NODE_RANK=$i RDZV_ENDPOINT=$head:${RDZV_PORT:-29400}"
  vars+=" RDZV_ID=$(basename "$run_dir") RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}"
  vars+=" MAX_RESTARTS=${MAX_RESTARTS:-3}"
  for name in NPROC_PER_NODE PYTHON OMP_NUM_THREADS; do
    if [ -n "${!name:-}" ]; then vars+=" $name=$(printf %q "${!name}")"; fi
  done
  # The remote shell announces its pid, which the exec chain hands on to torchrun.
  ${RSH:-ssh} "${hosts[$i]}" "cd $(printf %q "$repo") && echo fbi-remote-pid \$\$ && exec env $vars bash launch/torchrun_node.sh$args" |
    while IFS= read -r line; do
      case $line in
        "fbi-remote-pid "*) echo "${line#fbi-remote-pid }" > "$remote_pids/$i" ;;
        *) printf '%s\n' "$line" ;;
      esac
    done &
  pids+=($!)
done

stopping=""
forward() {
  [ -n "$stopping" ] && return
  stopping=1
  echo "launch: stopping; TERM to torchrun on ${hosts[*]} (the ranks checkpoint, then stop)" >&2
  for i in "${!hosts[@]}"; do
    if [ -s "$remote_pids/$i" ]; then
      ${RSH:-ssh} "${hosts[$i]}" "kill -TERM $(cat "$remote_pids/$i")" || true
    fi
  done
}
trap forward INT TERM
status=0
for pid in "${pids[@]}"; do
  # wait returns early when a trapped signal arrives: wait again until the job has ended.
  while :; do
    wait "$pid" && code=0 || code=$?
    kill -0 "$pid" 2> /dev/null || break
  done
  [ "$code" = 0 ] || status=$code
done
exit "$status"
