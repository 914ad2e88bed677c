// Expert parallelism end to end: EP ranks as threads, each with its own model
// (only its experts loaded), engine and requests (data-parallel attention),
// stepping in lockstep. A user sees the same greedy tokens and logits as from
// the single-process engine, whatever the mix of busy and idle ranks, across
// a rebalance, and an error (not a hang) when a rank dies.
#include <algorithm>
#include <chrono>
#include <functional>
#include <cmath>
#include <map>

#include "coordinator/placement/eplb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/paths.h"
#include "tests/worker/ep/dispatch/ep_test_util.h"
#include "worker/device/fake_device_backend.h"
#include "worker/engine/engine.h"
#include "worker/ep/ep_executor.h"
#include "worker/ep/inproc_transport.h"
#include "worker/ep/lockstep.h"

namespace joule::ep {
namespace {

using ::testing::HasSubstr;
using testing::OwnedBy;
using testing::RunRanks;

std::vector<int32_t> Prompt(int len, int salt) {
  std::vector<int32_t> p;
  for (int i = 0; i < len; ++i) p.push_back((i * 37 + salt * 11 + 3) % 256);
  return p;
}

GenerationRequest Greedy(uint64_t id, int prompt_len, int max_tokens) {
  GenerationRequest r;
  r.id = id;
  r.prompt = Prompt(prompt_len, static_cast<int>(id));
  r.sampling.temperature = 0.0f;
  r.sampling.max_tokens = max_tokens;
  r.sampling.ignore_eos = true;
  return r;
}

// Small batches so prompts are prefilled in chunks next to other sequences'
// decodes: more steps, more mixes of work across ranks.
EngineOptions Options() {
  EngineOptions o;
  o.max_batch_tokens = 12;
  o.max_prefill_chunk = 8;
  o.kv_cache_bytes = int64_t{8} << 20;
  return o;
}

struct Output {
  std::map<uint64_t, std::vector<int32_t>> tokens;
  std::map<uint64_t, std::vector<std::vector<float>>> logits;  // per sampled token
};

void Record(Output* out, const StepResult& step) {
  for (const TokenOutput& t : step.tokens) out->tokens[t.id].push_back(t.token);
}

void Observe(Engine* engine, Output* out) {
  engine->set_logits_observer([out](uint64_t id, const float* logits, int64_t vocab) {
    out->logits[id].emplace_back(logits, logits + vocab);
  });
}

// The single-process engine on one rank's requests.
Output RunSingle(const std::string& dir, const std::vector<GenerationRequest>& requests) {
  Output out;
  auto model = Model::Load(dir, {.num_threads = 1});
  EXPECT_TRUE(model.ok()) << model.status();
  auto engine = Engine::Create(model->get(), Options());
  EXPECT_TRUE(engine.ok()) << engine.status();
  Observe(engine->get(), &out);
  for (const auto& r : requests) EXPECT_TRUE((*engine)->Add(r).ok());
  for (int steps = 0; (*engine)->HasWork() && steps < 10000; ++steps) {
    auto step = (*engine)->Step();
    EXPECT_TRUE(step.ok()) << step.status();
    if (!step.ok()) break;
    Record(&out, *step);
  }
  return out;
}

struct EpRun {
  PayloadType payload = PayloadType::kF32;
  bool load_all_experts = false;
  // Each rank's model on a fake device, its rows in device memory
  // (device_stages.h): what a GPU worker runs, on the CPU's kernels.
  bool device = false;
  bool two_batch_overlap = false;
  // Called on every rank after each successful step (all ranks call it for
  // the same steps); may use the transport collectively.
  std::function<void(int rank, int step, ExpertParallelExecutor&, Transport&)> between_steps;
};

struct RankResult {
  Output out;
  absl::Status status;
  int steps = 0;
  ExpertParallelExecutor::Stats stats;
};

std::vector<RankResult> RunExpertParallel(const std::string& dir,
                                          const std::vector<std::vector<GenerationRequest>>& requests,
                                          const EpRun& run) {
  const int world = static_cast<int>(requests.size());
  auto config = LoadModelConfig(dir);
  EXPECT_TRUE(config.ok());
  auto placement = ContiguousPlacement(world, config->num_layers, config->num_experts);
  EXPECT_TRUE(placement.ok());
  InProcessGroup group(world);
  std::vector<RankResult> results(world);
  RunRanks(world, [&](int rank) {
    RankResult& res = results[rank];
    auto transport = group.Rank(rank);
    Model::Options mo{.num_threads = 1};
    if (!run.load_all_experts) mo.weights = OwnedBy(*placement, rank);
    absl::StatusOr<std::unique_ptr<Model>> model;
    if (run.device) {
      auto weights = ModelWeights::Load(dir, mo.weights);
      ASSERT_TRUE(weights.ok()) << weights.status();
      // Asynchronous: launches run on the fake device's thread, as on a GPU's stream.
      model = Model::Create(*std::move(weights),
                            std::make_unique<device::FakeDeviceBackend>(1, /*asynchronous=*/true),
                            /*cuda_graphs=*/false);
    } else {
      model = Model::Load(dir, mo);
    }
    ASSERT_TRUE(model.ok()) << model.status();
    ExpertParallelOptions options{.payload = run.payload,
                                  .two_batch_overlap = run.two_batch_overlap};
    if (run.device) {
      options.device = {.backend = &(*model)->backend(), .resident = &(*model)->device_weights(),
                        .resident_host = &(*model)->weights()};
    }
    ExpertParallelExecutor ex(&(*model)->weights(), transport.get(), *placement, (*model)->stream(),
                              options);
    (*model)->set_expert_executor(&ex);
    auto engine = Engine::Create(model->get(), Options());
    ASSERT_TRUE(engine.ok());
    Observe(engine->get(), &res.out);
    for (const auto& r : requests[rank]) ASSERT_TRUE((*engine)->Add(r).ok());
    LockstepStepper stepper(engine->get(), transport.get());
    for (;; ++res.steps) {
      auto step = stepper.Step();
      if (!step.ok()) {
        res.status = step.status();
        break;
      }
      Record(&res.out, step->step);
      if (step->global_tokens == 0) break;  // every rank sees the same count and stops here
      if (run.between_steps) run.between_steps(rank, res.steps, ex, *transport);
    }
    EXPECT_FALSE((*engine)->HasWork());
    res.stats = ex.stats();
  });
  return results;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// Requests per rank: different prompts on every rank, different lengths, so
// ranks finish at different times; `idle` ranks get none.
std::vector<std::vector<GenerationRequest>> Workload(int world, std::vector<int> idle = {}) {
  std::vector<std::vector<GenerationRequest>> requests(world);
  for (int r = 0; r < world; ++r) {
    if (std::find(idle.begin(), idle.end(), r) != idle.end()) continue;
    const uint64_t base = 100 * (r + 1);
    requests[r].push_back(Greedy(base, 5 + 4 * r, 3 + 5 * r));
    requests[r].push_back(Greedy(base + 1, 17 - 2 * r, 9 - r));
    if (r % 2 == 0) requests[r].push_back(Greedy(base + 2, 3, 6 + r));
  }
  return requests;
}

class EpEngineTest : public ::testing::TestWithParam<std::string> {
 protected:
  void TearDown() override {
    if (worst_f32_logit_diff_ >= 0) std::printf("largest F32-payload logit difference: %g\n", worst_f32_logit_diff_);
  }
  double worst_f32_logit_diff_ = -1;

  // BF16 payloads at EP 4: logits within BF16 rounding of the single process.
  void ExpectBf16Close(bool device);
  // EPLB replicas placed mid-generation, then every expert everywhere.
  void ExpectRebalanceKeepsOutputs(bool device);

  std::string Dir() const { return joule::testing::TinyModelDir(GetParam()); }

  // F32 payloads: the same tokens and logits as the single-process engine.
  void ExpectMatchesSingleProcess(const std::vector<std::vector<GenerationRequest>>& requests,
                                  const std::vector<RankResult>& ep) {
    for (size_t r = 0; r < requests.size(); ++r) {
      ASSERT_TRUE(ep[r].status.ok()) << "rank " << r << ": " << ep[r].status;
      const Output want = RunSingle(Dir(), requests[r]);
      EXPECT_EQ(ep[r].out.tokens, want.tokens) << "rank " << r;
      for (const auto& [id, steps] : want.logits) {
        const auto& got = ep[r].out.logits.at(id);
        ASSERT_EQ(got.size(), steps.size()) << "request " << id;
        for (size_t s = 0; s < steps.size(); ++s) {
          // Each row's experts compute exactly as locally (same kernels, the
          // same per-row arithmetic), so only a future kernel that changed
          // summation order with batch shape could move this off zero.
          const double diff = MaxAbsDiff(got[s], steps[s]);
          worst_f32_logit_diff_ = std::max(worst_f32_logit_diff_, diff);
          EXPECT_LE(diff, 1e-5) << "request " << id << " token " << s;
        }
      }
    }
  }
};

TEST_P(EpEngineTest, EveryRankBusyMatchesSingleProcess) {
  for (bool device : {false, true}) {
    for (int world : {1, 2, 4}) {
      SCOPED_TRACE(::testing::Message() << "EP " << world << (device ? " on a fake device" : ""));
      auto requests = Workload(world);
      ExpectMatchesSingleProcess(requests, RunExpertParallel(Dir(), requests, {.device = device}));
    }
  }
}

TEST_P(EpEngineTest, IdleRanksJoinWithEmptyBatches) {
  for (auto [world, idle, device] : std::vector<std::tuple<int, std::vector<int>, bool>>{
           {2, {1}, false}, {4, {0, 2}, false}, {4, {1, 2, 3}, false}, {4, {0, 2}, true}}) {
    SCOPED_TRACE(::testing::Message() << "EP " << world << ", idle ranks " << idle.size()
                                      << (device ? " on a fake device" : ""));
    auto requests = Workload(world, idle);
    auto ep = RunExpertParallel(Dir(), requests, {.device = device});
    ExpectMatchesSingleProcess(requests, ep);
    for (int r : idle) {
      EXPECT_TRUE(ep[r].out.tokens.empty());
      EXPECT_EQ(ep[r].steps, ep[world - 1 - r].steps) << "all ranks run the same steps";
    }
  }
}

// Each MoE layer as two micro-batches whose phases interleave (the GPU's
// two-batch overlap), busy and idle ranks: still the single process's
// tokens and logits.
TEST_P(EpEngineTest, TwoBatchOverlapMatchesSingleProcess) {
  for (auto [world, idle] : std::vector<std::pair<int, std::vector<int>>>{
           {2, {}}, {4, {}}, {4, {0, 2}}}) {
    SCOPED_TRACE(::testing::Message() << "EP " << world << ", idle ranks " << idle.size());
    auto requests = Workload(world, idle);
    ExpectMatchesSingleProcess(
        requests, RunExpertParallel(Dir(), requests, {.device = true, .two_batch_overlap = true}));
  }
}

TEST_P(EpEngineTest, Bf16PayloadKeepsTokensWhereMarginsAllow) {
  for (bool device : {false, true}) {
    SCOPED_TRACE(device ? "on a fake device" : "on the host");
    ExpectBf16Close(device);
  }
}

void EpEngineTest::ExpectBf16Close(bool device) {
  const int world = 4;
  auto requests = Workload(world);
  auto ep = RunExpertParallel(Dir(), requests, {.payload = PayloadType::kBF16, .device = device});
  auto config = LoadModelConfig(Dir());
  ASSERT_TRUE(config.ok());
  int moe_layers = 0;
  for (int l = 0; l < config->num_layers; ++l) moe_layers += config->IsMoeLayer(l) ? 1 : 0;
  int compared = 0, tokens_equal = 0;
  double worst = 0;
  for (int r = 0; r < world; ++r) {
    ASSERT_TRUE(ep[r].status.ok()) << ep[r].status;
    const Output want = RunSingle(Dir(), requests[r]);
    for (const auto& [id, steps] : want.logits) {
      const auto& got = ep[r].out.logits.at(id);
      const auto& got_tokens = ep[r].out.tokens.at(id);
      const auto& want_tokens = want.tokens.at(id);
      for (size_t s = 0; s < steps.size() && s < got.size(); ++s) {
        // BF16 payloads round each MoE layer's expert inputs and outputs to 8
        // significant bits: relative error <= 2^-8 each, so a layer's MoE
        // output moves by about 2 * 2^-8 of its size, and the residual stream
        // (of which it is a part) by less. Final norm and lm_head carry that
        // relative error to the logits: 2 * 2^-8 * (MoE layers) of the largest
        // logit bounds it (measured: under a fifth of that on the tiny models).
        double scale = 0;
        for (float v : steps[s]) scale = std::max(scale, std::abs(static_cast<double>(v)));
        const double tol = 2 * (1.0 / 256) * moe_layers * scale;
        const double diff = MaxAbsDiff(got[s], steps[s]);
        EXPECT_LE(diff, tol) << "rank " << r << " request " << id << " token " << s;
        worst = std::max(worst, diff / tol);
        ++compared;
        // Tokens agree while the reference's top-1 margin exceeds twice the
        // perturbation; after a disagreement the contexts differ, so stop.
        std::vector<float> sorted = steps[s];
        std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
        if (sorted[0] - sorted[1] <= 2 * tol) break;
        EXPECT_EQ(got_tokens[s], want_tokens[s]) << "rank " << r << " request " << id << " token " << s;
        if (got_tokens[s] != want_tokens[s]) break;
        ++tokens_equal;
      }
    }
    EXPECT_GT(ep[r].stats.dispatch_bytes, 0u);
  }
  std::printf("BF16 payload: %d logit rows compared, worst difference / tolerance %.3g, %d tokens equal\n",
              compared, worst, tokens_equal);
  EXPECT_GT(compared, 10);
  EXPECT_GT(tokens_equal, 0) << "no reference token had a margin the comparison could use";
}

TEST_P(EpEngineTest, RebalanceBetweenStepsKeepsOutputs) {
  for (bool device : {false, true}) {
    SCOPED_TRACE(device ? "on a fake device" : "on the host");
    ExpectRebalanceKeepsOutputs(device);
  }
}

void EpEngineTest::ExpectRebalanceKeepsOutputs(bool device) {
  const int world = 4;
  auto config = LoadModelConfig(Dir());
  ASSERT_TRUE(config.ok());
  auto base = ContiguousPlacement(world, config->num_layers, config->num_experts);
  ASSERT_TRUE(base.ok());
  Placement everywhere = *base;  // every expert on every rank: nothing leaves a rank
  for (auto& layer : everywhere.replicas) {
    for (auto& ranks : layer) ranks = {0, 1, 2, 3};
  }
  std::vector<uint64_t> bytes_at_switch(world);
  std::vector<int> replicas_added(world);
  EpRun run;
  run.load_all_experts = true;
  run.device = device;
  run.between_steps = [&](int rank, int step, ExpertParallelExecutor& ex, Transport& transport) {
    if (step == 2) {
      // What a coordinator does: sum the per-expert load the ranks report and
      // place redundant replicas of the hottest experts.
      const auto load = ex.TakeExpertLoad();
      std::vector<int64_t> flat;
      for (const auto& layer : load) flat.insert(flat.end(), layer.begin(), layer.end());
      std::vector<int64_t> all(flat.size() * world);
      ASSERT_TRUE(transport.AllGather(flat.data(), flat.size() * sizeof(int64_t), all.data()).ok());
      std::vector<std::vector<int64_t>> total(load.size(), std::vector<int64_t>(config->num_experts, 0));
      for (int r = 0; r < world; ++r) {
        for (size_t i = 0; i < flat.size(); ++i) total[i / config->num_experts][i % config->num_experts] += all[r * flat.size() + i];
      }
      auto rebalanced = RebalancePlacement(*base, total, config->num_experts / 2);
      ASSERT_TRUE(rebalanced.ok()) << rebalanced.status();
      for (const auto& layer : rebalanced->replicas) {
        for (const auto& ranks : layer) replicas_added[rank] += static_cast<int>(ranks.size()) - 1;
      }
      ASSERT_TRUE(ex.SetPlacement(*rebalanced).ok());
    }
    if (step == 5) {
      ASSERT_TRUE(ex.SetPlacement(everywhere).ok());
      bytes_at_switch[rank] = ex.stats().dispatch_bytes;
    }
  };
  auto requests = Workload(world);
  auto ep = RunExpertParallel(Dir(), requests, run);
  ExpectMatchesSingleProcess(requests, ep);
  for (int r = 0; r < world; ++r) {
    EXPECT_GT(replicas_added[r], 0);
    EXPECT_GT(ep[r].steps, 6) << "the test meant to rebalance mid-generation";
    EXPECT_EQ(ep[r].stats.dispatch_bytes, bytes_at_switch[r])
        << "with every expert on every rank, tokens stay on their rank";
  }
}

// Fails like a crashed process in the middle of a step: after `calls` MoE
// layer calls it marks its rank dead and stops.
class DyingExecutor : public ExpertExecutor {
 public:
  DyingExecutor(ExpertExecutor* inner, InProcessGroup* group, int rank, int calls)
      : inner_(inner), group_(group), rank_(rank), calls_left_(calls) {}
  absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* ids, const float* w,
                   float* out) override {
    if (--calls_left_ == 0) {
      killed_at = std::chrono::steady_clock::now();
      group_->Kill(rank_);
      return absl::UnavailableError("rank crashed");
    }
    return inner_->Run(layer, x, tokens, ids, w, out);
  }
  std::chrono::steady_clock::time_point killed_at;

 private:
  ExpertExecutor* inner_;
  InProcessGroup* group_;
  int rank_;
  int calls_left_;
};

TEST_P(EpEngineTest, DeadRankMidGenerationFailsEveryOtherRankQuickly) {
  const int world = 3;
  auto config = LoadModelConfig(Dir());
  ASSERT_TRUE(config.ok());
  auto placement = ContiguousPlacement(world, config->num_layers, config->num_experts);
  ASSERT_TRUE(placement.ok());
  // A long timeout: survivors must notice the death, not wait it out.
  InProcessGroup group(world, {.timeout = absl::Seconds(60)});
  std::vector<absl::Status> status(world);
  std::vector<int> steps_ok(world, 0);
  std::vector<std::chrono::steady_clock::time_point> failed_at(world);
  RunRanks(world, [&](int rank) {
    auto transport = group.Rank(rank);
    auto model = Model::Load(Dir(), {.num_threads = 1, .weights = OwnedBy(*placement, rank)});
    ASSERT_TRUE(model.ok());
    ExpertParallelExecutor ex(&(*model)->weights(), transport.get(), *placement, (*model)->stream(),
                              {.payload = PayloadType::kBF16});
    // Rank 2 dies in its 8th MoE layer call: mid-step, after a few steps.
    DyingExecutor die(&ex, &group, rank, 8);
    (*model)->set_expert_executor(rank == 2 ? static_cast<ExpertExecutor*>(&die) : &ex);
    auto engine = Engine::Create(model->get(), Options());
    ASSERT_TRUE(engine.ok());
    ASSERT_TRUE((*engine)->Add(Greedy(10 + rank, 6, 50)).ok());
    LockstepStepper stepper(engine->get(), transport.get());
    while (true) {
      auto step = stepper.Step();
      if (!step.ok()) {
        status[rank] = step.status();
        failed_at[rank] = std::chrono::steady_clock::now();
        break;
      }
      ++steps_ok[rank];
    }
    // The group is broken: later steps fail at once.
    EXPECT_FALSE(stepper.Step().ok());
    if (rank == 2) failed_at[2] = die.killed_at;
  });
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_GT(steps_ok[rank], 1) << "rank 2 died mid-generation";
    EXPECT_EQ(status[rank].code(), absl::StatusCode::kUnavailable) << status[rank];
    EXPECT_THAT(std::string(status[rank].message()), HasSubstr("layer"));
    EXPECT_THAT(std::string(status[rank].message()), HasSubstr("rank 2 is gone"));
    EXPECT_LT(std::chrono::duration<double>(failed_at[rank] - failed_at[2]).count(), 5.0);
  }
}

INSTANTIATE_TEST_SUITE_P(TinyModels, EpEngineTest,
                         ::testing::Values("qwen3_moe-tiny", "qwen2_moe-tiny", "mixtral-tiny", "deepseek_v3-tiny",
                                           "deepseek_v3_fp8-tiny"),
                         [](const auto& info) {
                           std::string n = info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// Counts MoE layer calls, to see which steps ran a forward pass.
class CountingExecutor : public ExpertExecutor {
 public:
  explicit CountingExecutor(ExpertExecutor* inner) : inner_(inner) {}
  absl::Status Run(int layer, const float* x, int64_t tokens, const int32_t* ids, const float* w,
                   float* out) override {
    ++calls;
    if (tokens == 0) ++empty_calls;
    return inner_->Run(layer, x, tokens, ids, w, out);
  }
  int calls = 0, empty_calls = 0;

 private:
  ExpertExecutor* inner_;
};

TEST(LockstepTest, IdleRankRunsEmptyStepsOnlyWhileOthersWork) {
  const std::string dir = joule::testing::TinyModelDir("mixtral-tiny");
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  auto placement = ContiguousPlacement(2, config->num_layers, config->num_experts);
  InProcessGroup group(2);
  std::vector<std::vector<int64_t>> global(2);
  std::vector<int> calls(2), empty_calls(2);
  RunRanks(2, [&](int rank) {
    auto transport = group.Rank(rank);
    auto model = Model::Load(dir, {.num_threads = 1, .weights = OwnedBy(*placement, rank)});
    ASSERT_TRUE(model.ok());
    ExpertParallelExecutor ex(&(*model)->weights(), transport.get(), *placement, (*model)->stream());
    CountingExecutor counting(&ex);
    (*model)->set_expert_executor(&counting);
    auto engine = Engine::Create(model->get(), Options());
    ASSERT_TRUE(engine.ok());
    if (rank == 0) {
      ASSERT_TRUE((*engine)->Add(Greedy(1, 4, 3)).ok());
    }
    LockstepStepper stepper(engine->get(), transport.get());
    for (int i = 0; i < 6; ++i) {  // 3 steps of work, then idle steps
      auto step = stepper.Step();
      ASSERT_TRUE(step.ok()) << step.status();
      global[rank].push_back(step->global_tokens);
      if (rank == 1) {
        EXPECT_TRUE(step->step.tokens.empty());
      }
    }
    calls[rank] = counting.calls;
    empty_calls[rank] = counting.empty_calls;
  });
  const std::vector<int64_t> want = {4, 1, 1, 0, 0, 0};  // prefill, two decodes, then nothing
  EXPECT_EQ(global[0], want);
  EXPECT_EQ(global[1], want);
  const int moe_layers = config->num_layers;  // Mixtral: every layer
  EXPECT_EQ(calls[0], 3 * moe_layers);
  EXPECT_EQ(empty_calls[0], 0);
  EXPECT_EQ(calls[1], 3 * moe_layers) << "the idle rank joins every step that runs, and no other";
  EXPECT_EQ(empty_calls[1], 3 * moe_layers);
}

TEST(LockstepTest, RestingPacedSequencesRideAlongStepsOtherRanksRun) {
  const std::string dir = joule::testing::TinyModelDir("qwen3_moe-tiny");
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  auto placement = ContiguousPlacement(2, config->num_layers, config->num_experts);
  InProcessGroup group(2);
  const absl::Time frozen = absl::UnixEpoch();  // rank 0's request is never due again
  std::vector<std::vector<size_t>> tokens(2);
  std::vector<std::vector<int64_t>> global(2);
  RunRanks(2, [&](int rank) {
    auto transport = group.Rank(rank);
    auto model = Model::Load(dir, {.num_threads = 1, .weights = OwnedBy(*placement, rank)});
    ASSERT_TRUE(model.ok());
    ExpertParallelExecutor ex(&(*model)->weights(), transport.get(), *placement, (*model)->stream());
    (*model)->set_expert_executor(&ex);
    EngineOptions options = Options();
    options.clock = [frozen] { return frozen; };
    auto engine = Engine::Create(model->get(), options);
    ASSERT_TRUE(engine.ok());
    GenerationRequest r = Greedy(1 + rank, 4, rank == 0 ? 3 : 5);
    if (rank == 0) r.token_interval = absl::Hours(1);
    ASSERT_TRUE((*engine)->Add(r).ok());
    LockstepStepper stepper(engine->get(), transport.get());
    for (int i = 0; i < 6; ++i) {
      auto step = stepper.Step();
      ASSERT_TRUE(step.ok()) << step.status();
      tokens[rank].push_back(step->step.tokens.size());
      global[rank].push_back(step->global_tokens);
    }
    EXPECT_FALSE((*engine)->HasWork());
  });
  // Rank 0 rests after its prefill, yet takes a token in each step rank 1
  // runs; the count exchange saw only rank 1's tokens.
  EXPECT_EQ(tokens[0], (std::vector<size_t>{1, 1, 1, 0, 0, 0}));
  EXPECT_EQ(tokens[1], (std::vector<size_t>{1, 1, 1, 1, 1, 0}));
  EXPECT_EQ(global[0], (std::vector<int64_t>{8, 1, 1, 1, 1, 0}));
  EXPECT_EQ(global[1], global[0]);
}

// A round nobody runs because every rank's sequences rest reports how long
// until the first falls due, over all ranks (rank 2 has no sequences and puts
// no bound on it); a round where a rank is idle because it has nothing at all
// reports no rest.
TEST(LockstepTest, ARoundEveryRankRestsThroughSaysUntilTheFirstIsDue) {
  const std::string dir = joule::testing::TinyModelDir("qwen3_moe-tiny");
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  constexpr int kWorld = 3;
  auto placement = ContiguousPlacement(kWorld, config->num_layers, config->num_experts);
  InProcessGroup group(kWorld);
  std::vector<std::vector<int64_t>> global(kWorld);
  std::vector<std::vector<absl::Duration>> rest(kWorld);
  RunRanks(kWorld, [&](int rank) {
    auto transport = group.Rank(rank);
    auto model = Model::Load(dir, {.num_threads = 1, .weights = OwnedBy(*placement, rank)});
    ASSERT_TRUE(model.ok());
    ExpertParallelExecutor ex(&(*model)->weights(), transport.get(), *placement, (*model)->stream());
    (*model)->set_expert_executor(&ex);
    absl::Time now = absl::UnixEpoch();  // this rank's clock, moved by this thread only
    EngineOptions options = Options();
    options.clock = [&now] { return now; };
    auto engine = Engine::Create(model->get(), options);
    ASSERT_TRUE(engine.ok());
    if (rank < 2) {
      GenerationRequest r = Greedy(1 + rank, 4, 3);
      r.token_interval = absl::Milliseconds(rank == 0 ? 100 : 40);
      ASSERT_TRUE((*engine)->Add(r).ok());
    }
    LockstepStepper stepper(engine->get(), transport.get());
    // Prefill (each rank's first token), then 10 ms later everyone rests:
    // rank 1's sequence is due 30 ms after that, rank 0's 90 ms.
    for (absl::Duration at : {absl::ZeroDuration(), absl::Milliseconds(10)}) {
      now = absl::UnixEpoch() + at;
      auto step = stepper.Step();
      ASSERT_TRUE(step.ok()) << step.status();
      global[rank].push_back(step->global_tokens);
      rest[rank].push_back(step->rest);
    }
    for (uint64_t id : {1, 2}) (*engine)->Cancel(id);
    auto step = stepper.Step();  // nobody has sequences: no rest to report
    ASSERT_TRUE(step.ok()) << step.status();
    global[rank].push_back(step->global_tokens);
    rest[rank].push_back(step->rest);
  });
  for (int rank = 0; rank < kWorld; ++rank) {
    EXPECT_EQ(global[rank], (std::vector<int64_t>{8, 0, 0})) << "rank " << rank;
    EXPECT_EQ(rest[rank], (std::vector<absl::Duration>{absl::ZeroDuration(), absl::Milliseconds(30),
                                                       absl::ZeroDuration()}))
        << "rank " << rank;
  }
}

TEST(LockstepTest, PlanIsStableAndCancelLeavesIt) {
  auto model = Model::Load(joule::testing::TinyModelDir("qwen3_moe-tiny"), {.num_threads = 1});
  ASSERT_TRUE(model.ok());
  auto engine = Engine::Create(model->get(), Options());
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  EXPECT_EQ(e.PlanStep(), 0);
  auto empty = e.RunPlannedStep(/*run_empty=*/true);  // a forward over nothing is fine
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->num_seqs, 0);
  ASSERT_TRUE(e.Add(Greedy(1, 5, 4)).ok());
  ASSERT_TRUE(e.Add(Greedy(2, 3, 4)).ok());
  EXPECT_EQ(e.PlanStep(), 8);
  EXPECT_EQ(e.PlanStep(), 8) << "planning twice returns the same plan";
  EXPECT_TRUE(e.Cancel(1));
  auto step = e.RunPlannedStep(false);
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_EQ(step->tokens.size(), 1u);
  EXPECT_EQ(step->tokens[0].id, 2u);
  EXPECT_EQ(step->prefill_tokens, 3);
}

}  // namespace
}  // namespace joule::ep
