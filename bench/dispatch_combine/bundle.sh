#!/usr/bin/env bash
# Packs the dispatch/combine benchmark with its baselines into .bench/ (ignored by git), for a
# machine that lacks our Debian build deps (e.g. a borrowed GPU box with many cores): Joule's
# bench binaries, ucx_perftest, Open MPI's mpirun with its plugins and help files, PMIx, UCX's
# modules and every non-glibc library they load. bench/dispatch_combine/run_bundled.sh runs it.
#
#   bench/dispatch_combine/bundle.sh [BUILD_DIR]     (default build/default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source deploy/local/common.sh  # joule_carry_libs
B=${1:-build/default}
cmake --build "$B" -j"$(nproc)" --target joule-transport-bench joule-dispatch-combine-bench \
  joule-mpi-alltoallv-bench
A=/usr/lib/x86_64-linux-gnu
rm -rf .bench && mkdir -p .bench/bin .bench/lib .bench/ompi/lib/x86_64-linux-gnu/openmpi/lib \
  .bench/ompi/share .bench/pmix2/lib .bench/pmix2/share
cp "$B"/bench/dispatch_combine/joule-{transport,dispatch-combine,mpi-alltoallv}-bench .bench/bin/
cp "$(command -v ucx_perftest)" "$(command -v ucx_info)" "$(command -v ompi_info)" .bench/bin/  # report.py asks the last two for versions
cp "$(readlink -f "$(command -v mpirun)")" .bench/bin/mpirun
# Open MPI and PMIx trees, relocated with OPAL_PREFIX / PMIX_PREFIX.
cp -r "$A/openmpi/lib/openmpi3" .bench/ompi/lib/x86_64-linux-gnu/openmpi/lib/
cp -r /usr/share/openmpi .bench/ompi/share/
cp -r "$A/pmix2/lib/pmix" .bench/pmix2/lib/ && cp -r "$A/pmix2/share/pmix" .bench/pmix2/share/
cp -r "$A/ucx" .bench/lib/ucx  # UCX loads its transports from <dir of libucs>/ucx
find .bench/lib/ucx -name '*.a' -delete
mapfile -t carried < <(find .bench/bin .bench/ompi .bench/pmix2 .bench/lib/ucx -type f)
joule_carry_libs .bench/lib "${carried[@]}"
grep -qx '/.bench/' .git/info/exclude 2>/dev/null || echo '/.bench/' >> .git/info/exclude
du -sh .bench
