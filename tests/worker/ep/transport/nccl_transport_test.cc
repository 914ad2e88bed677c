// NcclTransport on device buffers. With one GPU: a 1-rank communicator, the
// device-buffer path of both collectives, and an init that times out when the
// second rank never joins. With two or more GPUs: two ranks on threads.
// Then the transport conformance suite on NCCL: host collectives through
// StagedTransport over NcclTransport on a CudaBackend, as joule-worker
// --transport nccl runs them (one rank on one GPU; two ranks on two GPUs).
// Without a device every GPU test skips with the reason.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <latch>
#include <memory>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "kernels/cuda/cuda_check.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/worker/ep/transport/conformance.h"
#include "worker/device/backend.h"
#include "worker/ep/nccl_transport.h"
#include "worker/ep/staged_transport.h"

namespace joule::ep {
namespace {

using kernels::cuda::CheckDeviceAvailable;
using kernels::cuda::DeviceCount;

// Skips without a GPU; fails instead under JOULE_REQUIRE_GPU=1 (tests/gpu/run.sh).
#define SKIP_WITHOUT_DEVICE() JOULE_SKIP_WITHOUT_CUDA_DEVICE()

// Device buffer that frees itself.
struct DeviceBuffer {
  explicit DeviceBuffer(size_t n) : bytes(n) { EXPECT_EQ(cudaMalloc(&ptr, n ? n : 1), cudaSuccess); }
  ~DeviceBuffer() { cudaFree(ptr); }
  void Upload(const std::vector<uint8_t>& h) {
    ASSERT_EQ(cudaMemcpy(ptr, h.data(), h.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<uint8_t> Download() const {
    std::vector<uint8_t> h(bytes);
    EXPECT_EQ(cudaMemcpy(h.data(), ptr, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  void* ptr = nullptr;
  size_t bytes;
};

TEST(NcclTransport, RejectsBadArguments) {
  // Checked before any CUDA call, so this runs without a GPU too.
  EXPECT_TRUE(absl::IsInvalidArgument(NcclTransport::Create(0, 1, "too short").status()));
  const std::string id(128, '\0');
  EXPECT_TRUE(absl::IsInvalidArgument(NcclTransport::Create(1, 1, id).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(NcclTransport::Create(0, 0, id).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      NcclTransport::Create(0, 1, id, {.timeout = absl::ZeroDuration()}).status()));
}

TEST(NcclTransport, OneRankMovesDeviceBuffers) {
  SKIP_WITHOUT_DEVICE();
  auto id = NcclTransport::MakeUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  auto t = NcclTransport::Create(0, 1, *id, {.timeout = absl::Seconds(30)}, 0);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->memory_kind(), MemoryKind::kDevice);
  EXPECT_EQ((*t)->name(), "nccl");

  const size_t n = size_t{8} << 20;  // 8 MiB
  std::vector<uint8_t> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = static_cast<uint8_t>(i * 7 + 3);
  DeviceBuffer in(n), out(n);
  in.Upload(host);
  ASSERT_TRUE((*t)->AllGather(in.ptr, n, out.ptr).ok());
  EXPECT_EQ(out.Download(), host);

  // All-to-all-v to itself at offsets: bytes [100, 100+len) land at 4096.
  const size_t len = 1 << 20;
  const size_t send_counts[1] = {len}, send_offsets[1] = {100};
  const size_t recv_counts[1] = {len}, recv_offsets[1] = {4096};
  DeviceBuffer recv(4096 + len);
  ASSERT_EQ(cudaMemset(recv.ptr, 0, recv.bytes), cudaSuccess);
  absl::Status s = (*t)->AllToAllV(in.ptr, send_counts, send_offsets, recv.ptr, recv_counts,
                                   recv_offsets);
  ASSERT_TRUE(s.ok()) << s;
  std::vector<uint8_t> got = recv.Download();
  EXPECT_TRUE(std::equal(got.begin() + 4096, got.end(), host.begin() + 100));
  EXPECT_TRUE(std::all_of(got.begin(), got.begin() + 4096, [](uint8_t b) { return b == 0; }));
  EXPECT_TRUE((*t)->Barrier().ok());
}

TEST(NcclTransport, MissingRankTimesOutAtInit) {
  SKIP_WITHOUT_DEVICE();
  auto id = NcclTransport::MakeUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  const absl::Time start = absl::Now();
  auto t = NcclTransport::Create(0, 2, *id, {.timeout = absl::Seconds(2)}, 0);  // rank 1 never comes
  EXPECT_TRUE(absl::IsDeadlineExceeded(t.status())) << t.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

TEST(NcclTransport, TwoRanksExchangeAcrossDevices) {
  SKIP_WITHOUT_DEVICE();
  if (DeviceCount() < 2) GTEST_SKIP() << "needs two CUDA devices, found " << DeviceCount();
  auto id = NcclTransport::MakeUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  std::vector<absl::Status> results(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      results[r] = [&]() -> absl::Status {
        JOULE_CUDA_RETURN_IF_ERROR(cudaSetDevice(r));
        auto t = NcclTransport::Create(r, 2, *id, {.timeout = absl::Seconds(30)}, r);
        if (!t.ok()) return t.status();
        // Rank r sends (r + 1) * 1000 bytes of value 10 + r to the other rank
        // and 5 bytes to itself.
        const int other = 1 - r;
        const size_t to_other = (r + 1) * 1000, from_other = (other + 1) * 1000;
        std::vector<uint8_t> host(to_other + 5, static_cast<uint8_t>(10 + r));
        DeviceBuffer send(host.size()), recv(from_other + 5);
        send.Upload(host);
        size_t send_counts[2], send_offsets[2], recv_counts[2], recv_offsets[2];
        send_counts[r] = 5, send_offsets[r] = to_other;
        send_counts[other] = to_other, send_offsets[other] = 0;
        recv_counts[r] = 5, recv_offsets[r] = from_other;
        recv_counts[other] = from_other, recv_offsets[other] = 0;
        if (absl::Status s = (*t)->AllToAllV(send.ptr, send_counts, send_offsets, recv.ptr,
                                             recv_counts, recv_offsets);
            !s.ok()) {
          return s;
        }
        std::vector<uint8_t> got = recv.Download();
        for (size_t i = 0; i < got.size(); ++i) {
          const uint8_t want = i < from_other ? 10 + other : 10 + r;
          if (got[i] != want) return absl::DataLossError("wrong byte at " + std::to_string(i));
        }
        return (*t)->Barrier();
      }();
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_TRUE(results[0].ok()) << results[0];
  EXPECT_TRUE(results[1].ok()) << results[1];
}

// ---- The conformance suite on NCCL: StagedTransport over NcclTransport ----------------

// Runs `body` on one thread per rank, rank r on cuda:r with its own CudaBackend
// and a StagedTransport over its NCCL communicator. Every rank's transport
// lives until every body returned (an absent rank's communicator stays up, as
// a hung process's would).
std::vector<absl::Status> RunStagedNcclRanks(int world, absl::Duration timeout,
                                             const std::function<absl::Status(Transport&)>& body) {
  std::vector<absl::Status> results(world);
  absl::StatusOr<std::string> id = NcclTransport::MakeUniqueId();
  if (!id.ok()) return std::vector<absl::Status>(world, id.status());
  std::latch done(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      std::unique_ptr<device::Backend> backend;
      std::unique_ptr<StagedTransport> staged;
      results[r] = [&]() -> absl::Status {
        absl::StatusOr<std::unique_ptr<device::Backend>> b =
            device::CreateBackend({.kind = device::DeviceKind::kCuda, .index = r});
        if (!b.ok()) return b.status();
        backend = *std::move(b);
        auto nccl = NcclTransport::Create(r, world, *id, {.timeout = timeout}, r);
        if (!nccl.ok()) return nccl.status();
        staged = std::make_unique<StagedTransport>(*std::move(nccl), backend.get());
        if (staged->memory_kind() != MemoryKind::kHost || staged->name() != "nccl+staged" ||
            staged->device_transport()->memory_kind() != MemoryKind::kDevice) {
          return absl::InternalError("not a host transport over a device transport: " +
                                     staged->name());
        }
        return body(*staged);
      }();
      done.arrive_and_wait();
      staged.reset();  // before its backend
    });
  }
  for (auto& th : threads) th.join();
  return results;
}

TEST(StagedNcclTransport, OneRankPassesConformance) {
  SKIP_WITHOUT_DEVICE();
  auto results = RunStagedNcclRanks(1, absl::Seconds(30),
                                    [](Transport& t) { return testing::RunConformance(t); });
  EXPECT_TRUE(results[0].ok()) << results[0];
}

TEST(StagedNcclTransport, TwoRanksPassConformance) {
  SKIP_WITHOUT_DEVICE();
  if (DeviceCount() < 2) GTEST_SKIP() << "needs two CUDA devices, found " << DeviceCount();
  auto results = RunStagedNcclRanks(2, absl::Seconds(30),
                                    [](Transport& t) { return testing::RunConformance(t); });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

TEST(StagedNcclTransport, AbsentRankTimesOutTheOther) {
  SKIP_WITHOUT_DEVICE();
  if (DeviceCount() < 2) GTEST_SKIP() << "needs two CUDA devices, found " << DeviceCount();
  const absl::Duration timeout = absl::Seconds(5);  // also bounds the communicator's init
  auto results = RunStagedNcclRanks(2, timeout, [&](Transport& t) {
    return testing::CheckAbsentPeerTimesOut(t, /*absent=*/1, timeout);
  });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

TEST(StagedNcclTransport, InterruptEndsAWaitForAnAbsentRank) {
  SKIP_WITHOUT_DEVICE();
  if (DeviceCount() < 2) GTEST_SKIP() << "needs two CUDA devices, found " << DeviceCount();
  auto results = RunStagedNcclRanks(2, absl::Seconds(30), [](Transport& t) {
    return testing::CheckInterruptEndsAWait(t, /*absent=*/1, absl::Milliseconds(200));
  });
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
}

}  // namespace
}  // namespace joule::ep
