# Shared by deploy/local/*.sh: package installation and the build.
# shellcheck shell=bash

JOULE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# Debian 12 packages the binaries' build needs (also the container image's build stage).
JOULE_BUILD_PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libabsl-dev libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc
  prometheus-cpp-dev libucx-dev nlohmann-json3-dev libboost1.81-dev libssl-dev
  libicu-dev  # NFC and Unicode regexes of Hugging Face tokenizers (coordinator/tokenizer)
)

# Debian 12 packages the build, the tests and the demo need.
JOULE_PACKAGES=(
  "${JOULE_BUILD_PACKAGES[@]}" ccache git ucx-utils
  libgtest-dev libgmock-dev libbenchmark-dev
  python3-torch python3-numpy curl iproute2
  openssl  # deploy/local/make_secrets.sh: the local cluster's throwaway CA and token
  libopenmpi-dev openmpi-bin  # MPI_Alltoallv baseline of bench/dispatch_combine
)

# Only for bench/energy/plot.py (the sweep's plots); not needed to build or test.
JOULE_BENCH_PACKAGES=(python3-matplotlib)

# Only for the fuzzers (libFuzzer comes with clang's runtime); test.sh --sanitizers installs them.
JOULE_FUZZ_PACKAGES=(clang libclang-rt-14-dev)

# Only for the container image's test (tests/e2e/container_e2e.sh): podman builds, mmdebstrap
# makes the Debian 12 base it builds on.
JOULE_CONTAINER_PACKAGES=(podman mmdebstrap)

# Only for the test with a real Prometheus (tests/e2e/prometheus_e2e.sh; promtool comes with it).
JOULE_PROMETHEUS_PACKAGES=(prometheus)

# Only for deploy/slurm's test against a real Slurm on this machine (tests/e2e/slurm_e2e.sh).
JOULE_SLURM_PACKAGES=(slurm-wlm munge)

# Only for the tests that run npm packages (tests/k8s: the API schemas; tests/openai_sdk: the
# official OpenAI SDK). Skipped where node and npm already exist (e.g. NodeSource's nodejs).
JOULE_NODE_PACKAGES=(nodejs npm)

joule_log() { printf '\033[1m[joule]\033[0m %s\n' "$*" >&2; }

# Installs whatever of JOULE_PACKAGES (and the packages named) is missing (apt), once.
joule_install_packages() {
  local missing=()
  for p in "${JOULE_PACKAGES[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  joule_log "installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "need root to install packages: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Configures and builds the given preset (default: Release) in build/<preset>.
joule_build() {
  local preset="${1:-default}"
  cd "$JOULE_ROOT"
  export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
  joule_log "configuring (preset $preset)"
  cmake --preset "$preset" >/dev/null
  joule_log "building with $(nproc) jobs"
  cmake --build --preset "$preset" -j "$(nproc)"
}

# Copies into DEST every shared library the given binaries and plugins resolve here, except
# glibc, libstdc++/libgcc and CUDA's (the other machine has its own): what a Debian build needs
# on a machine without our packages (tests/gpu/bundle.sh, bench/dispatch_combine/bundle.sh).
joule_carry_libs() {
  local dest="$1"
  shift
  for f in "$@"; do ldd "$f" 2>/dev/null || true; done | awk '$3 ~ /^\// {print $3}' | sort -u |
    grep -Ev '/usr/local/cuda|/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+)\.so' |
    xargs -r -I{} cp -L {} "$dest/"
}

# For a test that needs optional packages: installs them when one of the commands is missing
# (as root); exits 77 (ctest: skipped) when one is missing and this is not root.
#   joule_require "prometheus promtool" "${JOULE_PROMETHEUS_PACKAGES[@]}"
joule_require() {
  local commands="$1" c
  shift
  for c in $commands; do
    command -v "$c" >/dev/null && continue
    [ "$(id -u)" = 0 ] || { echo "SKIP: $c is not installed and this is not root"; exit 77; }
    joule_install_packages "$@"
    return 0
  done
}
