#include "worker/service/worker_config.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "worker/device/device_spec.h"

namespace joule::worker {

absl::Status WorkerConfig::Validate() const {
  if (coordinator.empty()) return absl::InvalidArgumentError("--coordinator: required (host:port)");
  if (model.empty()) return absl::InvalidArgumentError("--model: required (checkpoint directory)");
  if (rank < -1) return absl::InvalidArgumentError(absl::StrCat("--rank: must be >= -1, got ", rank));
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--port: must be in [0, 65535], got ", port));
  }
  if (grpc_host.empty()) return absl::InvalidArgumentError("--grpc-host: must name an address (e.g. 127.0.0.1)");
  if (!listen_host.empty() && grpc_host != listen_host && grpc_host != "127.0.0.1") {
    return absl::InvalidArgumentError(absl::StrCat("--listen-host ", listen_host, " and --grpc-host ", grpc_host,
                                                   " disagree: --listen-host is the older name, set one"));
  }
  if (metrics_host.empty()) {
    return absl::InvalidArgumentError("--metrics-host: must name an address (e.g. 127.0.0.1)");
  }
  if (metrics_port < -1 || metrics_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-port: must be in [0, 65535] or -1 (off), got ", metrics_port));
  }
  if (ucx_spin_us < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--ucx-spin-us: must be >= 0, got ", ucx_spin_us));
  }
  if (threads < 0) return absl::InvalidArgumentError(absl::StrCat("--threads: must be >= 0, got ", threads));
  if (workers_per_host < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--workers-per-host: must be at least 1, got ", workers_per_host));
  }
  if (absl::StatusOr<device::DeviceSpec> spec = device::ParseDeviceSpec(device); !spec.ok()) {
    return spec.status();
  }
  if (!(gpu_memory_utilization >= 0 && gpu_memory_utilization <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--gpu-memory-utilization: must be in [0, 1], got ", gpu_memory_utilization));
  }
  if (max_model_len < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--max-model-len: must be >= 0, got ", max_model_len));
  }
  if (kv_cache_mb <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-cache-mb: must be positive, got ", kv_cache_mb));
  }
  if (block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--block-size: must be positive, got ", block_size));
  }
  if (max_batch_tokens <= 0) return absl::InvalidArgumentError("--max-batch-tokens: must be positive");
  if (max_running <= 0) return absl::InvalidArgumentError("--max-running: must be positive");
  if (transport != "ucx" && transport != "nccl") {
    return absl::InvalidArgumentError(
        absl::StrCat("--transport: must be ucx or nccl, got '", transport, "'"));
  }
  if (payload != "bf16" && payload != "f32") {
    return absl::InvalidArgumentError(absl::StrCat("--payload: must be bf16 or f32, got '", payload, "'"));
  }
  if (two_batch_overlap_min_rows < 0) {
    return absl::InvalidArgumentError("--two-batch-overlap-min-rows: must not be negative");
  }
  if (step_timeout_ms <= 0) return absl::InvalidArgumentError("--step-timeout-ms: must be positive");
  if (rpc_timeout_ms <= 0) return absl::InvalidArgumentError("--rpc-timeout-ms: must be positive");
  if (rendezvous_timeout_ms <= 0) {
    return absl::InvalidArgumentError("--rendezvous-timeout-ms: must be positive");
  }
  if (heartbeat_max_missed < 0) return absl::InvalidArgumentError("--heartbeat-max-missed: must be >= 0");
  if (idle_wait_us < 0) return absl::InvalidArgumentError("--idle-wait-us: must be >= 0");
  if (idle_wait_max_us < 0) return absl::InvalidArgumentError("--idle-wait-max-us: must be >= 0");
  if (inject_step_delay_us < 0 || inject_delay_per_token_us < 0) {
    return absl::InvalidArgumentError("--inject-step-delay-us, --inject-delay-per-token-us: must be >= 0");
  }
  if (control_interval <= 0) return absl::InvalidArgumentError("--control-interval: must be positive");
  if (shutdown_grace_ms < 0) return absl::InvalidArgumentError("--shutdown-grace-ms: must be >= 0");
  return telemetry::EnergyMeterOptionsFrom(*this).Validate();
}

std::string WorkerConfig::ToString() const { return DescribeConfig(*this); }

absl::StatusOr<WorkerConfig> ParseWorkerConfig(int argc, const char* const* argv) {
  return ParseConfig<WorkerConfig>("usage: joule-worker --coordinator HOST:PORT --model DIR [flags]",
                                   "JOULE_WORKER_", argc, argv);
}

int WorkerConfig::ComputeThreads(int usable_cores) const {
  if (threads > 0) return threads;
  return std::max(1, usable_cores / workers_per_host);
}

}  // namespace joule::worker
