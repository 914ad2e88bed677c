#!/usr/bin/env bash
# Multi-host for real, on one machine: the coordinator and each worker run in
# their own network namespace ("host"), joined by veth pairs to a bridge in a
# further namespace, so every byte between them crosses a network interface
# (UCX over TCP). Tokens must equal the single-process engine's.
#   netns_e2e.sh BUILD_DIR MODEL_DIR WORKERS [linkdown]
# linkdown: instead, chaos_e2e.py (in the coordinator's namespace) takes one
# worker's link down while 32 streams run; every request must still complete.
# Needs root (ip netns); exits 77 (ctest: skipped) where namespaces cannot be made.
set -euo pipefail
BUILD="$1"
MODEL="$2"
WORKERS="$3"
MODE="${4:-tokens}"
source "$(dirname "$0")/cluster_lib.sh"

tag="j$$"
bridge_ns="${tag}br"
hosts=("${tag}c")
for r in $(seq 0 $((WORKERS - 1))); do hosts+=("${tag}w$r"); done
subnet="10.231.$(( $$ % 200 + 20 ))"
# The certificate must name every "host" address that peers dial over TLS.
e2e_secure $(for i in "${!hosts[@]}"; do echo "IP:$subnet.$((i + 1))"; done)

netns_cleanup() {
  e2e_cleanup
  for ns in "${hosts[@]}" "$bridge_ns"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap netns_cleanup EXIT

if ! ip netns add "$bridge_ns" 2>/dev/null; then
  echo "SKIP: cannot create network namespaces here (needs root and CAP_SYS_ADMIN)"
  exit 77
fi
ip -n "$bridge_ns" link add br0 type bridge
ip -n "$bridge_ns" link set br0 up
for i in "${!hosts[@]}"; do
  ns="${hosts[$i]}"
  ip netns add "$ns"
  ip link add eth0 netns "$ns" type veth peer name "p$i" netns "$bridge_ns"
  ip -n "$bridge_ns" link set "p$i" master br0 up
  ip -n "$ns" addr add "$subnet.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
done
in_ns() { echo "ip netns exec $1"; }

if [ "$MODE" = linkdown ]; then
  # Longer streams: taking a link down runs a process (ip), which a loaded
  # machine may start late; the streams must still be running by then.
  ip netns exec "${hosts[0]}" /usr/bin/python3 "$(dirname "$0")/chaos_e2e.py" "$BUILD" "$MODEL" \
    --workers "$WORKERS" --fault link --netns "$tag" --subnet "$subnet" --max-tokens 320
  exit $?
fi

# UCX over TCP on the namespace's interface only: no shared memory between "hosts".
export UCX_TLS=tcp,self UCX_NET_DEVICES=eth0 UCX_WARN_UNUSED_ENV_VARS=n
coordinator_ip="$subnet.1"
# Each "host" listens on its namespace's interface, as multi-host deployments
# must (the default, 127.0.0.1, is reachable from the same host only).
e2e_start_coordinator "$(in_ns "${hosts[0]}")" "$MODEL" "$WORKERS" --grpc-host "$coordinator_ip"
addr="$coordinator_ip:$E2E_PORT"
for r in $(seq 0 $((WORKERS - 1))); do
  e2e_start_worker "$(in_ns "${hosts[$((r + 1))]}")" "w$r" "$addr" "$MODEL" \
    --grpc-host 0.0.0.0 --advertise-host "$subnet.$((r + 2))"
done
e2e_wait_ready "$(in_ns "${hosts[0]}")" "$addr" "$WORKERS"

# Traffic really crosses the veths: bytes worker 0's port received on the bridge.
bytes() { ip -n "$bridge_ns" -s link show p1 | awk '/RX:/{getline; print $1}'; }
before="$(bytes)"
prompts=("1,2,3,4,5" "72,101,108,108,111" "257,115,121,115,10")
for i in "${!prompts[@]}"; do
  got="$(e2e_cluster_tokens "$(in_ns "${hosts[0]}")" "$addr" "${prompts[$i]}" 8)"
  want="$(e2e_engine_tokens "$MODEL" "${prompts[$i]}" 8)"
  [ -n "$want" ] || e2e_fail "single-process engine produced nothing"
  [ "$got" = "$want" ] || e2e_fail "prompt $i: cluster across namespaces gave [$got], engine gave [$want]"
done
after="$(bytes)"
crossed=$((after - before))
# Every MoE layer of every step sends activations between the workers.
[ "$crossed" -gt 10000 ] || e2e_fail "only $crossed bytes left worker 0's namespace: expert traffic did not cross the network"
echo "PASS: $WORKERS workers in separate network namespaces (UCX tcp over veth, $crossed bytes from worker 0 during requests): tokens match the single-process engine"
