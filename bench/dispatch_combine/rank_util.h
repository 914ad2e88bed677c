// Shared by the dispatch/combine benchmark binaries, one process per rank:
// the flags every rank takes, list flags, fatal checks and the file
// rendezvous for UCX addresses.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "worker/ep/file_rendezvous.h"

namespace joule::bench {

// The options table rows (common/options.h) every rank binary has.
#define JOULE_RANK_BENCH_FLAGS(X)                                                          \
  X(int, rank, -1, "this process's rank (required)")                                      \
  X(int, world, 0, "number of rank processes (required)")                                 \
  X(std::string, dir, "", "rendezvous directory the ranks share (required)")              \
  X(std::string, hidden, "", "hidden sizes to sweep, comma-separated (required)")         \
  X(std::string, tokens, "", "tokens per rank to sweep, comma-separated (required)")      \
  X(int, top_k, 8, "experts per token")                                                   \
  X(bool, peer_errors, false, "UCX peer error handling (true: no CMA zero-copy over shm)")   \
  X(bool, recv_thread, false,                                                             \
    "UCX receive thread: a second worker and thread take the receives of large exchanges") \
  X(int64_t, spin_us, 500,                                                                \
    "waiting for a peer: spin this long before sleeping (the worker's --ucx-spin-us)")   \
  X(std::string, out, "", "file rank 0 appends its JSON lines to (default: stdout)")

// "1,4,16" -> {1, 4, 16}; InvalidArgument naming --flag for an empty list or an
// element that is not a positive integer.
inline absl::StatusOr<std::vector<int>> ParseSizeList(absl::string_view flag, const std::string& s) {
  std::vector<int> v;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int x = 0;
    if (!absl::SimpleAtoi(p, &x) || x <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": '", p, "' is not a positive integer"));
    }
    v.push_back(x);
  }
  if (v.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": required"));
  return v;
}

// The checks of JOULE_RANK_BENCH_FLAGS, for a config's Validate().
template <typename Config>
absl::Status ValidateRankFlags(const Config& c) {
  if (c.world < 1) return absl::InvalidArgumentError("--world: required, at least 1");
  if (c.rank < 0 || c.rank >= c.world) {
    return absl::InvalidArgumentError(absl::StrCat("--rank: must be in [0, ", c.world, ")"));
  }
  if (c.dir.empty()) return absl::InvalidArgumentError("--dir: required");
  if (c.top_k < 1) return absl::InvalidArgumentError("--top-k: must be at least 1");
  if (auto s = ParseSizeList("hidden", c.hidden); !s.ok()) return s.status();
  return ParseSizeList("tokens", c.tokens).status();
}

// A benchmark rank cannot go on after a failed setup step: print and exit 1.
inline void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

// Publishes this rank's address in `dir` and returns every rank's (60 s limit).
inline std::vector<std::string> Rendezvous(const std::string& dir, int rank, int world,
                                           const std::string& address) {
  Check(ep::PublishAddress(dir, rank, address), "publish address");
  auto all = ep::CollectAddresses(dir, world, absl::Seconds(60));
  Check(all.status(), "collect addresses");
  return *all;
}

}  // namespace joule::bench
