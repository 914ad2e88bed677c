#!/usr/bin/env bash
# Packs what tests/gpu/run.sh needs into .gpu/ (ignored by git): the GPU test and benchmark
# binaries built here (stripped), the non-CUDA shared libraries they load (Debian's Abseil and
# ICU, which a GPU image usually lacks), and the tiny checkpoints. CUDA, cuBLAS, NCCL and NVML
# come from the GPU machine itself. Use it when the GPU machine is not a Debian host with our
# build deps; on one that is, `deploy/local/test.sh` runs the same tests un-skipped.
#
#   tests/gpu/bundle.sh [BUILD_DIR]        (default build/default; builds the targets it needs)
#
# Targets that do not exist in this build yet are left out with a note; run.sh then fails
# their checks, saying the bundle lacks them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source deploy/local/common.sh  # joule_carry_libs
B=${1:-build/default}
# target -> its binary in the build tree
declare -A binaries=(
  [cuda_kernels_test]=tests/kernels/cuda/cuda_kernels_test
  [nccl_transport_test]=tests/worker/ep/transport/nccl_transport_test
  [cuda_ipc_windows_test]=tests/worker/ep/transport/cuda_ipc_windows_test
  [cuda_ipc_windows_peer]=tests/worker/ep/transport/cuda_ipc_windows_peer
  [energy_meter_test]=tests/worker/telemetry/energy_meter_test
  [joule_fake_nvml]=tests/worker/telemetry/libjoule_fake_nvml.so
  [joule-energy-probe]=worker/telemetry/joule-energy-probe
  [joule-make-model]=worker/tools/joule-make-model
  [gpu_model_test]=tests/worker/model/gpu_model_test
  [gpu_fault_test]=tests/worker/model/gpu_fault_test
  [device_test]=tests/worker/device/device_test
  [joule-engine-bench]=bench/engine/joule-engine-bench
  # A whole cluster on the GPU (tests/e2e/gpu_cluster_e2e.sh, bench/energy/sweep.sh DEVICE=cuda,
  # gpu_run.sh's EP 2 vs EP 1): the servers, the CLI and the load generator.
  [joule-coordinator]=coordinator/joule-coordinator
  [joule-worker]=worker/service/joule-worker
  [joule-cli]=coordinator/cli/joule-cli
  [joule-bench]=bench/energy/joule-bench
  [joule-dispatch-combine-bench]=bench/dispatch_combine/joule-dispatch-combine-bench
  [joule-memcpy-bench]=bench/dispatch_combine/joule-memcpy-bench
)
known=$(cmake --build "$B" --target help | sed -n 's/^\([^ :]*\): .*/\1/p')
targets=()
for t in "${!binaries[@]}"; do
  if grep -qx -- "$t" <<<"$known"; then
    targets+=("$t")
  else
    echo "bundle.sh: no target $t in $B yet: left out (run.sh will fail its check)" >&2
  fi
done
cmake --build "$B" -j"$(nproc)" --target "${targets[@]}"
rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib .gpu/models
for t in "${targets[@]}"; do
  cp "$B/${binaries[$t]}" .gpu/bin/
done
# Symbols are most of a test binary's size; the CUDA kernels (fatbins) are data and stay.
strip --strip-unneeded .gpu/bin/* 2>/dev/null || true
joule_carry_libs .gpu/lib .gpu/bin/*
# The peer's path is compiled into cuda_ipc_windows_test too; run.sh points it at the bundle's
# (JOULE_CUDA_IPC_PEER). Its UCX libraries come along above (TCP and shared memory are built
# into libuct; the bundle needs no UCX modules).
# The fake NVML's path is compiled into energy_meter_test; run.sh recreates it there.
realpath "$B/tests/worker/telemetry" > .gpu/fake_nvml_dir
cp -r "$B"/models/{qwen3_moe,qwen2_moe,mixtral,deepseek_v3,deepseek_v3_fp8}-tiny .gpu/models/
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
du -sh .gpu .gpu/bin .gpu/lib .gpu/models
# What travels is the xz archive (the device tool carries at most 64 MiB with the working tree;
# ICU's data library alone is 30 MB unpacked): env.sh unpacks it there when .gpu/ is absent or
# came from another archive.
grep -qx '/.gpu.tar.xz' .git/info/exclude 2>/dev/null || echo '/.gpu.tar.xz' >> .git/info/exclude
# The CPU dispatch/combine sweep's bundle (.bench/: its benchmarks, ucx_perftest, Open MPI) rides
# along for run.sh's cpu_dispatch_sweep check, so a GPU host's many cores measure it too.
packed=(.gpu)
if bash bench/dispatch_combine/bundle.sh "$B" >/dev/null; then
  packed+=(.bench)
else
  echo "bundle.sh: bench/dispatch_combine/bundle.sh failed: cpu_dispatch_sweep will fail" >&2
fi
tar -cf - "${packed[@]}" | xz -6 -T0 > .gpu.tar.xz
size_mb=$(( $(du -sb .gpu | cut -f1) / 1000000 ))
packed_mb=$(( $(stat -c %s .gpu.tar.xz) / 1000000 ))
echo "bundle: ${size_mb} MB in .gpu/, ${packed_mb} MB in .gpu.tar.xz (binaries: ${targets[*]})"
if [ "$packed_mb" -gt 40 ]; then
  echo "bundle.sh: WARNING: ${packed_mb} MB packed; the device tool carries 64 MiB with the tree" >&2
fi
