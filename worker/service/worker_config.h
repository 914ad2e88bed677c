// joule-worker's configuration, declared once: name, type, default, help.
// Read from the environment (JOULE_WORKER_<NAME>, e.g. JOULE_WORKER_KV_CACHE_MB)
// and then the command line (--kv-cache-mb), and printed at start-up.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/grpc_security.h"
#include "common/options.h"
#include "worker/telemetry/make_energy_meter.h"

namespace joule::worker {

// X(type, field, default, help); the flag is --field with '_' written '-'
// (common/options.h reads and prints them).
#define JOULE_WORKER_FLAGS(X)                                                                     \
  X(std::string, coordinator, "", "host:port of the coordinator (required)")                      \
  X(std::string, model, "", "Hugging Face checkpoint directory (required)")                       \
  X(int, rank, -1, "rank to ask for; -1: any free rank")                                         \
  X(std::string, grpc_host, "127.0.0.1",                                                          \
    "address the Worker gRPC server binds; multi-host clusters: 0.0.0.0 or the address the "     \
    "coordinator reaches (see --advertise-host)")                                                 \
  X(std::string, listen_host, "", "older name of --grpc-host; when set, it wins")                 \
  X(std::string, metrics_host, "127.0.0.1",                                                       \
    "address the Prometheus /metrics server binds; 0.0.0.0 for a scraper on another host")       \
  X(int, port, 0, "port of the Worker gRPC server; 0: an ephemeral port (printed)")               \
  X(int, metrics_port, 0, "port of the Prometheus /metrics server; 0: an ephemeral port (printed); -1: off") \
  X(std::string, metrics_port_file, "", "write the metrics port to this file once listening")   \
  X(std::string, advertise_host, "",                                                              \
    "host the coordinator reaches this worker at; empty: the local address facing the coordinator") \
  X(int, threads, 0,                                                                              \
    "CPU threads for the forward pass; 0: this worker's share of the usable cores (CPU affinity, " \
    "cgroup CPU quota; see --workers-per-host)")                                                  \
  X(int, workers_per_host, 1,                                                                     \
    "worker processes sharing this host's cores: --threads 0 gives each usable cores / this, at least 1") \
  X(int64_t, kv_cache_mb, 256,                                                                    \
    "KV cache size in MiB (CPU; a GPU too with --gpu-memory-utilization 0)")                      \
  X(double, gpu_memory_utilization, 0.9,                                                          \
    "GPU: the fraction of the device's memory this worker may use; the KV cache gets what weights " \
    "and workspaces leave of it. 0: --kv-cache-mb instead (workers sharing one GPU)")           \
  X(int64_t, max_model_len, 0,                                                                    \
    "longest prompt + max_tokens a request may have; 0: the model's max_position_embeddings")     \
  X(bool, cuda_graphs, true, "GPU: replay decode steps from CUDA graphs captured at start-up")    \
  X(int, block_size, 16, "tokens per KV block")                                                   \
  X(bool, prefix_caching, true,                                                                   \
    "reuse the KV blocks of prompt prefixes seen before (full blocks, kept until evicted LRU); "  \
    "false: every prompt is computed in full")                                                    \
  X(int, max_batch_tokens, 512, "tokens per engine step (decode + prefill chunks)")               \
  X(int, max_running, 64, "sequences in the running batch")                                       \
  X(std::string, transport, "ucx", "expert-parallel transport: ucx | nccl")                       \
  X(std::string, payload, "bf16", "dispatch/combine payload precision: bf16 | f32")               \
  X(bool, shared_windows, true,                                                                   \
    "BF16 expert parallelism on one host: write dispatch/combine rows straight into peers' "      \
    "shared windows (CUDA IPC on a GPU, UCX shared memory on a CPU) where they map; false: "      \
    "rows through the all-to-all-v even then; the same on every worker")                          \
  X(bool, two_batch_overlap, false,                                                               \
    "GPU expert parallelism: each MoE layer as two micro-batches, one's exchange waiting while "  \
    "the other's experts run; the same on every worker")                                          \
  X(int64_t, two_batch_overlap_min_rows, 0,                                                       \
    "with --two-batch-overlap: split a layer only after one that moved at least this many rows " \
    "over all ranks (0: every layer); the same on every worker")                                  \
  X(int64_t, step_timeout_ms, 10000, "a collective that takes longer fails the step (peer lost); the coordinator's value wins") \
  X(int64_t, rpc_timeout_ms, 5000, "deadline of Register and Heartbeat calls")                    \
  X(int64_t, rendezvous_timeout_ms, 300000, "how long to wait for every rank to register")        \
  X(int, heartbeat_max_missed, 5, "failed heartbeats in a row before the worker stops")           \
  X(int64_t, idle_wait_us, 1000, "pause after a lockstep round in which no rank had work")        \
  X(int64_t, idle_wait_max_us, 20000,                                                              \
    "longest pause while every rank's paced sequences rest (delays another rank's new request)")  \
  X(int64_t, ucx_spin_us, 500,                                                                    \
    "waiting for a peer: spin this long before sleeping in naps (CPU time against latency)")     \
  X(int, control_interval, 4, "lockstep rounds between control exchanges (placement, stop)")      \
  X(int64_t, regroup_timeout_ms, 30000,                                                           \
    "after a failed step (a peer died), how long to wait for the coordinator's new group before " \
    "failing every request; 0: fail at once")                                                     \
  X(int64_t, shutdown_grace_ms, 2000, "time given to streams to end at shutdown")                 \
  X(int64_t, inject_step_delay_us, 0,                                                              \
    "fault injection for tests: each step with tokens of this rank takes this much longer")       \
  X(double, inject_delay_per_token_us, 0,                                                          \
    "fault injection for tests: and this much longer per token of the step")                      \
  X(std::string, device, "cpu",                                                                  \
    "where the forward pass runs: cpu, cuda (= cuda:0) or cuda:N (fake: tests, in "              \
    "joule-worker-fake-device only); reported at registration")                                    \
  JOULE_ENERGY_METER_FLAGS(X)                                                                     \
  JOULE_GRPC_SECURITY_FLAGS(X)

struct WorkerConfig {
  JOULE_WORKER_FLAGS(JOULE_OPTION_FIELD)

  std::vector<Option> Options() { return {JOULE_WORKER_FLAGS(JOULE_OPTION_BIND)}; }
  // InvalidArgument naming the flag when a value is out of range.
  absl::Status Validate() const;
  // One line per flag, "--name=value", for the start-up log.
  std::string ToString() const;
  // The address the Worker gRPC server binds: --listen-host (the older name) or --grpc-host.
  const std::string& GrpcHost() const { return listen_host.empty() ? grpc_host : listen_host; }
  // Compute threads: --threads, or for 0 this worker's share of `usable_cores`.
  int ComputeThreads(int usable_cores) const;
};

// Environment first, then argv, then Validate. InvalidArgument names the flag
// for unknown flags, missing or malformed values. `--help` gives Cancelled with
// the usage (IsHelpRequest).
absl::StatusOr<WorkerConfig> ParseWorkerConfig(int argc, const char* const* argv);

}  // namespace joule::worker
