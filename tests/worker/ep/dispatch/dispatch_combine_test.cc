// Dispatch/combine against a dense reference: for random shapes, placements
// (with replicas), token counts (zero on some ranks) and top-k, every rank's
// output equals sum_k w_k * expert_k(x) computed densely per token — exactly
// the local executor's result with F32 payloads, within BF16 rounding with
// BF16 payloads. Plus the failure paths: a dead peer, disagreeing placements,
// a rank missing weights — every rank returns an error, none hangs.
#include <algorithm>
#include <chrono>
#include <latch>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/worker/ep/dispatch/ep_test_util.h"
#include "worker/device/cpu_backend.h"
#include "worker/device/fake_device_backend.h"
#include "worker/ep/ep_executor.h"
#include "worker/ep/inproc_transport.h"
#include "worker/model/experts.h"

namespace joule::ep {
namespace {

using ::testing::HasSubstr;
using testing::OwnedBy;
using testing::RunRanks;
using testing::TestDir;
using testing::WriteRandomMoeCheckpoint;

// BF16 keeps 8 significant bits: round-to-nearest moves a value by at most
// 2^-8 of its magnitude.
constexpr double kBf16Unit = 1.0 / 256;

float Weight(const Linear& l, int64_t row, int64_t col) {
  const int64_t i = row * l.in_features + col;
  return l.type == kernels::cpu::WeightType::kBF16 ? Bf16ToF32(static_cast<const uint16_t*>(l.w)[i])
                                                   : static_cast<const float*>(l.w)[i];
}

// One expert applied to one token in double precision: y = down(silu(gate x) * up x),
// and |down| |act| (the magnitude F32 rounding errors scale with).
void DenseExpert(const MlpWeights& m, const float* x, std::vector<double>* y, std::vector<double>* mag) {
  const int64_t H = m.gate.in_features, I = m.gate.out_features;
  std::vector<double> act(I);
  for (int64_t i = 0; i < I; ++i) {
    double g = 0, u = 0;
    for (int64_t h = 0; h < H; ++h) {
      g += static_cast<double>(x[h]) * Weight(m.gate, i, h);
      u += static_cast<double>(x[h]) * Weight(m.up, i, h);
    }
    act[i] = g / (1 + std::exp(-g)) * u;
  }
  y->assign(H, 0);
  mag->assign(H, 0);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < I; ++i) {
      (*y)[h] += act[i] * Weight(m.down, h, i);
      (*mag)[h] += std::abs(act[i] * Weight(m.down, h, i));
    }
  }
}

struct RankInput {
  int64_t tokens = 0;
  std::vector<float> x;         // [layers][tokens, H]
  std::vector<int32_t> ids;     // [layers][tokens, K]
  std::vector<float> weights;   // [layers][tokens, K]
  std::vector<float> initial;   // [layers][tokens, H]: `out` before Run (it accumulates)
};

struct Trial {
  int world, experts, top_k, layers = 2;
  int64_t hidden, intermediate;
  Placement placement;
  std::vector<RankInput> in;
};

Trial MakeTrial(std::mt19937_64& rng) {
  Trial t;
  auto pick = [&rng](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  t.world = pick(1, 4);
  t.experts = pick(4, 16);
  t.top_k = pick(1, 4);
  t.hidden = pick(1, 80);
  t.intermediate = pick(1, 48);
  // Random placement with replicas; sometimes every expert lives on a subset
  // of ranks, so some ranks receive nothing.
  Placement& p = t.placement;
  p.num_ranks = t.world;
  p.num_layers = t.layers;
  p.num_experts = t.experts;
  p.replicas.resize(t.layers);
  for (int l = 0; l < t.layers; ++l) {
    std::vector<int32_t> hosts(t.world);
    std::iota(hosts.begin(), hosts.end(), 0);
    std::shuffle(hosts.begin(), hosts.end(), rng);
    if (t.world > 1 && pick(0, 2) == 0) hosts.resize(pick(1, t.world - 1));
    for (int e = 0; e < t.experts; ++e) {
      std::vector<int32_t> ranks = hosts;
      std::shuffle(ranks.begin(), ranks.end(), rng);
      ranks.resize(pick(0, 3) == 0 ? pick(1, static_cast<int>(hosts.size())) : 1);
      p.replicas[l].push_back(ranks);
    }
  }
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unit(0.05f, 1.0f);
  t.in.resize(t.world);
  for (RankInput& r : t.in) {
    r.tokens = pick(0, 3) == 0 ? 0 : pick(1, 24);
    const int hot = pick(0, t.experts - 1);
    for (int l = 0; l < t.layers; ++l) {
      for (int64_t i = 0; i < r.tokens * t.hidden; ++i) {
        r.x.push_back(normal(rng));
        r.initial.push_back(normal(rng));
      }
      for (int64_t tok = 0; tok < r.tokens; ++tok) {
        // Distinct experts per token as a router picks them; skewed towards
        // one hot expert so loads are uneven.
        std::vector<int32_t> order(t.experts);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), rng);
        if (pick(0, 1) == 0) std::swap(order[0], *std::find(order.begin(), order.end(), hot));
        float sum = 0;
        std::vector<float> w(t.top_k);
        for (float& v : w) sum += (v = unit(rng));
        for (int k = 0; k < t.top_k; ++k) {
          r.ids.push_back(order[k]);
          r.weights.push_back(w[k] / sum);
        }
      }
    }
  }
  return t;
}

// The ranks that token `tok` of `rank` (layer l) is dispatched to.
std::set<int> TokenDestinations(const Trial& t, int rank, int l, int64_t tok) {
  const RankInput& in = t.in[rank];
  std::set<int> dests;
  for (int k = 0; k < t.top_k; ++k) {
    const int32_t e = in.ids[(l * in.tokens + tok) * t.top_k + k];
    dests.insert(ChooseReplica(t.placement, l, e, tok, rank));
  }
  return dests;
}

// Runs every layer of `t` on all ranks; returns each rank's outputs [layers][tokens, H].
// A random checkpoint for trial `t` under dir, loaded whole and as each
// rank's share of t.placement.
// The local executor (the reference F32 expert parallelism must match) on one
// CPU thread, over host weights.
struct LocalOnCpu {
  explicit LocalOnCpu(const ModelWeights& weights)
      : cpu(kernels::cpu::CpuStream{}),
        device_weights(*DeviceWeights::Create(weights, cpu)),
        executor(&cpu, device_weights.get(), weights.config()) {}
  device::CpuBackend cpu;
  std::unique_ptr<DeviceWeights> device_weights;
  LocalExpertExecutor executor;
};

struct TrialWeights {
  std::unique_ptr<ModelWeights> full;
  std::vector<std::unique_ptr<ModelWeights>> ranks;
};
void WriteAndLoad(const std::string& dir, const Trial& t, uint64_t seed, TrialWeights* out) {
  ASSERT_TRUE(
      WriteRandomMoeCheckpoint(dir, t.hidden, t.experts, t.top_k, t.intermediate, t.layers, seed)
          .ok());
  auto full = ModelWeights::Load(dir);
  ASSERT_TRUE(full.ok()) << full.status();
  out->full = std::move(*full);
  for (int r = 0; r < t.world; ++r) {
    auto w = ModelWeights::Load(dir, OwnedBy(t.placement, r));
    ASSERT_TRUE(w.ok()) << w.status();
    out->ranks.push_back(std::move(*w));
  }
}

// How a run's ranks execute: on the host (CPU threads), or on a fake device
// (rows in its device memory: device_stages.h), with or without shared windows.
struct RunMode {
  bool shared_windows = true;
  int threads = 1;
  bool device = false;
  bool two_batches = false;  // two-batch overlap
};

// A fake device's copy of `host` (its memory is this process's, but reached
// only through the backend, as a GPU's would be).
template <typename T>
device::Buffer ToDevice(device::Backend& backend, const std::vector<T>& host) {
  auto buffer = backend.Allocate(device::MemoryKind::kDevice, std::max<size_t>(1, host.size() * sizeof(T)));
  EXPECT_TRUE(buffer.ok()) << buffer.status();
  EXPECT_TRUE(backend.CopyAsync(buffer->data(), host.data(), host.size() * sizeof(T)).ok());
  return *std::move(buffer);
}

std::vector<std::vector<float>> RunExpertParallel(
    const Trial& t, const std::vector<std::unique_ptr<ModelWeights>>& rank_weights,
    PayloadType payload, std::vector<std::vector<std::vector<int64_t>>>* loads,
    std::vector<ExpertParallelExecutor::Stats>* stats, RunMode mode = {}) {
  InProcessGroup group(t.world);
  std::vector<std::vector<float>> outs(t.world);
  loads->assign(t.world, {});
  stats->assign(t.world, {});
  RunRanks(t.world, [&](int rank) {
    auto transport = group.Rank(rank);
    std::unique_ptr<kernels::cpu::ThreadPool> pool;
    if (mode.threads > 1) pool = std::make_unique<kernels::cpu::ThreadPool>(mode.threads);
    std::unique_ptr<device::Backend> fake;
    ExpertParallelOptions options{.payload = payload, .shared_windows = mode.shared_windows,
                                  .two_batch_overlap = mode.two_batches};
    if (mode.device) {
      fake = std::make_unique<device::FakeDeviceBackend>(1, /*asynchronous=*/true);
      options.device.backend = fake.get();
    }
    ExpertParallelExecutor ex(rank_weights[rank].get(), transport.get(), t.placement,
                              {pool.get()}, options);
    const RankInput& in = t.in[rank];
    const int64_t TH = in.tokens * t.hidden, TK = in.tokens * t.top_k;
    outs[rank] = in.initial;
    const float* x = in.x.data();
    const int32_t* ids = in.ids.data();
    const float* weights = in.weights.data();
    float* out = outs[rank].data();
    device::Buffer dx, dids, dweights, dout;
    if (mode.device) {
      dx = ToDevice(*fake, in.x);
      dids = ToDevice(*fake, in.ids);
      dweights = ToDevice(*fake, in.weights);
      dout = ToDevice(*fake, in.initial);
      x = dx.as<float>();
      ids = dids.as<int32_t>();
      weights = dweights.as<float>();
      out = dout.as<float>();
    }
    for (int l = 0; l < t.layers; ++l) {
      absl::Status s = ex.Run(l, x + l * TH, in.tokens, ids + l * TK, weights + l * TK, out + l * TH);
      EXPECT_TRUE(s.ok()) << "rank " << rank << ": " << s;
    }
    if (mode.device) {
      EXPECT_TRUE(fake->CopyAsync(outs[rank].data(), out, outs[rank].size() * sizeof(float)).ok());
    }
    (*loads)[rank] = ex.TakeExpertLoad();
    (*stats)[rank] = ex.stats();
    for (const auto& layer : ex.TakeExpertLoad()) {
      for (int64_t n : layer) EXPECT_EQ(n, 0) << "TakeExpertLoad resets the counts";
    }
  });
  return outs;
}

TEST(DispatchCombineTest, MatchesDenseReferenceOnRandomProblems) {
  std::mt19937_64 rng(20240611);
  double worst_f32 = 0, worst_bf16 = 0;  // error / tolerance, reported at the end
  for (int trial = 0; trial < 40; ++trial) {
    Trial t = MakeTrial(rng);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": world " << t.world << ", hidden "
                                      << t.hidden << ", experts " << t.experts << ", top_k "
                                      << t.top_k << ", intermediate " << t.intermediate
                                      << ", tokens/rank " << [&] {
                                           std::string s;
                                           for (auto& r : t.in) s += absl::StrCat(r.tokens, " ");
                                           return s;
                                         }());
    const std::string dir = TestDir(absl::StrCat(trial));
    TrialWeights loaded;
    ASSERT_NO_FATAL_FAILURE(WriteAndLoad(dir, t, rng(), &loaded));
    const auto& full = loaded.full;
    const auto& rank_weights = loaded.ranks;

    std::vector<std::vector<std::vector<int64_t>>> loads;
    std::vector<ExpertParallelExecutor::Stats> stats;
    auto f32 = RunExpertParallel(t, rank_weights, PayloadType::kF32, &loads, &stats);
    auto bf16_loads = loads;
    auto bf16_stats = stats;
    auto bf16 = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &bf16_loads, &bf16_stats);
    // BF16 writes rows into peers' shared windows; through all-to-all-v
    // instead, the same arithmetic must give the same bits and bytes.
    auto a2a_loads = loads;
    auto a2a_stats = stats;
    auto bf16_a2a = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &a2a_loads, &a2a_stats,
                                      {.shared_windows = false});
    // And with a thread pool per rank (the chunks of every kernel split over
    // threads): still the same bits.
    auto pooled_loads = loads;
    auto pooled_stats = stats;
    auto bf16_pooled = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &pooled_loads,
                                         &pooled_stats, {.threads = 3});
    // On a (fake) device: F32 gives the host's bits; BF16 through device
    // windows and staged through host memory give each other's bits (their
    // per-rank sums are in choice order, the host's in expert order, so
    // BF16 is held to the reference's tolerance below instead).
    std::vector<std::vector<std::vector<int64_t>>> dev_loads;
    std::vector<ExpertParallelExecutor::Stats> dev_f32_stats, dev_bf16_stats, dev_staged_stats;
    auto dev_f32 = RunExpertParallel(t, rank_weights, PayloadType::kF32, &dev_loads, &dev_f32_stats,
                                     {.device = true});
    EXPECT_EQ(dev_loads, loads);
    auto dev_bf16 = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &dev_loads,
                                      &dev_bf16_stats, {.device = true});
    auto dev_staged = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &dev_loads,
                                        &dev_staged_stats, {.shared_windows = false, .device = true});
    // Two micro-batches per layer (their phases interleaved on the device,
    // one after the other on the host): every token's arithmetic is the
    // same, so the bits are too.
    std::vector<ExpertParallelExecutor::Stats> tbo_stats;
    auto tbo_loads = loads;
    auto dev_f32_tbo = RunExpertParallel(t, rank_weights, PayloadType::kF32, &tbo_loads, &tbo_stats,
                                         {.device = true, .two_batches = true});
    EXPECT_EQ(tbo_loads, loads);
    auto dev_bf16_tbo = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &tbo_loads,
                                          &tbo_stats, {.device = true, .two_batches = true});
    auto dev_staged_tbo = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &tbo_loads,
                                            &tbo_stats,
                                            {.shared_windows = false, .device = true,
                                             .two_batches = true});
    auto bf16_tbo = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &tbo_loads, &tbo_stats,
                                      {.two_batches = true});
    for (int rank = 0; rank < t.world; ++rank) {
      ASSERT_EQ(dev_f32_tbo[rank], f32[rank]) << "rank " << rank << ": two micro-batches, F32";
      ASSERT_EQ(dev_bf16_tbo[rank], dev_bf16[rank]) << "rank " << rank << ": two micro-batches";
      ASSERT_EQ(dev_staged_tbo[rank], dev_bf16[rank]) << "rank " << rank << ": two, staged";
      ASSERT_EQ(bf16_tbo[rank], bf16[rank]) << "rank " << rank << ": two micro-batches, host";
      EXPECT_EQ(tbo_stats[rank].combine_bytes, bf16_stats[rank].combine_bytes) << "rank " << rank;
    }
    for (int rank = 0; rank < t.world; ++rank) {
      ASSERT_EQ(dev_f32[rank], f32[rank]) << "rank " << rank << ": device vs host, F32 payload";
      ASSERT_EQ(dev_bf16[rank], dev_staged[rank]) << "rank " << rank << ": device windows vs staged";
      EXPECT_EQ(dev_bf16_stats[rank].combine_bytes, bf16_stats[rank].combine_bytes) << "rank " << rank;
      EXPECT_EQ(dev_staged_stats[rank].dispatch_bytes, dev_bf16_stats[rank].dispatch_bytes);
    }
    for (int rank = 0; rank < t.world; ++rank) {
      ASSERT_EQ(bf16[rank], bf16_a2a[rank]) << "rank " << rank << ": windows vs all-to-all-v";
      ASSERT_EQ(bf16[rank], bf16_pooled[rank]) << "rank " << rank << ": 1 vs 3 threads";
      EXPECT_EQ(bf16_stats[rank].dispatch_bytes, a2a_stats[rank].dispatch_bytes) << "rank " << rank;
      EXPECT_EQ(bf16_stats[rank].combine_bytes, a2a_stats[rank].combine_bytes) << "rank " << rank;
    }

    const int64_t H = t.hidden;
    const int K = t.top_k;
    std::vector<std::vector<int64_t>> want_load(t.layers, std::vector<int64_t>(t.experts, 0));
    for (int rank = 0; rank < t.world; ++rank) {
      const RankInput& in = t.in[rank];
      // The local executor on this rank's tokens: F32 EP must reproduce it bit for bit.
      LocalOnCpu local_cpu(*full);
      LocalExpertExecutor& local = local_cpu.executor;
      std::vector<float> local_out = in.initial;
      for (int l = 0; l < t.layers; ++l) {
        const int64_t TH = in.tokens * H, TK = in.tokens * K;
        ASSERT_TRUE(local.Run(l, in.x.data() + l * TH, in.tokens, in.ids.data() + l * TK,
                              in.weights.data() + l * TK, local_out.data() + l * TH)
                        .ok());
      }
      ASSERT_EQ(f32[rank].size(), local_out.size());
      for (size_t i = 0; i < local_out.size(); ++i) {
        ASSERT_EQ(f32[rank][i], local_out[i]) << "rank " << rank << " element " << i;
      }

      std::vector<double> y, mag, ybf, magbf;
      int64_t sent_f32 = 0, sent_bf16 = 0, sent_rows = 0, returned_f32 = 0, returned_bf16 = 0;
      for (int l = 0; l < t.layers; ++l) {
        for (int64_t tok = 0; tok < in.tokens; ++tok) {
          const int64_t row = l * in.tokens + tok;
          std::vector<double> ref(H), ref_bf(H), tol(H), tol_bf(H);
          std::vector<float> xbf(H);
          for (int64_t h = 0; h < H; ++h) xbf[h] = Bf16ToF32(F32ToBf16(in.x[row * H + h]));
          for (int k = 0; k < K; ++k) {
            const int32_t e = in.ids[row * K + k];
            const double w = in.weights[row * K + k];
            ++want_load[l][e];
            const MlpWeights& m = full->layers()[l].experts[e];
            DenseExpert(m, in.x.data() + row * H, &y, &mag);
            DenseExpert(m, xbf.data(), &ybf, &magbf);
            for (int64_t h = 0; h < H; ++h) {
              ref[h] += w * y[h];
              ref_bf[h] += w * ybf[h];
              // F32: two chained GEMMs of at most 80 terms (and the silu) in
              // single precision: far below 1e-5 of the magnitudes involved.
              tol[h] += w * 1e-5 * (mag[h] + std::abs(y[h]));
              // BF16: the receiver computes on the rounded x (as ref_bf does)
              // and rounds the weighted sum of the token's experts it ran once
              // more: at most 2^-8 of sum w |y| over them, plus the F32 error
              // of that computation.
              tol_bf[h] += w * (kBf16Unit * std::abs(ybf[h]) * 1.001 + 1e-5 * (magbf[h] + std::abs(ybf[h])));
            }
          }
          // A token goes once to each other rank holding any of its experts.
          for (int dest : TokenDestinations(t, rank, l, tok)) {
            if (dest == rank) continue;
            sent_f32 += H * 4 + 8 * K;
            sent_bf16 += H * 2 + 8 * K;
            sent_rows += 1;
          }
          for (int64_t h = 0; h < H; ++h) {
            const double c = in.initial[row * H + h];
            const double slack = 1e-6 * (std::abs(c) + 1);  // the F32 accumulation into out
            const double err = std::abs(f32[rank][row * H + h] - (c + ref[h]));
            ASSERT_LE(err, tol[h] + slack) << "F32 payload, rank " << rank << " layer " << l
                                           << " token " << tok << " dim " << h;
            worst_f32 = std::max(worst_f32, err / (tol[h] + slack));
            const double err_bf = std::abs(bf16[rank][row * H + h] - (c + ref_bf[h]));
            ASSERT_LE(err_bf, tol_bf[h] + slack) << "BF16 payload, rank " << rank << " layer " << l
                                                 << " token " << tok << " dim " << h;
            worst_bf16 = std::max(worst_bf16, err_bf / (tol_bf[h] + slack));
            const double err_dev = std::abs(dev_bf16[rank][row * H + h] - (c + ref_bf[h]));
            ASSERT_LE(err_dev, tol_bf[h] + slack) << "BF16 payload on the device, rank " << rank
                                                  << " layer " << l << " token " << tok << " dim " << h;
          }
        }
      }
      // Bytes counted are those sent to other ranks: dispatch rows carry the
      // token's expert ids and router weights on that rank (top_k of each).
      EXPECT_EQ(stats[rank].dispatch_bytes, static_cast<uint64_t>(sent_f32));
      EXPECT_EQ(bf16_stats[rank].dispatch_bytes, static_cast<uint64_t>(sent_bf16));
      // On a device the choices go over the control transport: rows are payload only.
      EXPECT_EQ(dev_f32_stats[rank].dispatch_bytes, static_cast<uint64_t>(sent_rows * H * 4));
      EXPECT_EQ(dev_bf16_stats[rank].dispatch_bytes, static_cast<uint64_t>(sent_rows * H * 2));
      returned_f32 = returned_bf16 = 0;
      for (int src = 0; src < t.world; ++src) {
        if (src == rank) continue;
        for (int l = 0; l < t.layers; ++l) {
          for (int64_t tok = 0; tok < t.in[src].tokens; ++tok) {
            for (int k = 0; k < K; ++k) {
              const int32_t e = t.in[src].ids[(l * t.in[src].tokens + tok) * K + k];
              if (ChooseReplica(t.placement, l, e, tok, src) == rank) returned_f32 += H * 4;
            }
            // BF16: one row per token, the sum of its experts on this rank.
            if (TokenDestinations(t, src, l, tok).count(rank) != 0) returned_bf16 += H * 2;
          }
        }
      }
      EXPECT_EQ(stats[rank].combine_bytes, static_cast<uint64_t>(returned_f32));
      EXPECT_EQ(dev_f32_stats[rank].combine_bytes, static_cast<uint64_t>(returned_f32));
      EXPECT_EQ(bf16_stats[rank].combine_bytes, static_cast<uint64_t>(returned_bf16));
    }
    // Per-expert load: tokens each rank routed, summed over ranks.
    std::vector<std::vector<int64_t>> got_load(t.layers, std::vector<int64_t>(t.experts, 0));
    for (const auto& rank_load : loads) {
      ASSERT_EQ(rank_load.size(), static_cast<size_t>(t.layers));
      for (int l = 0; l < t.layers; ++l) {
        for (int e = 0; e < t.experts; ++e) got_load[l][e] += rank_load[l][e];
      }
    }
    EXPECT_EQ(got_load, want_load);
    std::filesystem::remove_all(dir);
  }
  std::printf("worst error / tolerance: F32 payload %.3g, BF16 payload %.3g\n", worst_f32, worst_bf16);
}

// Wide enough rows and enough of them that the BF16 combine is rounded into
// the returning rows over several column chunks (the random problems above
// fit one): windows, all-to-all-v and a thread pool agree bit for bit, and
// all are within BF16 rounding of the single-process executor.
TEST(DispatchCombineTest, WideRowsCombineOverSeveralChunks) {
  Trial t{.world = 2, .experts = 8, .top_k = 2, .layers = 1, .hidden = 1024, .intermediate = 8};
  auto placement = ContiguousPlacement(t.world, t.layers, t.experts);
  ASSERT_TRUE(placement.ok()) << placement.status();
  t.placement = *placement;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  t.in.resize(t.world);
  for (RankInput& r : t.in) {
    r.tokens = 1500;
    for (int64_t i = 0; i < r.tokens * t.hidden; ++i) {
      r.x.push_back(normal(rng));
      r.initial.push_back(0.0f);
    }
    std::vector<int32_t> order(t.experts);
    std::iota(order.begin(), order.end(), 0);
    for (int64_t tok = 0; tok < r.tokens; ++tok) {
      std::shuffle(order.begin(), order.end(), rng);
      for (int k = 0; k < t.top_k; ++k) {
        r.ids.push_back(order[k]);
        r.weights.push_back(k == 0 ? 0.75f : 0.25f);
      }
    }
  }
  TrialWeights loaded;
  ASSERT_NO_FATAL_FAILURE(WriteAndLoad(TestDir("wide_rows"), t, 3, &loaded));
  const auto& full = loaded.full;
  const auto& rank_weights = loaded.ranks;
  std::vector<std::vector<std::vector<int64_t>>> loads;
  std::vector<ExpertParallelExecutor::Stats> stats;
  auto windows = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &loads, &stats);
  auto a2a = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &loads, &stats,
                               {.shared_windows = false});
  auto pooled = RunExpertParallel(t, rank_weights, PayloadType::kBF16, &loads, &stats,
                                  {.threads = 3});
  for (int rank = 0; rank < t.world; ++rank) {
    ASSERT_EQ(windows[rank], a2a[rank]) << "rank " << rank << ": windows vs all-to-all-v";
    ASSERT_EQ(windows[rank], pooled[rank]) << "rank " << rank << ": 1 vs 3 threads";
    const RankInput& in = t.in[rank];
    LocalOnCpu local_cpu(*full);
    LocalExpertExecutor& local = local_cpu.executor;
    std::vector<float> want = in.initial;
    ASSERT_TRUE(
        local.Run(0, in.x.data(), in.tokens, in.ids.data(), in.weights.data(), want.data()).ok());
    double rms = 0;
    for (float v : want) rms += double(v) * v / want.size();
    rms = std::sqrt(rms);
    ASSERT_GT(rms, 0);
    for (size_t i = 0; i < want.size(); ++i) {
      // BF16 inputs and a BF16 sum: a few units of 2^-8 of the values involved.
      ASSERT_NEAR(windows[rank][i], want[i], 4 * kBf16Unit * (std::abs(want[i]) + rms))
          << "rank " << rank << " token " << i / t.hidden << " column " << i % t.hidden;
    }
  }
}

// The fused combine's column-chunk form (FusedCombine::sink, what BF16
// expert parallelism runs) gives the same bits as scatter-adding into the
// whole zeroed output: for short rows (the down projection's k = 8) and long
// ones (k = 40), F32 and BF16 inputs, with enough output rows that the output
// is split into several chunks, the last one narrower.
TEST(FusedCombineTest, ColumnChunksGiveTheBitsOfTheWholeOutput) {
  for (const int64_t intermediate : {8, 40}) {
    const int64_t hidden = 500;
    const int experts = 4;
    const std::string dir = TestDir(absl::StrCat("fused_chunks_", intermediate));
    ASSERT_TRUE(WriteRandomMoeCheckpoint(dir, hidden, experts, 2, intermediate, 1, 11).ok());
    auto weights = ModelWeights::Load(dir);
    ASSERT_TRUE(weights.ok()) << weights.status();
    const LayerWeights& layer = (*weights)->layers()[0];
    std::vector<const void*> table;
    const ExpertsView view = ViewExperts(layer, &table);

    std::mt19937_64 rng(intermediate);
    const int64_t out_rows = 4000, x_rows = 300;
    std::vector<int64_t> offsets = {0, 2500, 2500, 4500, 6000};  // expert 1 gets none
    const int64_t rows = offsets.back();
    std::vector<int32_t> x_index(rows), out_index(rows);
    std::vector<float> scale(rows);
    std::uniform_int_distribution<int32_t> pick_x(0, x_rows - 1), pick_out(0, out_rows - 1);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int64_t g = 0; g < rows; ++g) {
      x_index[g] = pick_x(rng);
      // Every output row gets at least one term (the sink's contract).
      out_index[g] = g < out_rows ? static_cast<int32_t>(g) : pick_out(rng);
      scale[g] = u(rng);
    }
    std::vector<float> x32(x_rows * hidden);
    for (float& v : x32) v = u(rng);
    std::vector<uint16_t> x16(x32.size());
    for (size_t i = 0; i < x32.size(); ++i) x16[i] = F32ToBf16(x32[i]);

    kernels::cpu::ThreadPool pool(3);
    for (const bool bf16 : {false, true}) {
      const GroupedInput in{.x = bf16 ? static_cast<const void*>(x16.data()) : x32.data(),
                            .type = bf16 ? kernels::RowType::kBF16 : kernels::RowType::kF32,
                            .rows = x_index.data()};
      GroupedExpertBuffers buffers;
      std::vector<float> whole(out_rows * hidden, 0.0f);
      const FusedCombine plain{.rows = out_index.data(), .weights = scale.data()};
      device::CpuBackend one_thread(kernels::cpu::CpuStream{});
      ASSERT_TRUE(RunGroupedExperts(one_thread, view, 0, in, offsets.data(), rows, whole.data(),
                                    &buffers, &plain)
                      .ok());

      // Chunked on one thread and on a pool: the same bits either way.
      for (const kernels::cpu::CpuStream stream :
           {kernels::cpu::CpuStream{}, kernels::cpu::CpuStream{&pool}}) {
        std::vector<float> chunked(out_rows * hidden, std::nanf(""));
        std::vector<int64_t> chunk_cols;
        FusedCombine sink{.rows = out_index.data(), .weights = scale.data(), .out_rows = out_rows};
        sink.sink = [&](int64_t col0, int64_t cols, const float* y) {
          chunk_cols.push_back(cols);
          for (int64_t r = 0; r < out_rows; ++r) {
            std::copy(y + r * cols, y + (r + 1) * cols, chunked.begin() + r * hidden + col0);
          }
        };
        device::CpuBackend backend(stream);
        ASSERT_TRUE(RunGroupedExperts(backend, view, 0, in, offsets.data(), rows, nullptr, &buffers,
                                      &sink)
                        .ok());
        ASSERT_GE(chunk_cols.size(), 2u) << "the output should not fit one chunk";
        EXPECT_LT(chunk_cols.back(), chunk_cols.front());
        EXPECT_EQ(std::accumulate(chunk_cols.begin(), chunk_cols.end(), int64_t{0}), hidden);
        ASSERT_EQ(std::memcmp(whole.data(), chunked.data(), whole.size() * sizeof(float)), 0)
            << "intermediate " << intermediate << (bf16 ? ", BF16" : ", F32") << " rows, "
            << (stream.pool != nullptr ? "3 threads" : "1 thread");
      }
    }
  }
}

class DispatchFailureTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TestDir("ckpt");
    ASSERT_TRUE(WriteRandomMoeCheckpoint(dir_, 24, 6, 2, 16, 2, 7).ok());
    auto w = ModelWeights::Load(dir_);
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = std::move(*w);
    auto p = ContiguousPlacement(3, 2, 6);
    ASSERT_TRUE(p.ok());
    placement_ = *p;
    x_.assign(4 * 24, 0.5f);
    ids_ = {0, 5, 1, 4, 2, 3, 5, 0};
    w_.assign(8, 0.5f);
    out_.assign(4 * 24, 0.0f);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // With an asynchronous `device`, its launches (which read x_ and write out)
  // are waited for before out goes: a GPU's would outlive the call too.
  absl::Status RunLayer(ExpertParallelExecutor& ex, int layer, device::Backend* device = nullptr) {
    std::vector<float> out(out_);
    absl::Status s = ex.Run(layer, x_.data(), 4, ids_.data(), w_.data(), out.data());
    if (device != nullptr) device->Synchronize().IgnoreError();  // a fault's status is s's
    return s;
  }

  std::string dir_;
  std::unique_ptr<ModelWeights> weights_;
  Placement placement_;
  std::vector<float> x_, w_, out_;
  std::vector<int32_t> ids_;
};

TEST_F(DispatchFailureTest, DeadPeerFailsEveryLayerCallQuicklyWithTheLayer) {
  // A long transport timeout: the survivors must fail because the peer is
  // gone, not because they waited it out.
  InProcessGroup group(3, {.timeout = absl::Seconds(60)});
  std::vector<absl::Status> results(3);
  std::vector<double> seconds(3);
  RunRanks(3, [&](int rank) {
    auto transport = group.Rank(rank);
    ExpertParallelExecutor ex(weights_.get(), transport.get(), placement_, {});
    EXPECT_TRUE(RunLayer(ex, 0).ok());
    if (rank == 2) {  // crashes before layer 1
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      group.Kill(2);
      return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    results[rank] = RunLayer(ex, 1);
    seconds[rank] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // Later calls fail fast too.
    EXPECT_FALSE(RunLayer(ex, 0).ok());
  });
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_EQ(results[rank].code(), absl::StatusCode::kUnavailable) << results[rank];
    EXPECT_THAT(std::string(results[rank].message()), HasSubstr("layer 1"));
    EXPECT_THAT(std::string(results[rank].message()), HasSubstr("rank 2"));
    EXPECT_LT(seconds[rank], 5.0);
  }
}

// A GPU fault on one rank in the middle of a layer (its stream fails at the
// dispatch's synchronization): that rank reports the device's error with
// the layer; its peers, waiting for its rows, fail within the transport's
// timeout instead of hanging or combining partial rows.
TEST_F(DispatchFailureTest, DeviceFaultOnOneRankFailsItsPeersWithinTheTimeout) {
  // One batch per layer, then two overlapped micro-batches (their own waits).
  for (bool two_batches : {false, true}) {
    SCOPED_TRACE(two_batches ? "two micro-batches" : "one batch");
    InProcessGroup group(3, {.timeout = absl::Seconds(1)});
    std::vector<absl::Status> results(3);
    std::vector<double> seconds(3);
    // In-process windows are each rank's own memory: a rank's executor must
    // outlive its peers' writes into them (separate processes keep the mapping).
    std::latch all_done(3);
    RunRanks(3, [&](int rank) {
      auto transport = group.Rank(rank);
      device::FakeDeviceBackend fake(1, /*asynchronous=*/true);
      ExpertParallelExecutor ex(weights_.get(), transport.get(), placement_, {},
                                {.two_batch_overlap = two_batches, .device = {.backend = &fake}});
      EXPECT_TRUE(RunLayer(ex, 0, &fake).ok());
      // The next wait after the router's choices: the (first) dispatch's.
      if (rank == 1) fake.InjectFault(2, absl::InternalError("cuda:0: an illegal memory access"));
      const auto t0 = std::chrono::steady_clock::now();
      results[rank] = RunLayer(ex, 1, &fake);
      seconds[rank] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      all_done.arrive_and_wait();
    });
    EXPECT_THAT(std::string(results[1].message()), HasSubstr("illegal memory access"));
    EXPECT_THAT(std::string(results[1].message()), HasSubstr("layer 1"));
    for (int rank : {0, 2}) {
      EXPECT_EQ(results[rank].code(), absl::StatusCode::kDeadlineExceeded) << results[rank];
      EXPECT_THAT(std::string(results[rank].message()), HasSubstr("layer 1"));
      EXPECT_LT(seconds[rank], 5.0);
    }
  }
}

TEST_F(DispatchFailureTest, DisagreeingPlacementsFailOnEveryRank) {
  InProcessGroup group(3, {.timeout = absl::Seconds(60)});
  std::vector<absl::Status> results(3);
  Placement other = placement_;
  other.replicas[1][0] = {0, 2};  // rank 1 believes expert 0 of layer 1 has a second replica
  RunRanks(3, [&](int rank) {
    auto transport = group.Rank(rank);
    ExpertParallelExecutor ex(weights_.get(), transport.get(), rank == 1 ? other : placement_, {});
    // Layer 0 is placed alike in both, but a rank must not route by a
    // placement its peers do not share at all: the whole placement is compared.
    results[rank] = RunLayer(ex, 0);
  });
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_EQ(results[rank].code(), absl::StatusCode::kFailedPrecondition) << results[rank];
    EXPECT_THAT(std::string(results[rank].message()), HasSubstr("different placement"));
  }
}

TEST_F(DispatchFailureTest, TwoBatchOverlapOnSomeRanksOnlyIsRefusedOnEveryRank) {
  InProcessGroup group(3, {.timeout = absl::Seconds(60)});
  std::vector<absl::Status> results(3);
  RunRanks(3, [&](int rank) {
    auto transport = group.Rank(rank);
    // Rank 2 has it on, rank 1 on from another minimum, rank 0 off.
    ExpertParallelExecutor ex(weights_.get(), transport.get(), placement_, {},
                              {.two_batch_overlap = rank > 0, .two_batch_min_rows = rank});
    results[rank] = RunLayer(ex, 0);
  });
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_EQ(results[rank].code(), absl::StatusCode::kFailedPrecondition) << results[rank];
    EXPECT_THAT(std::string(results[rank].message()), HasSubstr("micro-batch"));
    EXPECT_THAT(std::string(results[rank].message()), HasSubstr("two-batch overlap"));
  }
}

// A rank with --shared-windows=false would never join the others' collective
// mapping of windows: the count exchange before it refuses the mix.
TEST_F(DispatchFailureTest, SharedWindowsOnSomeRanksOnlyIsRefusedOnEveryRank) {
  InProcessGroup group(3, {.timeout = absl::Seconds(60)});
  std::vector<absl::Status> results(3);
  RunRanks(3, [&](int rank) {
    auto transport = group.Rank(rank);
    ExpertParallelExecutor ex(weights_.get(), transport.get(), placement_, {},
                              {.payload = PayloadType::kBF16, .shared_windows = rank != 1});
    results[rank] = RunLayer(ex, 0);
  });
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_EQ(results[rank].code(), absl::StatusCode::kFailedPrecondition) << results[rank];
    EXPECT_THAT(std::string(results[rank].message()),
                HasSubstr("--shared-windows must be alike on every rank"));
  }
  EXPECT_THAT(std::string(results[0].message()),
              HasSubstr("rank 1 moves rows through the all-to-all-v, rank 0 into shared windows"));
}

// With a minimum of rows, a layer splits only after one that moved that many
// over all ranks: every rank decides alike from the count matrix they share.
TEST_F(DispatchFailureTest, TwoBatchOverlapSplitsOnlyAfterALayerWithEnoughRows) {
  for (auto [min_rows, want] : std::vector<std::pair<int64_t, uint64_t>>{
           {0, 2}, {1, 1}, {1000000, 0}}) {
    InProcessGroup group(3, {.timeout = absl::Seconds(60)});
    std::vector<uint64_t> split(3);
    RunRanks(3, [&](int rank) {
      auto transport = group.Rank(rank);
      ExpertParallelExecutor ex(weights_.get(), transport.get(), placement_, {},
                                {.two_batch_overlap = true, .two_batch_min_rows = min_rows});
      for (int layer : {0, 1}) EXPECT_TRUE(RunLayer(ex, layer).ok()) << "layer " << layer;
      split[rank] = ex.stats().two_batch_layers;
    });
    for (int rank = 0; rank < 3; ++rank) {
      EXPECT_EQ(split[rank], want) << "rank " << rank << ", min rows " << min_rows;
    }
  }
}

// A new placement starts the row history afresh on every rank, whether the
// rank reloads its experts into a new executor or applies it to its own.
// (F32: no shared windows, which only executors created together can map.)
TEST_F(DispatchFailureTest, ANewPlacementStartsTheRowHistoryOnEveryRank) {
  InProcessGroup group(3, {.timeout = absl::Seconds(60)});
  std::vector<uint64_t> split(3);
  RunRanks(3, [&](int rank) {
    auto transport = group.Rank(rank);
    const ExpertParallelOptions options{.payload = PayloadType::kF32, .two_batch_overlap = true,
                                        .two_batch_min_rows = 1};
    auto ex = std::make_unique<ExpertParallelExecutor>(weights_.get(), transport.get(),
                                                       placement_, kernels::cpu::CpuStream{},
                                                       options);
    for (int layer : {0, 1}) EXPECT_TRUE(RunLayer(*ex, layer).ok());
    if (rank == 0) {  // reloaded its experts: a new executor
      ex = std::make_unique<ExpertParallelExecutor>(weights_.get(), transport.get(), placement_,
                                                    kernels::cpu::CpuStream{}, options);
    } else {
      EXPECT_TRUE(ex->SetPlacement(placement_).ok());
    }
    for (int layer : {0, 1}) EXPECT_TRUE(RunLayer(*ex, layer).ok()) << "rank " << rank;
    split[rank] = ex->stats().two_batch_layers;
  });
  EXPECT_EQ(split[0], 1u);  // layer 1 after the new placement
  EXPECT_EQ(split[1], 2u);  // layer 1 before it, and after
  EXPECT_EQ(split[2], 2u);
}

TEST_F(DispatchFailureTest, RankWithoutItsWeightsFailsAndSoDoItsPeers) {
  auto partial = ModelWeights::Load(dir_, OwnedBy(placement_, 0));  // rank 0's experts only
  ASSERT_TRUE(partial.ok());
  InProcessGroup group(3, {.timeout = absl::Seconds(60)});
  std::vector<absl::Status> results(3);
  const auto t0 = std::chrono::steady_clock::now();
  RunRanks(3, [&](int rank) {
    auto transport = group.Rank(rank);
    // Rank 1 was given rank 0's weights.
    ExpertParallelExecutor ex(rank == 1 ? partial->get() : weights_.get(), transport.get(), placement_, {});
    results[rank] = RunLayer(ex, 0);
  });
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  EXPECT_EQ(results[1].code(), absl::StatusCode::kFailedPrecondition) << results[1];
  EXPECT_THAT(std::string(results[1].message()), HasSubstr("layer 0 expert 2 on rank 1"));
  for (int rank : {0, 2}) {
    EXPECT_EQ(results[rank].code(), absl::StatusCode::kAborted) << results[rank];
    EXPECT_THAT(std::string(results[rank].message()), HasSubstr("rank 1 failed"));
  }
}

TEST_F(DispatchFailureTest, BadRoutingOnOneRankFailsItAndStopsItsPeers) {
  InProcessGroup group(3, {.timeout = absl::Seconds(60)});
  std::vector<absl::Status> results(3);
  RunRanks(3, [&](int rank) {
    auto transport = group.Rank(rank);
    ExpertParallelExecutor ex(weights_.get(), transport.get(), placement_, {});
    std::vector<int32_t> ids = ids_;
    if (rank == 0) ids[3] = 99;
    std::vector<float> out(out_);
    results[rank] = ex.Run(1, x_.data(), 4, ids.data(), w_.data(), out.data());
  });
  EXPECT_EQ(results[0].code(), absl::StatusCode::kInvalidArgument) << results[0];
  EXPECT_THAT(std::string(results[0].message()), HasSubstr("token 1 is routed to expert 99"));
  EXPECT_THAT(std::string(results[0].message()), HasSubstr("layer 1"));
  for (int rank : {1, 2}) EXPECT_EQ(results[rank].code(), absl::StatusCode::kAborted) << results[rank];

  InProcessGroup group2(1);
  auto transport = group2.Rank(0);
  auto one = ContiguousPlacement(1, 2, 6);
  ExpertParallelExecutor ex(weights_.get(), transport.get(), *one, {});
  std::vector<float> out(out_);
  absl::Status s = ex.Run(7, x_.data(), 4, ids_.data(), w_.data(), out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("layer 7 is not a MoE layer"));
}

TEST_F(DispatchFailureTest, SetPlacementRefusesWhatThisRankCannotServe) {
  auto partial = ModelWeights::Load(dir_, OwnedBy(placement_, 0));
  ASSERT_TRUE(partial.ok());
  InProcessGroup group(3);
  auto transport = group.Rank(0);
  ExpertParallelExecutor ex(partial->get(), transport.get(), placement_, {});
  Placement more = placement_;
  more.replicas[1][4].push_back(0);  // rank 0 never loaded expert 4
  absl::Status s = ex.SetPlacement(more);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("layer 1 expert 4 on rank 0"));
  EXPECT_EQ(ex.placement().replicas[1][4].size(), 1u) << "a refused placement is not applied";

  auto two = ContiguousPlacement(2, 2, 6);
  s = ex.SetPlacement(*two);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("2 ranks"));
  Placement broken = placement_;
  broken.replicas[0][3] = {};
  EXPECT_THAT(std::string(ex.SetPlacement(broken).message()), HasSubstr("layer 0 expert 3 has no replica"));
}

TEST_F(DispatchFailureTest, AllRanksIdleExchangesOnlyCounts) {
  InProcessGroup group(3);
  RunRanks(3, [&](int rank) {
    auto transport = group.Rank(rank);
    ExpertParallelExecutor ex(weights_.get(), transport.get(), placement_, {});
    std::vector<float> out;
    EXPECT_TRUE(ex.Run(0, nullptr, 0, nullptr, nullptr, out.data()).ok());
    EXPECT_EQ(ex.stats().dispatch_bytes, 0u);
    EXPECT_EQ(ex.stats().combine_bytes, 0u);
  });
}

}  // namespace
}  // namespace joule::ep
