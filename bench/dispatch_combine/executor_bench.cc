// One rank of the ExpertParallelExecutor-level dispatch/combine benchmark
// (run.sh --executor starts EP of them on the CPU, UCX_TLS picking shared
// memory or TCP; gpu_run.sh starts them on a GPU).
//
//   joule-dispatch-combine-bench --rank R --world W --dir DIR --hidden 2048,7168
//       --tokens 1,4,16,64,128,256,1024,4096 [--top-k 8] [--experts 64]
//       [--device cpu|cuda:N|fake] [--moe-intermediate 8] [--peer-errors] [--threads 1]
//       [--target-seconds 0.25] [--max-iters 200] [--mem-fraction 0.6] [--out FILE]
//
// Per hidden size, rank 0 writes a synthetic Qwen3-MoE checkpoint with ONE
// MoE layer (E experts, top-k K, BF16 weights) under DIR; every rank loads
// only the experts a contiguous placement gives it, through the production
// loader, and builds an ExpertParallelExecutor (BF16 payloads) on a
// UcxTransport. moe_intermediate_size is tiny (8 by default) to keep the
// expert GEMMs small; they are not free (about 0.1 MFLOP per (token, expert)
// row at hidden 2048) and are excluded from the reported latency (see below).
//
// --device: cpu (default) is the host path: Run's pointers are host memory
// and the executor computes on the rank's CPU threads. cuda:N creates that
// GPU's backend and gives it to the executor (ExpertParallelOptions::device),
// which uploads its experts itself; x, expert ids, router weights and out
// then live in device memory (uploaded from the host arrays drawn below) and
// rows move as device_stages.h says (CUDA IPC windows when every rank is on
// one host: several ranks may share one GPU; the executor logs "rows through
// ..."). fake is the same device path on device::FakeDeviceBackend (CPU
// kernels behind a backend whose memory must be staged), so that the device
// code of this benchmark runs on a machine without a GPU. On a device,
// dispatch seconds also cover the router choices' exchange over the control
// transport and the layout's upload, combine seconds the wait for the expert
// kernels; the Run wall time is taken after synchronizing the device.
//
// Per tokens-per-rank point: warm-up, then N iterations (N sized to about
// --target-seconds; at least 5, or 3 for the slowest points) of ExpertParallelExecutor::Run with fresh
// random routing (each token picks K distinct experts uniformly; router
// weights 1/K), a barrier before each. Per iteration and rank the deltas of
// stats() give dispatch seconds (layout, count exchange, packing, dispatch
// all-to-all) and combine seconds (combine all-to-all or barrier, weighted
// un-permute; the BF16 combine rows are summed and rounded inside the expert
// down projection, so that is in Run), and the payload bytes sent to other ranks. The latency of an
// iteration is the slowest rank's dispatch + combine; the reported latency
// is the median over iterations. A rank's combine also waits for the peers
// that finish their experts later; the skew-free latency (slowest dispatch +
// fastest combine, i.e. the combine of the rank that arrived last and so
// waited for nobody's experts) leaves that wait out, as the MPI baseline,
// which computes nothing between its exchanges, has none. Run's wall time
// (which adds the expert compute, with the combine rows' sums) is
// reported alongside.
// A point whose buffers would need more than --mem-fraction of the memory
// they live in (MemAvailable; on a GPU its free memory) over all ranks is
// skipped (and reported as such): the host is shared.
// Rank 0 appends one JSON line per point to FILE (or stdout); with
// JOULE_BENCH_TRACE set every rank prints its per-Run dispatch/combine/Run
// microseconds and minor faults to stderr.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "bench/dispatch_combine/payload.h"
#include "bench/dispatch_combine/rank_util.h"
#include "common/dtype.h"
#include "common/options.h"
#include "common/placement.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "kernels/cpu/thread_pool.h"
#include "worker/device/backend.h"
#include "worker/device/device_spec.h"
#include "worker/device/fake_device_backend.h"
#include "worker/ep/ep_executor.h"
#include "worker/ep/ucx_transport.h"
#include "worker/model/weights.h"

namespace {

namespace device = joule::device;
using joule::bench::Check;
using joule::bench::ParseSizeList;
using joule::bench::Rendezvous;
using joule::ep::ExpertParallelExecutor;

#define JOULE_EXECUTOR_BENCH_FLAGS(X)                                                       \
  JOULE_RANK_BENCH_FLAGS(X)                                                                 \
  X(std::string, device, "cpu",                                                             \
    "cpu (the host path), cuda:N (the executor's device path on that GPU) or fake (the "    \
    "device path on the CPU-backed fake device, for tests)")                               \
  X(int, experts, 64, "experts of the MoE layer")                                          \
  X(int, moe_intermediate, 8, "moe_intermediate_size (tiny, to keep the expert GEMMs small)") \
  X(int, threads, 1, "CPU threads of each rank's executor")                                \
  X(bool, shared_windows, true, "write rows into peers' shared windows where the transport maps them (else all-to-all-v)") \
  X(bool, two_batch_overlap, false, "each Run as two micro-batches whose phases interleave (device path)") \
  X(int, max_iters, 200, "most timed Runs per point (at least 3)")                         \
  X(double, target_seconds, 0.25, "timed Runs per point are sized to about this long")     \
  X(double, mem_fraction, 0.6, "skip points whose buffers need more of the free memory")

struct Args {
  JOULE_EXECUTOR_BENCH_FLAGS(JOULE_OPTION_FIELD)
  std::vector<joule::Option> Options() { return {JOULE_EXECUTOR_BENCH_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    RETURN_IF_ERROR(joule::bench::ValidateRankFlags(*this));
    if (device != "fake" && !device::ParseDeviceSpec(device).ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--device: expected cpu, cuda:N or fake, got \"", device, "\""));
    }
    if (experts < world) return absl::InvalidArgumentError("--experts: must be at least --world");
    if (top_k > experts) return absl::InvalidArgumentError("--top-k: must be at most --experts");
    if (moe_intermediate < 1) return absl::InvalidArgumentError("--moe-intermediate: must be positive");
    if (threads < 1) return absl::InvalidArgumentError("--threads: must be positive");
    if (max_iters < 3) return absl::InvalidArgumentError("--max-iters: must be at least 3");
    return absl::OkStatus();
  }
};

// A Qwen3-MoE checkpoint with one decoder layer, which is MoE: attention is a
// stub (one head of dim 2) the benchmark never runs; the router is unused too
// (routing is drawn at random). Only the experts' shapes matter.
absl::Status WriteCheckpoint(const std::string& dir, int64_t hidden, int experts, int top_k,
                             int64_t inter) {
  std::filesystem::create_directories(dir);
  constexpr int64_t kVocab = 16, kHeadDim = 2;
  uint64_t state = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(hidden);
  std::vector<std::vector<uint16_t>> store;
  std::vector<joule::TensorToWrite> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float center, float scale) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<uint16_t> v(n);
    for (auto& x : v) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      const float u = static_cast<float>(state >> 40) * (1.0f / 8388608.0f) - 1.0f;
      x = joule::F32ToBf16(center + scale * u);
    }
    store.push_back(std::move(v));
    tensors.push_back({name, joule::DType::kBF16, std::move(shape), nullptr});
  };
  const float in_scale = 1.0f / std::sqrt(static_cast<float>(hidden));
  const std::string p = "model.layers.0";
  add("model.embed_tokens.weight", {kVocab, hidden}, 0, 1);
  add("model.norm.weight", {hidden}, 1, 0.1f);
  add(p + ".input_layernorm.weight", {hidden}, 1, 0.1f);
  add(p + ".post_attention_layernorm.weight", {hidden}, 1, 0.1f);
  for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
    add(absl::StrCat(p, ".self_attn.", proj, ".weight"), {kHeadDim, hidden}, 0, in_scale);
  }
  add(p + ".self_attn.o_proj.weight", {hidden, kHeadDim}, 0, 0.5f);
  add(p + ".self_attn.q_norm.weight", {kHeadDim}, 1, 0.1f);
  add(p + ".self_attn.k_norm.weight", {kHeadDim}, 1, 0.1f);
  add(p + ".mlp.gate.weight", {experts, hidden}, 0, in_scale);
  for (int e = 0; e < experts; ++e) {
    const std::string m = absl::StrCat(p, ".mlp.experts.", e);
    add(m + ".gate_proj.weight", {inter, hidden}, 0, in_scale);
    add(m + ".up_proj.weight", {inter, hidden}, 0, in_scale);
    add(m + ".down_proj.weight", {hidden, inter}, 0, 1.0f / std::sqrt(static_cast<float>(inter)));
  }
  for (size_t i = 0; i < tensors.size(); ++i) tensors[i].data = store[i].data();
  RETURN_IF_ERROR(joule::WriteSafetensors(dir + "/model.safetensors", tensors));
  const std::string tmp = dir + "/config.json.tmp";
  std::ofstream cfg(tmp, std::ios::trunc);
  cfg << "{\"architectures\": [\"Qwen3MoeForCausalLM\"], \"model_type\": \"qwen3_moe\", "
      << "\"vocab_size\": " << kVocab << ", \"hidden_size\": " << hidden
      << ", \"num_hidden_layers\": 1, \"num_attention_heads\": 1, \"num_key_value_heads\": 1"
      << ", \"head_dim\": " << kHeadDim
      << ", \"max_position_embeddings\": 64, \"rms_norm_eps\": 1e-6, \"rope_theta\": 1000000.0"
      << ", \"rope_scaling\": null, \"tie_word_embeddings\": true, \"attention_bias\": false"
      << ", \"num_experts\": " << experts << ", \"num_experts_per_tok\": " << top_k
      << ", \"moe_intermediate_size\": " << inter << ", \"intermediate_size\": " << inter
      << ", \"decoder_sparse_step\": 1, \"mlp_only_layers\": [], \"norm_topk_prob\": true"
      << ", \"use_sliding_window\": false, \"sliding_window\": null, \"hidden_act\": \"silu\""
      << ", \"torch_dtype\": \"bfloat16\", \"bos_token_id\": 1, \"eos_token_id\": 2}\n";
  cfg.close();
  if (!cfg) return absl::InternalError("cannot write " + tmp);
  std::filesystem::rename(tmp, dir + "/config.json");
  return absl::OkStatus();
}

// MemAvailable in bytes (0 when unknown).
uint64_t MemAvailable() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

// Minor page faults of this process so far.
long MinorFaults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double Mean(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m += x / v.size();
  return m;
}

const char* Bool(bool b) { return b ? "true" : "false"; }

// This rank's device for --device: null for cpu (the host path).
absl::StatusOr<std::unique_ptr<device::Backend>> CreateDevice(const std::string& name,
                                                              int threads) {
  // Asynchronous, as a GPU's stream: the host waits only where the executor does.
  if (name == "fake") return std::make_unique<device::FakeDeviceBackend>(threads, true);
  ASSIGN_OR_RETURN(const device::DeviceSpec spec, device::ParseDeviceSpec(name));
  if (!spec.is_cuda()) return std::unique_ptr<device::Backend>();
  return device::CreateBackend(spec);
}

// What a rank keeps for the whole sweep.
struct Rank {
  const Args& args;
  joule::ep::UcxTransport& transport;
  device::Backend* backend;  // null: the host path
  joule::kernels::cpu::CpuStream stream;
  joule::Placement placement;
  FILE* out;        // rank 0's JSON lines
  std::string tls;  // UCX_TLS, for the lines

  int world() const { return args.world; }
  bool on_gpu() const { return backend != nullptr && backend->spec().is_cuda(); }
};

// Rank 0's `value`, on every rank (rank 0 decides warm-up and iteration counts).
int Rank0Value(Rank& r, int value) {
  std::vector<int> all(r.world());
  Check(r.transport.AllGather(&value, sizeof(int), all.data()), "all-gather");
  return all[0];
}

// The fields every line of a point starts with (the caller closes the object).
void PrintHead(const Rank& r, int hidden, int tokens) {
  const Args& a = r.args;
  std::fprintf(r.out,
               "{\"impl\":\"joule-ep-executor\",\"device\":\"%s\",\"tls\":\"%s\","
               "\"peer_errors\":%s,\"recv_thread\":%s,\"shared_windows\":%s,"
               "\"two_batch_overlap\":%s,\"ep\":%d,"
               "\"hidden\":%d,\"tokens\":%d,\"top_k\":%d",
               a.device.c_str(), r.tls.c_str(), Bool(a.peer_errors), Bool(a.recv_thread),
               Bool(a.shared_windows), Bool(a.two_batch_overlap), a.world, hidden, tokens,
               a.top_k);
}

// True (on every rank) when the point's buffers would need more than
// --mem-fraction of the memory they share; rank 0 then prints the skip line.
bool SkipPoint(Rank& r, int hidden, int tokens) {
  const int W = r.world(), K = r.args.top_k;
  // Resident bytes per rank: x and out (F32, 8 bytes per element), and per
  // token and rank it reaches (at most min(W, K)) one BF16 row sent and one
  // received in dispatch and again in combine (windows or all-to-all
  // buffers), doubled by the headroom the warm-up gives them (below); on a
  // device also the experts' F32 output row per received choice (K per token
  // on average), doubled likewise. The expert scratch is small
  // (moe_intermediate columns). An upper bound: on the host, EP 4, hidden
  // 7168, 4096 tokens took 2.7 GB of MemAvailable in all against 4.7 GB here.
  const double per_element = 8.0 + 2 * 4.0 * std::min(W, K) + (r.backend ? 8.0 * K : 0.0);
  const double need = double(tokens) * hidden * per_element * W;
  // Ranks sharing one GPU see the same free memory (conservative for one GPU
  // per rank); the fake device's memory is the host's.
  double free = double(MemAvailable());
  if (r.on_gpu()) {
    auto memory = r.backend->DeviceMemory();
    Check(memory.status(), "device memory");
    free = double(memory->free_bytes);
  }
  const int skip = Rank0Value(r, need > r.args.mem_fraction * free ? 1 : 0);
  if (skip == 0) return false;
  if (r.args.rank == 0) {
    std::fprintf(stderr, "EP %d hidden %d tokens %d: skipped, needs %.1f GB\n", W, hidden, tokens,
                 need / 1e9);
    PrintHead(r, hidden, tokens);
    std::fprintf(r.out, ",\"skipped\":\"needs %.1f GB, more than %.0f%% of %s\"}\n", need / 1e9,
                 r.args.mem_fraction * 100, r.on_gpu() ? "the GPU's free memory" : "MemAvailable");
    std::fflush(r.out);
  }
  return true;
}

// Run's arguments at one point: the host arrays the benchmark draws and, with
// a device, their copies in its memory, which Run then gets.
class RunInputs {
 public:
  RunInputs(device::Backend* backend, int64_t tokens, int hidden, int top_k, int experts,
            uint64_t seed)
      : backend_(backend), tokens_(tokens), top_k_(top_k), rng_(seed), pick_(0, experts - 1),
        x_(size_t(tokens) * hidden), out_(size_t(tokens) * hidden),
        ids_(size_t(tokens) * top_k), weights_(size_t(tokens) * top_k, 1.0f / top_k) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (float& v : x_) v = u(rng_);
  }

  // With a device: its buffers, with x and the router weights uploaded.
  absl::Status Upload() {
    if (backend_ == nullptr) return absl::OkStatus();
    auto allocate = [this](size_t bytes, device::Buffer* buffer) -> absl::Status {
      ASSIGN_OR_RETURN(*buffer, backend_->Allocate(device::MemoryKind::kDevice,
                                                   std::max<size_t>(bytes, 1)));
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(allocate(x_.size() * sizeof(float), &x_dev_));
    RETURN_IF_ERROR(allocate(weights_.size() * sizeof(float), &weights_dev_));
    RETURN_IF_ERROR(allocate(ids_.size() * sizeof(int32_t), &ids_dev_));
    RETURN_IF_ERROR(allocate(out_.size() * sizeof(float), &out_dev_));
    RETURN_IF_ERROR(backend_->CopyAsync(x_dev_.data(), x_.data(), x_.size() * sizeof(float)));
    RETURN_IF_ERROR(backend_->CopyAsync(weights_dev_.data(), weights_.data(),
                                        weights_.size() * sizeof(float)));
    return backend_->Synchronize();
  }

  // Fresh routing (K distinct uniform experts per token) and a zero out, where
  // Run reads them; the device is idle on return.
  absl::Status NextRouting() {
    for (int64_t tok = 0; tok < tokens_; ++tok) {
      int32_t* row = ids_.data() + tok * top_k_;
      for (int k = 0; k < top_k_; ++k) {
        int32_t e;
        do e = pick_(rng_); while (std::find(row, row + k, e) != row + k);
        row[k] = e;
      }
    }
    if (backend_ == nullptr) {
      std::memset(out_.data(), 0, out_.size() * sizeof(float));
      return absl::OkStatus();
    }
    RETURN_IF_ERROR(backend_->CopyAsync(ids_dev_.data(), ids_.data(), ids_.size() * sizeof(int32_t)));
    RETURN_IF_ERROR(backend_->Zero(out_dev_.data(), out_.size() * sizeof(float)));
    return backend_->Synchronize();
  }

  // Waits for what Run left on the device's stream (the reduce into out).
  absl::Status Finish() { return backend_ ? backend_->Synchronize() : absl::OkStatus(); }

  const float* x() const { return backend_ ? x_dev_.as<float>() : x_.data(); }
  const int32_t* ids() const { return backend_ ? ids_dev_.as<int32_t>() : ids_.data(); }
  const float* weights() const { return backend_ ? weights_dev_.as<float>() : weights_.data(); }
  float* out() { return backend_ ? out_dev_.as<float>() : out_.data(); }

 private:
  device::Backend* backend_;
  int64_t tokens_;
  int top_k_;
  std::mt19937_64 rng_;
  std::uniform_int_distribution<int32_t> pick_;
  std::vector<float> x_, out_;
  std::vector<int32_t> ids_;
  std::vector<float> weights_;
  device::Buffer x_dev_, ids_dev_, weights_dev_, out_dev_;
};

struct Sample {
  double dispatch_s, combine_s, run_s, bytes_dispatch, bytes_combine, minor_faults;
};

// One Run of the first n tokens after fresh routing and a barrier.
Sample TimedRun(Rank& r, ExpertParallelExecutor& ex, RunInputs& in, int64_t n) {
  Check(in.NextRouting(), "routing");
  Check(r.transport.Barrier(), "barrier");
  const auto s0 = ex.stats();
  const long f0 = MinorFaults();
  const auto t0 = std::chrono::steady_clock::now();
  Check(ex.Run(0, in.x(), n, in.ids(), in.weights(), in.out()), "run");
  Check(in.Finish(), "device synchronize");
  const double run_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const long f1 = MinorFaults();
  const auto s1 = ex.stats();
  return {s1.dispatch_seconds - s0.dispatch_seconds, s1.combine_seconds - s0.combine_seconds,
          run_s, double(s1.dispatch_bytes - s0.dispatch_bytes),
          double(s1.combine_bytes - s0.combine_bytes), double(f1 - f0)};
}

// Warm-up, then the timed Runs; this rank's samples of the timed ones.
std::vector<Sample> Measure(Rank& r, ExpertParallelExecutor& ex, RunInputs& in, int tokens) {
  const double target = r.args.target_seconds;
  // Warm-up: buffer growth, first touch, UCX wire-up of the protocol for
  // this size (on a device: the windows' mapping, the kernels' first
  // launches). The executor's scratch buffers grow to the exact size first
  // and double when a later Run needs more; with random routing the received
  // rows vary from Run to Run, so without care the timed Runs would regrow
  // (and page-fault) them now and then. The first warm-up Run therefore has
  // 10% fewer tokens, the next full one makes every buffer double, and
  // routing noise then stays far below that headroom. Then full warm-up Runs
  // while they fit in the target time (at most 3 in all; rank 0 decides, so
  // every rank runs as many).
  Sample probe = TimedRun(r, ex, in, std::max<int64_t>(1, tokens - tokens / 10));
  probe = TimedRun(r, ex, in, tokens);
  double warm_s = probe.run_s;
  for (int w = 2; w < 3; ++w) {
    if (Rank0Value(r, warm_s < target ? 1 : 0) == 0) break;
    probe = TimedRun(r, ex, in, tokens);
    warm_s += probe.run_s;
  }
  // Size the run (rank 0 decides): about --target-seconds, at least 5
  // iterations, 3 for points slower than a third of the target (the large
  // ones, which dominate the sweep).
  const double per_run = std::max(probe.run_s, 1e-6);
  const int iters = Rank0Value(
      r, per_run > target / 3
             ? 3
             : static_cast<int>(std::clamp(target / per_run, 5.0, double(r.args.max_iters))));
  std::vector<Sample> mine(iters);
  for (Sample& s : mine) s = TimedRun(r, ex, in, tokens);
  if (std::getenv("JOULE_BENCH_TRACE") != nullptr) {
    std::fprintf(stderr, "rank %d tokens %d probe run %.0f us; runs:", r.args.rank, tokens,
                 probe.run_s * 1e6);
    for (const Sample& s : mine) {
      std::fprintf(stderr, " %.0f/%.0f/%.0f/%.0f", s.dispatch_s * 1e6, s.combine_s * 1e6,
                   s.run_s * 1e6, s.minor_faults);
    }
    std::fprintf(stderr, "\n");
  }
  return mine;
}

// One point over every rank's samples (seconds; bytes: mean over ranks).
struct Summary {
  int iters = 0;
  double latency = 0, latency_mean = 0, latency_rank_mean = 0, skew_free = 0;
  double dispatch = 0, combine = 0, run = 0, excluded = 0, faults = 0, faults_max = 0;
  double bytes_dispatch = 0, bytes_combine = 0;
};

// all: [rank][iteration]. Per iteration the slowest rank's time, then medians.
Summary Summarize(const std::vector<Sample>& all, int iters, int W) {
  std::vector<double> dc(iters), dc_rank_mean(iters), disp(iters), comb(iters), run(iters),
      excluded(iters), faults(iters), comb_min(iters, 1e30), skew_free(iters);
  Summary out{.iters = iters};
  for (int i = 0; i < iters; ++i) {
    for (int r = 0; r < W; ++r) {
      const Sample& s = all[size_t(r) * iters + i];
      dc[i] = std::max(dc[i], s.dispatch_s + s.combine_s);
      dc_rank_mean[i] += (s.dispatch_s + s.combine_s) / W;
      disp[i] = std::max(disp[i], s.dispatch_s);
      comb[i] = std::max(comb[i], s.combine_s);
      comb_min[i] = std::min(comb_min[i], s.combine_s);
      run[i] = std::max(run[i], s.run_s);
      faults[i] = std::max(faults[i], s.minor_faults);
      excluded[i] = std::max(excluded[i], s.run_s - s.dispatch_s - s.combine_s);
      out.bytes_dispatch += s.bytes_dispatch / (double(iters) * W);
      out.bytes_combine += s.bytes_combine / (double(iters) * W);
    }
    skew_free[i] = disp[i] + comb_min[i];
  }
  out.latency = Median(dc);
  out.latency_mean = Mean(dc);
  out.latency_rank_mean = Median(dc_rank_mean);
  out.skew_free = Median(skew_free);
  out.dispatch = Median(disp);
  out.combine = Median(comb);
  out.run = Median(run);
  out.excluded = Median(excluded);
  out.faults = Median(faults);
  out.faults_max = *std::max_element(faults.begin(), faults.end());
  return out;
}

// What dispatch and combine seconds cover on this path (the line says it).
const char* StatsScope(const Rank& r) {
  return r.backend == nullptr
             ? "host: dispatch = layout, count exchange, packing, dispatch exchange; combine = "
               "combine exchange, un-permute"
             : "device: dispatch = layout, count exchange, router choices' exchange, layout "
               "upload, packing, dispatch rows' move; combine = waiting for the expert kernels, "
               "return rows, combine rows' move, reduce launch; run synchronizes the device";
}

void PrintPoint(const Rank& r, int hidden, int tokens, const Summary& s) {
  const Args& a = r.args;
  const int W = a.world, K = a.top_k, E = a.experts;
  const double lat_us = s.latency * 1e6;
  // The expected dispatch message to one peer (what ucx_perftest is run
  // at): one row per token that has an expert there, of hidden BF16 values
  // plus K expert ids and K router weights.
  const uint64_t nominal_peer = uint64_t(std::llround(
      joule::bench::ExpectedRowsPerPeer(tokens, K, E, W) * (2.0 * hidden + 8.0 * K)));
  // What one row per (token, expert) slot would send to other ranks (the
  // MPI baseline's payload): dispatch hidden x 2 + 4, combine hidden x 2.
  const double slot_bytes = double(tokens) * K * (W - 1) / W * (4.0 * hidden + 4);
  const double bytes = s.bytes_dispatch + s.bytes_combine;
  PrintHead(r, hidden, tokens);
  std::fprintf(
      r.out,
      ",\"experts\":%d,\"moe_intermediate\":%d,\"threads\":%d,\"stats_scope\":\"%s\","
      "\"iters\":%d,\"latency_us_median\":%.2f,\"latency_us_mean\":%.2f,"
      "\"latency_us_median_rank_mean\":%.2f,\"latency_us_median_skew_free\":%.2f,"
      "\"dispatch_us_median\":%.2f,\"combine_us_median\":%.2f,\"run_us_median\":%.2f,"
      "\"excluded_us_median\":%.2f,\"minor_faults_median\":%.0f,\"minor_faults_max\":%.0f,"
      "\"dispatch_bytes_per_rank\":%.0f,\"combine_bytes_per_rank\":%.0f,\"bytes_per_rank\":%.0f,"
      "\"bytes_per_peer\":%llu,\"algbw_GBps\":%.4f,\"dispatch_GBps\":%.4f,\"combine_GBps\":%.4f,"
      "\"slot_bytes_per_rank\":%.0f,\"slot_algbw_GBps\":%.4f}\n",
      E, a.moe_intermediate, a.threads, StatsScope(r), s.iters, lat_us, s.latency_mean * 1e6,
      s.latency_rank_mean * 1e6, s.skew_free * 1e6, s.dispatch * 1e6, s.combine * 1e6,
      s.run * 1e6, s.excluded * 1e6, s.faults, s.faults_max, s.bytes_dispatch, s.bytes_combine,
      bytes, static_cast<unsigned long long>(nominal_peer), bytes / lat_us / 1e3,
      s.bytes_dispatch / std::max(s.dispatch, 1e-12) / 1e9,
      s.bytes_combine / std::max(s.combine, 1e-12) / 1e9, slot_bytes, slot_bytes / lat_us / 1e3);
  std::fflush(r.out);
}

void RunPoint(Rank& r, ExpertParallelExecutor& ex, int hidden, int tokens) {
  const Args& a = r.args;
  const int W = a.world;
  RunInputs in(r.backend, tokens, hidden, a.top_k, a.experts,
               0x5eed + 1000003ull * a.rank + 7919ull * tokens + hidden);
  Check(in.Upload(), "device inputs");
  const std::vector<Sample> mine = Measure(r, ex, in, tokens);
  const int iters = static_cast<int>(mine.size());
  std::vector<Sample> all(size_t(iters) * W);
  Check(r.transport.AllGather(mine.data(), mine.size() * sizeof(Sample), all.data()),
        "all-gather");
  if (a.rank == 0) PrintPoint(r, hidden, tokens, Summarize(all, iters, W));
}

// One hidden size: the checkpoint, this rank's experts, the executor, the points.
void RunHidden(Rank& r, int hidden, const std::vector<int>& token_counts) {
  const Args& a = r.args;
  const std::string model_dir = absl::StrCat(a.dir, "/model-h", hidden);
  if (a.rank == 0) {
    Check(WriteCheckpoint(model_dir, hidden, a.experts, a.top_k, a.moe_intermediate),
          "write checkpoint");
  }
  Check(r.transport.Barrier(), "barrier");
  const joule::Placement& pl = r.placement;
  const int me = a.rank;
  auto weights = joule::ModelWeights::Load(
      model_dir, {.owns_expert = [&pl, me](int l, int e) { return pl.Holds(me, l, e); }});
  Check(weights.status(), "load");
  // With a device the executor uploads the experts it holds itself.
  ExpertParallelExecutor ex(weights->get(), &r.transport, pl, r.stream,
                            {.payload = joule::ep::PayloadType::kBF16,
                             .shared_windows = a.shared_windows,
                             .two_batch_overlap = a.two_batch_overlap,
                             .device = {.backend = r.backend}});
  for (int tokens : token_counts) {
    if (!SkipPoint(r, hidden, tokens)) RunPoint(r, ex, hidden, tokens);
  }
  Check(r.transport.Barrier(), "barrier");
}

}  // namespace

int main(int argc, char** argv) {
  auto parsed = joule::ParseConfig<Args>(
      "usage: joule-dispatch-combine-bench --rank R --world W --dir DIR --hidden H,.. "
      "--tokens T,.. [--device cpu|cuda:N|fake] [flags]",
      "JOULE_BENCH_", argc, argv);
  if (!parsed.ok()) return joule::ReportOptionsError("joule-dispatch-combine-bench", parsed.status());
  const Args& a = *parsed;
  auto backend = CreateDevice(a.device, a.threads);
  Check(backend.status(), "device");
  auto created = joule::ep::UcxTransport::Create(a.rank, a.world, {.timeout = absl::Seconds(120)},
                                                 {.peer_error_handling = a.peer_errors,
                                                  .spin_before_naps = absl::Microseconds(a.spin_us),
                                                  .receive_thread = a.recv_thread});
  Check(created.status(), "create");
  joule::ep::UcxTransport& t = **created;
  Check(t.Connect(Rendezvous(a.dir, a.rank, a.world, t.address())), "connect");
  auto placement = joule::ContiguousPlacement(a.world, 1, a.experts);
  Check(placement.status(), "placement");

  std::unique_ptr<joule::kernels::cpu::ThreadPool> pool;
  if (a.threads > 1) pool = std::make_unique<joule::kernels::cpu::ThreadPool>(a.threads);
  FILE* out = stdout;
  if (a.rank == 0 && !a.out.empty()) out = std::fopen(a.out.c_str(), "a");
  if (out == nullptr) Check(absl::InternalError("cannot open --out " + a.out), "out");
  const char* tls = std::getenv("UCX_TLS");
  Rank rank{.args = a, .transport = t, .backend = backend->get(),
            .stream = joule::kernels::cpu::CpuStream{pool.get()}, .placement = *placement,
            .out = out, .tls = tls ? tls : "default"};
  const std::vector<int> hidden_sizes = *ParseSizeList("hidden", a.hidden);
  const std::vector<int> token_counts = *ParseSizeList("tokens", a.tokens);
  for (int hidden : hidden_sizes) RunHidden(rank, hidden, token_counts);
  if (out != stdout) std::fclose(out);
  return 0;
}
