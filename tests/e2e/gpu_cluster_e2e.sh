#!/usr/bin/env bash
# GPU workers in one expert-parallel cluster on ONE GPU, end to end: a coordinator and N
# `joule-worker --device cuda:0` processes sharing the GPU (expert rows through CUDA IPC windows
# in device memory, counts and barriers over UCX) must give the greedy tokens of one GPU worker
# (N = 1), started by the same run on the same GPU:
#   --payload f32   identical tokens for every prompt (the single-GPU engine's bits);
#   --payload bf16  rows rounded to BF16 once per token: reports the fraction of sequences and of
#                   tokens identical to N = 1; fails only on errors and missing output.
# Per model, every prompt is sent alone first (one rank holds the request and the others step
# with empty batches: the rank-idle case; the router cannot pin a rank, the least loaded one
# takes it), then all at once, with prompt lengths 1-100 and 3-24 output tokens, so ranks hold
# several requests and finish at different times (at least two ranks must serve). A prompt whose
# tokens one GPU worker changes between alone and together (a batch-dependent GPU kernel) is
# compared alone only, and says so. Every worker of N > 1 must log its row path: BF16 "rows
# through device windows"; F32 device windows or the host-staged all-to-all that F32 payloads on
# one host take (docs/architecture.md).
#
#   gpu_cluster_e2e.sh BUILD_DIR PAYLOADS SIZES [CUDA]
#     PAYLOADS  f32, bf16 or f32,bf16
#     SIZES     cluster sizes to compare with N = 1, e.g. 2,4 (a 1 in the list is the baseline,
#               which always runs first, once per model); a size with a t (2t) runs its workers
#               with --two-batch-overlap (each MoE layer as two interleaved micro-batches)
#     CUDA      ON|OFF: whether the build has the CUDA backend (ctest passes JOULE_HAVE_CUDA)
# With f32 payloads each cluster of N > 1 then changes its placement while serving: a rebalance
# with 2 replicas per MoE layer, then kill -9 of the last worker started (the others regroup);
# every prompt alone after each must still give one GPU worker's tokens
# (E2E_PLACEMENT_CHANGES=0: not).
#   BUILD_DIR is a build tree or a tests/gpu bundle (.gpu/: binaries in bin/, libraries from
#   tests/gpu/env.sh, tiny models in models/).
# Environment: E2E_FAMILIES (qwen3_moe deepseek_v3: BUILD_DIR/models/<family>-tiny),
#   E2E_DEVICE (cuda:0; fake: the fake device in joule-worker-fake-device, no GPU needed — the
#   GPU worker's process path on the CPU, what CI runs), E2E_KV_CACHE_MB (64, per worker), E2E_LOG_DIR (copy every process's log
#   there), UCX_TLS (shm,self), JOULE_E2E_SKIP_RC (77).
# Without a GPU (nvidia-smi lists none) or without the CUDA backend it prints "needs a GPU" and
# exits 77 (ctest's SKIP_RETURN_CODE); under JOULE_REQUIRE_GPU=1 (tests/gpu/run.sh) that is a
# failure instead.
set -euo pipefail
BUILD="$1"
PAYLOADS="$2"
SIZES="$3"
CUDA="${4:-ON}"
SKIP_RC="${JOULE_E2E_SKIP_RC:-77}"
FAMILIES="${E2E_FAMILIES:-qwen3_moe deepseek_v3}"
CHANGES="${E2E_PLACEMENT_CHANGES:-1}"
DEVICE="${E2E_DEVICE:-cuda:0}"
KV_CACHE_MB="${E2E_KV_CACHE_MB:-64}"
here="$(cd "$(dirname "$0")" && pwd)"

skip() {
  if [ "${JOULE_REQUIRE_GPU:-0}" = 1 ]; then
    echo "FAIL: JOULE_REQUIRE_GPU=1 but this test needs a GPU: $*" >&2
    exit 1
  fi
  echo "SKIP: needs a GPU: $*"
  exit "$SKIP_RC"
}
if [ "$DEVICE" = fake ]; then
  # The fake device (tests only): the GPU worker's process path on the CPU, in joule-worker-fake-device.
  export E2E_WORKER_BIN="$BUILD/worker/service/joule-worker-fake-device"
  [ -x "$E2E_WORKER_BIN" ] || { echo "FAIL: no $E2E_WORKER_BIN" >&2; exit 1; }
  GPU_NAME="the fake device (CPU kernels behind an asynchronous GPU-like backend)"
else
  [ "$CUDA" = ON ] || skip "this build has no CUDA backend"
  command -v nvidia-smi >/dev/null 2>&1 || skip "no nvidia-smi"
  nvidia-smi -L 2>/dev/null | grep -q '^GPU ' || skip "nvidia-smi lists no GPU"
  GPU_NAME="$(nvidia-smi -L | head -1)"
fi
for p in ${PAYLOADS//,/ }; do
  [[ "$p" =~ ^(f32|bf16)$ ]] || { echo "PAYLOADS: f32, bf16 or f32,bf16, got '$PAYLOADS'" >&2; exit 2; }
done
for n in ${SIZES//,/ }; do
  [[ "$n" =~ ^[1-9][0-9]*t?$ ]] || { echo "SIZES: cluster sizes like 2,4,2t, got '$SIZES'" >&2; exit 2; }
done

# The numbers are under test here, not TLS (a GPU host may lack openssl).
export E2E_INSECURE="${E2E_INSECURE:-1}"
export UCX_TLS="${UCX_TLS:-shm,self}" UCX_WARN_UNUSED_ENV_VARS=n
# shellcheck source=tests/e2e/cluster_lib.sh
source "$here/cluster_lib.sh"
MODELS="$BUILD/models"

# A bundle keeps its binaries in bin/ and its libraries apart: lay them out as a build tree does,
# each a wrapper that gives only our binary the bundle's libraries (the host's tools keep theirs).
if [ -d "$BUILD/bin" ] && [ ! -d "$BUILD/worker" ]; then
  if [ -z "${JOULE_GPU_LD:-}" ]; then
    export JOULE_GPU_BUNDLE
    JOULE_GPU_BUNDLE="$(cd "$BUILD" && pwd)"
    # shellcheck source=tests/gpu/env.sh
    source "$here/../gpu/env.sh"
    joule_gpu_find_libraries || true  # env.sh is for scripts without set -e (find fails on absent dirs)
  fi
  tree="$E2E_TMP/tree"
  for b in coordinator/joule-coordinator coordinator/cli/joule-cli worker/service/joule-worker; do
    real="$(cd "$BUILD/bin" && pwd)/$(basename "$b")"
    [ -x "$real" ] ||
      e2e_fail "$(basename "$b") is not in the bundle $BUILD: tests/gpu/bundle.sh must pack joule-coordinator, joule-worker and joule-cli"
    mkdir -p "$tree/$(dirname "$b")"
    printf '#!/usr/bin/env bash\nLD_LIBRARY_PATH=%q exec %q "$@"\n' "$JOULE_GPU_LD" "$real" >"$tree/$b"
    chmod +x "$tree/$b"
  done
  BUILD="$tree"
fi

keep_logs() {
  if [ -n "${E2E_LOG_DIR:-}" ]; then
    mkdir -p "$E2E_LOG_DIR"
    cp "$E2E_TMP"/*.err "$E2E_TMP"/*.out "$E2E_LOG_DIR"/ 2>/dev/null || true
  fi
}
trap 'keep_logs; e2e_cleanup' EXIT

# Stops every process started so far; a GPU worker must be gone before the next cluster starts.
stop_all() {
  local pid
  for pid in "${E2E_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 60); do
    local alive=0
    for pid in "${E2E_PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    if [ "$alive" = 0 ]; then break; fi
    sleep 0.25
  done
  for pid in "${E2E_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  E2E_PIDS=()
}

# wait_ready ADDR N: like e2e_wait_ready with room for GPU start-up (CUDA contexts, weights,
# decode graphs), failing at once with the log of a process that exited.
wait_ready() {
  local addr="$1" n="$2" i
  for _ in $(seq 1 480); do
    if [ "$("$BUILD/coordinator/cli/joule-cli" status --coordinator "$addr" 2>/dev/null | grep -c ': ready')" = "$n" ]; then
      return 0
    fi
    for i in "${!E2E_PIDS[@]}"; do
      kill -0 "${E2E_PIDS[$i]}" 2>/dev/null ||
        e2e_fail "a process of the cluster at $addr exited before it was ready (pid ${E2E_PIDS[$i]})"
    done
    sleep 0.25
  done
  "$BUILD/coordinator/cli/joule-cli" status --coordinator "$addr" >&2 || true
  e2e_fail "cluster at $addr did not become ready with $n ranks in 120 s"
}

# Prompts of 1 to 100 tokens (ids inside every tiny vocabulary) and outputs of 3 to 24 tokens.
ids() {  # ids LEN SEED: LEN token ids, comma separated
  local len="$1" seed="$2" k list=()
  for k in $(seq 0 $((len - 1))); do list+=($(( (seed + 37 * k + k * k) % 250 + 1 ))); done
  (IFS=,; echo "${list[*]}")
}
prompts=("9" "1,2,3,4,5" "72,101,108,108,111,44,32,119,111,114,108,100" "$(ids 40 3)" "$(ids 100 11)")
max_tokens=(24 6 16 3 12)

# generate ADDR PROMPT_INDEX OUT: greedy tokens into OUT, the rank that served into OUT.rank.
generate() {
  local addr="$1" i="$2" out="$3"
  "$BUILD/coordinator/cli/joule-cli" generate --coordinator "$addr" --prompt-ids "${prompts[$i]}" \
    --max-tokens "${max_tokens[$i]}" --temperature 0 --timeout-s 60 >"$out.raw" 2>"$out.cli" || true
  { grep -E '^[0-9]+$' "$out.raw" || true; } | paste -sd, - >"$out"
  sed -n 's/.* served by rank \([0-9]*\):.*/\1/p' "$out.cli" >"$out.rank"
  [ -s "$out" ] || e2e_fail "no tokens for prompt $i from $addr: $(tail -2 "$out.cli")"
}

# serve FAMILY N PAYLOAD: a cluster of N GPU workers; every prompt alone, then all together.
# Results in $E2E_TMP/res/FAMILY.epN.PAYLOAD.{alone,together}.I
serve() {
  local family="$1" n="$2" payload="$3" tag r i clients=()
  local model="$MODELS/$family-tiny" workers="${2%t}" flags=()
  [ "$n" = "$workers" ] || flags=(--two-batch-overlap)
  tag="$family.ep$n.$payload"
  [ -f "$model/config.json" ] || e2e_fail "no tiny model at $model"
  e2e_start_coordinator "" "$model" "$workers"
  local addr="127.0.0.1:$E2E_PORT"
  for r in $(seq 0 $((workers - 1))); do
    e2e_start_worker "" "$tag.w$r" "$addr" "$model" --device "$DEVICE" --payload "$payload" \
      --gpu-memory-utilization 0 --kv-cache-mb "$KV_CACHE_MB" "${flags[@]}"
  done
  wait_ready "$addr" "$workers"
  mkdir -p "$E2E_TMP/res"
  for i in "${!prompts[@]}"; do generate "$addr" "$i" "$E2E_TMP/res/$tag.alone.$i"; done
  for i in "${!prompts[@]}"; do
    generate "$addr" "$i" "$E2E_TMP/res/$tag.together.$i" &
    clients+=($!)
  done
  for pid in "${clients[@]}"; do wait "$pid" || e2e_fail "$tag: a concurrent request failed"; done
  if [ "$workers" -gt 1 ]; then
    local ranks
    ranks="$(cat "$E2E_TMP/res/$tag.together".*.rank | sort -u | paste -sd' ' -)"
    [ "$(wc -w <<<"$ranks")" -ge 2 ] || e2e_fail "$tag: the concurrent prompts were all served by rank(s) [$ranks]"
    echo "$tag: concurrent prompts served by ranks $ranks"
    for r in $(seq 0 $((workers - 1))); do
      local log="$E2E_TMP/$tag.w$r.err" path
      if [ ${#flags[@]} -gt 0 ] && ! grep -q "two micro-batches per MoE layer" "$log"; then
        e2e_fail "$tag: worker $r did not log two micro-batches per MoE layer"
      fi
      path="$(grep -o 'rows through [a-z -]*[a-z]' "$log" | head -1 || true)"
      case "$payload:$path" in
        "bf16:rows through device windows" | "f32:rows through device windows" | \
        "f32:rows through host-staged all-to-all") ;;
        *) e2e_fail "$tag: worker $r logged '${path:-no row path}' (expected rows through device windows$(
             [ "$payload" = f32 ] && echo ' or the host-staged all-to-all'))" ;;
      esac
      if [ "$r" = 0 ]; then echo "$tag: $path"; fi
    done
  fi
  if [ "$CHANGES" = 1 ] && [ "$workers" -gt 1 ] && [ "$payload" = f32 ]; then
    change_placement "$tag" "$addr" "$workers"
  fi
  stop_all
  mv "$E2E_TMP/coordinator.err" "$E2E_TMP/$tag.coordinator.err"  # the next cluster's goes there
}

# wait_log FILE PATTERN: until FILE has a line matching PATTERN (30 s); 1 if it never does.
wait_log() {
  local file="$1" pattern="$2"
  for _ in $(seq 1 120); do
    grep -q -- "$pattern" "$file" 2>/dev/null && return 0
    sleep 0.25
  done
  return 1
}

# change_placement TAG ADDR N: the GPU path's placement changes on a serving cluster. A
# rebalance with 2 replicas per MoE layer (the replicas' ranks load them: new executors whose
# experts the device store uploads, the kept ones reused), then kill -9 of the last worker
# started (the survivors regroup and take its experts). After each, every prompt alone again
# ($tag.rebalanced.I, $tag.regrouped.I: compared with one GPU worker by compare()). A failure
# is recorded in change_failures (the run goes on, so a GPU run still reports every size).
change_failures=()
change_placement() {
  local tag="$1" addr="$2" n="$3" r i
  if ! "$BUILD/coordinator/cli/joule-cli" rebalance --coordinator "$addr" --redundant-experts 2 >/dev/null; then
    change_failures+=("$tag: joule-cli rebalance failed")
    return
  fi
  for r in $(seq 0 $((n - 1))); do
    if ! wait_log "$E2E_TMP/$tag.w$r.err" "applied placement epoch 2"; then
      change_failures+=("$tag: worker $r did not apply the rebalance within 30 s")
      return
    fi
  done
  grep -h "bytes uploaded for this placement" "$E2E_TMP/$tag".w*.err | sed 's/^[^]]*] /  /' | head -4
  for i in "${!prompts[@]}"; do generate "$addr" "$i" "$E2E_TMP/res/$tag.rebalanced.$i"; done
  kill -KILL "${E2E_PIDS[-1]}"
  if ! wait_log "$E2E_TMP/coordinator.err" "serves again"; then
    change_failures+=("$tag: the survivors of a kill -9 did not serve again within 30 s")
    return
  fi
  for i in "${!prompts[@]}"; do generate "$addr" "$i" "$E2E_TMP/res/$tag.regrouped.$i"; done
  echo "$tag: rebalanced (2 replicas per MoE layer), then regrouped after a kill -9"
}

# compare FAMILY N PAYLOAD: against the baseline; prints one summary line, counts f32 failures.
f32_failures=()
summary=()
compare() {
  local family="$1" n="$2" payload="$3" i phase want got same=0 total=0 tok_same=0 tok_total=0 k w g
  local base="$E2E_TMP/res/$family.ep1.${PAYLOAD_LIST[0]}" tag="$E2E_TMP/res/$family.ep$n.$payload"
  local notes="" label="EP ${n%t}"
  [ "$n" = "${n%t}" ] || label+=" (two-batch overlap)"
  local phases=(alone together)
  [ -f "$tag.rebalanced.0" ] && phases+=(rebalanced)
  [ -f "$tag.regrouped.0" ] && phases+=(regrouped)
  for i in "${!prompts[@]}"; do
    for phase in "${phases[@]}"; do
      want="$(cat "$base.$phase.$i" 2>/dev/null || cat "$base.alone.$i")"
      got="$(cat "$tag.$phase.$i")"
      if [ "$phase" = together ] && [ "$want" != "$(cat "$base.alone.$i")" ]; then
        notes+=" prompt $i: one GPU worker gives other tokens in a batch than alone, compared alone only;"
        continue
      fi
      total=$((total + 1))
      IFS=, read -r -a w <<<"$want"
      IFS=, read -r -a g <<<"$got"
      tok_total=$((tok_total + ${#w[@]}))
      for k in "${!w[@]}"; do  # tokens up to the first difference
        [ "${w[$k]}" = "${g[$k]:-}" ] || break
        tok_same=$((tok_same + 1))
      done
      if [ "$got" = "$want" ]; then
        same=$((same + 1))
      elif [ "$payload" = f32 ]; then
        f32_failures+=("$family $label f32, prompt $i $phase: [$got], one GPU worker [$want]")
      fi
    done
  done
  summary+=("$family $label $payload: $same/$total sequences identical to EP 1, $tok_same/$tok_total tokens before the first difference ($(( 100 * tok_same / tok_total ))%)${notes:+;$notes}")
  echo "${summary[-1]}"
}

IFS=, read -r -a PAYLOAD_LIST <<<"$PAYLOADS"
IFS=, read -r -a SIZE_LIST <<<"$SIZES"
echo "GPU: $GPU_NAME; families: $FAMILIES; payloads: $PAYLOADS; sizes: 1 + $SIZES on $DEVICE"
for family in $FAMILIES; do
  # The baseline: one GPU worker (its payload flag moves no rows: it runs its experts itself).
  serve "$family" 1 "${PAYLOAD_LIST[0]}"
  for payload in "${PAYLOAD_LIST[@]}"; do
    for n in "${SIZE_LIST[@]}"; do
      [ "$n" = 1 ] && continue
      serve "$family" "$n" "$payload"
      compare "$family" "$n" "$payload"
    done
  done
done
echo "----- summary"
[ ${#summary[@]} -gt 0 ] || summary=("only one GPU worker ran: SIZES named no cluster to compare with it")
printf '%s\n' "${summary[@]}"
if [ ${#change_failures[@]} -gt 0 ]; then
  printf '%s\n' "${change_failures[@]}" >&2
  e2e_fail "${#change_failures[@]} placement change(s) failed"
fi
if [ ${#f32_failures[@]} -gt 0 ]; then
  printf '%s\n' "${f32_failures[@]}" >&2
  e2e_fail "${#f32_failures[@]} f32 sequence(s) differ from one GPU worker's"
fi
echo "PASS: GPU clusters of 1 + $SIZES workers on one GPU ($FAMILIES; $PAYLOADS): f32 identical to one GPU worker$(
  [[ ",$PAYLOADS," == *,bf16,* ]] && echo '; bf16 fractions above')"
