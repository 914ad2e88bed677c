#!/usr/bin/env bash
# ctest e2e_openai_sdk: the official OpenAI SDK (npm "openai", pinned by package-lock.json,
# installed into BUILD_DIR/openai-sdk once) against a real coordinator and one joule-worker:
# chat and completions log probabilities (streamed and not), echo, n, best_of, several
# prompts, penalties, logit_bias and the 400s of their limits (check.mjs).
#   openai_sdk_e2e.sh BUILD_DIR MODEL_DIR [WORKERS]   (expert-parallel ranks, default 1)
set -euo pipefail
BUILD="$(cd "$1" && pwd)"
MODEL="$2"
WORKERS="${3:-1}"
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/../../deploy/local/common.sh"
joule_require "node npm" "${JOULE_NODE_PACKAGES[@]}"
work="$BUILD/openai-sdk"
mkdir -p "$work"
if ! cmp -s "$HERE/package-lock.json" "$work/package-lock.json" || [ ! -d "$work/node_modules/openai" ]; then
  cp "$HERE/package.json" "$HERE/package-lock.json" "$work/"
  (cd "$work" && npm ci --no-audit --no-fund --loglevel=error)
fi
cp "$HERE/check.mjs" "$work/"

export UCX_TLS=shm,self
source "$HERE/../e2e/cluster_lib.sh"
MAX_LOGIT_BIAS=8
e2e_start_coordinator "" "$MODEL" "$WORKERS" --http-port 0 --http-port-file "$E2E_TMP/http_port" \
  --max-logit-bias-entries "$MAX_LOGIT_BIAS"
addr="127.0.0.1:$E2E_PORT"
for r in $(seq 0 $((WORKERS - 1))); do e2e_start_worker "" "w$r" "$addr" "$MODEL"; done
e2e_wait_ready "" "$addr" "$WORKERS"
vocab="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$MODEL/config.json")"
# The special tokens' ids, and the BOS a Llama-class tokenizer_config.json adds (DeepSeek-V3).
read -r bos specials < <(python3 - "$MODEL" <<'PY'
import json, os, sys
d = sys.argv[1]
ids = {t["content"]: t["id"] for t in json.load(open(f"{d}/tokenizer.json")).get("added_tokens", [])}
cfg = json.load(open(f"{d}/tokenizer_config.json")) if os.path.exists(f"{d}/tokenizer_config.json") else {}
adds = "Llama" in str(cfg.get("tokenizer_class", "")) and cfg.get("add_bos_token", True)
print(ids.get(cfg.get("bos_token"), -1) if adds else -1, ",".join(str(i) for i in sorted(ids.values())))
PY
)
node "$work/check.mjs" --port "$(cat "$E2E_TMP/http_port")" --model "$(basename "$MODEL")" --vocab "$vocab" \
  --max-logit-bias "$MAX_LOGIT_BIAS" --bos "$bos" --specials "$specials" || e2e_fail "OpenAI SDK checks failed"
echo "PASS: the OpenAI SDK against $(basename "$MODEL") at EP $WORKERS"
