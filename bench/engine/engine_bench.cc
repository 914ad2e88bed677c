// joule-engine-bench: decode and prefill throughput of the single-process
// engine on one checkpoint, with the machine's memory read bandwidth measured
// in the same run so decode can be stated as a fraction of the roofline
// (active weight bytes per token / bandwidth). Prints and writes JSON.
//
//   joule-engine-bench --model DIR [--threads N] [--batch 1,8,64] [--prompt-len 32]
//                      [--decode-steps 32] [--prefill-len 512] [--json OUT]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/options.h"
#include "common/status.h"
#include "kernels/cpu/thread_pool.h"
#include "nlohmann/json.hpp"
#include "worker/engine/engine.h"

namespace joule {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// STREAM-style read: sum a buffer much larger than the caches with the same
// threads the engine uses; best of several passes.
double ReadBandwidthGBs(int threads, size_t bytes) {
  kernels::cpu::ThreadPool pool(threads);
  const size_t n = bytes / sizeof(float);
  std::vector<float> buf(n);
  pool.ParallelFor(static_cast<int64_t>(n), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) buf[i] = static_cast<float>(i & 1023);
  });
  std::vector<double> partial(pool.num_threads() * 64);
  double best = 0;
  for (int rep = 0; rep < 10; ++rep) {
    std::atomic<int> slot{0};
    double sink = 0;
    auto t0 = Clock::now();
    const int64_t chunk = (static_cast<int64_t>(n) + pool.num_threads() - 1) / pool.num_threads();
    pool.ParallelFor(static_cast<int64_t>(n), chunk, [&](int64_t b, int64_t e) {
      // 8 independent accumulators so the sum is load-bound, not latency-bound.
      float acc[16] = {};
      int64_t i = b;
      for (; i + 16 <= e; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += buf[i + j];
      for (; i < e; ++i) acc[0] += buf[i];
      partial[slot.fetch_add(1)] = std::accumulate(acc, acc + 16, 0.0);
    });
    auto t1 = Clock::now();
    for (double p : partial) sink += p;
    std::fill(partial.begin(), partial.end(), 0.0);
    if (sink == 42.0) std::printf(" ");  // keep the sum alive
    best = std::max(best, bytes / Seconds(t0, t1) / 1e9);
  }
  return best;
}

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
};

absl::StatusOr<DecodeResult> MeasureDecode(Model* model, int batch, int prompt_len, int steps) {
  EngineOptions o;
  o.max_running = std::max(batch, 1);
  o.max_batch_tokens = std::max(batch * prompt_len, 64);
  o.max_prefill_chunk = prompt_len;
  o.kv_cache_bytes = int64_t{1} << 30;
  ASSIGN_OR_RETURN(auto engine, Engine::Create(model, o));
  // Sampled (seeded), not greedy: a random model's greedy output tends to
  // repeat one token, which would route every step to the same experts and
  // let their weights sit in the CPU cache — an unrealistically kind workload.
  SamplingParams sp;
  sp.temperature = 1.0f;
  sp.max_tokens = steps * kDecodeWindows + 8;
  sp.ignore_eos = true;
  for (int b = 0; b < batch; ++b) {
    sp.seed = 7 + b;
    RETURN_IF_ERROR(engine->Add({.id = static_cast<uint64_t>(b), .prompt = RandomPrompt(prompt_len, b, model->config().vocab_size), .sampling = sp}));
  }
  // Prefill plus a few warm-up decode steps.
  for (int i = 0; i < 4; ++i) RETURN_IF_ERROR(engine->Step().status());
  // Median of several windows: these shared machines are noisy.
  std::vector<double> rates, step_ms;
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
  }
  std::sort(rates.begin(), rates.end());
  std::sort(step_ms.begin(), step_ms.end());
  return DecodeResult{batch, rates[rates.size() / 2], step_ms[step_ms.size() / 2]};
}

absl::StatusOr<double> MeasurePrefill(Model* model, int len, int reps) {
  EngineOptions o;
  o.max_batch_tokens = len;
  o.max_prefill_chunk = len;
  o.kv_cache_bytes = int64_t{1} << 30;
  ASSIGN_OR_RETURN(auto engine, Engine::Create(model, o));
  SamplingParams sp;
  sp.temperature = 0.0f;
  sp.max_tokens = 1;
  double best = 0;
  for (int r = 0; r < reps + 1; ++r) {
    RETURN_IF_ERROR(engine->Add({.id = static_cast<uint64_t>(r), .prompt = RandomPrompt(len, 1000 + r, model->config().vocab_size), .sampling = sp}));
    auto t0 = Clock::now();
    ASSIGN_OR_RETURN(StepResult res, engine->Step());
    const double s = Seconds(t0, Clock::now());
    if (res.prefill_tokens != len) return absl::InternalError("prefill did not run in one step");
    if (r > 0) best = std::max(best, len / s);  // first run is warm-up
  }
  return best;
}

// X(type, field, default, help); the flag is --field with '_' written '-'.
#define JOULE_ENGINE_BENCH_FLAGS(X)                                                               \
  X(std::string, model, "", "checkpoint directory (required)")                                    \
  X(int, threads, 0, "CPU threads; 0: every core")                                                \
  X(std::string, batch, "1,8,64", "decode batch sizes, comma separated")                          \
  X(int, prompt_len, 32, "prompt tokens per sequence before decoding")                            \
  X(int, decode_steps, 32, "decode steps per measured window")                                    \
  X(int, prefill_len, 512, "prompt tokens of the prefill measurement")                            \
  X(std::string, json, "", "also write the results to this JSON file")

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

absl::Status Run(const EngineBenchFlags& flags) {
  const std::string& model_dir = flags.model;
  const std::string& json_out = flags.json;
  ASSIGN_OR_RETURN(const std::vector<int> batches, flags.Batches());
  const int threads = flags.threads, prompt_len = flags.prompt_len, steps = flags.decode_steps,
            prefill_len = flags.prefill_len;
  ASSIGN_OR_RETURN(auto model, Model::Load(model_dir, {.num_threads = threads}));
  const int nthreads = model->stream().pool->num_threads();
  // Conservative roofline: the best read bandwidth seen, before and after the decode runs.
  double bw = ReadBandwidthGBs(nthreads, size_t{1} << 30);
  const double active_mb = model->weights().ActiveBytesPerToken() / 1e6;
  double roofline = bw * 1e9 / model->weights().ActiveBytesPerToken();
  std::printf("decode: median of %d windows of %d steps after prefill; prompt %d tokens\n",
              kDecodeWindows, steps, prompt_len);
  std::printf("model %s: %.1f MB loaded, %.2f MB active per token; threads %d\n", model_dir.c_str(),
              model->weights().LoadedBytes() / 1e6, active_mb, nthreads);
  std::printf("memory read bandwidth %.1f GB/s -> batch-1 decode roofline %.1f tokens/s\n", bw, roofline);

  nlohmann::json out = {{"model", model_dir}, {"threads", nthreads}, {"read_bandwidth_gbs", bw},
                        {"active_bytes_per_token", model->weights().ActiveBytesPerToken()},
                        {"loaded_bytes", model->weights().LoadedBytes()},
                        {"roofline_tokens_per_s_batch1", roofline}, {"prompt_len", prompt_len},
                        {"decode_steps", steps}};
  for (int b : batches) {
    ASSIGN_OR_RETURN(DecodeResult r, MeasureDecode(model.get(), b, prompt_len, steps));
    std::printf("decode batch %3d: %8.1f tokens/s (%.2f ms/step)", b, r.tokens_per_s, r.step_ms);
    if (b == 1) std::printf("  = %.0f%% of roofline", 100.0 * r.tokens_per_s / roofline);
    std::printf("\n");
    out["decode"][std::to_string(b)] = {{"tokens_per_s", r.tokens_per_s}, {"step_ms", r.step_ms}};
    if (b == 1) out["roofline_fraction_batch1"] = r.tokens_per_s / roofline;
  }
  const double bw_after = ReadBandwidthGBs(nthreads, size_t{1} << 30);
  if (bw_after > bw) {
    bw = bw_after;
    roofline = bw * 1e9 / model->weights().ActiveBytesPerToken();
    out["read_bandwidth_gbs"] = bw;
    out["roofline_tokens_per_s_batch1"] = roofline;
    std::printf("read bandwidth after decode %.1f GB/s\n", bw);
    if (out.contains("decode") && out["decode"].contains("1")) {
      out["roofline_fraction_batch1"] = out["decode"]["1"]["tokens_per_s"].get<double>() / roofline;
      std::printf("batch-1 decode = %.0f%% of the roofline at that bandwidth\n",
                  100.0 * out["roofline_fraction_batch1"].get<double>());
    }
  }
  ASSIGN_OR_RETURN(double prefill, MeasurePrefill(model.get(), prefill_len, 3));
  std::printf("prefill %d tokens: %.1f tokens/s\n", prefill_len, prefill);
  out["prefill"] = {{"len", prefill_len}, {"tokens_per_s", prefill}};
  if (!json_out.empty()) {
    std::ofstream(json_out) << out.dump(2) << "\n";
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace joule

int main(int argc, char** argv) {
  auto flags = joule::ParseConfig<joule::EngineBenchFlags>(
      "decode and prefill throughput of the single-process engine, against the memory roofline.\n"
      "usage: joule-engine-bench --model DIR [--threads N] [--batch 1,8,64] [--json OUT] ...",
      "JOULE_ENGINE_BENCH_", argc, argv);
  if (!flags.ok()) return joule::ReportOptionsError("joule-engine-bench", flags.status());
  absl::Status s = joule::Run(*flags);
  if (!s.ok()) {
    std::fprintf(stderr, "joule-engine-bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
