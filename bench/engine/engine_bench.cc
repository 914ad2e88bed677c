// joule-engine-bench: decode and prefill throughput of the single-process
// engine on one checkpoint, on the CPU or a GPU (--device), with the device's
// memory bandwidth measured in the same run so decode can be stated as a
// fraction of the roofline (active weight bytes per token / bandwidth), and
// tokens per joule from the energy meter (NVML on the GPU computed on).
// Prints and writes JSON.
//
//   joule-engine-bench --model DIR [--device cpu|cuda:N] [--threads N] [--batch 1,8,64]
//                      [--prompt-len 32] [--decode-steps 32] [--prefill-len 512] [--json OUT]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/options.h"
#include "common/status.h"
#include "kernels/cpu/thread_pool.h"
#include "nlohmann/json.hpp"
#include "worker/device/backend.h"
#include "worker/engine/engine.h"
#include "worker/engine/kv_cache.h"
#include "worker/telemetry/make_energy_meter.h"

namespace joule {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// XOR of n words, in 32 independent lanes so the loop is bound by loads, not
// by a dependency chain. Built for AVX-512 and AVX2 besides plain x86-64 and
// picked at load time: the GEMMs read their weights with the widest vectors
// the CPU has, and a narrower read reaches less bandwidth than they do (on
// the CI VM the SSE sum this replaces read 19-22 GB/s, below what decode
// read; this reads 23-29). GCC only, and not under a sanitizer: the clones'
// resolver runs before the sanitizer's runtime is up.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
uint64_t XorWords(const uint64_t* p, int64_t n) {
  uint64_t acc[32] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int j = 0; j < 32; ++j) acc[j] ^= p[i + j];
  }
  for (; i < n; ++i) acc[0] ^= p[i];
  uint64_t x = 0;
  for (uint64_t a : acc) x ^= a;
  return x;
}

// STREAM-style read of a buffer of `bytes` with the threads the engine uses,
// one contiguous share each; best of several passes.
double ReadBandwidthGBs(int threads, size_t bytes) {
  kernels::cpu::ThreadPool pool(threads);
  const int64_t n = static_cast<int64_t>(bytes / sizeof(uint64_t));
  std::vector<uint64_t> buf(n);
  pool.ParallelFor(n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) buf[i] = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull;
  });
  std::atomic<uint64_t> sink{0};
  double best = 0;
  for (int rep = 0; rep < 10; ++rep) {
    const int64_t chunk = (n + pool.num_threads() - 1) / pool.num_threads();
    const auto t0 = Clock::now();
    pool.ParallelFor(n, chunk, [&](int64_t b, int64_t e) {
      sink.fetch_xor(XorWords(buf.data() + b, e - b), std::memory_order_relaxed);
    });
    best = std::max(best, bytes / Seconds(t0, Clock::now()) / 1e9);
  }
  if (sink.load() == 42) std::printf(" ");  // keeps the reads
  return best;
}

// Device-to-device copy bandwidth of a GPU (or whatever device memory is),
// best of several copies of `bytes`, counting what the copy moves through
// memory: bytes read plus bytes written.
absl::StatusOr<double> CopyBandwidthGBs(device::Backend& backend, size_t bytes) {
  ASSIGN_OR_RETURN(device::Buffer src, backend.Allocate(device::MemoryKind::kDevice, bytes));
  ASSIGN_OR_RETURN(device::Buffer dst, backend.Allocate(device::MemoryKind::kDevice, bytes));
  double best = 0;
  for (int rep = 0; rep < 6; ++rep) {
    RETURN_IF_ERROR(backend.Synchronize());
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(backend.CopyAsync(dst.data(), src.data(), bytes));
    RETURN_IF_ERROR(backend.Synchronize());
    if (rep > 0) best = std::max(best, 2.0 * bytes / Seconds(t0, Clock::now()) / 1e9);
  }
  return best;
}

constexpr size_t kMiB = size_t{1} << 20;

// The roofline's buffer: as large as the model's loaded weights, which decode
// reads from step after step (at least 16 MiB for a steady timing, at most
// 1 GiB, beyond every cache). A model that fits the last-level cache (the
// 205 MB mini presets on a CPU with a 260 MB L3) is bound by the cache's
// bandwidth, not DRAM's; the 1 GiB figure is reported beside it.
size_t RooflineBufferBytes(const Model& model) {
  return std::clamp<size_t>(model.weights().LoadedBytes(), 16 * kMiB, 1024 * kMiB);
}

// The roofline's bandwidth over `bytes`: the CPU's read bandwidth with the
// engine's threads, or the GPU's device-to-device copy bandwidth.
absl::StatusOr<double> MemoryBandwidthGBs(Model& model, int threads, size_t bytes) {
  if (model.backend().device_memory_is_host()) return ReadBandwidthGBs(threads, bytes);
  return CopyBandwidthGBs(model.backend(), bytes);
}

// Joules the meter saw between two reads; 0 when it cannot read.
class EnergyWindow {
 public:
  explicit EnergyWindow(telemetry::EnergyMeter* meter) : meter_(meter), start_(Read()) {}
  double Joules() const { return std::max(0.0, Read() - start_); }

 private:
  double Read() const {
    if (meter_ == nullptr) return 0;
    absl::StatusOr<double> j = meter_->ReadJoules();
    return j.ok() ? *j : 0;
  }
  telemetry::EnergyMeter* meter_;
  double start_;
};

std::vector<int32_t> RandomPrompt(int len, uint64_t seed, int64_t vocab) {
  SamplerRng rng(seed);
  std::vector<int32_t> p(len);
  for (int& t : p) t = static_cast<int32_t>(rng.Next() % std::min<int64_t>(vocab, 256));
  return p;
}

constexpr int kDecodeWindows = 5;

struct DecodeResult {
  int batch;
  double tokens_per_s;
  double step_ms;
  double joules = 0;  // over every measured window
  int64_t tokens = 0;
};

// Requests no longer than `len` tokens: block tables (copied to a GPU every
// step) only as wide as the benchmark needs.
int64_t ModelLen(const Model& model, int64_t len) {
  return std::min<int64_t>(model.config().max_position_embeddings, len + 16);
}

absl::StatusOr<DecodeResult> MeasureDecode(Model* model, int batch, int prompt_len, int steps,
                                           telemetry::EnergyMeter* meter) {
  // Sampled (seeded), not greedy: a random model's greedy output tends to
  // repeat one token, which would route every step to the same experts and
  // let their weights sit in the CPU cache — an unrealistically kind workload.
  SamplingParams sp;
  sp.temperature = 1.0f;
  sp.max_tokens = steps * kDecodeWindows + 8;
  sp.ignore_eos = true;
  EngineOptions o;
  o.max_running = std::max(batch, 1);
  o.max_batch_tokens = std::max(batch * prompt_len, 64);
  o.max_prefill_chunk = prompt_len;
  o.kv_cache_bytes = int64_t{1} << 30;
  o.max_model_len = ModelLen(*model, prompt_len + sp.max_tokens);
  ASSIGN_OR_RETURN(auto engine, Engine::Create(model, o));
  for (int b = 0; b < batch; ++b) {
    sp.seed = 7 + b;
    RETURN_IF_ERROR(engine->Add({.id = static_cast<uint64_t>(b), .prompt = RandomPrompt(prompt_len, b, model->config().vocab_size), .sampling = sp}));
  }
  // Prefill plus a few warm-up decode steps.
  for (int i = 0; i < 4; ++i) RETURN_IF_ERROR(engine->Step().status());
  // Median of several windows: these shared machines are noisy.
  std::vector<double> rates, step_ms;
  int64_t all_tokens = 0;
  const EnergyWindow energy(meter);
  for (int w = 0; w < kDecodeWindows; ++w) {
    int64_t tokens = 0;
    auto t0 = Clock::now();
    for (int i = 0; i < steps; ++i) {
      ASSIGN_OR_RETURN(StepResult r, engine->Step());
      if (r.prefill_tokens != 0) return absl::InternalError("decode benchmark step still had prefill");
      tokens += static_cast<int64_t>(r.tokens.size());
    }
    const double s = Seconds(t0, Clock::now());
    rates.push_back(tokens / s);
    step_ms.push_back(s / steps * 1e3);
    all_tokens += tokens;
  }
  const double joules = energy.Joules();
  std::sort(rates.begin(), rates.end());
  std::sort(step_ms.begin(), step_ms.end());
  return DecodeResult{batch, rates[rates.size() / 2], step_ms[step_ms.size() / 2], joules,
                      all_tokens};
}

struct PrefillResult {
  double tokens_per_s = 0;
  double joules = 0;  // over the measured repetitions
  int64_t tokens = 0;
};

absl::StatusOr<PrefillResult> MeasurePrefill(Model* model, int len, int reps,
                                             telemetry::EnergyMeter* meter) {
  EngineOptions o;
  o.max_batch_tokens = len;
  o.max_prefill_chunk = len;
  o.kv_cache_bytes = int64_t{1} << 30;
  o.max_model_len = ModelLen(*model, len + 1);
  ASSIGN_OR_RETURN(auto engine, Engine::Create(model, o));
  SamplingParams sp;
  sp.temperature = 0.0f;
  sp.max_tokens = 1;
  PrefillResult result;
  std::optional<EnergyWindow> energy;
  for (int r = 0; r < reps + 1; ++r) {
    if (r == 1) energy.emplace(meter);  // after the warm-up
    RETURN_IF_ERROR(engine->Add({.id = static_cast<uint64_t>(r), .prompt = RandomPrompt(len, 1000 + r, model->config().vocab_size), .sampling = sp}));
    auto t0 = Clock::now();
    ASSIGN_OR_RETURN(StepResult res, engine->Step());
    const double s = Seconds(t0, Clock::now());
    if (res.prefill_tokens != len) return absl::InternalError("prefill did not run in one step");
    if (r > 0) {  // the first run is warm-up
      result.tokens_per_s = std::max(result.tokens_per_s, len / s);
      result.tokens += len;
    }
  }
  result.joules = energy->Joules();
  return result;
}

// X(type, field, default, help); the flag is --field with '_' written '-'.
#define JOULE_ENGINE_BENCH_FLAGS(X)                                                               \
  X(std::string, model, "", "checkpoint directory (required)")                                    \
  X(std::string, device, "cpu", "where the engine runs: cpu, cuda or cuda:N")                    \
  X(bool, cuda_graphs, true, "GPU: replay decode steps from CUDA graphs")                         \
  X(int, threads, 0, "CPU threads; 0: every core")                                                \
  X(std::string, batch, "1,8,64", "decode batch sizes, comma separated")                          \
  X(int, prompt_len, 32, "prompt tokens per sequence before decoding")                            \
  X(int, decode_steps, 32, "decode steps per measured window")                                    \
  X(int, prefill_len, 512, "prompt tokens of the prefill measurement")                            \
  X(std::string, json, "", "also write the results to this JSON file")                            \
  JOULE_ENERGY_METER_FLAGS(X)

struct EngineBenchFlags {
  JOULE_ENGINE_BENCH_FLAGS(JOULE_OPTION_FIELD)

  std::vector<Option> Options() { return {JOULE_ENGINE_BENCH_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    if (model.empty()) return absl::InvalidArgumentError("--model: required (checkpoint directory)");
    const std::pair<const char*, int> counts[] = {
        {"threads", threads}, {"prompt-len", prompt_len}, {"decode-steps", decode_steps}, {"prefill-len", prefill_len}};
    for (const auto& [flag, n] : counts) {
      if (n < 0) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": must be >= 0, got ", n));
    }
    RETURN_IF_ERROR(device::ParseDeviceSpec(device).status());
    RETURN_IF_ERROR(telemetry::EnergyMeterOptionsFrom(*this).Validate());
    return Batches().status();
  }
  absl::StatusOr<std::vector<int>> Batches() const {
    std::vector<int> batches;
    for (absl::string_view p : absl::StrSplit(batch, ',')) {
      int b;
      if (!absl::SimpleAtoi(p, &b) || b < 1) {
        return absl::InvalidArgumentError(absl::StrCat("--batch: '", p, "' is not a positive integer"));
      }
      batches.push_back(b);
    }
    return batches;
  }
};

// KV cache bytes per token, as this engine stores them and as per-head keys
// and values would take (what MLA's latent rows save; the same for GQA).
std::pair<int64_t, int64_t> KvBytesPerToken(const ModelConfig& c, kernels::DType type) {
  const int64_t stored = PagedKvCache::BlockBytes(c, 1, type);
  if (!c.UsesMla()) return {stored, stored};
  const int64_t per_head = c.mla.qk_head_dim() + c.mla.v_head_dim;
  return {stored, int64_t{c.num_layers} * c.num_attention_heads * per_head *
                      static_cast<int64_t>(kernels::ElementBytes(type))};
}

// tokens / joules, or null when nothing was metered.
nlohmann::json TokensPerJoule(int64_t tokens, double joules) {
  return joules > 0 ? nlohmann::json(tokens / joules) : nlohmann::json(nullptr);
}

absl::Status Run(const EngineBenchFlags& flags) {
  const std::string& model_dir = flags.model;
  ASSIGN_OR_RETURN(const std::vector<int> batches, flags.Batches());
  const int prompt_len = flags.prompt_len, steps = flags.decode_steps;
  ASSIGN_OR_RETURN(const device::DeviceSpec spec, device::ParseDeviceSpec(flags.device));
  ASSIGN_OR_RETURN(auto model, Model::Load(model_dir, {.num_threads = flags.threads, .device = spec,
                                                       .cuda_graphs = flags.cuda_graphs}));
  device::Backend& backend = model->backend();
  const kernels::cpu::CpuStream host = backend.host_stream();
  const int threads = host.pool != nullptr ? host.pool->num_threads() : 1;
  ASSIGN_OR_RETURN(std::unique_ptr<telemetry::EnergyMeter> meter,
                   telemetry::MakeEnergyMeter(telemetry::ForComputeDevice(
                       telemetry::EnergyMeterOptionsFrom(flags), backend.pci_bus_id())));
  // The bytes one decoded token reads, as the device stores them (BF16 on a GPU).
  const size_t active = model->weights().ActiveBytesPerToken(
      backend.device_memory_is_host() ? std::nullopt : std::optional(kernels::DType::kBF16));
  // Conservative roofline: the best bandwidth seen, before and after the decode runs.
  const size_t bw_bytes = RooflineBufferBytes(*model);
  ASSIGN_OR_RETURN(double bw, MemoryBandwidthGBs(*model, threads, bw_bytes));
  double bw_1gib = bw;  // a model of 1 GiB or more was just read over 1 GiB
  if (bw_bytes < 1024 * kMiB) {
    ASSIGN_OR_RETURN(bw_1gib, MemoryBandwidthGBs(*model, threads, 1024 * kMiB));
  }
  double roofline = bw * 1e9 / active;
  const char* bw_kind = backend.device_memory_is_host() ? "read" : "device-to-device copy (read + write)";
  std::printf("device: %s; energy meter: %s\n", backend.Describe().c_str(), meter->Describe().c_str());
  std::printf("decode: median of %d windows of %d steps after prefill; prompt %d tokens\n",
              kDecodeWindows, steps, prompt_len);
  std::printf("model %s: %.1f MB loaded, %.2f MB active per token; threads %d\n", model_dir.c_str(),
              model->weights().LoadedBytes() / 1e6, active / 1e6, threads);
  std::printf("memory %s bandwidth %.1f GB/s over %.0f MB (the model's weights; 1 GiB: %.1f GB/s) "
              "-> batch-1 decode roofline %.1f tokens/s\n", bw_kind, bw, bw_bytes / 1e6, bw_1gib,
              roofline);
  const auto [kv_bytes, kv_expanded] = KvBytesPerToken(model->config(), backend.kv_cache_type());
  std::printf("KV cache %lld bytes per token (%s); per-head K/V would take %lld (%.1fx)\n",
              static_cast<long long>(kv_bytes), kernels::DTypeName(backend.kv_cache_type()),
              static_cast<long long>(kv_expanded), static_cast<double>(kv_expanded) / kv_bytes);

  nlohmann::json out = {{"model", model_dir}, {"device", backend.Describe()},
                        {"threads", threads}, {"bandwidth_kind", bw_kind},
                        {"read_bandwidth_gbs", bw}, {"bandwidth_buffer_bytes", bw_bytes},
                        {"read_bandwidth_gbs_1gib", bw_1gib}, {"active_bytes_per_token", active},
                        {"loaded_bytes", model->weights().LoadedBytes()},
                        {"roofline_tokens_per_s_batch1", roofline}, {"prompt_len", prompt_len},
                        {"kv_cache_type", std::string(kernels::DTypeName(backend.kv_cache_type()))},
                        {"kv_cache_bytes_per_token", kv_bytes},
                        {"kv_cache_bytes_per_token_per_head_kv", kv_expanded},
                        {"decode_steps", steps}, {"energy_source", std::string(meter->source())},
                        {"energy_meter", meter->Describe()}};
  // Written after every measurement, so a run cut short keeps what it measured.
  auto save = [&] {
    if (!flags.json.empty()) std::ofstream(flags.json) << out.dump(2) << "\n";
  };
  save();
  for (int b : batches) {
    ASSIGN_OR_RETURN(DecodeResult r, MeasureDecode(model.get(), b, prompt_len, steps, meter.get()));
    const nlohmann::json per_joule = TokensPerJoule(r.tokens, r.joules);
    std::printf("decode batch %3d: %8.1f tokens/s (%.2f ms/step)", b, r.tokens_per_s, r.step_ms);
    if (r.joules > 0) std::printf(", %.2f tokens/J", per_joule.get<double>());
    if (b == 1) std::printf("  = %.0f%% of roofline", 100.0 * r.tokens_per_s / roofline);
    std::printf("\n");
    out["decode"][std::to_string(b)] = {{"tokens_per_s", r.tokens_per_s}, {"step_ms", r.step_ms},
                                         {"joules", r.joules}, {"tokens", r.tokens},
                                         {"tokens_per_joule", per_joule}};
    if (b == 1) out["roofline_fraction_batch1"] = r.tokens_per_s / roofline;
    save();
  }
  ASSIGN_OR_RETURN(const double bw_after, MemoryBandwidthGBs(*model, threads, bw_bytes));
  if (bw_after > bw) {
    bw = bw_after;
    roofline = bw * 1e9 / active;
    out["read_bandwidth_gbs"] = bw;
    out["roofline_tokens_per_s_batch1"] = roofline;
    std::printf("bandwidth after decode %.1f GB/s\n", bw);
    if (out.contains("decode") && out["decode"].contains("1")) {
      out["roofline_fraction_batch1"] = out["decode"]["1"]["tokens_per_s"].get<double>() / roofline;
      std::printf("batch-1 decode = %.0f%% of the roofline at that bandwidth\n",
                  100.0 * out["roofline_fraction_batch1"].get<double>());
    }
  }
  ASSIGN_OR_RETURN(const PrefillResult prefill,
                   MeasurePrefill(model.get(), flags.prefill_len, 3, meter.get()));
  std::printf("prefill %d tokens: %.1f tokens/s\n", flags.prefill_len, prefill.tokens_per_s);
  out["prefill"] = {{"len", flags.prefill_len}, {"tokens_per_s", prefill.tokens_per_s},
                    {"joules", prefill.joules},
                    {"tokens_per_joule", TokensPerJoule(prefill.tokens, prefill.joules)}};
  out["graph_replays"] = model->graph_replays();
  save();
  return absl::OkStatus();
}

}  // namespace
}  // namespace joule

int main(int argc, char** argv) {
  auto flags = joule::ParseConfig<joule::EngineBenchFlags>(
      "decode and prefill throughput of the single-process engine, against the memory roofline.\n"
      "usage: joule-engine-bench --model DIR [--device cpu|cuda:N] [--threads N] [--batch 1,8,64]\n"
      "       [--json OUT] ...",
      "JOULE_ENGINE_BENCH_", argc, argv);
  if (!flags.ok()) return joule::ReportOptionsError("joule-engine-bench", flags.status());
  absl::Status s = joule::Run(*flags);
  if (!s.ok()) {
    std::fprintf(stderr, "joule-engine-bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
