// Who gets CUDA IPC windows, decided on the CPU: WindowsReachable on made-up
// identities, and AgreeOnWindows as a collective over in-process ranks (one
// rank reporting another host, an error or another size makes every rank
// answer the same, and the group stays usable). Runs without a GPU.
#include <sys/types.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "kernels/cuda/cuda_check.h"
#include "worker/ep/cuda_ipc_windows.h"
#include "worker/ep/inproc_transport.h"

namespace joule::ep {
namespace {

std::string Gpu(char id) { return std::string(16, id); }

PeerIdentity Rank(const std::string& host, uint64_t pid, char gpu, std::vector<char> reach = {}) {
  PeerIdentity id{.host = host, .process = pid, .device = Gpu(gpu)};
  for (char r : reach) id.peer_devices.push_back(Gpu(r));
  return id;
}

TEST(WindowsReachable, RanksOnOneGpuInSeparateProcesses) {
  EXPECT_TRUE(WindowsReachable({Rank("h/b", 10, 'a'), Rank("h/b", 11, 'a'), Rank("h/b", 12, 'a'),
                                Rank("h/b", 13, 'a')})
                  .ok());
  EXPECT_TRUE(WindowsReachable({Rank("h/b", 10, 'a')}).ok());
  EXPECT_TRUE(WindowsReachable({}).ok());
}

TEST(WindowsReachable, GpusThatReachEachOther) {
  EXPECT_TRUE(
      WindowsReachable({Rank("h/b", 10, 'a', {'b'}), Rank("h/b", 11, 'b', {'a', 'c'})}).ok());
}

TEST(WindowsReachable, AnotherHostIsUnimplementedNamingIt) {
  absl::Status s = WindowsReachable({Rank("h/b", 10, 'a'), Rank("h/b", 11, 'a'),
                                     Rank("other/b", 12, 'a')});
  EXPECT_TRUE(absl::IsUnimplemented(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 2 runs on host 'other/b'")) << s;
  // Same hostname after a reboot (another boot id) is another host too.
  s = WindowsReachable({Rank("h/b1", 10, 'a'), Rank("h/b2", 11, 'a')});
  EXPECT_TRUE(absl::IsUnimplemented(s)) << s;
}

TEST(WindowsReachable, OneProcessIsUnimplemented) {
  absl::Status s =
      WindowsReachable({Rank("h/b", 10, 'a'), Rank("h/b", 11, 'a'), Rank("h/b", 10, 'a')});
  EXPECT_TRUE(absl::IsUnimplemented(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "ranks 0 and 2 are one process")) << s;
}

TEST(WindowsReachable, UnreachableGpuIsUnimplementedInEitherDirection) {
  // Rank 0's GPU cannot reach rank 1's.
  absl::Status s = WindowsReachable({Rank("h/b", 10, 'a'), Rank("h/b", 11, 'b', {'a'})});
  EXPECT_TRUE(absl::IsUnimplemented(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 0's GPU-61616161-6161-6161-6161-616161616161 "
                                             "cannot reach rank 1's GPU-6262"))
      << s;
  // Rank 1's GPU cannot reach rank 0's.
  s = WindowsReachable({Rank("h/b", 10, 'a', {'b'}), Rank("h/b", 11, 'b')});
  EXPECT_TRUE(absl::IsUnimplemented(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 1's")) << s;
  // Reaching a third GPU does not help.
  s = WindowsReachable({Rank("h/b", 10, 'a', {'c'}), Rank("h/b", 11, 'b', {'a'})});
  EXPECT_TRUE(absl::IsUnimplemented(s)) << s;
}

TEST(LocalHostIdentity, IsHostnameAndBootId) {
  const std::string id = LocalHostIdentity();
  char host[256] = {};
  ASSERT_EQ(gethostname(host, sizeof(host) - 1), 0);
  EXPECT_TRUE(absl::StartsWith(id, std::string(host) + "/")) << id;
  EXPECT_EQ(id.size(), std::string(host).size() + 1 + 36) << id;  // a boot id is a UUID
  EXPECT_EQ(LocalHostIdentity(), id);
}

// Runs `body(rank, transport)` on one thread per rank; each rank's status.
template <typename Body>
std::vector<absl::Status> RunRanks(int world, Body body) {
  InProcessGroup group(world, {.timeout = absl::Seconds(10)});
  std::vector<std::unique_ptr<Transport>> transports;
  for (int r = 0; r < world; ++r) transports.push_back(group.Rank(r));
  std::vector<absl::Status> results(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      results[r] = body(r, *transports[r]);
      // The group must still work after the answer, whatever it was.
      if (absl::Status s = transports[r]->Barrier(); !s.ok()) {
        results[r] = absl::InternalError("barrier after the agreement: " + s.ToString());
      }
    });
  }
  for (auto& t : threads) t.join();
  return results;
}

// Every rank's answer is `want`'s code with the same message, containing `names`.
void ExpectSameAnswer(const std::vector<absl::Status>& results, absl::StatusCode want,
                      const std::string& names) {
  for (size_t r = 0; r < results.size(); ++r) {
    EXPECT_EQ(results[r].code(), want) << "rank " << r << ": " << results[r];
    EXPECT_EQ(results[r].message(), results[0].message()) << "rank " << r;
    EXPECT_TRUE(absl::StrContains(results[r].message(), names))
        << "rank " << r << ": " << results[r];
  }
}

class AgreeOnWindowsTest : public ::testing::TestWithParam<int> {
 protected:
  int world() const { return GetParam(); }
};

TEST_P(AgreeOnWindowsTest, OneHostOneGpuAgrees) {
  auto results = RunRanks(world(), [](int r, Transport& t) {
    return AgreeOnWindows(t, Rank("h/b", 100 + r, 'a'), 4096);
  });
  ExpectSameAnswer(results, absl::StatusCode::kOk, "");
}

TEST_P(AgreeOnWindowsTest, ARankOnAnotherHostMakesEveryRankUnimplemented) {
  const int foreign = world() - 1;
  auto results = RunRanks(world(), [&](int r, Transport& t) {
    return AgreeOnWindows(t, Rank(r == foreign ? "elsewhere/x" : "h/b", 100 + r, 'a'), 4096);
  });
  ExpectSameAnswer(results, absl::StatusCode::kUnimplemented,
                   "rank " + std::to_string(foreign) + " runs on host 'elsewhere/x'");
}

TEST_P(AgreeOnWindowsTest, ARankWithoutIdentityFailsEveryRankNamingIt) {
  auto results = RunRanks(world(), [](int r, Transport& t) -> absl::Status {
    if (r == 1) return AgreeOnWindows(t, absl::InvalidArgumentError("device 7 of 1"), 4096);
    return AgreeOnWindows(t, Rank("h/b", 100 + r, 'a'), 4096);
  });
  ExpectSameAnswer(results, absl::StatusCode::kInvalidArgument, "rank 1: device 7 of 1");
}

TEST_P(AgreeOnWindowsTest, DifferentSizesAreInvalidOnEveryRank) {
  auto results = RunRanks(world(), [&](int r, Transport& t) {
    return AgreeOnWindows(t, Rank("h/b", 100 + r, 'a'), r == world() - 1 ? 8192 : 4096);
  });
  ExpectSameAnswer(results, absl::StatusCode::kInvalidArgument,
                   "rank " + std::to_string(world() - 1) + " asks for a window of 8192 bytes");
}

INSTANTIATE_TEST_SUITE_P(World, AgreeOnWindowsTest, ::testing::Values(2, 4),
                         [](const auto& info) { return "world" + std::to_string(info.param); });

// The whole collective, as far as a host gets: without a GPU every rank gets
// the same error and nothing hangs; on a GPU host, ranks that are threads of
// one process get Unimplemented (IPC needs one rank per process).
TEST(MapCudaIpcWindows, ThreadRanksGetTheSameAnswerWithOrWithoutAGpu) {
  const bool gpu = kernels::cuda::CheckDeviceAvailable().ok();
  auto results =
      RunRanks(2, [](int, Transport& t) { return MapCudaIpcWindows(t, 0, 4096).status(); });
  if (gpu) {
    ExpectSameAnswer(results, absl::StatusCode::kUnimplemented, "are one process");
  } else {
    ExpectSameAnswer(results, absl::StatusCode::kFailedPrecondition, "rank 0: no CUDA device");
  }
}

}  // namespace
}  // namespace joule::ep
