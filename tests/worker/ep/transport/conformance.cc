#include "tests/worker/ep/transport/conformance.h"

#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace joule::ep::testing {
namespace {

constexpr uint8_t kGuard = 0xEE;
constexpr size_t kGap = 8;  // bytes of guard between chunks

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The byte rank `src` sends to rank `dst` at index `i` in round `round`:
// depends on all four, so misplaced or stale data shows.
uint8_t Pattern(uint64_t round, int src, int dst, size_t i) {
  return static_cast<uint8_t>(round * 131 + src * 37 + dst * 11 + i + (i >> 8) * 7);
}

void Fill(uint8_t* p, size_t n, uint64_t round, int src, int dst) {
  for (size_t i = 0; i < n; ++i) p[i] = Pattern(round, src, dst, i);
}

absl::Status Verify(const uint8_t* p, size_t n, uint64_t round, int src, int dst,
                    absl::string_view what) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != Pattern(round, src, dst, i)) {
      return absl::DataLossError(absl::StrCat(what, ": round ", round, ": byte ", i, " of ", n,
                                              " from rank ", src, " to rank ", dst, " is ",
                                              int{p[i]}, ", expected ",
                                              int{Pattern(round, src, dst, i)}));
    }
  }
  return absl::OkStatus();
}

absl::Status VerifyGuard(const uint8_t* p, size_t n, absl::string_view what) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != kGuard) {
      return absl::DataLossError(absl::StrCat(what, ": guard byte overwritten"));
    }
  }
  return absl::OkStatus();
}

absl::Status Annotate(const absl::Status& s, absl::string_view what) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
}

// Byte count rank `src` sends to rank `dst` in `round`: up to 3000, a third zero.
size_t Count(uint64_t seed, uint64_t round, int src, int dst) {
  if (round % 8 == 7) return 0;
  const uint64_t r = SplitMix64(seed ^ (round << 32) ^ (uint64_t(src) << 16) ^ uint64_t(dst));
  return r % 3 == 0 ? 0 : (r >> 8) % 3000;
}

// Runs one all-to-all-v of counts[src][dst] bytes and checks the result.
absl::Status ExchangeAndVerify(Transport& t, uint64_t round,
                               const std::vector<std::vector<size_t>>& counts,
                               absl::string_view what) {
  const int w = t.world_size();
  const int me = t.rank();
  std::vector<size_t> send_counts(w), send_offsets(w), recv_counts(w), recv_offsets(w);
  size_t send_total = kGap, recv_total = kGap;
  for (int p = 0; p < w; ++p) {
    send_counts[p] = counts[me][p];
    send_offsets[p] = send_total;
    send_total += send_counts[p] + kGap;
    recv_counts[p] = counts[p][me];
    recv_offsets[p] = recv_total;
    recv_total += recv_counts[p] + kGap;
  }
  std::vector<uint8_t> send(send_total, kGuard), recv(recv_total, kGuard);
  for (int p = 0; p < w; ++p) Fill(send.data() + send_offsets[p], send_counts[p], round, me, p);
  absl::Status s = t.AllToAllV(send.data(), send_counts.data(), send_offsets.data(), recv.data(),
                               recv_counts.data(), recv_offsets.data());
  if (!s.ok()) return Annotate(s, absl::StrCat(what, " round ", round));
  if (absl::Status g = VerifyGuard(recv.data(), kGap, what); !g.ok()) return g;
  for (int p = 0; p < w; ++p) {
    const uint8_t* chunk = recv.data() + recv_offsets[p];
    if (absl::Status v = Verify(chunk, recv_counts[p], round, p, me, what); !v.ok()) return v;
    if (absl::Status g = VerifyGuard(chunk + recv_counts[p], kGap, what); !g.ok()) return g;
  }
  return absl::OkStatus();
}

bool IsPeerFailure(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s);
}

}  // namespace

absl::Status CheckAllGather(Transport& t) {
  const int w = t.world_size();
  const int me = t.rank();
  uint64_t round = 0;
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{13}, size_t{4096}, size_t{1} << 20}) {
    ++round;
    std::vector<uint8_t> in(bytes);
    Fill(in.data(), bytes, round, me, -1);
    std::vector<uint8_t> out(w * bytes + kGap, kGuard);
    if (absl::Status s = t.AllGather(in.data(), bytes, out.data()); !s.ok()) {
      return Annotate(s, absl::StrCat("all-gather of ", bytes, " bytes"));
    }
    for (int p = 0; p < w; ++p) {
      if (absl::Status v = Verify(out.data() + p * bytes, bytes, round, p, -1, "all-gather");
          !v.ok()) {
        return v;
      }
    }
    if (absl::Status g = VerifyGuard(out.data() + w * bytes, kGap, "all-gather"); !g.ok()) return g;
  }
  // In place: this rank's contribution already sits at its slot of `out`.
  ++round;
  const size_t bytes = 100;
  std::vector<uint8_t> out(w * bytes);
  Fill(out.data() + me * bytes, bytes, round, me, -1);
  if (absl::Status s = t.AllGather(out.data() + me * bytes, bytes, out.data()); !s.ok()) {
    return Annotate(s, "in-place all-gather");
  }
  for (int p = 0; p < w; ++p) {
    if (absl::Status v = Verify(out.data() + p * bytes, bytes, round, p, -1, "in-place all-gather");
        !v.ok()) {
      return v;
    }
  }
  return absl::OkStatus();
}

absl::Status CheckAllToAllVRandom(Transport& t, int rounds, uint64_t seed) {
  const int w = t.world_size();
  for (int round = 0; round < rounds; ++round) {
    std::vector<std::vector<size_t>> counts(w, std::vector<size_t>(w));
    for (int s = 0; s < w; ++s) {
      for (int d = 0; d < w; ++d) counts[s][d] = Count(seed, round, s, d);
    }
    if (absl::Status s = ExchangeAndVerify(t, round, counts, "random all-to-all-v"); !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status CheckLargeAllToAllV(Transport& t, size_t bytes_per_peer, int rounds) {
  const int w = t.world_size();
  std::vector<std::vector<size_t>> counts(w, std::vector<size_t>(w, bytes_per_peer));
  for (int round = 0; round < rounds; ++round) {
    if (absl::Status s = ExchangeAndVerify(t, 1000 + round, counts, "large all-to-all-v"); !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status CheckBarriers(Transport& t, int n) {
  for (int i = 0; i < n; ++i) {
    if (absl::Status s = t.Barrier(); !s.ok()) return Annotate(s, absl::StrCat("barrier ", i));
  }
  return absl::OkStatus();
}

absl::Status CheckMismatchedCounts(Transport& t) {
  const int w = t.world_size();
  const int me = t.rank();
  if (w < 2) return absl::OkStatus();
  std::vector<size_t> send_counts(w, 4), recv_counts(w, 4), offsets(w);
  for (int p = 0; p < w; ++p) offsets[p] = 8 * p;
  if (me == 1) recv_counts[0] = 3;  // rank 0 sends 4
  if (me == 0) recv_counts[1] = 5;  // rank 1 sends 4
  std::vector<uint8_t> send(8 * w, 1), recv(8 * w);
  absl::Status s = t.AllToAllV(send.data(), send_counts.data(), offsets.data(), recv.data(),
                               recv_counts.data(), offsets.data());
  if (me <= 1) {
    const std::string sender = absl::StrCat("rank ", 1 - me);
    if (!absl::IsInvalidArgument(s) || s.message().find(sender) == absl::string_view::npos) {
      return absl::InternalError(absl::StrCat("rank ", me, ": mismatched counts: expected ",
                                              "InvalidArgument naming ", sender, ", got ",
                                              s.ToString()));
    }
  } else if (!s.ok()) {
    return Annotate(s, "all-to-all-v beside a mismatch");
  }
  return Annotate(t.Barrier(), "barrier after mismatched counts");
}

WindowCopy HostWindowCopy() {
  return {
      .to_window = [](void* window, const void* host, size_t n) {
        std::memcpy(window, host, n);
        return absl::OkStatus();
      },
      .from_window = [](void* host, const void* window, size_t n) {
        std::memcpy(host, window, n);
        return absl::OkStatus();
      },
      .settle = [] { return absl::OkStatus(); },
  };
}

absl::Status CheckWindowExchange(Transport& t, const SharedWindows& win, const WindowCopy& copy,
                                 uint64_t round) {
  const int w = t.world_size();
  const int me = t.rank();
  if (win.bytes() % w != 0) {
    return absl::InvalidArgumentError(absl::StrCat("window of ", win.bytes(), " bytes for ", w,
                                                   " ranks"));
  }
  const size_t chunk = win.bytes() / w;
  std::vector<uint8_t> staging(chunk);
  // Rank `me` writes its chunk of every rank's window (its own included).
  for (int p = 0; p < w; ++p) {
    if (win.at(p) == nullptr) return absl::InternalError(absl::StrCat("no window for rank ", p));
    Fill(staging.data(), chunk, round, me, p);
    if (absl::Status s = copy.to_window(win.at(p) + me * chunk, staging.data(), chunk); !s.ok()) {
      return Annotate(s, absl::StrCat("write to rank ", p, "'s window"));
    }
  }
  if (absl::Status s = copy.settle(); !s.ok()) return Annotate(s, "settle window writes");
  if (absl::Status s = t.Barrier(); !s.ok()) return Annotate(s, "barrier after window writes");
  for (int p = 0; p < w; ++p) {
    if (absl::Status s = copy.from_window(staging.data(), win.at(me) + p * chunk, chunk); !s.ok()) {
      return Annotate(s, "read own window");
    }
    if (absl::Status s = Verify(staging.data(), chunk, round, p, me, "shared window"); !s.ok()) {
      return s;
    }
  }
  // Nobody releases (or reuses) a window a peer may still be reading.
  if (absl::Status s = t.Barrier(); !s.ok()) return Annotate(s, "barrier after window reads");
  return absl::OkStatus();
}

absl::Status CheckSharedWindows(Transport& t, bool* mapped) {
  const int w = t.world_size();
  *mapped = false;
  for (const size_t chunk : {size_t{4096} + 3, size_t{3} << 20}) {  // then larger, the first released
    absl::StatusOr<std::unique_ptr<SharedWindows>> windows = t.MapSharedWindows(chunk * w);
    if (absl::IsUnimplemented(windows.status())) return absl::OkStatus();
    if (!windows.ok()) return Annotate(windows.status(), "map shared windows");
    *mapped = true;
    const SharedWindows& win = **windows;
    if (win.bytes() != chunk * w) {
      return absl::InternalError(absl::StrCat("window of ", win.bytes(), " bytes, asked ", chunk * w));
    }
    if (absl::Status s = CheckWindowExchange(t, win, HostWindowCopy(), chunk); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status RunConformance(Transport& t) {
  bool mapped = false;
  if (absl::Status s = CheckSharedWindows(t, &mapped); !s.ok()) return s;
  if (absl::Status s = CheckBarriers(t, 3); !s.ok()) return s;
  if (absl::Status s = CheckAllGather(t); !s.ok()) return s;
  if (absl::Status s = CheckAllToAllVRandom(t, 64, 42); !s.ok()) return s;
  if (absl::Status s = CheckLargeAllToAllV(t, size_t{8} << 20, 2); !s.ok()) return s;
  if (absl::Status s = CheckBarriers(t, 50); !s.ok()) return s;
  if (absl::Status s = CheckMismatchedCounts(t); !s.ok()) return s;
  // Still healthy after everything above.
  return CheckAllToAllVRandom(t, 4, 7);
}

absl::Status CheckAbsentPeerTimesOut(Transport& t, int absent, absl::Duration timeout) {
  if (t.rank() == absent) return absl::OkStatus();
  const int w = t.world_size();
  std::vector<std::vector<size_t>> counts(w, std::vector<size_t>(w, 64));
  const absl::Time start = absl::Now();
  absl::Status s = ExchangeAndVerify(t, 0, counts, "all-to-all-v with an absent rank");
  const absl::Duration took = absl::Now() - start;
  if (!absl::IsDeadlineExceeded(s)) {
    return absl::InternalError(absl::StrCat("rank ", t.rank(), ": expected DeadlineExceeded, got ",
                                            s.ToString()));
  }
  if (took < timeout * 0.8 || took > timeout + absl::Seconds(2)) {
    return absl::InternalError(absl::StrCat("rank ", t.rank(), ": timed out after ",
                                            absl::FormatDuration(took), ", timeout is ",
                                            absl::FormatDuration(timeout)));
  }
  const absl::Time again = absl::Now();
  s = t.Barrier();
  const absl::Duration took_again = absl::Now() - again;
  if (!absl::IsFailedPrecondition(s)) {
    return absl::InternalError(absl::StrCat("rank ", t.rank(),
                                            ": after a timeout expected FailedPrecondition, got ",
                                            s.ToString()));
  }
  if (took_again > absl::Milliseconds(200)) {
    return absl::InternalError(absl::StrCat("rank ", t.rank(), ": the call after a timeout took ",
                                            absl::FormatDuration(took_again)));
  }
  return absl::OkStatus();
}

absl::Status CheckInterruptEndsAWait(Transport& t, int absent, absl::Duration after) {
  if (t.rank() == absent) return absl::OkStatus();
  const int w = t.world_size();
  std::vector<std::vector<size_t>> counts(w, std::vector<size_t>(w, 64));
  std::thread interrupter([&] {
    absl::SleepFor(after);
    t.Interrupt("membership epoch 2");
  });
  const absl::Time start = absl::Now();
  absl::Status s = ExchangeAndVerify(t, 0, counts, "all-to-all-v while interrupted");
  const absl::Duration took = absl::Now() - start;
  interrupter.join();
  if (!absl::IsAborted(s) || s.message().find("interrupted: membership epoch 2") == absl::string_view::npos) {
    return absl::InternalError(absl::StrCat("rank ", t.rank(),
                                            ": expected Aborted naming the interruption, got ",
                                            s.ToString()));
  }
  if (took > after + absl::Seconds(1)) {
    return absl::InternalError(absl::StrCat("rank ", t.rank(), ": the interrupted wait took ",
                                            absl::FormatDuration(took)));
  }
  const absl::Time again = absl::Now();
  s = t.Barrier();
  if (s.ok() || absl::Now() - again > absl::Milliseconds(200)) {
    return absl::InternalError(absl::StrCat("rank ", t.rank(),
                                            ": the call after an interrupt did not fail fast: ",
                                            s.ToString()));
  }
  return absl::OkStatus();
}

absl::Status RunUntilPeerFails(Transport& t, absl::Duration limit,
                               const std::function<void()>& on_started, absl::Status* failure,
                               absl::Duration* failed_after) {
  const int w = t.world_size();
  const absl::Time end = absl::Now() + limit;
  for (uint64_t round = 0; absl::Now() < end; ++round) {
    if (round == 20 && on_started) on_started();
    std::vector<std::vector<size_t>> counts(w, std::vector<size_t>(w));
    for (int s = 0; s < w; ++s) {
      for (int d = 0; d < w; ++d) counts[s][d] = Count(99, round, s, d);
    }
    const absl::Time start = absl::Now();
    absl::Status s = ExchangeAndVerify(t, round, counts, "all-to-all-v while a peer fails");
    if (s.ok()) continue;
    *failed_after = absl::Now() - start;
    *failure = s;
    if (!IsPeerFailure(s)) {
      return absl::InternalError(absl::StrCat("rank ", t.rank(),
                                              ": expected Unavailable or DeadlineExceeded, got ",
                                              s.ToString()));
    }
    const absl::Time again = absl::Now();
    absl::Status next = t.Barrier();
    if (next.ok() || absl::Now() - again > absl::Milliseconds(200)) {
      return absl::InternalError(absl::StrCat("rank ", t.rank(),
                                              ": the call after a failure did not fail fast: ",
                                              next.ToString()));
    }
    return absl::OkStatus();
  }
  return absl::DeadlineExceededError(absl::StrCat("rank ", t.rank(), ": no failure within ",
                                                  absl::FormatDuration(limit)));
}

}  // namespace joule::ep::testing
