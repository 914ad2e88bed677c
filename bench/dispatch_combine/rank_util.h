// Shared by the dispatch/combine benchmark binaries, one process per rank:
// list flags, fatal checks and the file rendezvous for UCX addresses.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "worker/ep/file_rendezvous.h"

namespace joule::bench {

// "1,4,16" -> {1, 4, 16}; exits with status 2 on a bad element.
inline std::vector<int> ParseList(const std::string& s) {
  std::vector<int> v;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int x = 0;
    if (!absl::SimpleAtoi(p, &x) || x <= 0) {
      std::fprintf(stderr, "bad list element '%s'\n", std::string(p).c_str());
      std::exit(2);
    }
    v.push_back(x);
  }
  return v;
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
