# Sourced by tests/gpu/run.sh and bench/engine/gpu_run.sh on a GPU host: where the bundle is
# (JOULE_GPU_BUNDLE, default .gpu/ of the repository) and the library path its binaries need
# (JOULE_GPU_LD: the bundle's own libraries, then the host's CUDA runtime, cuBLAS, NCCL and
# NVML). Only our binaries get JOULE_GPU_LD: torch must keep loading its own CUDA libraries.
# shellcheck shell=bash

JOULE_GPU_BUNDLE=${JOULE_GPU_BUNDLE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.gpu}
# The bundle travels packed (bundle.sh writes .gpu.tar.xz beside .gpu/, the device tool carries
# it): unpack it where .gpu/ is absent, or where it came from another archive (a warm machine
# keeps the last call's .gpu/: its .archive-cksum names the archive it was unpacked from). A
# .gpu/ without that file is bundle.sh's own, here: left alone.
if [ -f "$JOULE_GPU_BUNDLE.tar.xz" ]; then
  joule_gpu_cksum=$(cksum < "$JOULE_GPU_BUNDLE.tar.xz")
  if [ ! -d "$JOULE_GPU_BUNDLE/bin" ] || { [ -f "$JOULE_GPU_BUNDLE/.archive-cksum" ] &&
       [ "$(cat "$JOULE_GPU_BUNDLE/.archive-cksum")" != "$joule_gpu_cksum" ]; }; then
    # The archive holds .gpu/ and .bench/ (cpu_dispatch_sweep); checkpoints that the old
    # bundle's joule-make-model wrote (bench/engine/gpu_run.sh, bench/energy/sweep.sh) go too.
    rm -rf "$JOULE_GPU_BUNDLE" "$(dirname "$JOULE_GPU_BUNDLE")/.bench" "${TMPDIR:-/tmp}/joule-bench-models"
    { tar -C "$(dirname "$JOULE_GPU_BUNDLE")" -xJf "$JOULE_GPU_BUNDLE.tar.xz" ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
          "$JOULE_GPU_BUNDLE.tar.xz" "$(dirname "$JOULE_GPU_BUNDLE")"; } &&
      echo "$joule_gpu_cksum" > "$JOULE_GPU_BUNDLE/.archive-cksum"
  fi
  unset joule_gpu_cksum
fi
JOULE_GPU_HOST_LIBS=(libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2 libnvidia-ml.so.1)

# Sets JOULE_GPU_LD, JOULE_GPU_LIBS (one "name: path" line each) and JOULE_GPU_MISSING (names
# not found); exports them.
joule_gpu_find_libraries() {
  local libdirs=$JOULE_GPU_BUNDLE/lib n p sites
  JOULE_GPU_LIBS="" JOULE_GPU_MISSING=""
  # python's site-packages, if there is a python3 (none: no search, as find without a path
  # would search the working directory).
  read -r -a sites <<<"$(python3 -c 'import site; print(*site.getsitepackages())' 2>/dev/null)"
  for n in "${JOULE_GPU_HOST_LIBS[@]}"; do
    p=$(find /usr/local/cuda/lib64/ /usr/local/cuda/ /usr/local/nvidia/ /usr/lib/x86_64-linux-gnu/ /opt/ \
          -name "$n" 2>/dev/null | head -1)
    [ -n "$p" ] || p=$(ldconfig -p 2>/dev/null | awk -v n="$n" '$1 == n {print $NF; exit}')
    # Last, the CUDA wheels beside torch (site-packages/nvidia/*/lib).
    [ -n "$p" ] || [ ${#sites[@]} -eq 0 ] ||
      p=$(find "${sites[@]/%//nvidia/}" -name "$n" 2>/dev/null | head -1)
    JOULE_GPU_LIBS+="$n: ${p:-MISSING}"$'\n'
    if [ -n "$p" ]; then
      case ":$libdirs:" in *":$(dirname "$p"):"*) ;; *) libdirs=$libdirs:$(dirname "$p") ;; esac
    else
      JOULE_GPU_MISSING+="$n "
    fi
  done
  JOULE_GPU_LD=$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export JOULE_GPU_BUNDLE JOULE_GPU_LD JOULE_GPU_LIBS JOULE_GPU_MISSING
}
