#!/usr/bin/env bash
# Packs what tests/gpu/run.sh needs into .gpu/ (ignored by git): the GPU test binaries built
# here, the non-CUDA shared libraries they load (Debian's Abseil and ICU, which a GPU image
# usually lacks), and the tiny checkpoints. CUDA, cuBLAS, NCCL and NVML come from the GPU
# machine itself. Use it when the GPU machine is not a Debian host with our build deps;
# on one that is, `deploy/local/test.sh` runs the same tests un-skipped.
#
#   tests/gpu/bundle.sh [BUILD_DIR]        (default build/default; builds the targets it needs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source deploy/local/common.sh  # joule_carry_libs
B=${1:-build/default}
targets=(cuda_kernels_test nccl_transport_test energy_meter_test joule_fake_nvml
         joule-energy-probe joule-make-model)
cmake --build "$B" -j"$(nproc)" --target "${targets[@]}"
rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib .gpu/models
cp "$B/tests/kernels/cuda/cuda_kernels_test" "$B/tests/worker/ep/transport/nccl_transport_test" \
   "$B/tests/worker/telemetry/energy_meter_test" "$B/tests/worker/telemetry/libjoule_fake_nvml.so" \
   "$B/worker/telemetry/joule-energy-probe" "$B/worker/tools/joule-make-model" .gpu/bin/
joule_carry_libs .gpu/lib .gpu/bin/*
# The fake NVML's path is compiled into energy_meter_test; run.sh recreates it there.
realpath "$B/tests/worker/telemetry" > .gpu/fake_nvml_dir
cp -r "$B"/models/{qwen3_moe,qwen2_moe,mixtral}-tiny .gpu/models/
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
du -sh .gpu
