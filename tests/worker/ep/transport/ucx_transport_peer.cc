// One UCX transport rank as a process, for ucx_transport_test.
//
//   ucx_transport_peer RANK WORLD DIR SCENARIO TIMEOUT_MS
//
// Publishes its worker address in DIR, collects the others', connects and
// runs SCENARIO: "conformance", "absent" (the last rank stays away),
// "late" (the last rank joins an all-gather 500 ms late; the others must not
// spend a core waiting for it), "windows-shm" / "windows-none" (shared
// windows must map / must be refused) or "killed" (loops until a peer fails; writes
// DIR/started.RANK once running), "recv-copies" (large exchanges with a
// receive thread: that thread must do a fair part of the work) or "mixed"
// (only rank 0 runs a receive thread: every rank's Connect must refuse);
// a "-peer-errors" suffix runs it with UcxOptions::peer_error_handling on, a
// "-recv-thread" suffix with UcxOptions::receive_thread on for every
// collective (receive_thread_min_bytes 0).
// Exit status: 0 when the scenario behaved as the contract says, 1 when it
// did not, 2 on bad arguments or a failed setup. Prints why on stderr.
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "tests/worker/ep/transport/conformance.h"
#include "tests/worker/ep/transport/process_group.h"
#include "worker/ep/file_rendezvous.h"
#include "worker/ep/ucx_transport.h"

namespace {

using joule::ep::CollectAddresses;
using joule::ep::PublishAddress;
using joule::ep::testing::Touch;

absl::Duration CpuTime() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return absl::DurationFromTimeval(u.ru_utime) + absl::DurationFromTimeval(u.ru_stime);
}

// Every rank but the last waits in an all-gather for the last one, which
// comes `late`; the waiting ranks' CPU time over that wait must stay a small
// part of it, and the gathered values must be right.
absl::Status CheckLatePeerCostsNoCore(joule::ep::Transport& t, absl::Duration late) {
  const int w = t.world_size();
  const bool is_late = t.rank() == w - 1;
  if (absl::Status s = t.Barrier(); !s.ok()) return s;
  if (is_late) absl::SleepFor(late);
  const absl::Time start = absl::Now();
  const absl::Duration cpu_start = CpuTime();
  const int64_t mine = 100 + t.rank();
  std::vector<int64_t> all(w, -1);
  if (absl::Status s = t.AllGather(&mine, sizeof(mine), all.data()); !s.ok()) return s;
  const absl::Duration wall = absl::Now() - start;
  const absl::Duration cpu = CpuTime() - cpu_start;
  for (int r = 0; r < w; ++r) {
    if (all[r] != 100 + r) {
      return absl::InternalError(absl::StrCat("all-gather slot ", r, " holds ", all[r]));
    }
  }
  if (is_late) return absl::OkStatus();
  std::fprintf(stderr, "rank %d: waited %s for the late rank using %s of CPU\n", t.rank(),
               absl::FormatDuration(wall).c_str(), absl::FormatDuration(cpu).c_str());
  if (wall < late / 2) {
    return absl::InternalError(
        absl::StrCat("the all-gather took only ", absl::FormatDuration(wall)));
  }
  if (cpu > wall * 0.2) {
    return absl::InternalError(absl::StrCat("waiting ", absl::FormatDuration(wall),
                                            " for a late rank used ", absl::FormatDuration(cpu),
                                            " of CPU"));
  }
  return absl::OkStatus();
}

absl::Duration ThisThreadCpu() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return absl::DurationFromTimespec(ts);
}

// CPU time of this process's threads named `name` (utime + stime from
// /proc/self/task/*/stat), in clock ticks; -1 when there is none.
int64_t ThreadTicks(const std::string& name) {
  int64_t ticks = -1;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    std::ifstream stat(task.path() / "stat");
    if (!stat) continue;
    const std::string line((std::istreambuf_iterator<char>(stat)), {});
    const size_t open = line.find('('), close = line.rfind(')');
    if (open == std::string::npos || close == std::string::npos) continue;
    if (line.substr(open + 1, close - open - 1) != name) continue;
    // After "comm)": state is field 3; utime and stime are fields 14 and 15.
    std::vector<std::string> f = absl::StrSplit(line.substr(close + 2), ' ');
    int64_t u = 0, k = 0;
    if (f.size() > 12 && absl::SimpleAtoi(f[11], &u) && absl::SimpleAtoi(f[12], &k)) {
      ticks = std::max<int64_t>(ticks, 0) + u + k;
    }
  }
  return ticks;
}

// Large exchanges with a receive thread: the data must arrive intact, and
// the thread must do a fair part of the work of plain exchanges.
absl::Status CheckReceiveThreadWorks(joule::ep::Transport& t) {
  const std::string name = joule::ep::UcxTransport::kReceiveThreadName;
  if (ThreadTicks(name) < 0) return absl::InternalError("no thread named " + name);
  if (absl::Status s = t.Barrier(); !s.ok()) return s;
  // Intact data first (this fills and checks buffers on the calling thread).
  if (absl::Status s = joule::ep::testing::CheckLargeAllToAllV(t, size_t{16} << 20, 2); !s.ok()) {
    return s;
  }
  const int w = t.world_size();
  const size_t per_peer = size_t{16} << 20;
  std::vector<size_t> counts(w, per_peer), offsets(w);
  for (int p = 0; p < w; ++p) offsets[p] = p * per_peer;
  std::vector<char> send(w * per_peer, 1), recv(w * per_peer);
  if (absl::Status s = t.Barrier(); !s.ok()) return s;
  const int64_t thread_before = ThreadTicks(name);
  const absl::Duration main_before = ThisThreadCpu();
  const absl::Time start = absl::Now();
  for (int round = 0; round < 12; ++round) {
    if (absl::Status s = t.AllToAllV(send.data(), counts.data(), offsets.data(), recv.data(),
                                     counts.data(), offsets.data());
        !s.ok()) {
      return s;
    }
  }
  const double tick = 1.0 / static_cast<double>(sysconf(_SC_CLK_TCK));
  const double thread_s = (ThreadTicks(name) - thread_before) * tick;
  const double main_s = absl::ToDoubleSeconds(ThisThreadCpu() - main_before);
  std::fprintf(stderr, "rank %d: receive thread %.3f s, calling thread %.3f s CPU, wall %s\n",
               t.rank(), thread_s, main_s, absl::FormatDuration(absl::Now() - start).c_str());
  // Over TCP the thread makes the kernel's receive copies (about half the
  // copying), over shared memory the CMA reads (nearly all of it).
  if (thread_s + main_s < 0.05) return absl::OkStatus();  // below clock-tick resolution
  if (thread_s < 0.25 * (thread_s + main_s)) {
    return absl::InternalError(absl::StrCat("the receive thread used ", thread_s,
                                            " s CPU beside the calling thread's ", main_s,
                                            " s: it did not take the receives"));
  }
  return absl::OkStatus();
}

bool StripSuffix(std::string& s, const std::string& suffix) {
  if (s.size() <= suffix.size() || s.compare(s.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return false;
  }
  s.resize(s.size() - suffix.size());
  return true;
}

int Run(int rank, int world, const std::string& dir, std::string scenario,
        absl::Duration timeout) {
  joule::ep::UcxOptions ucx;
  for (bool more = true; more;) {
    more = false;
    if (StripSuffix(scenario, "-peer-errors")) more = ucx.peer_error_handling = true;
    if (StripSuffix(scenario, "-recv-thread")) more = ucx.receive_thread = true;
  }
  if (ucx.receive_thread || scenario == "recv-copies") ucx.receive_thread_min_bytes = 0;
  if (scenario == "recv-copies") ucx.receive_thread = true;
  if (scenario == "mixed") ucx.receive_thread = rank == 0;
  auto transport = joule::ep::UcxTransport::Create(rank, world, {.timeout = timeout}, ucx);
  if (!transport.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, transport.status().ToString().c_str());
    return 2;
  }
  joule::ep::UcxTransport& t = **transport;
  if (absl::Status s = PublishAddress(dir, rank, t.address()); !s.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, s.ToString().c_str());
    return 2;
  }
  auto addresses = CollectAddresses(dir, world, absl::Seconds(20));
  if (!addresses.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, addresses.status().ToString().c_str());
    return 2;
  }
  absl::Status connected = t.Connect(*addresses);
  if (scenario == "mixed") {
    // Rank 0 sees peers without a receive thread, the others see rank 0 with one.
    std::fprintf(stderr, "rank %d: connect: %s\n", rank, connected.ToString().c_str());
    return absl::IsInvalidArgument(connected) &&
                   connected.message().find("every rank must agree") != absl::string_view::npos
               ? 0
               : 1;
  }
  if (!connected.ok()) {
    std::fprintf(stderr, "rank %d: connect: %s\n", rank, connected.ToString().c_str());
    return 2;
  }
  absl::Status result;
  if (scenario == "conformance") {
    result = joule::ep::testing::RunConformance(t);
  } else if (scenario == "absent") {
    const int absent = world - 1;
    result = joule::ep::testing::CheckAbsentPeerTimesOut(t, absent, timeout);
    // Stay alive past the others' deadline so they see a silent peer, not a dead one.
    if (rank == absent) absl::SleepFor(timeout + absl::Seconds(1));
  } else if (scenario == "interrupt") {
    const int absent = world - 1;
    result = joule::ep::testing::CheckInterruptEndsAWait(t, absent, absl::Milliseconds(300));
    if (rank == absent) absl::SleepFor(absl::Seconds(2));  // silent, not dead
  } else if (scenario == "windows-shm" || scenario == "windows-none") {
    // Over shared memory every rank maps every peer's window; over TCP none does.
    bool mapped = false;
    result = joule::ep::testing::CheckSharedWindows(t, &mapped);
    if (result.ok() && mapped != (scenario == "windows-shm")) {
      result = absl::InternalError(absl::StrCat("shared windows ", mapped ? "mapped" : "not mapped",
                                                " in scenario ", scenario));
    }
  } else if (scenario == "recv-copies") {
    result = CheckReceiveThreadWorks(t);
  } else if (scenario == "late") {
    result = CheckLatePeerCostsNoCore(t, absl::Milliseconds(500));
  } else if (scenario == "killed") {
    absl::Duration failed_after;
    absl::Status failure;
    result = joule::ep::testing::RunUntilPeerFails(
        t, absl::Seconds(30), [&] { (void)Touch(dir, absl::StrCat("started.", rank)); }, &failure,
        &failed_after);
    std::fprintf(stderr, "rank %d: the failing collective returned after %s: %s\n", rank,
                 absl::FormatDuration(failed_after).c_str(), failure.ToString().c_str());
  } else {
    std::fprintf(stderr, "unknown scenario '%s'\n", scenario.c_str());
    return 2;
  }
  if (!result.ok()) {
    std::fprintf(stderr, "rank %d: %s: FAILED: %s\n", rank, scenario.c_str(),
                 result.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int rank = 0, world = 0, timeout_ms = 0;
  if (argc != 6 || !absl::SimpleAtoi(argv[1], &rank) || !absl::SimpleAtoi(argv[2], &world) ||
      !absl::SimpleAtoi(argv[5], &timeout_ms) || timeout_ms <= 0) {
    std::fprintf(stderr, "usage: %s RANK WORLD DIR SCENARIO TIMEOUT_MS\n", argv[0]);
    return 2;
  }
  return Run(rank, world, argv[3], argv[4], absl::Milliseconds(timeout_ms));
}
