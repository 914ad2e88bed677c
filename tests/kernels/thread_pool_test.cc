#include "kernels/cpu/thread_pool.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace joule::kernels::cpu {
namespace {

// Runs ParallelFor and returns the chunks it produced, sorted.
std::vector<std::pair<int64_t, int64_t>> Chunks(ThreadPool* pool, int64_t n, int64_t grain) {
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> chunks;
  ParallelFor(CpuStream{pool}, n, grain, [&](int64_t b, int64_t e) {
    std::lock_guard<std::mutex> lock(mu);
    chunks.emplace_back(b, e);
  });
  std::sort(chunks.begin(), chunks.end());
  return chunks;
}

TEST(ThreadPoolTest, ChunksCoverRangeOnceAndRespectGrain) {
  ThreadPool pool(3);
  for (int64_t n : {1, 2, 7, 64, 1000, 12345}) {
    for (int64_t grain : {1, 3, 16, 5000}) {
      auto chunks = Chunks(&pool, n, grain);
      ASSERT_FALSE(chunks.empty());
      int64_t expect = 0;
      for (size_t i = 0; i < chunks.size(); ++i) {
        EXPECT_EQ(chunks[i].first, expect) << "n=" << n << " grain=" << grain;
        EXPECT_GT(chunks[i].second, chunks[i].first);
        if (i + 1 < chunks.size()) {
          EXPECT_GE(chunks[i].second - chunks[i].first, grain);
        }
        expect = chunks[i].second;
      }
      EXPECT_EQ(expect, n);
    }
  }
}

TEST(ThreadPoolTest, ZeroWorkCallsNothing) {
  ThreadPool pool(2);
  bool called = false;
  pool.ParallelFor(0, 1, [&](int64_t, int64_t) { called = true; });
  ParallelFor(CpuStream{}, 0, 1, [&](int64_t, int64_t) { called = true; });
  EXPECT_FALSE(called);
}

TEST(ThreadPoolTest, NullPoolRunsInlineAsOneChunk) {
  auto chunks = Chunks(nullptr, 100, 1);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0], std::make_pair(int64_t{0}, int64_t{100}));
}

TEST(ThreadPoolTest, UsesHelperThreads) {
  ThreadPool pool(2);
  std::mutex mu;
  std::set<std::thread::id> ids;
  // Each chunk waits briefly so one thread cannot drain the queue alone.
  pool.ParallelFor(64, 1, [&](int64_t, int64_t) {
    {
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  EXPECT_EQ(ids.size(), 2u);
}

TEST(ThreadPoolTest, ManyBackToBackCallsAllComplete) {
  ThreadPool pool(2);
  int64_t total = 0;
  std::atomic<int64_t> sum{0};
  for (int iter = 0; iter < 20000; ++iter) {
    pool.ParallelFor(16, 1, [&](int64_t b, int64_t e) { sum.fetch_add(e - b); });
    total += 16;
  }
  EXPECT_EQ(sum.load(), total);
}

TEST(ThreadPoolTest, CallsAfterHelpersFellAsleepStillComplete) {
  ThreadPool pool(2);
  for (int iter = 0; iter < 3; ++iter) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // past the spin window
    std::atomic<int64_t> sum{0};
    pool.ParallelFor(1000, 1, [&](int64_t b, int64_t e) { sum.fetch_add(e - b); });
    EXPECT_EQ(sum.load(), 1000);
  }
}

TEST(ThreadPoolTest, ConcurrentCallersAreSerializedCorrectly) {
  ThreadPool pool(2);
  std::atomic<int64_t> sum{0};
  auto caller = [&] {
    for (int i = 0; i < 2000; ++i)
      pool.ParallelFor(10, 1, [&](int64_t b, int64_t e) { sum.fetch_add(e - b); });
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  EXPECT_EQ(sum.load(), 2 * 2000 * 10);
}

// Guards the per-call overhead the engine depends on (10-20 calls per layer).
// The bound is loose (a shared 2-core CI host); a regression to a sleep/wake
// per call costs tens of microseconds and fails it.
TEST(ThreadPoolTest, PerCallOverheadIsSmall) {
  ThreadPool pool(2);
  std::atomic<int64_t> sink{0};
  auto fn = [&](int64_t b, int64_t e) { sink.fetch_add(e - b, std::memory_order_relaxed); };
  for (int i = 0; i < 1000; ++i) pool.ParallelFor(2, 1, fn);  // warm up
  const int kCalls = 20000;
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kCalls; ++i) pool.ParallelFor(2, 1, fn);
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
      kCalls;
  RecordProperty("per_call_us", std::to_string(us));
  std::printf("ParallelFor per-call overhead: %.2f us\n", us);
  EXPECT_LT(us, 20.0);
}

// A fake cgroup2 tree: /a/b in the hierarchy, limits on some levels.
class CgroupCpuLimitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::path(::testing::TempDir()) /
            ("cgroup-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(root_ / "a" / "b");
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  void Write(const std::string& rel, const std::string& text) {
    std::ofstream(root_ / rel) << text;
  }
  int Limit(const std::string& proc_self_cgroup) {
    return CgroupCpuLimit(proc_self_cgroup, root_.string());
  }
  std::filesystem::path root_;
};

TEST_F(CgroupCpuLimitTest, TightestLevelWinsAndQuotaRoundsUp) {
  Write("a/b/cpu.max", "max 100000\n");
  Write("a/cpu.max", "250000 100000\n");  // 2.5 cores -> 3
  Write("cpu.max", "800000 100000\n");
  EXPECT_EQ(Limit("0::/a/b\n"), 3);
  Write("a/b/cpu.max", "50000 100000\n");  // half a core -> 1
  EXPECT_EQ(Limit("0::/a/b\n"), 1);
  EXPECT_EQ(Limit("0::/\n"), 8);  // a container sees its own cgroup as the root
}

TEST_F(CgroupCpuLimitTest, NoLimitWhenUnsetUnreadableOrCgroupV1) {
  EXPECT_EQ(Limit("0::/a/b\n"), 0);  // no cpu.max files at all
  Write("a/cpu.max", "max 100000\n");
  EXPECT_EQ(Limit("0::/a/b\n"), 0);
  Write("a/cpu.max", "lots 100000\n");
  EXPECT_EQ(Limit("0::/a/b\n"), 0);
  Write("a/cpu.max", "200000 100000\n");
  EXPECT_EQ(Limit("12:cpu,cpuacct:/a/b\n"), 0);  // cgroup v1 only: not read
  EXPECT_EQ(Limit(""), 0);
  EXPECT_EQ(Limit("11:memory:/x\n0::/a/b\n"), 2);
}

// A fake cgroup v1 cpu hierarchy mounted at ROOT/cpu,cpuacct.
class CgroupV1CpuLimitTest : public CgroupCpuLimitTest {
 protected:
  void Cfs(const std::string& rel, const std::string& quota, const std::string& period = "100000\n") {
    std::filesystem::create_directories(root_ / ("cpu,cpuacct/" + rel));
    Write("cpu,cpuacct/" + rel + "cpu.cfs_quota_us", quota);
    Write("cpu,cpuacct/" + rel + "cpu.cfs_period_us", period);
  }
  // One mountinfo line for the hierarchy, mounted from cgroup `mount_root`.
  std::string Mountinfo(const std::string& mount_root = "/", const std::string& options = "rw,cpu,cpuacct") {
    return "30 22 0:27 / " + root_.string() + " rw - tmpfs tmpfs rw,mode=755\n" +
           "31 30 0:28 " + mount_root + " " + (root_ / "cpu,cpuacct").string() +
           " rw,nosuid shared:9 - cgroup cgroup " + options + "\n";
  }
};

TEST_F(CgroupV1CpuLimitTest, TightestLevelWinsAndQuotaRoundsUp) {
  Cfs("a/b/", "-1\n");
  Cfs("a/", "150000\n");  // 1.5 cores -> 2
  Cfs("", "400000\n");
  const std::string self = "12:memory:/a/b\n11:cpu,cpuacct:/a/b\n0::/\n";
  EXPECT_EQ(CgroupV1CpuLimit(self, Mountinfo()), 2);
  Cfs("a/b/", "25000\n", "50000\n");  // half a core -> 1
  EXPECT_EQ(CgroupV1CpuLimit(self, Mountinfo()), 1);
  EXPECT_EQ(CgroupV1CpuLimit("11:cpu,cpuacct:/\n", Mountinfo()), 4);
}

TEST_F(CgroupV1CpuLimitTest, ContainerMountsItsOwnCgroupAtTheMountPoint) {
  // Docker on v1: the container's cgroup /docker/ID is what is mounted, so its
  // limit sits at the mount point itself, whatever /proc/self/cgroup says.
  Cfs("", "300000\n");
  Cfs("b/", "-1\n");
  EXPECT_EQ(CgroupV1CpuLimit("4:cpu,cpuacct:/docker/ID\n", Mountinfo("/docker/ID")), 3);
  EXPECT_EQ(CgroupV1CpuLimit("4:cpu,cpuacct:/\n", Mountinfo("/docker/ID")), 3);  // cgroup namespace
  Cfs("b/", "100000\n");
  EXPECT_EQ(CgroupV1CpuLimit("4:cpu,cpuacct:/docker/ID/b\n", Mountinfo("/docker/ID")), 1);
  // A path that only shares a prefix with the mount root is not below it.
  EXPECT_EQ(CgroupV1CpuLimit("4:cpu,cpuacct:/docker/IDX/b\n", Mountinfo("/docker/ID")), 3);
}

TEST_F(CgroupV1CpuLimitTest, NoLimitWithoutTheCpuControllerOrAQuota) {
  const std::string self = "11:cpu,cpuacct:/a/b\n";
  EXPECT_EQ(CgroupV1CpuLimit(self, Mountinfo()), 0);  // no files
  Cfs("a/", "-1\n");
  EXPECT_EQ(CgroupV1CpuLimit(self, Mountinfo()), 0);
  Cfs("a/", "lots\n");
  EXPECT_EQ(CgroupV1CpuLimit(self, Mountinfo()), 0);
  Cfs("a/", "200000\n");
  EXPECT_EQ(CgroupV1CpuLimit(self, Mountinfo()), 2);
  EXPECT_EQ(CgroupV1CpuLimit("3:cpuset:/a/b\n0::/a/b\n", Mountinfo()), 0);  // no cpu line
  EXPECT_EQ(CgroupV1CpuLimit(self, Mountinfo("/", "rw,cpuset")), 0);         // no cpu mount
  EXPECT_EQ(CgroupV1CpuLimit(self, ""), 0);
  EXPECT_EQ(CgroupV1CpuLimit("", Mountinfo()), 0);
}

TEST(UsableCoresTest, FollowsTheAffinityMask) {
  const int all = UsableCores();
  EXPECT_GE(all, 1);
  EXPECT_LE(all, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  EXPECT_EQ(ThreadPool().num_threads(), all);
  // Pin this thread (sched_getaffinity(0) reads the calling thread) to one CPU.
  cpu_set_t saved;
  ASSERT_EQ(sched_getaffinity(0, sizeof(saved), &saved), 0);
  int first = 0;
  while (!CPU_ISSET(first, &saved)) ++first;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
  const int pinned = UsableCores();
  const int pool_threads = ThreadPool().num_threads();
  ASSERT_EQ(sched_setaffinity(0, sizeof(saved), &saved), 0);
  EXPECT_EQ(pinned, 1);
  EXPECT_EQ(pool_threads, 1);
}

}  // namespace
}  // namespace joule::kernels::cpu
