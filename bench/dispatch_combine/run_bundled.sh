#!/usr/bin/env bash
# Runs bench/dispatch_combine/run.sh from the .bench/ bundle that bundle.sh made, on a machine
# without our Debian deps (same arguments and environment as run.sh). Results land in
# bench/results/ as usual; the command they record names .bench/build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
R=$PWD/.bench
[ -d "$R/bin" ] || { echo "no .bench/ bundle: run bench/dispatch_combine/bundle.sh first" >&2; exit 2; }
export LD_LIBRARY_PATH=$R/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export OPAL_PREFIX=$R/ompi PMIX_PREFIX=$R/pmix2 PATH=$R/bin:$PATH
export PMIX_MCA_mca_base_component_path=$R/pmix2/lib/pmix
# run.sh wants a build tree layout.
mkdir -p "$R/build/bench/dispatch_combine"
for b in "$R"/bin/joule-*-bench; do ln -sf "$b" "$R/build/bench/dispatch_combine/"; done
exec bench/dispatch_combine/run.sh "$R/build" "$@"
