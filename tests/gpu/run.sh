#!/bin/bash
# Joule's GPU checks, from the repository root, on a machine with an NVIDIA GPU whose image
# lacks our Debian build deps: runs the binaries that tests/gpu/bundle.sh packed into .gpu/.
#   - cuda_kernels_test, nccl_transport_test (1-rank communicator, device buffers, init
#     timeout), energy_meter_test (incl. the real NVML counter);
#   - joule-energy-probe on NVML while a bf16 matmul loads the GPU (idle, load, idle);
#   - tests/reference/hf_check.py: transformers against the golden fixtures (tiny) and against
#     reference.py on the mini presets (generated there with joule-make-model).
# Logs go to $OUT (default /tmp/joule-gpu): gpu.log and one gtest JSON per binary.
set -u
G=$PWD/.gpu
OUT=${OUT:-/tmp/joule-gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
step() { echo; echo "===== $* ($(date +%T))"; }
[ -d "$G/bin" ] || { echo "no .gpu/ bundle: run tests/gpu/bundle.sh first"; exit 2; }

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total,power.draw,power.limit --format=csv
echo "cores: $(nproc)"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step libraries
libdirs=$G/lib
for n in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2 libnvidia-ml.so.1; do
  p=$(find /usr/local/cuda/lib64/ /usr/local/cuda/ /usr/local/nvidia/ /usr/lib/x86_64-linux-gnu/ /opt/ \
        -name "$n" 2>/dev/null | head -1)
  echo "$n: ${p:-MISSING}"
  if [ -n "$p" ]; then libdirs=$libdirs:$(dirname "$p"); fi
done
# Only our binaries get these paths: torch must keep loading its own CUDA libraries.
GPU_LD=$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$(cat "$G/fake_nvml_dir")" && cp "$G/bin/libjoule_fake_nvml.so" "$(cat "$G/fake_nvml_dir")/"

for t in cuda_kernels_test nccl_transport_test energy_meter_test; do
  step "$t"
  LD_LIBRARY_PATH=$GPU_LD NCCL_DEBUG=WARN timeout 180 "$G/bin/$t" --gtest_output="json:$OUT/$t.json"
  echo "$t exit $?"
done

step "NVML counter under a bf16 matmul load (idle 1.5 s, load 3 s, idle)"
LD_LIBRARY_PATH=$GPU_LD "$G/bin/joule-energy-probe" --energy-source nvml --samples 28 --interval-ms 250 &
probe=$!
sleep 1.5
python3 - <<'PY'
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
n, t = 0, time.time()
while time.time() - t < 3.0:
    b = a @ a; torch.cuda.synchronize(); n += 1
dt = time.time() - t
print(f"load: {n} matmuls 8192^3 in {dt:.2f} s = {n * 2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PY
wait $probe

step "transformers vs the golden fixtures (tiny checkpoints)"
timeout 240 python3 tests/reference/hf_check.py fixtures --models-dir "$G/models" \
  --fixtures tests/data/golden/qwen3_moe-tiny.json tests/data/golden/qwen2_moe-tiny.json \
             tests/data/golden/mixtral-tiny.json
echo "hf fixtures exit $?"

step "transformers vs reference.py on the mini presets"
mini=$(mktemp -d)
for f in qwen3_moe qwen2_moe mixtral; do
  LD_LIBRARY_PATH=$G/lib "$G/bin/joule-make-model" --family $f --preset mini --out "$mini/$f-mini"
done
timeout 300 python3 tests/reference/hf_check.py compare \
  --model "$mini/qwen3_moe-mini" --model "$mini/qwen2_moe-mini" --model "$mini/mixtral-mini"
echo "hf compare exit $?"
rm -rf "$mini"
step done
