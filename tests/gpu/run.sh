#!/bin/bash
# Joule's GPU checks, on a machine with an NVIDIA GPU whose image lacks our Debian build deps:
# runs what tests/gpu/bundle.sh packed into .gpu/ (see tests/gpu/README.md).
#
# Every check runs, each under its own time limit; the summary at the end gives PASS or FAIL
# per check, and the exit status is 1 when any failed (2: no bundle). Test binaries run with
# JOULE_REQUIRE_GPU=1, so a test that finds no usable GPU fails here instead of skipping.
# Logs go to $OUT (default /tmp/joule-gpu): gpu.log, one gtest JSON per test binary, the
# engine benchmark's results under bench/.
#
# JOULE_GPU_CHECKS="cuda_kernels_test gpu_model_test" runs only the checks named;
# JOULE_GPU_PACK_OUT=1 packs $OUT (but gpu.log) into results.tar.xz at the end;
# JOULE_GPU_BUDGET_S=N ends the whole run within about N seconds (give the device tool's
# timeout_s less 30): a check gets at most the time left less a minute for packing, and one
# that would get under 30 s is not started (FAIL, "not run: the budget was spent"), so the
# summary and the packed results come back even when the checks outlast the lease.
#
# A check is one line at the bottom: `check NAME TIME_LIMIT_S COMMAND [ARGS...]`, where COMMAND
# is a program or one of the functions here (`gtest BINARY` runs a bundled gtest binary, and
# fails saying so when the bundle lacks it).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
export OUT=${OUT:-/tmp/joule-gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
tee_pid=$!
source tests/gpu/env.sh
export G=$JOULE_GPU_BUNDLE
[ -d "$G/bin" ] || { echo "no bundle at $G: run tests/gpu/bundle.sh first"; exit 2; }
joule_gpu_find_libraries
export JOULE_REQUIRE_GPU=1
# The test binaries find fixtures in this tree and the tiny models in the bundle
# (tests/testing/paths.h), not in the build tree they were compiled in.
export JOULE_SOURCE_DIR=$PWD JOULE_BINARY_DIR=$G
# GPU 0's PCI bus id as NVML spells it: energy_meter_test opens the real GPU by it.
JOULE_TEST_NVML_PCI_BUS_ID=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i 0 2>/dev/null | tr -d ' ')
export JOULE_TEST_NVML_PCI_BUS_ID
# cuda_ipc_windows_test launches its peer from the bundle, not from the build tree.
export JOULE_CUDA_IPC_PEER=$G/bin/cuda_ipc_windows_peer
# The fake NVML's path is compiled into energy_meter_test: recreate it.
mkdir -p "$(cat "$G/fake_nvml_dir")" && cp "$G/bin/libjoule_fake_nvml.so" "$(cat "$G/fake_nvml_dir")/"

# ---- checks' commands ----------------------------------------------------------------------

machine() {
  # compute_mode and MIG: whether several processes may share GPU 0 (the cluster checks' workers).
  nvidia-smi --query-gpu=name,driver_version,memory.total,power.draw,power.limit,pci.bus_id,compute_mode,mig.mode.current \
    --format=csv || return 1
  echo "cores: $(nproc)"
  # What multi-process checks need besides: /dev/shm for UCX's shared memory, the user, the limits.
  df -h /dev/shm
  echo "uid: $(id -u)"
  ulimit -a
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__);
assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch device 0:', torch.cuda.get_device_name(0))"
}

libraries() {
  printf '%s' "$JOULE_GPU_LIBS"
  [ -z "$JOULE_GPU_MISSING" ] || { echo "missing on this host: $JOULE_GPU_MISSING"; return 1; }
}

# gtest BINARY [ARGS...]: a gtest binary of the bundle, its results in $OUT/BINARY.json.
gtest() {
  local name=$1
  shift
  if [ ! -x "$G/bin/$name" ]; then
    echo "$name is not in the bundle: build its target, then rerun tests/gpu/bundle.sh"
    return 127
  fi
  LD_LIBRARY_PATH=$JOULE_GPU_LD NCCL_DEBUG=WARN "$G/bin/$name" --gtest_output="json:$OUT/$name.json" "$@"
}

# The NVML counter of GPU 0, opened by PCI bus id, while a bf16 matmul loads it (idle 1.5 s,
# load 3 s, idle): the probe must name the bus id and see the power rise. It samples for 30 s:
# the load starts only once python has imported torch and made a CUDA context (5 s or more cold).
nvml_under_load() {
  local probe_out=$OUT/nvml_under_load.txt
  [ -n "$JOULE_TEST_NVML_PCI_BUS_ID" ] || { echo "nvidia-smi gave no PCI bus id for GPU 0"; return 1; }
  LD_LIBRARY_PATH=$JOULE_GPU_LD "$G/bin/joule-energy-probe" --energy-source nvml \
    --nvml-pci-bus-id "$JOULE_TEST_NVML_PCI_BUS_ID" --samples 120 --interval-ms 250 > "$probe_out" 2>&1 &
  local probe=$!
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
  wait "$probe"
  local rc=$?
  cat "$probe_out"
  [ "$rc" -eq 0 ] || { echo "joule-energy-probe failed (exit $rc)"; return 1; }
  python3 - "$probe_out" "$JOULE_TEST_NVML_PCI_BUS_ID" <<'PY'
import statistics, sys
text = open(sys.argv[1]).read()
lines = [l.split() for l in text.splitlines()]
watts = [float(l[2]) for l in lines if len(l) == 4 and l[2].replace('.', '', 1).isdigit()]
if sys.argv[2][-7:].upper() not in text.upper():
    sys.exit(f"the probe does not name the GPU at {sys.argv[2]}")
if len(watts) < 8:
    sys.exit(f"only {len(watts)} power readings")
idle, peak = statistics.median(watts[:4]), max(watts)
print(f"idle {idle:.0f} W, peak {peak:.0f} W under load")
if peak < idle + 100:
    sys.exit("the counter's power did not rise by 100 W under a matmul load")
PY
}

hf_mini_presets() {
  local mini rc f
  mini=$(mktemp -d)
  for f in qwen3_moe qwen2_moe mixtral deepseek_v3; do
    LD_LIBRARY_PATH=$JOULE_GPU_LD "$G/bin/joule-make-model" --family $f --preset mini --out "$mini/$f-mini" || return 1
  done
  python3 tests/reference/hf_check.py compare \
    --model "$mini/qwen3_moe-mini" --model "$mini/qwen2_moe-mini" --model "$mini/mixtral-mini" \
    --model "$mini/deepseek_v3-mini"
  rc=$?
  rm -rf "$mini"
  return $rc
}

# The CPU dispatch/combine sweep (bench/dispatch_combine/run.sh, quick sizes, transport and
# executor levels, EP 2 and 4 over UCX shm and TCP with and without the receive thread, against
# ucx_perftest and MPI_Alltoallv) on this host's cores, from the .bench/ bundle; the tables go
# to $OUT/bench/.
cpu_dispatch_sweep() {
  [ -d .bench/bin ] || { echo "no .bench/ bundle: tests/gpu/bundle.sh packs it"; return 127; }
  local rc=0 f since
  echo "cores: $(nproc)"
  # bench/results/ holds the committed tables (the CI VM's): only those these runs wrote, newer
  # than this file, come back, so a failed run's table is not taken for this host's.
  since=$(mktemp)
  bench/dispatch_combine/run_bundled.sh --quick || rc=$?
  bench/dispatch_combine/run_bundled.sh --quick --executor || rc=$?
  mkdir -p "$OUT/bench"
  for f in bench/results/dispatch_combine-{transport,executor}.{json,md}; do
    if [ "$f" -nt "$since" ]; then cp "$f" "$OUT/bench/"; else echo "$f: not written by this run"; fi
  done
  rm -f "$since"
  return $rc
}

export -f machine libraries gtest nvml_under_load hf_mini_presets cpu_dispatch_sweep

# ---- the runner ----------------------------------------------------------------------------

names=() results=() seconds=() notes=()
# check NAME TIME_LIMIT_S COMMAND [ARGS...]: runs one check and records PASS or FAIL.
check() {
  local name=$1 limit=$2 start=$SECONDS rc note=""
  shift 2
  # JOULE_GPU_CHECKS="a b": run only these checks (a rerun after a fix).
  if [ -n "${JOULE_GPU_CHECKS:-}" ] && [[ " $JOULE_GPU_CHECKS " != *" $name "* ]]; then return 0; fi
  if [ -n "${JOULE_GPU_BUDGET_S:-}" ]; then
    local left=$((JOULE_GPU_BUDGET_S - SECONDS - 60))
    if [ "$left" -lt 30 ]; then
      echo "===== $name: not run, ${JOULE_GPU_BUDGET_S} s budget spent"
      names+=("$name") seconds+=(0) notes+=("not run: the budget was spent") results+=(FAIL)
      return 0
    fi
    [ "$left" -ge "$limit" ] || limit=$left
  fi
  echo
  echo "===== $name ($(date +%T), limit ${limit} s): $*"
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@"
  rc=$?
  case $rc in
    0) ;;
    124|137) note="timed out after $limit s" ;;
    127) note="command or binary missing" ;;
    77) note="exit 77: skipped, which is a failure on a GPU host" ;;
    *) note="exit $rc" ;;
  esac
  names+=("$name") seconds+=($((SECONDS - start))) notes+=("$note")
  if [ $rc -eq 0 ]; then results+=(PASS); else results+=(FAIL); fi
  echo "----- $name: ${results[-1]}${note:+ ($note)}, $((SECONDS - start)) s"
}

# Most telling first: a short lease may end before the benchmark.
check machine               60 machine
check libraries              5 libraries
check device_test           60 gtest device_test
check cuda_kernels_test    180 gtest cuda_kernels_test
check gpu_model_test       300 gtest gpu_model_test
check gpu_fault_test        60 gtest gpu_fault_test
check nccl_transport_test  180 gtest nccl_transport_test
check cuda_ipc_windows_test 240 gtest cuda_ipc_windows_test
check nccl_ep2_cluster     420 env LD_LIBRARY_PATH="$JOULE_GPU_LD" JOULE_E2E_SKIP_RC=0 tests/e2e/nccl_cluster_e2e.sh "$G" "$G/models/qwen3_moe-tiny" ep2 ON
# The short dispatch/combine benchmark before the long all-or-nothing cluster checks.
check dispatch_combine_gpu 300 bench/dispatch_combine/gpu_run.sh "$G" --out "$OUT/bench"
# gpu_cluster_ep, one check per model family so that one can pass while the other is cut short;
# JOULE_GPU_CHECKS=gpu_cluster_ep still names both.
[[ " ${JOULE_GPU_CHECKS:-} " != *" gpu_cluster_ep "* ]] ||
  JOULE_GPU_CHECKS+=" gpu_cluster_ep_qwen3 gpu_cluster_ep_deepseek"
check gpu_cluster_ep_qwen3 300 env E2E_FAMILIES=qwen3_moe E2E_LOG_DIR="$OUT/gpu_cluster_ep/qwen3_moe" \
  tests/e2e/gpu_cluster_e2e.sh "$G" f32,bf16 1,2,4,2t
check gpu_cluster_ep_deepseek 300 env E2E_FAMILIES=deepseek_v3 E2E_LOG_DIR="$OUT/gpu_cluster_ep/deepseek_v3" \
  tests/e2e/gpu_cluster_e2e.sh "$G" f32,bf16 1,2,4,2t
check energy_meter_test    120 gtest energy_meter_test
check nvml_under_load       60 nvml_under_load
# The transformers checks before the long benchmark, which must not starve them.
check hf_fixtures          240 python3 tests/reference/hf_check.py fixtures --models-dir "$G/models" \
  --fixtures tests/data/golden/qwen3_moe-tiny.json tests/data/golden/qwen2_moe-tiny.json \
             tests/data/golden/mixtral-tiny.json tests/data/golden/deepseek_v3-tiny.json
check hf_mini_presets      300 hf_mini_presets
check engine_bench         480 bench/engine/gpu_run.sh --out "$OUT/bench"
# After engine_bench: the sweep serves the qwen3_moe mini that engine_bench generates.
check energy_sweep_gpu     300 env DEVICE=cuda:0 QUICK=1 BUILD="$G" OUT="$OUT/energy-sweep-gpu" PORT=18000 \
  METRICS_PORT=19100 bench/energy/sweep.sh
check cpu_dispatch_sweep   300 cpu_dispatch_sweep
echo
echo "===== summary ($(date +%T))"
failed=0
printf '%-22s %-6s %8s  %s\n' check result seconds note
for i in "${!names[@]}"; do
  printf '%-22s %-6s %8s  %s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}" "${notes[$i]}"
  [ "${results[$i]}" = PASS ] || failed=$((failed + 1))
done
echo "$(( ${#names[@]} - failed )) passed, $failed failed"
exec >&- 2>&-
# tee ends once every writer of its pipe has: give it 10 s, then stop it, so that a process a
# killed check left behind holding the pipe cannot keep the packing below from happening.
for _ in $(seq 1 40); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.25; done
kill "$tee_pid" 2>/dev/null
wait "$tee_pid" 2>/dev/null
# JOULE_GPU_PACK_OUT=1 (the device tool returns at most 8 files from $OUT): everything but
# gpu.log into $OUT/results.tar.xz. Without xz (tar -J runs it) python's tarfile packs; the
# files go only once an archive is written, and a half-written one goes instead.
if [ "${JOULE_GPU_PACK_OUT:-0}" = 1 ]; then
  (cd "$OUT" &&
   { find . -mindepth 1 -maxdepth 1 ! -name gpu.log ! -name results.tar.xz -print0 |
       tar --null -T - -cJf results.tar.xz ||
     python3 -c 'import os, tarfile
with tarfile.open("results.tar.xz", "w:xz") as t:
    for n in sorted(os.listdir(".")):
        if n not in ("gpu.log", "results.tar.xz"):
            t.add(n)' ||
     { rm -f results.tar.xz; false; }; } &&
   find . -mindepth 1 -maxdepth 1 ! -name gpu.log ! -name results.tar.xz -exec rm -rf {} +)
fi
[ "$failed" -eq 0 ]
