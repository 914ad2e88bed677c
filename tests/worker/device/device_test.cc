// The execution seam on a host without a GPU: device specs, buffers that know
// where they live, workspace layouts, the CPU backend, launches that give the
// same bits on the CPU backend and the fake device, and the clear refusal of a
// GPU that is not there.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/device/backend.h"
#include "worker/device/cpu_backend.h"
#include "worker/device/device_spec.h"
#include "worker/device/fake_device_backend.h"

namespace joule::device {
namespace {

using ::testing::HasSubstr;

TEST(DeviceSpecTest, ParsesCpuAndCudaOrdinals) {
  EXPECT_EQ(*ParseDeviceSpec("cpu"), DeviceSpec{});
  EXPECT_EQ(*ParseDeviceSpec("cuda"), (DeviceSpec{.kind = DeviceKind::kCuda, .index = 0}));
  EXPECT_EQ(*ParseDeviceSpec("cuda:0"), (DeviceSpec{.kind = DeviceKind::kCuda, .index = 0}));
  EXPECT_EQ(*ParseDeviceSpec("cuda:12"), (DeviceSpec{.kind = DeviceKind::kCuda, .index = 12}));
  EXPECT_EQ(ParseDeviceSpec("cuda:3")->ToString(), "cuda:3");
  EXPECT_EQ(ParseDeviceSpec("cpu")->ToString(), "cpu");
  EXPECT_EQ(*ParseDeviceSpec("fake"), DeviceSpec{.kind = DeviceKind::kFake});
  EXPECT_EQ(ParseDeviceSpec("fake")->ToString(), "fake");
}

// --device fake only where a test build registered the fake device; then it
// is the asynchronous fake GPU (its own device kind, not the CPU's).
TEST(DeviceSpecTest, TheFakeDeviceNeedsARegisteredFactory) {
  absl::StatusOr<std::unique_ptr<Backend>> none = CreateBackend({.kind = DeviceKind::kFake});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("joule-worker-fake-device"));
  SetFakeBackendFactory([](const BackendOptions& o) -> std::unique_ptr<Backend> {
    return std::make_unique<FakeDeviceBackend>(o.num_threads, /*asynchronous=*/true);
  });
  absl::StatusOr<std::unique_ptr<Backend>> fake = CreateBackend({.kind = DeviceKind::kFake});
  SetFakeBackendFactory(nullptr);
  ASSERT_TRUE(fake.ok()) << fake.status();
  EXPECT_EQ((*fake)->spec().ToString(), "fake");
  EXPECT_FALSE((*fake)->device_memory_is_host());
  EXPECT_EQ((*fake)->DeviceMemory()->total_bytes, int64_t{1} << 30);
}

TEST(DeviceSpecTest, RejectsAnythingElseNamingTheFlag) {
  for (const char* bad : {"", "gpu", "cuda:", "cuda:-1", "cuda:1x", "CUDA:0", "cuda:0 ", "cpu:0",
                          "cuda:99999999999"}) {
    absl::StatusOr<DeviceSpec> spec = ParseDeviceSpec(bad);
    ASSERT_FALSE(spec.ok()) << "'" << bad << "'";
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(spec.status().message()), HasSubstr("--device"));
  }
}

int releases = 0;
void CountRelease(void* data, MemoryKind) {
  ++releases;
  delete[] static_cast<char*>(data);
}

TEST(BufferTest, OwnsItsMemoryOnceAcrossMoves) {
  releases = 0;
  {
    Buffer a(new char[16], 16, MemoryKind::kPinned, &CountRelease);
    EXPECT_EQ(a.kind(), MemoryKind::kPinned);
    Buffer b = std::move(a);
    EXPECT_TRUE(a.empty());
    EXPECT_EQ(b.bytes(), 16u);
    Buffer c(new char[8], 8, MemoryKind::kDevice, &CountRelease);
    c = std::move(b);  // c's own memory goes back first
    EXPECT_EQ(releases, 1);
    EXPECT_EQ(c.bytes(), 16u);
  }
  EXPECT_EQ(releases, 2);
}

TEST(WorkspaceLayoutTest, SlicesAreAlignedAndDisjoint) {
  WorkspaceLayout layout;
  const size_t a = layout.Reserve(1);
  const size_t b = layout.Reserve(300);
  const size_t c = layout.Reserve(0);
  const size_t d = layout.Reserve(256);
  EXPECT_EQ(a, 0u);
  EXPECT_EQ(b, 256u);
  EXPECT_EQ(c, 768u);  // 300 rounds up to 512
  EXPECT_EQ(d, 768u);  // an empty slice takes no room
  EXPECT_EQ(layout.bytes(), 1024u);
}

TEST(CpuBackendTest, AllocatesZeroedAlignedHostMemoryForEveryKind) {
  CpuBackend cpu(1);
  for (MemoryKind kind : {MemoryKind::kHost, MemoryKind::kPinned, MemoryKind::kDevice}) {
    absl::StatusOr<Buffer> buffer = cpu.Allocate(kind, 1000);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    EXPECT_EQ(buffer->kind(), kind);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(buffer->data()) % 64, 0u);
    const auto* bytes = buffer->as<unsigned char>();
    EXPECT_TRUE(std::all_of(bytes, bytes + 1000, [](unsigned char v) { return v == 0; }));
  }
  EXPECT_TRUE(cpu.device_memory_is_host());
  EXPECT_EQ(cpu.kv_cache_type(), kernels::DType::kF32);
  EXPECT_EQ(cpu.weight_type(kernels::DType::kBF16), kernels::DType::kBF16);
  EXPECT_EQ(cpu.pci_bus_id(), "");
  EXPECT_FALSE(cpu.SupportsGraphs());
  EXPECT_EQ(cpu.BeginCapture().code(), absl::StatusCode::kUnimplemented);
}

TEST(CpuBackendTest, CopiesAndZeroesInStreamOrder) {
  CpuBackend cpu(2);
  std::vector<float> src = {1, 2, 3, 4};
  absl::StatusOr<Buffer> dst = cpu.Allocate(MemoryKind::kDevice, 4 * sizeof(float));
  ASSERT_TRUE(dst.ok());
  ASSERT_TRUE(cpu.CopyAsync(dst->data(), src.data(), 4 * sizeof(float)).ok());
  ASSERT_TRUE(cpu.Zero(dst->as<float>() + 1, 2 * sizeof(float)).ok());
  ASSERT_TRUE(cpu.Synchronize().ok());
  EXPECT_EQ(std::vector<float>(dst->as<float>(), dst->as<float>() + 4),
            (std::vector<float>{1, 0, 0, 4}));
}

TEST(CpuBackendTest, RefusesWhatOnlyAGpuDoesNamingTheField) {
  CpuBackend cpu(1);
  absl::Status kv = cpu.KvCacheWrite({.cache_type = kernels::DType::kBF16});
  EXPECT_EQ(kv.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(kv.message()), HasSubstr("KV cache"));
  int64_t valid = 1;
  absl::Status router = cpu.RouterTopK({.valid_tokens = &valid});
  EXPECT_EQ(router.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(router.message()), HasSubstr("valid_tokens"));
}

TEST(CpuBackendTest, RunsKernelsOnItsThreads) {
  CpuBackend cpu(2);
  std::vector<float> y = {1, 2, 3}, x = {10, 20, 30};
  ASSERT_TRUE(cpu.Add({.y = y.data(), .x = x.data(), .n = 3}).ok());
  EXPECT_EQ(y, (std::vector<float>{11, 22, 33}));
  std::vector<uint16_t> table = {0x3f80, 0x4000, 0xc040, 0x0000};  // 1, 2, -3, 0 in BF16
  std::vector<int32_t> tokens = {1, 0};
  std::vector<float> out(4);
  ASSERT_TRUE(cpu.Embedding({.tokens = tokens.data(), .count = 2, .table = table.data(),
                             .table_type = kernels::DType::kBF16, .hidden = 2, .out = out.data()})
                  .ok());
  EXPECT_EQ(out, (std::vector<float>{-3, 0, 1, 2}));
  EXPECT_THAT(cpu.Describe(), HasSubstr("2 threads"));
}

// Expert-parallel combine's reduce through the seam: rows of 0..3 weighted
// terms, F32 -> F32 accumulated and F32 -> BF16 into rows scattered over two
// buffers by out_rows. The fake device gives the CPU backend's bits eagerly,
// and a graph captured on it records the launch (nothing written) and
// replays it over the inputs as they are at replay.
TEST(BackendSeamTest, ReduceRowsGivesTheCpuBackendsBitsOnTheFakeDevice) {
  constexpr int64_t kHidden = 5, kRows = 4;
  std::vector<float> in = {1.5f,  -2.f, 0.25f, 3.f,  -1.f,    // row 0
                           0.1f,  0.2f, 0.3f,  0.4f, 0.5f,    // row 1
                           -7.f,  8.f,  1e-3f, 2.f,  1.f / 3,  // row 2
                           100.f, -0.f, 6.f,   -5.f, 0.7f};   // row 3
  const std::vector<int64_t> offsets = {0, 2, 2, 5, 6};
  const std::vector<int32_t> index = {3, 1, 0, 2, 0, 1};
  const std::vector<float> weights = {0.3f, 0.7f, 0.125f, -1.1f, 0.6f, 2.f};
  // The sums of what `in` holds, in term order: a multiply, then an add, in F32.
  auto reference = [&](std::vector<float> acc) {
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t j = offsets[r]; j < offsets[r + 1]; ++j) {
        for (int64_t d = 0; d < kHidden; ++d) {
          const float term = weights[j] * in[index[j] * kHidden + d];
          acc[r * kHidden + d] += term;
        }
      }
    }
    return acc;
  };
  const std::vector<float> prior = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                    11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
  const kernels::ReduceRowsParams f32 = {
      .in = in.data(), .in_stride_bytes = kHidden * 4, .offsets = offsets.data(),
      .index = index.data(), .weights = weights.data(), .out_stride_bytes = kHidden * 4,
      .accumulate = true, .rows = kRows, .hidden = kHidden};

  CpuBackend cpu(2);
  FakeDeviceBackend fake(2);
  std::vector<float> on_cpu = prior, on_fake = prior;
  kernels::ReduceRowsParams p = f32;
  p.out = on_cpu.data();
  ASSERT_TRUE(cpu.ReduceRows(p).ok());
  p.out = on_fake.data();
  ASSERT_TRUE(fake.ReduceRows(p).ok());
  EXPECT_EQ(on_cpu, reference(prior));
  EXPECT_EQ(std::memcmp(on_fake.data(), on_cpu.data(), on_cpu.size() * sizeof(float)), 0);

  // BF16 rows, odd rows in one buffer and even rows in the other.
  std::vector<uint16_t> even(2 * kHidden), odd(2 * kHidden), contiguous(kRows * kHidden);
  const std::vector<std::byte*> out_rows = {
      reinterpret_cast<std::byte*>(even.data()), reinterpret_cast<std::byte*>(odd.data()),
      reinterpret_cast<std::byte*>(even.data() + kHidden),
      reinterpret_cast<std::byte*>(odd.data() + kHidden)};
  kernels::ReduceRowsParams bf16 = f32;
  bf16.out_type = kernels::RowType::kBF16;
  bf16.accumulate = false;
  bf16.out = contiguous.data();
  bf16.out_stride_bytes = kHidden * 2;
  ASSERT_TRUE(cpu.ReduceRows(bf16).ok());
  kernels::ReduceRowsParams scattered = bf16;
  scattered.out = nullptr;
  scattered.out_rows = out_rows.data();
  ASSERT_TRUE(fake.BeginCapture().ok());
  ASSERT_TRUE(fake.ReduceRows(scattered).ok());
  absl::StatusOr<std::unique_ptr<Graph>> graph = fake.EndCapture();
  ASSERT_TRUE(graph.ok()) << graph.status();
  EXPECT_EQ(fake.recorded(), 1);
  EXPECT_EQ(even, std::vector<uint16_t>(2 * kHidden, 0));  // recorded, not run
  ASSERT_TRUE((*graph)->Launch().ok());
  for (int64_t r = 0; r < kRows; ++r) {
    EXPECT_EQ(std::memcmp(out_rows[r], contiguous.data() + r * kHidden, kHidden * 2), 0)
        << "row " << r;
  }
  // A replay reads the inputs as they are then.
  for (float& v : in) v *= -3.f;
  ASSERT_TRUE(cpu.ReduceRows(bf16).ok());
  ASSERT_TRUE((*graph)->Launch().ok());
  for (int64_t r = 0; r < kRows; ++r) {
    EXPECT_EQ(std::memcmp(out_rows[r], contiguous.data() + r * kHidden, kHidden * 2), 0)
        << "replayed row " << r;
  }
  EXPECT_NE(contiguous, std::vector<uint16_t>(kRows * kHidden, 0));

  // Accumulating into BF16 rows is refused on both, naming the field, as on CUDA.
  bf16.accumulate = true;
  for (Backend* backend : {static_cast<Backend*>(&cpu), static_cast<Backend*>(&fake)}) {
    const absl::Status refused = backend->ReduceRows(bf16);
    EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(refused.message()), HasSubstr("accumulate"));
  }
}

// Without a usable GPU (this CI host) asking for one is a clear error, not a
// crash or a silent CPU fallback; on a GPU host, an ordinal past the last
// device names how many there are.
// An event on a backend whose launches run to completion (the CPU; the fake
// device) waits by Synchronize: a fault inside earlier work surfaces at Wait.
TEST(EventTest, TheDefaultEventWaitsBySynchronizingAndReportsFaults) {
  CpuBackend cpu(1);
  absl::StatusOr<std::unique_ptr<Event>> event = cpu.CreateEvent();
  ASSERT_TRUE(event.ok()) << event.status();
  EXPECT_TRUE((*event)->Record().ok());
  EXPECT_TRUE((*event)->Wait().ok());
  FakeDeviceBackend fake(1);
  absl::StatusOr<std::unique_ptr<Event>> faulty = fake.CreateEvent();
  ASSERT_TRUE(faulty.ok()) << faulty.status();
  fake.InjectFault(1, absl::InternalError("cuda:0: an illegal memory access"));
  ASSERT_TRUE((*faulty)->Record().ok());
  EXPECT_THAT(std::string((*faulty)->Wait().message()), HasSubstr("illegal memory access"));
}

// The asynchronous fake device is a stream: launches run on its own thread
// in order, an event waits for what was launched before its Record, a copy
// from pageable host memory takes the source at the call (cudaMemcpyAsync's
// rule), and a failing launch fails the next wait, and every later one.
TEST(EventTest, TheAsynchronousFakeDeviceRunsInStreamOrder) {
  FakeDeviceBackend fake(1, /*asynchronous=*/true);
  const size_t n = 1 << 16;
  absl::StatusOr<Buffer> dev = fake.Allocate(MemoryKind::kDevice, n * sizeof(float));
  absl::StatusOr<Buffer> pinned = fake.Allocate(MemoryKind::kPinned, n * sizeof(float));
  ASSERT_TRUE(dev.ok() && pinned.ok());
  std::vector<float> src(n, 1.0f);
  absl::StatusOr<std::unique_ptr<Event>> event = fake.CreateEvent();
  ASSERT_TRUE(event.ok());
  for (int round = 0; round < 20; ++round) {
    ASSERT_TRUE(fake.CopyAsync(dev->data(), src.data(), n * sizeof(float)).ok());
    src.assign(n, 2.0f);  // after the call: the copy has the 1s
    ASSERT_TRUE(fake.Add({.y = dev->as<float>(), .x = dev->as<float>(), .n = int64_t(n)}).ok());
    ASSERT_TRUE(fake.CopyAsync(pinned->data(), dev->data(), n * sizeof(float)).ok());
    ASSERT_TRUE((*event)->Record().ok());
    ASSERT_TRUE(fake.Zero(dev->data(), n * sizeof(float)).ok());  // later work
    ASSERT_TRUE((*event)->Wait().ok());
    EXPECT_EQ(pinned->as<float>()[n - 1], 2.0f) << "round " << round;  // 1 + 1
    ASSERT_TRUE(fake.Synchronize().ok());
    EXPECT_EQ(dev->as<float>()[0], 0.0f);
    src.assign(n, 1.0f);
  }
  std::vector<float> back(n, -1.0f);  // into pageable memory: done when the call returns
  ASSERT_TRUE(fake.CopyAsync(back.data(), pinned->data(), n * sizeof(float)).ok());
  EXPECT_EQ(back[0], 2.0f);
  // A BF16 KV cache write fails inside the (CPU) kernel: at the next wait, and every later one.
  ASSERT_TRUE(fake.KvCacheWrite({.cache_type = kernels::DType::kBF16}).ok());
  EXPECT_THAT(std::string(fake.Synchronize().message()), HasSubstr("KV cache"));
  EXPECT_FALSE(fake.Synchronize().ok());
}

// The default copy stream is the backend's own: its copies run in that
// stream's order and a fault inside earlier work surfaces at its Synchronize.
TEST(CopyStreamTest, TheDefaultCopiesOnTheBackendsStream) {
  CpuBackend cpu(1);
  absl::StatusOr<std::unique_ptr<CopyStream>> copies = cpu.CreateCopyStream();
  ASSERT_TRUE(copies.ok()) << copies.status();
  std::vector<int> src = {1, 2, 3}, dst(3);
  ASSERT_TRUE((*copies)->CopyAsync(dst.data(), src.data(), sizeof(int) * 3).ok());
  ASSERT_TRUE((*copies)->Synchronize().ok());
  EXPECT_EQ(dst, src);
  FakeDeviceBackend fake(1);
  absl::StatusOr<std::unique_ptr<CopyStream>> faulty = fake.CreateCopyStream();
  ASSERT_TRUE(faulty.ok()) << faulty.status();
  fake.InjectFault(1, absl::InternalError("cuda:0: an illegal memory access"));
  EXPECT_THAT(std::string((*faulty)->Synchronize().message()), HasSubstr("illegal memory access"));
}

// The asynchronous fake's copy stream does not wait for the backend's stream
// (held here as by a long kernel); its copies between device memories land
// only at its Synchronize, so a caller that forgets to wait reads stale bytes;
// it takes a pageable source at the call and fills pageable memory before
// returning; an injected fault surfaces at its Synchronize.
TEST(CopyStreamTest, TheAsynchronousFakesCopiesWaitOnlyForTheirOwnSynchronize) {
  FakeDeviceBackend fake(1, /*asynchronous=*/true);
  constexpr size_t kBytes = 4096;
  absl::StatusOr<Buffer> dev = fake.Allocate(MemoryKind::kDevice, kBytes);
  absl::StatusOr<Buffer> pinned = fake.Allocate(MemoryKind::kPinned, kBytes);
  ASSERT_TRUE(dev.ok() && pinned.ok());
  absl::StatusOr<std::unique_ptr<CopyStream>> copies = fake.CreateCopyStream();
  ASSERT_TRUE(copies.ok()) << copies.status();
  absl::Notification release;
  ASSERT_TRUE(fake.HoldStream(&release).ok());
  ASSERT_TRUE(fake.Zero(pinned->data(), kBytes).ok());  // queued behind the hold
  std::vector<std::byte> src(kBytes, std::byte{7});
  ASSERT_TRUE((*copies)->CopyAsync(dev->data(), src.data(), kBytes).ok());
  src.assign(kBytes, std::byte{9});  // after the call: the copy has the 7s
  ASSERT_TRUE((*copies)->CopyAsync(pinned->data(), dev->data(), kBytes).ok());
  EXPECT_EQ(pinned->as<std::byte>()[0], std::byte{0}) << "landed before Synchronize";
  ASSERT_TRUE((*copies)->Synchronize().ok());  // returns while the stream is held
  EXPECT_EQ(pinned->as<std::byte>()[kBytes - 1], std::byte{7});
  std::vector<std::byte> back(kBytes);
  ASSERT_TRUE((*copies)->CopyAsync(back.data(), dev->data(), kBytes).ok());
  EXPECT_EQ(back[0], std::byte{7});
  release.Notify();
  ASSERT_TRUE(fake.Synchronize().ok());
  EXPECT_EQ(pinned->as<std::byte>()[0], std::byte{0});  // the held stream's zero ran last
  fake.InjectFault(1, absl::InternalError("cuda:0: an illegal memory access"));
  EXPECT_FALSE((*copies)->Synchronize().ok());
  EXPECT_FALSE(fake.Synchronize().ok());
}

// Without a GPU the GPU tests skip; tests/gpu/run.sh runs this binary on one
// with JOULE_REQUIRE_GPU=1, which turns the skip into a failure.
void SkipWithoutGpu(const absl::Status& why) {
  const char* require = std::getenv("JOULE_REQUIRE_GPU");
  if (require != nullptr && std::string(require) == "1") {
    ADD_FAILURE() << why;
    return;
  }
  GTEST_SKIP() << why;
}

// A CUDA event waits for the copies launched before its Record.
TEST(EventTest, ACudaEventWaitsForTheWorkRecordedBeforeIt) {
  absl::StatusOr<std::unique_ptr<Backend>> cuda = CreateBackend({.kind = DeviceKind::kCuda});
  if (!cuda.ok()) return SkipWithoutGpu(cuda.status());
  Backend& gpu = **cuda;
  const size_t n = size_t{16} << 20;  // floats: long enough that the copies are still running
  std::vector<float> src(n);
  for (size_t i = 0; i < n; ++i) src[i] = static_cast<float>(i % 1000);
  absl::StatusOr<Buffer> dev = gpu.Allocate(MemoryKind::kDevice, n * sizeof(float));
  absl::StatusOr<Buffer> back = gpu.Allocate(MemoryKind::kPinned, n * sizeof(float));
  ASSERT_TRUE(dev.ok() && back.ok());
  absl::StatusOr<std::unique_ptr<Event>> first = gpu.CreateEvent();
  absl::StatusOr<std::unique_ptr<Event>> second = gpu.CreateEvent();
  ASSERT_TRUE(first.ok() && second.ok());
  ASSERT_TRUE(gpu.CopyAsync(dev->data(), src.data(), n * sizeof(float)).ok());
  ASSERT_TRUE(gpu.CopyAsync(back->data(), dev->data(), n * sizeof(float)).ok());
  ASSERT_TRUE((*first)->Record().ok());
  ASSERT_TRUE(gpu.Zero(dev->data(), n * sizeof(float)).ok());  // later work
  ASSERT_TRUE((*second)->Record().ok());
  ASSERT_TRUE((*first)->Wait().ok());
  EXPECT_EQ(std::memcmp(back->data(), src.data(), n * sizeof(float)), 0);
  ASSERT_TRUE((*second)->Wait().ok());
  ASSERT_TRUE(gpu.Synchronize().ok());
}

// A CUDA copy stream runs beside the backend's: while the backend's stream
// is busy zeroing 1 GiB two hundred times (memset kernels on the SMs, so the
// copy engines stay free, as they are beside expert GEMMs; few launches, so
// the host never waits for room in the launch queue), a small round trip on
// the copy stream finishes in a fraction of that time, with the right bytes.
TEST(CopyStreamTest, ACudaCopyStreamDoesNotWaitForTheBackendsStream) {
  absl::StatusOr<std::unique_ptr<Backend>> cuda = CreateBackend({.kind = DeviceKind::kCuda});
  if (!cuda.ok()) return SkipWithoutGpu(cuda.status());
  Backend& gpu = **cuda;
  const size_t big = size_t{1} << 30;
  absl::StatusOr<Buffer> a = gpu.Allocate(MemoryKind::kDevice, big);
  absl::StatusOr<Buffer> b = gpu.Allocate(MemoryKind::kDevice, big);
  absl::StatusOr<Buffer> staging = gpu.Allocate(MemoryKind::kDevice, 4096);
  absl::StatusOr<std::unique_ptr<CopyStream>> copies = gpu.CreateCopyStream();
  ASSERT_TRUE(a.ok() && b.ok() && staging.ok() && copies.ok());
  std::vector<uint8_t> src(4096), back(4096);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7 + 1);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 200; ++i) ASSERT_TRUE(gpu.Zero(i % 2 ? a->data() : b->data(), big).ok());
  ASSERT_TRUE((*copies)->CopyAsync(staging->data(), src.data(), src.size()).ok());
  ASSERT_TRUE((*copies)->CopyAsync(back.data(), staging->data(), back.size()).ok());
  ASSERT_TRUE((*copies)->Synchronize().ok());
  const double copy_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(gpu.Synchronize().ok());
  const double busy_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(back, src);
  EXPECT_LT(copy_s, busy_s / 4) << "the copy stream waited for the backend's stream: " << copy_s
                                << " s of " << busy_s << " s";
}

// MLA's batched per-head GEMM on a GPU: few rows take one SIMT launch over every member,
// prefill-sized rows a cuBLASLt launch per member. Both give the CPU backend's
// products up to x's rounding to BF16 (relative 2^-9 per term, so within
// 2.5e-3 of sum |x w|), which a member reading another's slice exceeds.
TEST(CudaGemmTest, ABatchedGemmMatchesTheCpuBackendOnBothPaths) {
  absl::StatusOr<std::unique_ptr<Backend>> cuda = CreateBackend({.kind = DeviceKind::kCuda});
  if (!cuda.ok()) return SkipWithoutGpu(cuda.status());
  Backend& gpu = **cuda;
  CpuBackend cpu(2);
  constexpr int64_t kHeads = 4, kK = 64, kN = 96;
  for (int64_t m : {8, 300}) {
    SCOPED_TRACE(testing::Message() << "m=" << m);
    std::vector<float> x(m * kHeads * kK);
    std::vector<uint16_t> w(kHeads * kN * kK);
    uint32_t state = 12345;
    auto next = [&] { return ((state = state * 1664525u + 1013904223u) >> 8) / 16777216.0f - 0.5f; };
    for (float& v : x) v = next();
    for (uint16_t& v : w) v = F32ToBf16(next());
    kernels::GemmParams p = {.m = m, .k = kK, .ldx = kHeads * kK, .w_type = kernels::DType::kBF16,
                             .n = kN, .ldy = kHeads * kN, .batch = kHeads, .x_batch_stride = kK,
                             .w_batch_stride = kN * kK, .y_batch_stride = kN};
    std::vector<float> want(m * kHeads * kN), got(want.size());
    p.x = x.data();
    p.w = w.data();
    p.y = want.data();
    ASSERT_TRUE(cpu.Gemm(p).ok());

    auto dx = gpu.Allocate(MemoryKind::kDevice, x.size() * sizeof(float));
    auto dw = gpu.Allocate(MemoryKind::kDevice, w.size() * sizeof(uint16_t));
    auto dy = gpu.Allocate(MemoryKind::kDevice, got.size() * sizeof(float));
    auto workspace = gpu.Allocate(MemoryKind::kDevice, std::max<size_t>(gpu.GemmWorkspaceBytes(m, kK), 1));
    ASSERT_TRUE(dx.ok() && dw.ok() && dy.ok() && workspace.ok());
    ASSERT_TRUE(gpu.CopyAsync(dx->data(), x.data(), x.size() * sizeof(float)).ok());
    ASSERT_TRUE(gpu.CopyAsync(dw->data(), w.data(), w.size() * sizeof(uint16_t)).ok());
    p.x = static_cast<const float*>(dx->data());
    p.w = dw->data();
    p.y = static_cast<float*>(dy->data());
    p.workspace = workspace->data();
    ASSERT_TRUE(gpu.Gemm(p).ok());
    ASSERT_TRUE(gpu.CopyAsync(got.data(), dy->data(), got.size() * sizeof(float)).ok());
    ASSERT_TRUE(gpu.Synchronize().ok());
    int reported = 0;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t h = 0; h < kHeads; ++h) {
        for (int64_t j = 0; j < kN; ++j) {
          double mag = 0;
          for (int64_t k = 0; k < kK; ++k) {
            mag += std::fabs(double(x[i * kHeads * kK + h * kK + k]) * Bf16ToF32(w[(h * kN + j) * kK + k]));
          }
          const int64_t at = i * kHeads * kN + h * kN + j;
          if (!(std::fabs(got[at] - want[at]) <= 2.5e-3 * mag + 1e-6) && reported++ < 10) {
            ADD_FAILURE() << "token " << i << " head " << h << " col " << j << ": got " << got[at]
                          << ", want " << want[at];
          }
        }
      }
    }
  }
}

TEST(CreateBackendTest, AGpuThatIsNotThereIsAClearError) {
  for (int ordinal : {0, 7}) {
    absl::StatusOr<std::unique_ptr<Backend>> backend =
        CreateBackend({.kind = DeviceKind::kCuda, .index = ordinal});
    if (backend.ok()) {
      EXPECT_EQ((*backend)->spec().index, ordinal);  // a GPU host with that many devices
      continue;
    }
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
    const std::string message(backend.status().message());
    EXPECT_THAT(message, HasSubstr("cuda:" + std::to_string(ordinal)));
    EXPECT_TRUE(message.find("no CUDA device") != std::string::npos ||
                message.find("built without CUDA") != std::string::npos ||
                message.find("CUDA device") != std::string::npos)
        << message;
  }
  absl::StatusOr<std::unique_ptr<Backend>> cpu = CreateBackend({});
  ASSERT_TRUE(cpu.ok());
  EXPECT_FALSE((*cpu)->spec().is_cuda());
}

// MLA's per-head products as one batched Gemm through the seam: the fake
// device gives the CPU backend's bits, and both refuse what the CUDA launch
// refuses (kernels/cuda/gemm_checks.h), naming the field.
TEST(BackendSeamTest, BatchedGemmOnTheFakeDeviceAndItsRefusals) {
  constexpr int64_t kHeads = 3, kM = 2, kK = 4, kN = 3;
  std::vector<float> x(kM * kHeads * kK), w(kHeads * kN * kK);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.125f * static_cast<float>(i % 5) - 0.25f;
  kernels::GemmParams p = {.x = x.data(), .m = kM, .k = kK, .ldx = kHeads * kK, .w = w.data(),
                           .w_type = kernels::DType::kF32, .n = kN, .ldy = kHeads * kN,
                           .batch = kHeads, .x_batch_stride = kK, .w_batch_stride = kN * kK,
                           .y_batch_stride = kN};
  CpuBackend cpu(2);
  FakeDeviceBackend fake(2);
  std::vector<float> on_cpu(kM * kHeads * kN), on_fake(on_cpu.size());
  p.y = on_cpu.data();
  ASSERT_TRUE(cpu.Gemm(p).ok());
  p.y = on_fake.data();
  ASSERT_TRUE(fake.Gemm(p).ok());
  ASSERT_TRUE(fake.Synchronize().ok());
  EXPECT_EQ(on_fake, on_cpu);
  // Head 1, token 1, output 2: the dot product of x's and w's head-1 slices.
  float want = 0.f;
  for (int64_t k = 0; k < kK; ++k) want += x[1 * kHeads * kK + kK + k] * w[(kN + 2) * kK + k];
  EXPECT_FLOAT_EQ(on_cpu[1 * kHeads * kN + kN + 2], want);

  kernels::GemmParams fp8 = p;
  fp8.w_type = kernels::DType::kF8E4M3;
  fp8.w_scale_inv = w.data();
  kernels::GemmParams empty = p;
  empty.batch = 0;
  for (Backend* backend : std::initializer_list<Backend*>{&cpu, &fake}) {
    SCOPED_TRACE(backend->Describe());
    EXPECT_THAT(backend->Gemm(fp8).message(), HasSubstr("f8_e4m3 weights take batch 1"));
    EXPECT_THAT(backend->Gemm(empty).message(), HasSubstr("batch must be in [1, 65535], got 0"));
  }
}

}  // namespace
}  // namespace joule::device
