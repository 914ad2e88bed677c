// Test helpers: N WorkerRuntime ranks over an InProcessGroup (ranks as
// threads: each runtime owns its step loop), the single-process reference, and
// a thread-safe collector for one request's callbacks.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/placement.h"
#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "worker/engine/engine.h"
#include "worker/ep/ep_executor.h"
#include "worker/ep/inproc_transport.h"
#include "worker/model/model.h"
#include "worker/service/worker_runtime.h"

namespace joule::worker::testing_util {

// What one request's callbacks saw.
class Collector {
 public:
  RequestCallbacks callbacks() {
    return RequestCallbacks{
        .on_tokens =
            [this](const TokenUpdate& update) {
              absl::MutexLock lock(&mu_);
              EXPECT_FALSE(done_.HasBeenNotified()) << "tokens after on_done";
              tokens_.insert(tokens_.end(), update.tokens.begin(), update.tokens.end());
            },
        .on_done =
            [this](const RequestOutcome& outcome) {
              {
                absl::MutexLock lock(&mu_);
                EXPECT_FALSE(done_.HasBeenNotified()) << "on_done twice";
                outcome_ = outcome;
              }
              // Last: a waiter may destroy the collector once it is notified.
              done_.Notify();
            },
    };
  }
  bool WaitDone(absl::Duration timeout = absl::Seconds(60)) {
    return done_.WaitForNotificationWithTimeout(timeout);
  }
  bool done() const { return done_.HasBeenNotified(); }
  std::vector<int32_t> tokens() const {
    absl::MutexLock lock(&mu_);
    return tokens_;
  }
  RequestOutcome outcome() const {
    absl::MutexLock lock(&mu_);
    return outcome_;
  }
  // Waits until at least n tokens arrived (or the request ended).
  bool WaitTokens(size_t n, absl::Duration timeout = absl::Seconds(60)) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return tokens_.size() >= n || done_.HasBeenNotified();
    };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout) && tokens_.size() >= n;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<int32_t> tokens_ ABSL_GUARDED_BY(mu_);
  RequestOutcome outcome_ ABSL_GUARDED_BY(mu_);
  absl::Notification done_;
};

inline std::vector<int32_t> Prompt(int len, int salt) {
  std::vector<int32_t> p;
  for (int i = 0; i < len; ++i) p.push_back((i * 37 + salt * 11) % 256);
  return p;
}

inline SamplingParams Greedy(int max_tokens) {
  SamplingParams s;
  s.temperature = 0.0f;
  s.max_tokens = max_tokens;
  s.ignore_eos = true;
  return s;
}

// A KV cache of a few MiB: the default 256 MiB is zeroed up front, which
// costs more than these tests' model forward passes.
inline EngineOptions SmallEngine() {
  EngineOptions o;
  o.kv_cache_bytes = int64_t{8} << 20;
  return o;
}

// Greedy tokens of the single-process engine (all experts local).
inline std::vector<int32_t> ReferenceTokens(const std::string& model_dir,
                                            const std::vector<int32_t>& prompt,
                                            const SamplingParams& sampling) {
  auto model = Model::Load(model_dir, {.num_threads = 1});
  EXPECT_TRUE(model.ok()) << model.status();
  auto engine = Engine::Create(model->get(), SmallEngine());
  EXPECT_TRUE(engine.ok()) << engine.status();
  EXPECT_TRUE((*engine)->Add({.id = 1, .prompt = prompt, .sampling = sampling}).ok());
  std::vector<int32_t> out;
  while ((*engine)->HasWork()) {
    auto step = (*engine)->Step();
    EXPECT_TRUE(step.ok()) << step.status();
    if (!step.ok()) break;
    for (const TokenOutput& t : step->tokens) out.push_back(t.token);
  }
  return out;
}

// N ranks as threads of this process, each with its own model (loaded with
// only its experts), executor, engine and runtime.
class RuntimeCluster {
 public:
  struct Rank {
    std::unique_ptr<Model> model;
    std::unique_ptr<ep::Transport> transport;
    std::unique_ptr<WorkerRuntime> runtime;
  };

  // `energy_meters`, when given, holds one meter per rank (not owned).
  RuntimeCluster(const std::string& model_dir, int world, absl::Duration step_timeout,
                 EngineOptions engine_options = SmallEngine(),
                 std::vector<telemetry::EnergyMeter*> energy_meters = {},
                 RuntimeOptions options = RuntimeOptions(),
                 ep::PayloadType payload = ep::PayloadType::kF32)  // F32: the reference's bits
      : model_dir_(model_dir), group_(world, ep::TransportOptions{.timeout = step_timeout}) {
    auto config = LoadModelConfig(model_dir);
    EXPECT_TRUE(config.ok()) << config.status();
    auto placement = ContiguousPlacement(world, config->num_layers, config->num_experts);
    EXPECT_TRUE(placement.ok()) << placement.status();
    // Dense layers carry no experts.
    for (int l = 0; l < config->num_layers; ++l) {
      if (!config->IsMoeLayer(l)) placement->replicas[l].clear();
    }
    placement_ = *placement;
    options.expert_parallel.payload = payload;  // BF16: rows through shared windows
    for (int r = 0; r < world; ++r) {
      Rank rank;
      options.energy_meter = energy_meters.empty() ? nullptr : energy_meters[r];
      Model::Options mo{.num_threads = 1};
      const Placement p = placement_;
      mo.weights.owns_expert = [p, r](int layer, int expert) { return p.Holds(r, layer, expert); };
      auto model = Model::Load(model_dir, mo);
      EXPECT_TRUE(model.ok()) << model.status();
      rank.model = std::move(*model);
      rank.transport = group_.Rank(r);
      auto executor = std::make_unique<ep::ExpertParallelExecutor>(
          &rank.model->weights(), rank.transport.get(), placement_, rank.model->stream(),
          options.expert_parallel);
      auto engine = Engine::Create(rank.model.get(), engine_options);
      EXPECT_TRUE(engine.ok()) << engine.status();
      rank.runtime = std::make_unique<WorkerRuntime>(rank.model.get(), rank.transport.get(),
                                                     std::move(*engine), std::move(executor),
                                                     /*placement_epoch=*/1, options);
      ranks_.push_back(std::move(rank));
    }
  }
  ~RuntimeCluster() {
    // Runtimes first (they join their loops), then models and transports.
    for (Rank& r : ranks_) r.runtime.reset();
  }

  void StartAll() {
    for (Rank& r : ranks_) r.runtime->Start();
  }
  WorkerRuntime& runtime(int r) { return *ranks_[r].runtime; }
  Rank& rank(int r) { return ranks_[r]; }
  ep::InProcessGroup& group() { return group_; }
  const Placement& placement() const { return placement_; }
  const std::string& model_dir() const { return model_dir_; }
  int world() const { return static_cast<int>(ranks_.size()); }

 private:
  std::string model_dir_;
  ep::InProcessGroup group_;
  Placement placement_;
  std::vector<Rank> ranks_;
};

}  // namespace joule::worker::testing_util
