#!/usr/bin/env bash
# Gathers what the runtime image needs from a build: the four binaries, every shared library
# they (and UCX's transport modules, which UCX loads at run time) resolve except those of the
# C/C++ runtime that every Debian 12 base has, and the CUDA libraries when the build used CUDA.
#   deploy/docker/collect.sh BUILD_DIR OUT_DIR   -> OUT_DIR/bin, OUT_DIR/lib, OUT_DIR/lib/ucx
set -euo pipefail
build="${1:?usage: collect.sh BUILD_DIR OUT_DIR}"
out="${2:?usage: collect.sh BUILD_DIR OUT_DIR}"
bins=(coordinator/joule-coordinator worker/service/joule-worker coordinator/cli/joule-cli
      worker/tools/joule-make-model)
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib/ucx"
for b in "${bins[@]}"; do
  [ -x "$build/$b" ] || { echo "collect.sh: no $build/$b (build the project first)" >&2; exit 1; }
  cp "$build/$b" "$out/bin/"
done
# UCX finds its transport modules in <dir of libucs>/ucx; a module whose own libraries are
# missing here (InfiniBand without rdma-core) is skipped by UCX at run time.
ucx_modules="$(dirname "$(ldd "$build/worker/service/joule-worker" | awk '/libucs\.so/ {print $3}')")/ucx"
[ -d "$ucx_modules" ] && cp -L "$ucx_modules"/*.so.0 "$out/lib/ucx/"

# Every library resolved, minus glibc, libstdc++ and libgcc (the base image's own).
for f in "$out"/bin/* "$out"/lib/ucx/*; do ldd "$f" 2>/dev/null || true; done |
  awk '$3 ~ /^\// {print $3}' | sort -u |
  grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|libgcc_s|libstdc\+\+|ld-linux-x86-64)\.so' |
  while read -r lib; do cp -L "$lib" "$out/lib/"; done
du -sh "$out" >&2
