// One rank of the ExpertParallelExecutor-level dispatch/combine benchmark
// (run_executor.sh starts EP of them; UCX_TLS picks shared memory or TCP).
//
//   joule-dispatch-combine-bench --rank R --world W --dir DIR --hidden 2048,7168
//       --tokens 1,4,16,64,128,256,1024,4096 [--top-k 8] [--experts 64]
//       [--moe-intermediate 8] [--peer-errors] [--threads 1]
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
// A point whose buffers would need more than --mem-fraction of MemAvailable
// over all ranks is skipped (and reported as such): the host is shared.
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
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "bench/dispatch_combine/rank_util.h"
#include "common/dtype.h"
#include "common/options.h"
#include "common/placement.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "kernels/cpu/thread_pool.h"
#include "worker/ep/ep_executor.h"
#include "worker/ep/ucx_transport.h"
#include "worker/model/weights.h"

namespace {

using joule::bench::Check;
using joule::bench::ParseSizeList;
using joule::bench::Rendezvous;

#define JOULE_EXECUTOR_BENCH_FLAGS(X)                                                       \
  JOULE_RANK_BENCH_FLAGS(X)                                                                 \
  X(int, experts, 64, "experts of the MoE layer")                                          \
  X(int, moe_intermediate, 8, "moe_intermediate_size (tiny, to keep the expert GEMMs small)") \
  X(int, threads, 1, "CPU threads of each rank's executor")                                \
  X(bool, shared_windows, true, "write rows into peers' shared windows where the transport maps them (else all-to-all-v)") \
  X(int, max_iters, 200, "most timed Runs per point (at least 3)")                         \
  X(double, target_seconds, 0.25, "timed Runs per point are sized to about this long")     \
  X(double, mem_fraction, 0.6, "skip points whose buffers need more of MemAvailable")

struct Args {
  JOULE_EXECUTOR_BENCH_FLAGS(JOULE_OPTION_FIELD)
  std::vector<joule::Option> Options() { return {JOULE_EXECUTOR_BENCH_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    RETURN_IF_ERROR(joule::bench::ValidateRankFlags(*this));
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

}  // namespace

int main(int argc, char** argv) {
  auto parsed = joule::ParseConfig<Args>(
      "usage: joule-dispatch-combine-bench --rank R --world W --dir DIR --hidden H,.. "
      "--tokens T,.. [flags]",
      "JOULE_BENCH_", argc, argv);
  if (!parsed.ok()) return joule::ReportOptionsError("joule-dispatch-combine-bench", parsed.status());
  const Args& a = *parsed;
  const std::vector<int> hidden_sizes = *ParseSizeList("hidden", a.hidden);
  const std::vector<int> token_counts = *ParseSizeList("tokens", a.tokens);
  const int W = a.world, K = a.top_k, E = a.experts;
  auto created = joule::ep::UcxTransport::Create(a.rank, W, {.timeout = absl::Seconds(120)},
                                                 {.peer_error_handling = a.peer_errors,
                                                  .spin_before_naps = absl::Microseconds(a.spin_us),
                                                  .receive_thread = a.recv_thread});
  Check(created.status(), "create");
  joule::ep::UcxTransport& t = **created;
  Check(t.Connect(Rendezvous(a.dir, a.rank, W, t.address())), "connect");

  FILE* out = stdout;
  if (a.rank == 0 && !a.out.empty()) out = std::fopen(a.out.c_str(), "a");
  const char* tls = std::getenv("UCX_TLS");
  std::unique_ptr<joule::kernels::cpu::ThreadPool> pool;
  if (a.threads > 1) pool = std::make_unique<joule::kernels::cpu::ThreadPool>(a.threads);
  const joule::kernels::cpu::CpuStream stream{pool.get()};
  auto placement = joule::ContiguousPlacement(W, 1, E);
  Check(placement.status(), "placement");

  for (int hidden : hidden_sizes) {
    const std::string model_dir = absl::StrCat(a.dir, "/model-h", hidden);
    if (a.rank == 0) {
      Check(WriteCheckpoint(model_dir, hidden, E, K, a.moe_intermediate), "write checkpoint");
    }
    Check(t.Barrier(), "barrier");
    const joule::Placement& pl = *placement;
    const int me = a.rank;
    auto weights = joule::ModelWeights::Load(
        model_dir, {.owns_expert = [&pl, me](int l, int e) { return pl.Holds(me, l, e); }});
    Check(weights.status(), "load");
    joule::ep::ExpertParallelExecutor ex(weights->get(), &t, pl, stream,
                                         {.payload = joule::ep::PayloadType::kBF16,
                                          .shared_windows = a.shared_windows});

    for (int tokens : token_counts) {
      // Resident bytes per rank at this point: x and out (F32, 8 bytes per
      // element), and per token and rank it reaches (at most min(W, K)) one
      // BF16 row sent and one received in dispatch and again in combine
      // (windows or all-to-all buffers), doubled by the headroom the warm-up
      // gives them (below). The expert scratch is small (moe_intermediate
      // columns; the down projection's output is one L2-sized chunk). An
      // upper bound: EP 4, hidden 7168, 4096 tokens took 2.7 GB of
      // MemAvailable in all against 4.7 GB here. Skip the point where all
      // ranks would need more than --mem-fraction of MemAvailable (the host
      // is shared).
      const double need = double(tokens) * hidden * (8.0 + 2 * 4.0 * std::min(W, K)) * W;
      int skip = need > a.mem_fraction * double(MemAvailable()) ? 1 : 0;
      std::vector<int> skips(W);
      Check(t.AllGather(&skip, sizeof(int), skips.data()), "all-gather");
      if (*std::max_element(skips.begin(), skips.end()) != 0) {
        if (a.rank == 0) {
          std::fprintf(stderr, "EP %d hidden %d tokens %d: skipped, needs %.1f GB\n", W, hidden,
                       tokens, need / 1e9);
          std::fprintf(out,
                       "{\"impl\":\"joule-ep-executor\",\"tls\":\"%s\",\"peer_errors\":%s,\"recv_thread\":%s,\"shared_windows\":%s,\"ep\":%d,"
                       "\"hidden\":%d,\"tokens\":%d,\"top_k\":%d,"
                       "\"skipped\":\"needs %.1f GB, more than %.0f%% of MemAvailable\"}\n",
                       tls ? tls : "default", a.peer_errors ? "true" : "false", a.recv_thread ? "true" : "false",
                       a.shared_windows ? "true" : "false", W, hidden, tokens,
                       K, need / 1e9, a.mem_fraction * 100);
          std::fflush(out);
        }
        continue;
      }

      std::vector<float> x(size_t(tokens) * hidden), y(size_t(tokens) * hidden);
      std::mt19937_64 rng(0x5eed + 1000003ull * a.rank + 7919ull * tokens + hidden);
      {
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        for (float& v : x) v = u(rng);
      }
      std::vector<int32_t> ids(size_t(tokens) * K);
      const std::vector<float> router_w(size_t(tokens) * K, 1.0f / K);
      std::uniform_int_distribution<int32_t> pick(0, E - 1);
      auto route = [&] {  // K distinct experts per token, uniform
        for (int64_t tok = 0; tok < tokens; ++tok) {
          int32_t* row = ids.data() + tok * K;
          for (int k = 0; k < K; ++k) {
            int32_t e;
            do e = pick(rng); while (std::find(row, row + k, e) != row + k);
            row[k] = e;
          }
        }
      };
      struct Sample {
        double dispatch_s, combine_s, run_s, bytes_dispatch, bytes_combine, minor_faults;
      };
      auto once = [&](int64_t n) -> Sample {
        route();
        std::memset(y.data(), 0, y.size() * sizeof(float));
        Check(t.Barrier(), "barrier");
        const auto s0 = ex.stats();
        const long f0 = MinorFaults();
        const auto t0 = std::chrono::steady_clock::now();
        Check(ex.Run(0, x.data(), n, ids.data(), router_w.data(), y.data()), "run");
        const double run_s =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const long f1 = MinorFaults();
        const auto s1 = ex.stats();
        return {s1.dispatch_seconds - s0.dispatch_seconds, s1.combine_seconds - s0.combine_seconds,
                run_s, double(s1.dispatch_bytes - s0.dispatch_bytes),
                double(s1.combine_bytes - s0.combine_bytes), double(f1 - f0)};
      };
      // Warm-up: buffer growth, first touch, UCX wire-up of the protocol for
      // this size. The executor's scratch buffers grow to the exact size
      // first and double when a later Run needs more; with random routing
      // the received rows vary from Run to Run, so without care the timed
      // Runs would regrow (and page-fault) them now and then. The first
      // warm-up Run therefore has 10% fewer tokens, the next full one makes
      // every buffer double, and routing noise then stays far below that
      // headroom. Then full warm-up Runs while they fit in the target time
      // (at most 3 in all; rank 0 decides, so every rank runs as many).
      Sample probe = once(std::max<int64_t>(1, tokens - tokens / 10));
      probe = once(tokens);
      double warm_s = probe.run_s;
      for (int w = 2; w < 3; ++w) {
        int more = warm_s < a.target_seconds ? 1 : 0;
        std::vector<int> all_more(W);
        Check(t.AllGather(&more, sizeof(int), all_more.data()), "all-gather");
        if (all_more[0] == 0) break;
        probe = once(tokens);
        warm_s += probe.run_s;
      }
      // Size the run (rank 0 decides): about --target-seconds, at least 5
      // iterations, 3 for points slower than a third of the target (the
      // large ones, which dominate the sweep).
      const double per_run = std::max(probe.run_s, 1e-6);
      int iters = per_run > a.target_seconds / 3
                      ? 3
                      : static_cast<int>(std::clamp(a.target_seconds / per_run, 5.0,
                                                    double(a.max_iters)));
      std::vector<int> all_iters(W);
      Check(t.AllGather(&iters, sizeof(int), all_iters.data()), "all-gather");
      iters = all_iters[0];
      std::vector<Sample> mine(iters);
      for (int i = 0; i < iters; ++i) mine[i] = once(tokens);
      if (std::getenv("JOULE_BENCH_TRACE") != nullptr) {
        std::fprintf(stderr, "rank %d tokens %d probe run %.0f us; runs:", a.rank, tokens,
                     probe.run_s * 1e6);
        for (const Sample& s : mine) {
          std::fprintf(stderr, " %.0f/%.0f/%.0f/%.0f", s.dispatch_s * 1e6, s.combine_s * 1e6,
                       s.run_s * 1e6, s.minor_faults);
        }
        std::fprintf(stderr, "\n");
      }
      std::vector<Sample> all(size_t(iters) * W);
      Check(t.AllGather(mine.data(), mine.size() * sizeof(Sample), all.data()), "all-gather");
      if (a.rank != 0) continue;

      // Per iteration: the slowest rank's time; bytes: mean over ranks.
      std::vector<double> dc(iters), dc_rank_mean(iters), disp(iters), comb(iters), run(iters),
          excluded(iters), faults(iters), comb_min(iters, 1e30);
      double bytes_d = 0, bytes_c = 0;
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
          bytes_d += s.bytes_dispatch / (double(iters) * W);
          bytes_c += s.bytes_combine / (double(iters) * W);
        }
      }
      const double lat_us = Median(dc) * 1e6;
      std::vector<double> skew_free(iters);
      for (int i = 0; i < iters; ++i) skew_free[i] = disp[i] + comb_min[i];
      // The expected dispatch message to one peer (what ucx_perftest is run
      // at): a token goes to a peer once if any of its K distinct uniform
      // experts is among the peer's E / W, as a row of hidden BF16 values
      // plus K expert ids and K router weights.
      double miss = 1;  // P(none of the token's experts is on a given rank)
      for (int i = 0; i < K; ++i) miss *= double(E - E / W - i) / (E - i);
      const double rows_per_peer = double(tokens) * (1 - std::max(miss, 0.0));
      const uint64_t nominal_peer =
          uint64_t(std::llround(rows_per_peer * (2.0 * hidden + 8.0 * K)));
      // What one row per (token, expert) slot would send to other ranks (the
      // MPI baseline's payload): dispatch hidden x 2 + 4, combine hidden x 2.
      const double slot_bytes = double(tokens) * K * (W - 1) / W * (4.0 * hidden + 4);
      std::fprintf(
          out,
          "{\"impl\":\"joule-ep-executor\",\"tls\":\"%s\",\"peer_errors\":%s,\"recv_thread\":%s,\"shared_windows\":%s,\"ep\":%d,\"hidden\":%d,"
          "\"tokens\":%d,\"top_k\":%d,\"experts\":%d,\"moe_intermediate\":%d,\"threads\":%d,"
          "\"iters\":%d,\"latency_us_median\":%.2f,\"latency_us_mean\":%.2f,"
          "\"latency_us_median_rank_mean\":%.2f,\"latency_us_median_skew_free\":%.2f,"
          "\"dispatch_us_median\":%.2f,\"combine_us_median\":%.2f,\"run_us_median\":%.2f,"
          "\"excluded_us_median\":%.2f,\"minor_faults_median\":%.0f,\"minor_faults_max\":%.0f,"
          "\"dispatch_bytes_per_rank\":%.0f,"
          "\"combine_bytes_per_rank\":%.0f,\"bytes_per_rank\":%.0f,\"bytes_per_peer\":%llu,"
          "\"algbw_GBps\":%.4f,\"slot_bytes_per_rank\":%.0f,\"slot_algbw_GBps\":%.4f}\n",
          tls ? tls : "default", a.peer_errors ? "true" : "false", a.recv_thread ? "true" : "false",
                       a.shared_windows ? "true" : "false", W, hidden, tokens, K, E,
          a.moe_intermediate, a.threads, iters, lat_us, Mean(dc) * 1e6, Median(dc_rank_mean) * 1e6,
          Median(skew_free) * 1e6,
          Median(disp) * 1e6,
          Median(comb) * 1e6, Median(run) * 1e6, Median(excluded) * 1e6, Median(faults),
          *std::max_element(faults.begin(), faults.end()), bytes_d, bytes_c,
          bytes_d + bytes_c, static_cast<unsigned long long>(nominal_peer),
          (bytes_d + bytes_c) / lat_us / 1e3, slot_bytes, slot_bytes / lat_us / 1e3);
      std::fflush(out);
    }
    Check(t.Barrier(), "barrier");
  }
  if (out != stdout) std::fclose(out);
  return 0;
}
