// One rank of the transport-level dispatch/combine benchmark (run.sh starts
// EP of them; UCX_TLS picks shared memory or TCP).
//
//   joule-transport-bench --rank R --world W --dir DIR --hidden 2048,7168
//       --tokens 1,4,16,64,128,256,1024,4096 [--top-k 8] [--peer-errors] [--self-copy]
//       [--out FILE]
//
// Per point: every rank routes tokens x top_k rows of hidden BF16 values
// spread evenly over the W ranks, as a dispatch with uniform routing would;
// one all-to-all-v moves the shares of the other ranks. A rank's own share
// stays out of the exchange, as in ExpertParallelExecutor, which packs those
// rows straight into its receive buffer; --self-copy passes it through
// AllToAllV as well (a local copy inside the timed call). Combine
// moves the same bytes back, so dispatch + combine = 2x the latency reported.
// Rank 0 appends one JSON line per point to FILE (or stdout).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "bench/dispatch_combine/rank_util.h"
#include "common/options.h"
#include "worker/ep/ucx_transport.h"

namespace {

using joule::bench::Check;
using joule::bench::ParseSizeList;
using joule::bench::Rendezvous;

#define JOULE_TRANSPORT_BENCH_FLAGS(X)                                                     \
  JOULE_RANK_BENCH_FLAGS(X)                                                                 \
  X(bool, self_copy, false,                                                                 \
    "also pass this rank's own share through AllToAllV (a local copy counted in the "       \
    "latency, not in the bytes); the executor writes it in place")

struct Args {
  JOULE_TRANSPORT_BENCH_FLAGS(JOULE_OPTION_FIELD)
  std::vector<joule::Option> Options() { return {JOULE_TRANSPORT_BENCH_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const { return joule::bench::ValidateRankFlags(*this); }
};

}  // namespace

int main(int argc, char** argv) {
  auto parsed = joule::ParseConfig<Args>(
      "usage: joule-transport-bench --rank R --world W --dir DIR --hidden H,.. --tokens T,.. [flags]",
      "JOULE_BENCH_", argc, argv);
  if (!parsed.ok()) return joule::ReportOptionsError("joule-transport-bench", parsed.status());
  const Args& a = *parsed;
  const std::vector<int> hidden_sizes = *ParseSizeList("hidden", a.hidden);
  const std::vector<int> token_counts = *ParseSizeList("tokens", a.tokens);
  auto created = joule::ep::UcxTransport::Create(a.rank, a.world, {.timeout = absl::Seconds(60)},
                                                 {.peer_error_handling = a.peer_errors,
                                                  .spin_before_naps = absl::Microseconds(a.spin_us),
                                                  .receive_thread = a.recv_thread});
  Check(created.status(), "create");
  joule::ep::UcxTransport& t = **created;
  Check(t.Connect(Rendezvous(a.dir, a.rank, a.world, t.address())), "connect");

  FILE* out = stdout;
  if (a.rank == 0 && !a.out.empty()) out = std::fopen(a.out.c_str(), "a");
  const char* tls = std::getenv("UCX_TLS");
  const int w = a.world;
  for (int hidden : hidden_sizes) {
    for (int tokens : token_counts) {
      const size_t row = size_t(hidden) * 2;  // BF16
      const size_t rows = size_t(tokens) * a.top_k;
      // Rows spread evenly; the first (rows % w) ranks get one more.
      std::vector<size_t> counts(w), offsets(w);
      size_t total = 0;
      for (int p = 0; p < w; ++p) {
        counts[p] = (rows / w + (size_t(p) < rows % w ? 1 : 0)) * row;
        offsets[p] = total;
        total += counts[p];
      }
      // Every rank sends the same split, so rank p receives counts[p] from everyone.
      std::vector<size_t> recv_counts(w, counts[a.rank]), recv_offsets(w);
      for (int p = 0; p < w; ++p) recv_offsets[p] = p * counts[a.rank];
      std::vector<size_t> send_counts = counts;
      if (!a.self_copy) send_counts[a.rank] = recv_counts[a.rank] = 0;
      // Allocated as the executor allocates its exchange buffers.
      joule::ep::HostBuffer send = joule::ep::AllocateHostBuffer(total);
      joule::ep::HostBuffer recv = joule::ep::AllocateHostBuffer(w * counts[a.rank] + 1);
      std::memset(send.get(), 1, total);
      std::memset(recv.get(), 0, w * counts[a.rank] + 1);
      auto once = [&] {
        Check(t.AllToAllV(send.get(), send_counts.data(), offsets.data(), recv.get(),
                          recv_counts.data(), recv_offsets.data()),
              "all-to-all-v");
      };
      // Warm up (wire-up, registration caches), then size the run to ~0.3 s
      // (rank 0 decides; everyone follows through the all-gather).
      for (int i = 0; i < 3; ++i) once();
      Check(t.Barrier(), "barrier");
      absl::Time start = absl::Now();
      once();
      int iters = static_cast<int>(std::clamp(absl::FDivDuration(absl::Seconds(0.3), absl::Now() - start), 5.0, 2000.0));
      std::vector<int> all(w);
      Check(t.AllGather(&iters, sizeof(int), all.data()), "all-gather");
      iters = all[0];
      std::vector<double> us(iters);
      Check(t.Barrier(), "barrier");
      for (int i = 0; i < iters; ++i) {
        start = absl::Now();
        once();
        us[i] = absl::ToDoubleMicroseconds(absl::Now() - start);
      }
      std::vector<double> sorted = us;
      std::sort(sorted.begin(), sorted.end());
      const double median = sorted[iters / 2];
      double mean = 0;
      for (double x : us) mean += x / iters;
      const size_t per_peer = counts[(a.rank + 1) % w];
      const size_t to_peers = total - counts[a.rank];
      if (a.rank == 0) {
        std::fprintf(out,
                     "{\"impl\":\"joule-ucx\",\"tls\":\"%s\",\"peer_errors\":%s,\"recv_thread\":%s,\"self_copy\":%s,\"ep\":%d,\"hidden\":%d,\"tokens\":%d,"
                     "\"top_k\":%d,\"bytes_per_rank\":%zu,\"bytes_per_peer\":%zu,\"iters\":%d,"
                     "\"latency_us_median\":%.2f,\"latency_us_mean\":%.2f,"
                     "\"algbw_GBps\":%.4f}\n",
                     tls ? tls : "default", a.peer_errors ? "true" : "false", a.recv_thread ? "true" : "false",
                     a.self_copy ? "true" : "false", w, hidden, tokens, a.top_k, total, per_peer, iters,
                     median, mean, to_peers / median / 1e3);
        std::fflush(out);
      }
    }
  }
  if (out != stdout) std::fclose(out);
  return 0;
}
