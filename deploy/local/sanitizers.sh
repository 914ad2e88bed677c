# The sanitizer phases of deploy/local/test.sh (CI runs them): unit tests under
# ASan + UBSan, the concurrency-heavy tests under ThreadSanitizer, and every
# fuzzer for a short time box. Each phase configures and builds its own preset
# in build/<preset>, builds only what it runs, and prints how long it took.
# docs/operations.md ("Fuzzing and sanitizers") says what runs and what is left out.
# shellcheck shell=bash

# ASan + UBSan (preset debug): the unit-test binaries run, and ctest -E of what
# is left out for time on a 2-core CI machine.
JOULE_ASAN_TARGETS=(
  joule-make-model  # the tiny_models fixture
  proto_test safetensors_test options_test placement_proto_test
  tokenizer_test chat_template_test hf_tokenizer_test
  cluster_model_identity_test membership_test router_test coordinator_grpc_test
  openai_api_test openai_server_test coordinator_http_test coordinator_metrics_test placement_test
  tier_test scheduler_test scheduler_simulation_test scheduler_config_cost_test
  kernels_cpu_test config_test weights_test golden_test device_path_test
  inproc_transport_test ucx_transport_test dispatch_combine_test ep_engine_test
  kv_cache_test sampler_test engine_test energy_meter_test energy_attributor_test
  worker_service_test worker_process_test make_model_test device_test
  coordinator_binary_test kernels_cuda_math_test
  secrets_test grpc_security_test worker_security_test block_allocator_test prefix_cache_test
  joule-generate  # generate_deepseek_v3*: MLA, noaux_tc and FP8 GEMMs through the CLI
  dtype_test logprobs_test prefix_routing_test scheduled_backend_test openai_fanout_test
  mla_test noaux_tc_ep_test cluster_model_summary_test tokenizer_special_tokens_test
  deepseek_v3_chat_test openai_choices_test staged_transport_test nccl_group_test
)
# LongRunsStayFast times the tokenizer against a wall-clock bound ASan cannot meet;
# ReceiveThreadTakesTheReceives compares two threads' CPU time, which the slowdown upsets.
JOULE_ASAN_EXCLUDE='_NOT_BUILT|LongRunsStayFast|ReceiveThreadTakesTheReceives'

# ThreadSanitizer (preset tsan): transports, router, HTTP server, scheduler, and
# the device path of expert parallelism on the asynchronous fake device (its
# launches on a thread of their own, as on a GPU's stream: a missing wait shows as
# wrong results or a race).
JOULE_TSAN_TARGETS=(
  inproc_transport_test ucx_transport_test device_test dispatch_combine_test
  router_test coordinator_grpc_test
  openai_server_test openai_api_test
  scheduler_test scheduler_simulation_test
  grpc_security_test
)
# make_tiny_models: none of these needs the tiny models (generate_*: joule-generate
# is not built here). ReceiveThreadTakesTheReceives
# compares the CPU time of two threads, which TSan's slowdown on a loaded machine upsets.
JOULE_TSAN_EXCLUDE='_NOT_BUILT|make_tiny_models|generate_|ReceiveThreadTakesTheReceives'

# Seconds each fuzzer runs (tests/fuzz/run.sh).
JOULE_FUZZ_SECONDS="${JOULE_FUZZ_SECONDS:-12}"

joule_phase_time() { joule_log "phase $1: $(( SECONDS - $2 )) s"; }


joule_asan_phase() {
  local start=$SECONDS
  cd "$JOULE_ROOT"
  joule_log "ASan + UBSan: building the unit tests (preset debug, without CUDA and benchmarks)"
  cmake --preset debug -DJOULE_ENABLE_CUDA=OFF -DJOULE_BUILD_BENCH=OFF >/dev/null
  cmake --build --preset debug -j "$(nproc)" --target "${JOULE_ASAN_TARGETS[@]}"
  joule_log "ASan + UBSan: running them"
  ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1}" \
  UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
    ctest --preset debug -j "$(nproc)" -L unit -E "$JOULE_ASAN_EXCLUDE" --timeout 900
  joule_phase_time asan "$start"
}

joule_tsan_phase() {
  local start=$SECONDS
  cd "$JOULE_ROOT"
  joule_log "ThreadSanitizer: building the concurrency tests (preset tsan)"
  cmake --preset tsan >/dev/null
  cmake --build --preset tsan -j "$(nproc)" --target "${JOULE_TSAN_TARGETS[@]}"
  joule_log "ThreadSanitizer: running them"
  # UCX's own malloc/mmap hooks crash the peers under TSan's interceptors (SIGSEGV);
  # shm and tcp work without them. Debian's libraries are not instrumented:
  # tests/testing/tsan_absl_sync.cc makes Abseil's locks visible, and the memory
  # functions those libraries call themselves are not checked.
  UCX_MEM_EVENTS=no UCX_MEM_MALLOC_HOOKS=no UCX_MEM_MMAP_HOOK_MODE=none \
  TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:ignore_noninstrumented_modules=1:suppressions=$JOULE_ROOT/tests/tsan.supp}" \
    ctest --preset tsan -j "$(nproc)" -L unit -E "$JOULE_TSAN_EXCLUDE" --timeout 900
  joule_phase_time tsan "$start"
}

joule_fuzz_phase() {
  local start=$SECONDS
  cd "$JOULE_ROOT"
  joule_log "fuzzers: building (preset fuzz, clang)"
  cmake --preset fuzz >/dev/null
  cmake --build --preset fuzz -j "$(nproc)" --target fuzzers
  joule_log "fuzzers: ${JOULE_FUZZ_SECONDS} s each from tests/fuzz/corpus"
  tests/fuzz/run.sh build/fuzz "$JOULE_FUZZ_SECONDS"
  joule_phase_time fuzz "$start"
}
