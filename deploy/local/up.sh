#!/usr/bin/env bash
# Installs what is missing, builds, makes the built-in tiny model if absent and
# runs it. Until the cluster lands (coordinator + workers, HTTP API), this is a
# single-process generation demo: one engine, one prompt, printed tokens/s.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: deploy/local/up.sh [options]
  --model DIR        checkpoint directory (default: build/default/models/qwen3_moe-tiny, made if absent)
  --family NAME      family of the built-in model to make: qwen3_moe | qwen2_moe | mixtral (default qwen3_moe)
  --preset NAME      built-in model size: tiny | mini (default tiny)
  --prompt TEXT      prompt (default: "Joule serves mixture-of-experts models")
  --max-tokens N     tokens to generate (default 32)
  --threads N        CPU threads (default: all cores)
  --no-build         skip package install and build
  -h, --help         this help
USAGE
}

model="" family=qwen3_moe preset=tiny prompt="Joule serves mixture-of-experts models" max_tokens=32
threads=0 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --family) family="$2"; shift 2 ;;
    --preset) preset="$2"; shift 2 ;;
    --prompt) prompt="$2"; shift 2 ;;
    --max-tokens) max_tokens="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [ "$build" = 1 ]; then
  joule_install_packages
  joule_build default
fi
bin="$JOULE_ROOT/build/default"
if [ -z "$model" ]; then
  model="$bin/models/$family-$preset"
  if [ ! -f "$model/config.json" ]; then
    "$bin/worker/tools/joule-make-model" --family "$family" --preset "$preset" --out "$model"
  fi
fi

joule_log "model: $model"
joule_log "prompt: $prompt"
joule_log "the built-in models have random weights: expect arbitrary bytes, not English"
"$bin/worker/tools/joule-generate" --model "$model" --prompt "$prompt" \
  --max-tokens "$max_tokens" --threads "$threads" --ignore-eos
