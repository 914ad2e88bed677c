// The dispatch payload of one rank under uniform random routing, shared by
// joule-dispatch-combine-bench (what it expects to send) and joule-memcpy-bench
// (which copies that many bytes on the GPU as the baseline).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace joule::bench {

// Expected rows a rank sends to one peer: a token goes to a peer once if any of
// its top_k distinct uniform experts is among the peer's experts / world
// (contiguous placement), however many of them are there.
inline double ExpectedRowsPerPeer(int64_t tokens, int top_k, int experts, int world) {
  double miss = 1;  // P(none of the token's experts is on a given rank)
  for (int i = 0; i < top_k; ++i) miss *= double(experts - experts / world - i) / (experts - i);
  return double(tokens) * (1 - std::max(miss, 0.0));
}

// Expected bytes of the BF16 rows (hidden x 2 each) a rank sends to its peers
// in one dispatch, which is also what comes back in combine: what the device
// path reports as dispatch_bytes_per_rank (the expert ids and router weights
// go over the control transport and are not counted there).
inline uint64_t ExpectedDispatchRowBytes(int64_t tokens, int hidden, int top_k, int experts,
                                         int world) {
  const double rows = (world - 1) * ExpectedRowsPerPeer(tokens, top_k, experts, world);
  return static_cast<uint64_t>(std::llround(rows * 2.0 * hidden));
}

}  // namespace joule::bench
