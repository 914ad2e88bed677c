// The transport conformance suite on StagedTransport, on the CPU: the
// in-process transport pretends to be a device transport (it must be handed
// the staging buffers, never the caller's host memory) under a
// FakeDeviceBackend, whose "device" memory is host memory the transport must
// still copy into and out of. Ranks as threads, as inproc_transport_test runs
// them. The same suite over NCCL on GPUs is in nccl_transport_test.
#include "worker/ep/staged_transport.h"

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/worker/ep/transport/conformance.h"
#include "worker/device/fake_device_backend.h"
#include "worker/ep/inproc_transport.h"

namespace joule::ep {
namespace {

using ::testing::HasSubstr;

// Host memory a device transport must never be given: the test's own buffers.
class HostRanges {
 public:
  void Add(const void* p, size_t bytes) {
    absl::MutexLock lock(&mu_);
    ranges_.emplace_back(static_cast<const std::byte*>(p), bytes);
  }
  bool Contains(const void* p) const {
    absl::MutexLock lock(&mu_);
    const auto* b = static_cast<const std::byte*>(p);
    for (const auto& [start, bytes] : ranges_) {
      if (b >= start && b < start + bytes) return true;
    }
    return false;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::pair<const std::byte*, size_t>> ranges_ ABSL_GUARDED_BY(mu_);
};

// In a PretendDeviceTransport method: fails when `p` points into the test's host buffers.
#define RETURN_IF_HOST(p)                                                                  \
  if (host_ != nullptr && host_->Contains(p)) {                                            \
    return absl::InternalError(absl::StrCat("rank ", rank(), ": " #p " is host memory")); \
  }

// The in-process transport posing as a device transport: says kDevice and
// refuses pointers into the test's host buffers.
class PretendDeviceTransport final : public Transport {
 public:
  PretendDeviceTransport(std::unique_ptr<Transport> inner, const HostRanges* host)
      : inner_(std::move(inner)), host_(host) {}
  int rank() const override { return inner_->rank(); }
  int world_size() const override { return inner_->world_size(); }
  MemoryKind memory_kind() const override { return MemoryKind::kDevice; }
  std::string name() const override { return "fake-device"; }
  absl::Status AllGather(const void* in, size_t bytes, void* out) override {
    RETURN_IF_HOST(in);
    RETURN_IF_HOST(out);
    return inner_->AllGather(in, bytes, out);
  }
  absl::Status AllToAllV(const void* send, const size_t* send_counts, const size_t* send_offsets,
                         void* recv, const size_t* recv_counts, const size_t* recv_offsets) override {
    RETURN_IF_HOST(send);
    RETURN_IF_HOST(recv);
    return inner_->AllToAllV(send, send_counts, send_offsets, recv, recv_counts, recv_offsets);
  }
  void Interrupt(const std::string& reason) override { inner_->Interrupt(reason); }

 private:
  std::unique_ptr<Transport> inner_;
  const HostRanges* host_;
};

// One rank: its fake device and its staged transport.
struct StagedRank {
  std::unique_ptr<device::FakeDeviceBackend> backend;
  std::unique_ptr<StagedTransport> transport;
};

std::vector<StagedRank> MakeRanks(InProcessGroup& group, const HostRanges* host = nullptr) {
  std::vector<StagedRank> ranks;
  for (int r = 0; r < group.world_size(); ++r) {
    StagedRank rank;
    rank.backend = std::make_unique<device::FakeDeviceBackend>(1, /*asynchronous=*/true);
    rank.transport = std::make_unique<StagedTransport>(
        std::make_unique<PretendDeviceTransport>(group.Rank(r), host), rank.backend.get());
    ranks.push_back(std::move(rank));
  }
  return ranks;
}

// Runs `body(transport)` on one thread per rank and returns each rank's status.
std::vector<absl::Status> RunRanks(std::vector<StagedRank>& ranks,
                                   const std::function<absl::Status(StagedTransport&)>& body) {
  std::vector<absl::Status> results(ranks.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < ranks.size(); ++r) {
    threads.emplace_back([&, r] { results[r] = body(*ranks[r].transport); });
  }
  for (auto& t : threads) t.join();
  return results;
}

class StagedConformance : public ::testing::TestWithParam<int> {};

TEST_P(StagedConformance, PassesSuite) {
  InProcessGroup group(GetParam());
  std::vector<StagedRank> ranks = MakeRanks(group);
  auto results = RunRanks(ranks, [](Transport& t) { return testing::RunConformance(t); });
  for (int r = 0; r < GetParam(); ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

INSTANTIATE_TEST_SUITE_P(World, StagedConformance, ::testing::Values(1, 2, 4),
                         [](const auto& info) { return "world" + std::to_string(info.param); });

class StagedFailures : public ::testing::TestWithParam<int> {};

TEST_P(StagedFailures, AbsentRankTimesOutEveryOtherRank) {
  const absl::Duration timeout = absl::Seconds(1);
  InProcessGroup group(GetParam(), {.timeout = timeout});
  std::vector<StagedRank> ranks = MakeRanks(group);
  const int absent = GetParam() - 1;
  auto results = RunRanks(ranks, [&](Transport& t) {
    return testing::CheckAbsentPeerTimesOut(t, absent, timeout);
  });
  for (int r = 0; r < GetParam(); ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

TEST_P(StagedFailures, InterruptEndsAWaitForAnAbsentRank) {
  InProcessGroup group(GetParam(), {.timeout = absl::Seconds(20)});
  std::vector<StagedRank> ranks = MakeRanks(group);
  const int absent = GetParam() - 1;
  auto results = RunRanks(ranks, [&](Transport& t) {
    return testing::CheckInterruptEndsAWait(t, absent, absl::Milliseconds(200));
  });
  for (int r = 0; r < GetParam(); ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

TEST_P(StagedFailures, KilledRankFailsSurvivors) {
  const absl::Duration timeout = absl::Seconds(2);
  InProcessGroup group(GetParam(), {.timeout = timeout});
  std::vector<StagedRank> ranks = MakeRanks(group);
  const int victim = GetParam() - 1;
  std::vector<absl::Duration> failed_after(GetParam());
  std::vector<absl::Status> failures(GetParam());
  auto results = RunRanks(ranks, [&](Transport& t) -> absl::Status {
    std::function<void()> kill;
    if (t.rank() == victim) kill = [&] { group.Kill(victim); };
    return testing::RunUntilPeerFails(t, absl::Seconds(20), kill, &failures[t.rank()],
                                      &failed_after[t.rank()]);
  });
  for (int r = 0; r < GetParam(); ++r) {
    if (r == victim) continue;  // a killed rank has no say
    EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
    EXPECT_TRUE(absl::IsUnavailable(failures[r])) << "rank " << r << ": " << failures[r];
    // Two collectives per all-to-all-v (counts, then rows): at most two timeouts.
    EXPECT_LE(failed_after[r], 2 * timeout + absl::Seconds(1)) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(World, StagedFailures, ::testing::Values(2, 4),
                         [](const auto& info) { return "world" + std::to_string(info.param); });

TEST(StagedTransport, IsAHostTransportOverItsDeviceTransport) {
  InProcessGroup group(1);
  std::vector<StagedRank> ranks = MakeRanks(group);
  StagedTransport& t = *ranks[0].transport;
  EXPECT_EQ(t.memory_kind(), MemoryKind::kHost);
  EXPECT_EQ(t.name(), "fake-device+staged");
  ASSERT_NE(t.device_transport(), nullptr);
  EXPECT_EQ(t.device_transport()->memory_kind(), MemoryKind::kDevice);
  absl::StatusOr<std::unique_ptr<SharedWindows>> windows = t.MapSharedWindows(4096);
  EXPECT_TRUE(absl::IsUnimplemented(windows.status())) << windows.status();
  EXPECT_THAT(std::string(windows.status().message()), HasSubstr("CUDA IPC windows"));
}

// The device transport sees only staging buffers, and calls no larger than
// earlier ones allocate nothing.
TEST(StagedTransport, HandsTheDeviceTransportStagingBuffersAndKeepsThem) {
  constexpr int kWorld = 2;
  InProcessGroup group(kWorld);
  HostRanges host;
  std::vector<StagedRank> ranks = MakeRanks(group, &host);
  // Per rank: all-gather in/out, all-to-all-v send/recv; registered before any thread runs.
  constexpr size_t kBytes = 3000;
  std::vector<std::vector<uint8_t>> in(kWorld, std::vector<uint8_t>(kBytes)),
      gathered(kWorld, std::vector<uint8_t>(kWorld * kBytes)),
      send(kWorld, std::vector<uint8_t>(kWorld * kBytes)),
      recv(kWorld, std::vector<uint8_t>(kWorld * kBytes));
  for (auto* buffers : {&in, &gathered, &send, &recv}) {
    for (auto& b : *buffers) host.Add(b.data(), b.size());
  }
  std::vector<int64_t> warm_allocations(kWorld), allocations(kWorld);
  auto results = RunRanks(ranks, [&](StagedTransport& t) -> absl::Status {
    const int me = t.rank();
    auto round = [&](size_t bytes, uint8_t salt) -> absl::Status {
      for (size_t i = 0; i < bytes; ++i) in[me][i] = static_cast<uint8_t>(me * 31 + i + salt);
      RETURN_IF_ERROR(t.AllGather(in[me].data(), bytes, gathered[me].data()));
      for (int p = 0; p < kWorld; ++p) {
        for (size_t i = 0; i < bytes; ++i) {
          if (gathered[me][p * bytes + i] != static_cast<uint8_t>(p * 31 + i + salt)) {
            return absl::DataLossError(absl::StrCat("all-gather: byte ", i, " of rank ", p));
          }
        }
      }
      std::vector<size_t> counts(kWorld, bytes), offsets(kWorld);
      for (int p = 0; p < kWorld; ++p) {
        offsets[p] = p * bytes;
        for (size_t i = 0; i < bytes; ++i) send[me][p * bytes + i] = static_cast<uint8_t>(me + 2 * p + i + salt);
      }
      RETURN_IF_ERROR(t.AllToAllV(send[me].data(), counts.data(), offsets.data(), recv[me].data(),
                                  counts.data(), offsets.data()));
      for (int p = 0; p < kWorld; ++p) {
        for (size_t i = 0; i < bytes; ++i) {
          if (recv[me][p * bytes + i] != static_cast<uint8_t>(p + 2 * me + i + salt)) {
            return absl::DataLossError(absl::StrCat("all-to-all-v: byte ", i, " from rank ", p));
          }
        }
      }
      return t.Barrier();
    };
    RETURN_IF_ERROR(round(kBytes, 1));
    warm_allocations[me] = t.staging_allocations();
    for (int i = 0; i < 20; ++i) RETURN_IF_ERROR(round(i % 2 == 0 ? kBytes : kBytes / 3, i));
    allocations[me] = t.staging_allocations();
    return absl::OkStatus();
  });
  for (int r = 0; r < kWorld; ++r) {
    ASSERT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
    EXPECT_GT(warm_allocations[r], 0) << "rank " << r;
    EXPECT_EQ(allocations[r], warm_allocations[r]) << "rank " << r << ": steady-state calls allocated";
    EXPECT_GE(ranks[r].transport->staging_bytes(), 2 * kWorld * kBytes) << "rank " << r;
  }
}

// A collective waits for its own staging copies, not for the kernels queued
// on the model's stream (two-batch overlap: the other micro-batch's). Each
// rank's stream is held, as by a long kernel, while the ranks all-gather,
// all-to-all-v and barrier; the calls must finish before it is released.
TEST(StagedTransport, CollectivesDoNotWaitForTheModelsStream) {
  constexpr int kWorld = 2;
  InProcessGroup group(kWorld, {.timeout = absl::Seconds(30)});
  std::vector<StagedRank> ranks = MakeRanks(group);
  absl::Notification release;
  for (StagedRank& rank : ranks) ASSERT_TRUE(rank.backend->HoldStream(&release).ok());
  std::vector<absl::Status> results(kWorld);
  std::atomic<int> running{kWorld};
  absl::Notification done;
  std::vector<std::thread> threads;
  for (int r = 0; r < kWorld; ++r) {
    threads.emplace_back([&, r] {
      results[r] = [&]() -> absl::Status {
        StagedTransport& t = *ranks[r].transport;
        const uint32_t mine = 100 + r;
        std::vector<uint32_t> all(kWorld);
        RETURN_IF_ERROR(t.AllGather(&mine, sizeof(mine), all.data()));
        if (all != std::vector<uint32_t>{100, 101}) return absl::DataLossError("all-gather");
        std::vector<size_t> counts(kWorld, 4), offsets = {0, 4};
        std::vector<uint32_t> send = {10u * r, 10u * r + 1}, recv(kWorld);
        RETURN_IF_ERROR(t.AllToAllV(send.data(), counts.data(), offsets.data(), recv.data(),
                                    counts.data(), offsets.data()));
        if (recv != std::vector<uint32_t>{uint32_t(r), 10u + r}) return absl::DataLossError("all-to-all-v");
        return t.Barrier();
      }();
      if (--running == 0) done.Notify();
    });
  }
  // Bounded: a transport that waits for the held stream is released after 20 s and fails.
  const bool finished_while_held = done.WaitForNotificationWithTimeout(absl::Seconds(20));
  release.Notify();
  for (auto& t : threads) t.join();
  EXPECT_TRUE(finished_while_held) << "a collective waited for the model's stream";
  for (int r = 0; r < kWorld; ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
  for (StagedRank& rank : ranks) EXPECT_TRUE(rank.backend->Synchronize().ok());
}

// Counts that disagree: both ranks of the pair hear the same sentence naming
// both, the pair moves nothing, the other pairs' bytes arrive.
TEST(StagedTransport, MismatchedCountsNameBothRanksAndTheRestArrives) {
  constexpr int kWorld = 3;
  InProcessGroup group(kWorld);
  std::vector<StagedRank> ranks = MakeRanks(group);
  std::vector<std::vector<uint8_t>> got(kWorld);
  auto results = RunRanks(ranks, [&](StagedTransport& t) -> absl::Status {
    const int me = t.rank();
    std::vector<size_t> send_counts(kWorld, 4), recv_counts(kWorld, 4), offsets(kWorld);
    for (int p = 0; p < kWorld; ++p) offsets[p] = 4 * p;
    if (me == 2) recv_counts[0] = 3;  // rank 0 sends 4
    std::vector<uint8_t> send(4 * kWorld);
    for (size_t i = 0; i < send.size(); ++i) send[i] = static_cast<uint8_t>(10 * me + 1);
    got[me].assign(4 * kWorld, 0xEE);
    return t.AllToAllV(send.data(), send_counts.data(), offsets.data(), got[me].data(),
                       recv_counts.data(), offsets.data());
  });
  EXPECT_TRUE(results[1].ok()) << results[1];
  for (int r : {0, 2}) {
    EXPECT_TRUE(absl::IsInvalidArgument(results[r])) << "rank " << r << ": " << results[r];
    EXPECT_THAT(std::string(results[r].message()),
                HasSubstr("rank 0 sends 4 bytes to rank 2, which expects 3"))
        << "rank " << r;
  }
  // Rank 2 got rank 1's bytes and its own, nothing from rank 0.
  EXPECT_EQ(got[2], (std::vector<uint8_t>{0xEE, 0xEE, 0xEE, 0xEE, 11, 11, 11, 11, 21, 21, 21, 21}));
  EXPECT_EQ(got[1], (std::vector<uint8_t>{1, 1, 1, 1, 11, 11, 11, 11, 21, 21, 21, 21}));
  // The group stays usable.
  results = RunRanks(ranks, [](Transport& t) { return t.Barrier(); });
  for (int r = 0; r < kWorld; ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

}  // namespace
}  // namespace joule::ep
