#!/usr/bin/env bash
# The Containerfile's build stage: installs the build's Debian packages, compiles the binaries
# (Release; CUDA when the base has nvcc in /usr/local/cuda) and gathers them with collect.sh.
#   build_in_image.sh SRC_DIR OUT_DIR
set -euo pipefail
src="${1:?}" out="${2:?}"
source "$src/deploy/local/common.sh"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${JOULE_BUILD_PACKAGES[@]}"
cmake -S "$src" -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DJOULE_BUILD_TESTS=OFF -DJOULE_BUILD_BENCH=OFF
cmake --build /build -j "$(nproc)" --target joule-coordinator joule-worker joule-cli joule-make-model
"$src/deploy/docker/collect.sh" /build "$out"
