// The transport conformance suite on InProcessTransport: ranks as threads.
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "tests/worker/ep/transport/conformance.h"
#include "worker/ep/inproc_transport.h"

namespace joule::ep {
namespace {

// Runs `body(transport)` on one thread per rank and returns each rank's status.
template <typename Body>
std::vector<absl::Status> RunRanks(InProcessGroup& group, Body body) {
  const int w = group.world_size();
  std::vector<std::unique_ptr<Transport>> transports;
  for (int r = 0; r < w; ++r) transports.push_back(group.Rank(r));
  std::vector<absl::Status> results(w);
  std::vector<std::thread> threads;
  for (int r = 0; r < w; ++r) {
    threads.emplace_back([&, r] { results[r] = body(*transports[r]); });
  }
  for (auto& t : threads) t.join();
  return results;
}

class InProcessConformance : public ::testing::TestWithParam<int> {};

TEST_P(InProcessConformance, PassesSuite) {
  InProcessGroup group(GetParam());
  auto results = RunRanks(group, [](Transport& t) { return testing::RunConformance(t); });
  for (int r = 0; r < GetParam(); ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

INSTANTIATE_TEST_SUITE_P(World, InProcessConformance, ::testing::Values(1, 2, 4),
                         [](const auto& info) { return "world" + std::to_string(info.param); });

// Failures need a peer to fail.
class InProcessFailures : public ::testing::TestWithParam<int> {};

TEST_P(InProcessFailures, AbsentRankTimesOutEveryOtherRank) {
  const absl::Duration timeout = absl::Seconds(1);
  InProcessGroup group(GetParam(), {.timeout = timeout});
  const int absent = GetParam() - 1;
  auto results = RunRanks(group, [&](Transport& t) {
    return testing::CheckAbsentPeerTimesOut(t, absent, timeout);
  });
  for (int r = 0; r < GetParam(); ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

TEST_P(InProcessFailures, InterruptEndsAWaitForAnAbsentRank) {
  InProcessGroup group(GetParam(), {.timeout = absl::Seconds(20)});
  const int absent = GetParam() - 1;
  auto results = RunRanks(group, [&](Transport& t) {
    return testing::CheckInterruptEndsAWait(t, absent, absl::Milliseconds(200));
  });
  for (int r = 0; r < GetParam(); ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

TEST_P(InProcessFailures, KilledRankFailsSurvivors) {
  const absl::Duration timeout = absl::Seconds(2);
  InProcessGroup group(GetParam(), {.timeout = timeout});
  const int victim = GetParam() - 1;
  std::vector<absl::Duration> failed_after(GetParam());
  std::vector<absl::Status> failures(GetParam());
  auto results = RunRanks(group, [&](Transport& t) -> absl::Status {
    std::function<void()> kill;
    if (t.rank() == victim) kill = [&] { group.Kill(victim); };
    return testing::RunUntilPeerFails(t, absl::Seconds(20), kill, &failures[t.rank()],
                                      &failed_after[t.rank()]);
  });
  for (int r = 0; r < GetParam(); ++r) {
    if (r == victim) continue;  // a killed rank has no say
    EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
    EXPECT_TRUE(absl::IsUnavailable(failures[r])) << "rank " << r << ": " << failures[r];
    EXPECT_LE(failed_after[r], timeout + absl::Seconds(1)) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(World, InProcessFailures, ::testing::Values(2, 4),
                         [](const auto& info) { return "world" + std::to_string(info.param); });

// Exchange buffers from 2 MiB up start on a 2 MiB boundary (so the kernel can
// back them with huge pages); smaller ones are plain allocations. All usable.
TEST(HostBufferTest, LargeBuffersAreHugePageAligned) {
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{4096}, (size_t{2} << 20) - 1, size_t{2} << 20,
                       (size_t{5} << 20) + 3}) {
    HostBuffer b = AllocateHostBuffer(bytes);
    ASSERT_NE(b.get(), nullptr) << bytes;
    if (bytes >= (size_t{2} << 20)) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(b.get()) % (size_t{2} << 20), 0u) << bytes;
    }
    for (size_t i = 0; i < bytes; i += 4096) b[i] = std::byte{1};
    if (bytes > 0) b[bytes - 1] = std::byte{2};
  }
}

}  // namespace
}  // namespace joule::ep
