#!/usr/bin/env bash
# One node's torchrun for a multi-node job; started on every node by launch/torchrun_hosts.sh
# (over ssh) or launch/slurm/train.sbatch (srun). Arguments: train.py's Hydra overrides.
#
# Environment: NNODES, RDZV_ENDPOINT (host:port on the first node), RDZV_ID (the same on every
# node), NODE_RANK (0 hosts the rendezvous store; default SLURM_NODEID), LOCAL_ADDR (this
# node's address as the other nodes reach it; see below), NPROC_PER_NODE
# (default: the node's GPUs, else 1), RDZV_TIMEOUT (s, default 600), MAX_RESTARTS (default 0;
# on a failed worker every node restarts its workers, which resume from the last checkpoint),
# PYTHON (default the repository's .venv), OMP_NUM_THREADS (default: CPUs / processes),
# SHUTDOWN_TIMEOUT (s, default 600: the grace torchrun gives its workers after a signal; at
# least the checkpoint time fbi estimates at start-up).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
node_rank=${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK (0 on the first node)}}
gpus=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2> /dev/null || true) | wc -l)}
nproc_node=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
threads=$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / nproc_node ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
# This node's address for the others: LOCAL_ADDR, else (under SLURM, when this host's name
# does not resolve) SLURM's NodeAddr for it, else torchrun uses the host's FQDN. fbi's process
# group store is announced at the first node's address as the rendezvous resolved it.
local_addr=${LOCAL_ADDR:-}
if [ -z "$local_addr" ] && [ -n "${SLURMD_NODENAME:-}" ] && ! getent hosts "$(hostname)" > /dev/null; then
  local_addr=$(scontrol show node "$SLURMD_NODENAME" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
fi
# Signals: torchrun forwards TERM/INT (cancel) and USR1/USR2 (preempt) to its workers, which
# checkpoint at the next step boundary; it waits SHUTDOWN_TIMEOUT seconds for them before
# KILL. Until torchrun installs its handlers (after the rendezvous) USR1/USR2 are ignored
# rather than fatal.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}}
trap '' USR1 USR2
exec "${PYTHON:-$repo/.venv/bin/python}" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$nproc_node" --max_restarts "${MAX_RESTARTS:-0}" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 \
  --shutdown-timeout "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" \
  ${local_addr:+--local-addr "$local_addr"} \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" \
  --rdzv_conf "is_host=$([ "$node_rank" = 0 ] && echo 1 || echo 0),join_timeout=${RDZV_TIMEOUT:-600}" \
  "$repo/train.py" "$@"
