#!/usr/bin/env bash
# joule-worker --transport nccl end to end.
#
#   nccl_cluster_e2e.sh BUILD_DIR MODEL_DIR ep2 NCCL
#     Two GPU workers (--device cuda:0 / cuda:1 --transport nccl) must give the
#     greedy tokens one GPU worker gives alone (a one-rank cluster), for prompts
#     served concurrently by both ranks; then again after kill -9 of the second
#     (the first serves alone: group epoch 2) and after a new worker on cuda:1
#     joins (epoch 3: a new NCCL communicator). Needs 2 GPUs and a CUDA + NCCL build
#     (NCCL = ON): otherwise it skips (exit 77, ctest's SKIP_RETURN_CODE) saying
#     "needs 2 GPUs, found N". Under JOULE_REQUIRE_GPU=1 (tests/gpu/run.sh) no
#     GPU at all is a failure; JOULE_E2E_SKIP_RC sets the skip status (run.sh
#     passes 0, as a gtest's GTEST_SKIP passes there on a one-GPU host).
#
#   nccl_cluster_e2e.sh BUILD_DIR MODEL_DIR refusals NCCL
#     On CPUs: two CPU workers with --transport nccl both exit naming both
#     ranks ("--transport nccl needs --device cuda:N"; in a CPU build, NCCL =
#     OFF: "no NCCL transport (CPU build)"), and a --transport ucx worker is
#     refused at registration naming both transports.
#
# BUILD_DIR may be a build tree or a tests/gpu bundle (.gpu/, binaries in bin/).
set -euo pipefail
BUILD="$1"
MODEL="$2"
MODE="$3"
NCCL="${4:-ON}"
SKIP_RC="${JOULE_E2E_SKIP_RC:-77}"
# The transport is under test here, not TLS (a GPU host may lack openssl).
export E2E_INSECURE="${E2E_INSECURE:-1}"

# GPUs this process may use: nvidia-smi's, narrowed by CUDA_VISIBLE_DEVICES.
gpu_count() {
  local n=0 visible
  if command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    visible=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c '[^[:space:]]' || true)
    [ "$visible" -lt "$n" ] && n=$visible
  fi
  echo "$n"
}

if [ "$MODE" = ep2 ]; then
  if [ "$NCCL" != ON ]; then
    echo "SKIP: needs 2 GPUs, found 0 (a CPU build: no CUDA and NCCL)"
    exit "$SKIP_RC"
  fi
  gpus=$(gpu_count)
  if [ "$gpus" -lt 2 ]; then
    if [ "$gpus" -eq 0 ] && [ "${JOULE_REQUIRE_GPU:-0}" = 1 ]; then
      echo "FAIL: JOULE_REQUIRE_GPU=1 but nvidia-smi lists no GPU" >&2
      exit 1
    fi
    echo "SKIP: needs 2 GPUs, found $gpus"
    exit "$SKIP_RC"
  fi
fi

source "$(dirname "$0")/cluster_lib.sh"

# A bundle keeps its binaries in bin/: lay them out as a build tree does.
if [ -d "$BUILD/bin" ] && [ ! -d "$BUILD/worker" ]; then
  tree="$E2E_TMP/tree"
  mkdir -p "$tree/coordinator/cli" "$tree/worker/service"
  for b in coordinator/joule-coordinator coordinator/cli/joule-cli worker/service/joule-worker; do
    [ -x "$BUILD/bin/$(basename "$b")" ] ||
      e2e_fail "$(basename "$b") is not in the bundle $BUILD: tests/gpu/bundle.sh must pack joule-coordinator, joule-worker and joule-cli"
    ln -s "$(cd "$BUILD/bin" && pwd)/$(basename "$b")" "$tree/$b"
  done
  BUILD="$tree"
fi

# Stops every process started so far and waits for them (a GPU worker frees its device).
stop_all() {
  for pid in "${E2E_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${E2E_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  E2E_PIDS=()
}

# wait_ready ADDR N SECONDS: like e2e_wait_ready, with room for GPU start-up
# (weights, graphs, the NCCL communicator); fails at once when a worker died.
wait_ready() {
  local addr="$1" n="$2" seconds="$3"
  for _ in $(seq 1 $((seconds * 4))); do
    if [ "$("$BUILD/coordinator/cli/joule-cli" status --coordinator "$addr" 2>/dev/null | grep -c ': ready')" = "$n" ]; then
      return 0
    fi
    for pid in "${E2E_PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || e2e_fail "a process of the cluster at $addr exited (pid $pid)"
    done
    sleep 0.25
  done
  "$BUILD/coordinator/cli/joule-cli" status --coordinator "$addr" >&2 || true
  e2e_fail "cluster at $addr did not become ready with $n ranks in $seconds s"
}

prompts=("1,2,3,4,5" "72,101,108,108,111,44,32,119,111,114,108,100" "257,115,121,115,116,101,109,10" "9")
n=10

# generate_all ADDR TAG: every prompt concurrently (several ranks hold requests in one step).
generate_all() {
  local addr="$1" tag="$2" clients=() i
  for i in "${!prompts[@]}"; do
    e2e_cluster_tokens "" "$addr" "${prompts[$i]}" $n >"$E2E_TMP/$tag.$i" &
    clients+=($!)
  done
  for pid in "${clients[@]}"; do wait "$pid" || true; done
}

# expect_single TAG WHAT: TAG's tokens for every prompt are the one GPU worker's.
expect_single() {
  local tag="$1" what="$2" i want got
  for i in "${!prompts[@]}"; do
    want="$(cat "$E2E_TMP/single.$i")"
    got="$(cat "$E2E_TMP/$tag.$i")"
    [ -n "$want" ] || e2e_fail "the one-GPU cluster produced nothing for prompt $i"
    [ "$got" = "$want" ] || e2e_fail "prompt $i: $what gave [$got], one GPU worker [$want]"
  done
}

# wait_group_epoch ADDR EPOCH READY SECONDS: until joule-cli status shows group epoch EPOCH
# with READY ranks ready.
wait_group_epoch() {
  local addr="$1" epoch="$2" ready="$3" seconds="$4" status=""
  for _ in $(seq 1 $((seconds * 4))); do
    status="$("$BUILD/coordinator/cli/joule-cli" status --coordinator "$addr" 2>/dev/null || true)"
    if grep -q "^group_epoch: $epoch\b" <<<"$status" && [ "$(grep -c ': ready' <<<"$status")" = "$ready" ]; then
      return 0
    fi
    sleep 0.25
  done
  echo "$status" >&2
  e2e_fail "no group epoch $epoch with $ready ready rank(s) within $seconds s"
}

case "$MODE" in
ep2)
  # The reference: one GPU worker alone.
  e2e_start_coordinator "" "$MODEL" 1
  e2e_start_worker "" single "127.0.0.1:$E2E_PORT" "$MODEL" --device cuda:0
  wait_ready "127.0.0.1:$E2E_PORT" 1 120
  generate_all "127.0.0.1:$E2E_PORT" single
  stop_all

  # Two GPU workers over NCCL.
  e2e_start_coordinator "" "$MODEL" 2 --transport nccl
  addr="127.0.0.1:$E2E_PORT"
  e2e_start_worker "" w0 "$addr" "$MODEL" --device cuda:0 --transport nccl
  e2e_start_worker "" w1 "$addr" "$MODEL" --device cuda:1 --transport nccl
  wait_ready "$addr" 2 180
  for w in w0 w1; do
    grep -q "nccl+staged transport connected to 1 peer(s)" "$E2E_TMP/$w.err" ||
      e2e_fail "$w did not log its NCCL transport"
  done
  generate_all "$addr" ep2
  expect_single ep2 "two GPU workers over NCCL"
  echo "EP=2 over NCCL (cuda:0, cuda:1) $(basename "$MODEL"): ${#prompts[@]} prompts match one GPU worker"

  # The group re-forms over NCCL: kill -9 of w1 (w0 serves alone in group epoch 2, a one-rank
  # communicator), then a new worker on cuda:1 joins (epoch 3: a new two-rank communicator
  # whose unique id the epoch's rendezvous carries). Every prompt must still match.
  kill -KILL "${E2E_PIDS[-1]}"
  wait "${E2E_PIDS[-1]}" 2>/dev/null || true
  wait_group_epoch "$addr" 2 1 60
  generate_all "$addr" after_kill
  expect_single after_kill "w0 alone after w1's kill -9 (group epoch 2)"
  e2e_start_worker "" w1b "$addr" "$MODEL" --device cuda:1 --transport nccl
  wait_group_epoch "$addr" 3 2 180
  generate_all "$addr" rejoined
  expect_single rejoined "w0 and a rejoined w1 over a new NCCL communicator (group epoch 3)"
  echo "PASS: EP=2 over NCCL (cuda:0, cuda:1) $(basename "$MODEL"): ${#prompts[@]} prompts match one GPU worker, also after a kill -9 (1 rank) and a rejoin (2 ranks, a new communicator)"
  ;;

refusals)
  e2e_start_coordinator "" "$MODEL" 2 --transport nccl
  addr="127.0.0.1:$E2E_PORT"
  declare -A pids
  for w in w0 w1; do
    e2e_start_worker "" $w "$addr" "$MODEL" --transport nccl
    pids[$w]=${E2E_PIDS[-1]}
  done
  e2e_start_worker "" ucx "$addr" "$MODEL" --transport ucx
  pids[ucx]=${E2E_PIDS[-1]}
  if [ "$NCCL" = ON ]; then
    # Both ranks see both descriptors and refuse alike, naming both.
    expect=("--transport nccl needs --device cuda:N: ranks 0 (cpu on " "), 1 (cpu on " "compute on a CPU")
  else
    expect=("--transport nccl: this joule-worker has no NCCL transport (CPU build); use --transport ucx")
  fi
  for w in w0 w1 ucx; do
    pid=${pids[$w]}
    for _ in $(seq 1 240); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && e2e_fail "worker $w is still running: expected it to refuse and exit"
    if wait "$pid"; then e2e_fail "worker $w exited 0: expected a refusal"; fi
  done
  for w in w0 w1; do
    for pattern in "${expect[@]}"; do
      grep -qF -- "$pattern" "$E2E_TMP/$w.err" ||
        e2e_fail "worker $w: expected '$pattern' in: $(grep -i 'fail\|error' "$E2E_TMP/$w.err" | tail -3)"
    done
  done
  grep -qF "this worker uses ucx (joule-worker --transport ucx) but the group uses nccl (joule-coordinator --transport nccl" \
    "$E2E_TMP/ucx.err" || e2e_fail "the ucx worker: expected the transport refusal in: $(tail -3 "$E2E_TMP/ucx.err")"
  echo "PASS: --transport nccl refused on CPU workers (NCCL=$NCCL) naming both ranks; a ucx worker refused at registration"
  ;;

*)
  echo "usage: $0 BUILD_DIR MODEL_DIR ep2|refusals [ON|OFF]" >&2
  exit 2
  ;;
esac
