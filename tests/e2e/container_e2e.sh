#!/usr/bin/env bash
# The container image (deploy/docker/Containerfile) builds, and what it holds runs: a Debian 12
# base made with mmdebstrap and imported into podman (no registry is reachable), the image built
# with `podman build --isolation=chroot` from this build's binaries (BINARIES=prebuilt: no second
# compile), its filesystem extracted and, in a chroot of it (containers cannot run here), every
# binary's --help and a one-worker cluster that answers a chat completion over HTTP.
#   container_e2e.sh BUILD_DIR
# Installs podman and mmdebstrap when missing (root); exit 77 (skipped) when not root.
# The base tarball is kept in BUILD_DIR/container-base (made once, ~1 minute).
set -euo pipefail
BUILD="$(cd "$1" && pwd)"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
[ "$(id -u)" = 0 ] || { echo "SKIP: podman build and chroot need root"; exit 77; }
source "$ROOT/deploy/local/common.sh"
joule_install_packages "${JOULE_CONTAINER_PACKAGES[@]}"

T="$(mktemp -d /tmp/joule-image.XXXXXX)"
RFS="$T/rootfs"
IMAGE="localhost/joule:e2e-$$"
cleanup() {
  # Whatever runs in the chroot (the background jobs are subshells around chroot).
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$RFS" ] && kill -KILL "${p#/proc/}" 2>/dev/null
  done
  wait 2>/dev/null || true
  for m in proc dev sys; do umount -R -l "$RFS/$m" 2>/dev/null || true; done
  [ -z "${ctr:-}" ] || podman rm -f "$ctr" >/dev/null 2>&1 || true
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  podman image prune -f >/dev/null 2>&1 || true
  rm -rf "$T" "$ROOT/build/image-stage"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$T"/*.log; do [ -f "$f" ] && { echo "--- $f (tail)" >&2; tail -8 "$f" >&2; }; done
  exit 1
}

base_tar="$BUILD/container-base/debian12-minbase.tar"
if [ ! -f "$base_tar" ]; then
  rm -rf "$base_tar"
  mkdir -p "$(dirname "$base_tar")"
  # mmdebstrap picks the output format from the name: it must end in .tar.
  partial="$(dirname "$base_tar")/partial-debian12-minbase.tar"
  echo "making a Debian 12 base with mmdebstrap"
  mmdebstrap --variant=minbase --mode=root --quiet bookworm "$partial" >"$T/mmdebstrap.log" 2>&1 ||
    fail "mmdebstrap"
  mv "$partial" "$base_tar"
fi
podman image exists localhost/joule-base:12 || podman import --quiet "$base_tar" localhost/joule-base:12 >/dev/null

"$ROOT/deploy/docker/collect.sh" "$BUILD" "$ROOT/build/image-stage"
start=$SECONDS
podman build --isolation=chroot --quiet --build-arg BASE=localhost/joule-base:12 \
  --build-arg BINARIES=prebuilt -f "$ROOT/deploy/docker/Containerfile" -t "$IMAGE" "$ROOT" \
  >"$T/build.log" 2>&1 || fail "podman build"
echo "built $IMAGE in $((SECONDS - start)) s: $(podman image inspect --format '{{.Size}}' "$IMAGE" |
  awk '{printf "%.0f MB", $1 / 1e6}')"
[ "$(podman image inspect --format '{{.Config.User}}' "$IMAGE")" = joule ] || fail "the image runs as root"

ctr="$(podman create "$IMAGE")"
mkdir -p "$RFS"
podman export "$ctr" | tar -x -C "$RFS"
# Slim: the runtime stage has the binaries and their libraries, not the build's tools.
for tool in cmake g++ protoc; do
  [ -z "$(find "$RFS/usr/bin" -name "$tool" 2>/dev/null)" ] || fail "the runtime image has $tool"
done
[ ! -d "$RFS/usr/include/grpcpp" ] || fail "the runtime image has development headers"

in_image() { chroot --userspec=10001:10001 "$RFS" env PATH=/opt/joule/bin:/usr/bin:/bin \
  LD_LIBRARY_PATH=/opt/joule/lib HOME=/var/lib/joule UCX_TLS=self,shm UCX_WARN_UNUSED_ENV_VARS=n "$@"; }
for b in joule-coordinator joule-worker joule-cli joule-make-model; do
  in_image "$b" --help >"$T/$b-help.log" 2>&1 || fail "$b --help in the image"
  grep -q -- "--" "$T/$b-help.log" || fail "$b --help printed no flags"
done
echo "--help of every binary runs in the image"

# A one-worker cluster in the chroot; the HTTP API is reached from here (same network).
for m in proc dev sys; do mount --rbind "/$m" "$RFS/$m"; done  # --rbind: /dev/shm for UCX
work=/var/lib/joule
in_image joule-make-model --family qwen3_moe --preset tiny --out $work/model >"$T/make-model.log" 2>&1 ||
  fail "joule-make-model in the image"
in_image joule-coordinator --model $work/model --workers 1 --port 0 --port-file $work/port \
  --http-port 0 --http-port-file $work/http_port >"$T/coordinator.log" 2>&1 &
for _ in $(seq 1 100); do [ -s "$RFS$work/port" ] && [ -s "$RFS$work/http_port" ] && break; sleep 0.1; done
[ -s "$RFS$work/http_port" ] || fail "the coordinator in the image did not start"
in_image joule-worker --coordinator "127.0.0.1:$(cat "$RFS$work/port")" --model $work/model \
  --threads 1 --kv-cache-mb 32 >"$T/worker.log" 2>&1 &
url="http://127.0.0.1:$(cat "$RFS$work/http_port")"
for _ in $(seq 1 300); do curl -sf -o /dev/null "$url/ready" && break; sleep 0.2; done
curl -sf -o /dev/null "$url/ready" || fail "the cluster in the image did not become ready"
served="$(curl -sf "$url/v1/models" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
reply="$(curl -s -H 'Content-Type: application/json' -d "{\"model\": \"$served\",
  \"messages\": [{\"role\": \"user\", \"content\": \"hello from the image\"}], \"max_tokens\": 5}" \
  "$url/v1/chat/completions")" || fail "chat completion: curl failed"
/usr/bin/python3 -c 'import json, sys; r = json.loads(sys.argv[1]); assert r["usage"]["completion_tokens"] > 0, r' \
  "$reply" || fail "unexpected answer: $reply"
echo "PASS: the image builds and serves a chat completion from a chroot of it"
