// Transport conformance checks, the same for every Transport implementation.
//
// Each check runs on one rank; every rank of the group calls it with the same
// arguments (lockstep), and each returns OK when what this rank saw matches
// the contract in worker/ep/transport.h: bytes arrive where they should and
// nowhere else, and failures surface as errors within the timeout.
// The in-process test runs them on threads, the UCX test in real processes
// (ucx_transport_peer), so both transports are held to the same behaviour.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "worker/ep/transport.h"

namespace joule::ep::testing {

// All-gather of several sizes, including 0 bytes and an in-place call.
absl::Status CheckAllGather(Transport& t);

// `rounds` all-to-all-v rounds in a row with random uneven byte counts
// (many zeros, every 8th round all zero) and gaps between the chunks;
// guard bytes around the chunks must stay untouched.
absl::Status CheckAllToAllVRandom(Transport& t, int rounds, uint64_t seed);

// One all-to-all-v with `bytes_per_peer` bytes to and from every rank.
absl::Status CheckLargeAllToAllV(Transport& t, size_t bytes_per_peer, int rounds);

// `n` barriers in a row.
absl::Status CheckBarriers(Transport& t, int n);

// Ranks 0 and 1 disagree on counts (rank 1 expects fewer bytes than rank 0
// sends, rank 0 more than rank 1 sends): both get InvalidArgument naming the
// sender, other ranks succeed, and the group stays usable.
absl::Status CheckMismatchedCounts(Transport& t);

// How a check moves bytes in and out of window memory: memcpy for host
// windows; for device windows cudaMemcpy, with `settle` waiting until the
// writes are complete (cudaDeviceSynchronize) before the barrier that
// publishes them.
struct WindowCopy {
  std::function<absl::Status(void* window, const void* host, size_t n)> to_window;
  std::function<absl::Status(void* host, const void* window, size_t n)> from_window;
  std::function<absl::Status()> settle;
};
WindowCopy HostWindowCopy();

// One exchange through mapped windows of bytes() = world * chunk: every rank
// writes its chunk of every rank's window (its own included), settles, passes
// a barrier on `t`, finds each peer's chunk (a pattern of `round`, source and
// destination) in its own, and passes another barrier (nobody releases or
// reuses a window a peer may still be reading).
absl::Status CheckWindowExchange(Transport& t, const SharedWindows& win, const WindowCopy& copy,
                                 uint64_t round);

// Shared windows (Transport::MapSharedWindows): Unimplemented is allowed
// (`*mapped` stays false). Otherwise every rank writes its chunk of every
// rank's window, and after a barrier finds each peer's chunk in its own; then
// the same with a larger mapping made after the first was released.
absl::Status CheckSharedWindows(Transport& t, bool* mapped);

// All of the above; the suite every transport must pass.
absl::Status RunConformance(Transport& t);

// Rank `absent` never joins. Every other rank runs one all-to-all-v, which
// must fail with DeadlineExceeded after about `timeout`, and then a barrier,
// which must fail fast with FailedPrecondition. The absent rank returns OK at once.
absl::Status CheckAbsentPeerTimesOut(Transport& t, int absent, absl::Duration timeout);

// Rank `absent` never joins. Every other rank waits in an all-to-all-v under
// a long timeout while another thread calls Interrupt after `after`: the wait
// must end with Aborted naming the reason well before the timeout, and the
// next call must fail fast.
absl::Status CheckInterruptEndsAWait(Transport& t, int absent, absl::Duration after);

// Runs all-to-all-v rounds until one fails (at most `limit` of wall time).
// `on_started` is called once after the first rounds succeeded (the caller
// then kills or removes a peer). OK when the failure is Unavailable or
// DeadlineExceeded and the next call fails fast; `*failure` receives the
// error and `*failed_after` the time from the failing call's start to its return.
absl::Status RunUntilPeerFails(Transport& t, absl::Duration limit,
                               const std::function<void()>& on_started, absl::Status* failure,
                               absl::Duration* failed_after);

}  // namespace joule::ep::testing
