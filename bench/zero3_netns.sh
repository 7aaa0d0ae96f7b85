#!/usr/bin/env bash
# The 2-rank ZeRO-3 step of bench/zero3_traffic.py (plain route against the 1-bit route) over a
# shaped link: two network namespaces, one rank each, joined by a veth pair whose both ends
# are limited by tc's token bucket (RATE, default 1gbit; "none": the veth unshaped). Needs root
# (ip netns, tc).
#
#   sudo bench/zero3_netns.sh [RATE] [-- bench/zero3_traffic.py options]
#   sudo bench/zero3_netns.sh 1gbit -- --model fbi_130m --steps 3
#
# Each namespace has its own hostname (unshare --uts), a hosts file naming both and a resolver
# that answers at once (a lookup must not wait on a DNS server it cannot reach); gloo talks
# over the veth (GLOO_SOCKET_IFNAME); torchrun's rendezvous is static on the first namespace's
# address. The namespaces and their /etc/netns files are removed on exit.
set -euo pipefail

RATE=${1:-1gbit}
shift || true
[[ "${1:-}" == "--" ]] && shift
BENCH_ARGS=("$@")
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
A=fbi-bench-a B=fbi-bench-b
ADDR_A=10.231.0.1 ADDR_B=10.231.0.2 PORT=29561

cleanup() {
    for ns in "$A" "$B"; do
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
}
trap cleanup EXIT
cleanup
for ns in "$A" "$B"; do
    ip netns add "$ns"
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$ADDR_A" "$A" "$ADDR_B" "$B" \
        >"/etc/netns/$ns/hosts"
    echo "nameserver 127.0.0.1" >"/etc/netns/$ns/resolv.conf"
done
ip link add vA netns "$A" type veth peer name vB netns "$B"
ip -n "$A" addr add "$ADDR_A/24" dev vA
ip -n "$B" addr add "$ADDR_B/24" dev vB
for end in "$A:vA" "$B:vB"; do
    ns=${end%:*} dev=${end#*:}
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$dev" up
    # token bucket: RATE sustained, a 256 KiB burst, packets queued at most 50 ms
    [[ "$RATE" == none ]] ||
        tc -n "$ns" qdisc add dev "$dev" root tbf rate "$RATE" burst 256kb latency 50ms
done

rank() {  # rank namespace device
    ip netns exec "$2" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$2" \
        env OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME="$3" "$PY" -m torch.distributed.run --nnodes 2 --nproc_per_node 1 --node_rank "$1" \
        --master_addr "$ADDR_A" --master_port "$PORT" \
        "$REPO/bench/zero3_traffic.py" "${BENCH_ARGS[@]}"
}
echo "link: veth between two namespaces, tc tbf rate $RATE each way, $(nproc) CPU cores"
rank 1 "$B" vB >"${RANK1_LOG:-/dev/null}" 2>&1 &
other=$!
rank 0 "$A" vA 2>/dev/null
wait "$other"
