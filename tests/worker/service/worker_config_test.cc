// joule-worker's flags: defaults, both spellings, the environment, and clear
// errors naming the flag.
#include "worker/service/worker_config.h"

#include <cstdlib>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule::worker {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<WorkerConfig> Parse(std::vector<const char*> args) {
  args.insert(args.begin(), "joule-worker");
  return ParseWorkerConfig(static_cast<int>(args.size()), args.data());
}

TEST(WorkerConfigTest, DefaultsAndFlags) {
  auto c = Parse({"--coordinator", "10.0.0.1:7000", "--model=/m", "--rank", "3", "--kv-cache-mb", "64",
                  "--payload", "f32", "--step-timeout-ms=1500"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->coordinator, "10.0.0.1:7000");
  EXPECT_EQ(c->model, "/m");
  EXPECT_EQ(c->rank, 3);
  EXPECT_EQ(c->kv_cache_mb, 64);
  EXPECT_EQ(c->payload, "f32");
  EXPECT_EQ(c->step_timeout_ms, 1500);
  EXPECT_EQ(c->port, 0);
  EXPECT_EQ(c->block_size, 16);
  EXPECT_EQ(c->transport, "ucx");
  EXPECT_TRUE(c->prefix_caching);
  EXPECT_THAT(c->ToString(), HasSubstr("--prefix-caching=true"));
  EXPECT_THAT(c->ToString(), HasSubstr("--kv-cache-mb=64"));
  EXPECT_THAT(c->ToString(), HasSubstr("--transport=ucx"));
}

TEST(WorkerConfigTest, EnvironmentThenFlags) {
  setenv("JOULE_WORKER_BLOCK_SIZE", "32", 1);
  setenv("JOULE_WORKER_THREADS", "3", 1);
  setenv("JOULE_WORKER_PREFIX_CACHING", "false", 1);
  auto c = Parse({"--coordinator", "c:1", "--model", "/m", "--threads", "2"});
  unsetenv("JOULE_WORKER_BLOCK_SIZE");
  unsetenv("JOULE_WORKER_THREADS");
  unsetenv("JOULE_WORKER_PREFIX_CACHING");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->block_size, 32);
  EXPECT_EQ(c->threads, 2);
  EXPECT_FALSE(c->prefix_caching);
  auto off = Parse({"--coordinator", "c:1", "--model", "/m", "--prefix-caching=false"});
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_FALSE(off->prefix_caching);
}

// --shared-windows: on by default (BF16 rows through peers' shared windows
// where they map); =false sends them through the all-to-all-v; a value that
// is not a bool is refused naming the flag.
TEST(WorkerConfigTest, SharedWindowsOnByDefaultAndCanBeTurnedOff) {
  auto on = Parse({"--coordinator", "c:1", "--model", "/m"});
  ASSERT_TRUE(on.ok()) << on.status();
  EXPECT_TRUE(on->shared_windows);
  EXPECT_THAT(on->ToString(), HasSubstr("--shared-windows=true"));
  auto off = Parse({"--coordinator", "c:1", "--model", "/m", "--shared-windows=false"});
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_FALSE(off->shared_windows);
  EXPECT_THAT(off->ToString(), HasSubstr("--shared-windows=false"));
  auto alone = Parse({"--coordinator", "c:1", "--model", "/m", "--shared-windows"});
  ASSERT_TRUE(alone.ok()) << alone.status();
  EXPECT_TRUE(alone->shared_windows);
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1", "--model", "/m", "--shared-windows=maybe"})
                              .status().message()),
              HasSubstr("--shared-windows: 'maybe' is not true or false"));
}

TEST(WorkerConfigTest, ErrorsNameTheFlag) {
  EXPECT_THAT(std::string(Parse({"--model", "/m"}).status().message()), HasSubstr("--coordinator"));
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1"}).status().message()), HasSubstr("--model"));
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1", "--model", "/m", "--port", "x"}).status().message()),
              HasSubstr("--port: 'x'"));
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1", "--model", "/m", "--transport", "tcp"})
                              .status().message()),
              HasSubstr("--transport"));
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1", "--model", "/m", "--bogus", "1"}).status().message()),
              HasSubstr("unknown flag --bogus"));
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1", "--model", "/m", "--rank"}).status().message()),
              HasSubstr("--rank: missing value"));
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1", "--model", "/m", "--ucx-spin-us", "-1"})
                              .status().message()),
              HasSubstr("--ucx-spin-us: must be >= 0"));
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1", "--model", "/m", "--workers-per-host", "0"})
                              .status().message()),
              HasSubstr("--workers-per-host: must be at least 1"));
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1", "--model", "/m",
                                 "--two-batch-overlap-min-rows", "-1"})
                              .status().message()),
              HasSubstr("--two-batch-overlap-min-rows: must not be negative"));
  EXPECT_EQ(Parse({"--help"}).status().code(), absl::StatusCode::kCancelled);
}

// Secure by default: the Worker gRPC and /metrics servers listen on this host
// only; --listen-host, the older name of --grpc-host, still works.
TEST(WorkerConfigTest, BindAddressesDefaultToLoopback) {
  auto c = Parse({"--coordinator", "c:1", "--model", "/m"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->GrpcHost(), "127.0.0.1");
  EXPECT_EQ(c->metrics_host, "127.0.0.1");
  auto wide = Parse({"--coordinator", "c:1", "--model", "/m", "--grpc-host", "0.0.0.0", "--metrics-host", "0.0.0.0"});
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_EQ(wide->GrpcHost(), "0.0.0.0");
  EXPECT_EQ(wide->metrics_host, "0.0.0.0");
  auto old = Parse({"--coordinator", "c:1", "--model", "/m", "--listen-host", "10.1.2.3"});
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ(old->GrpcHost(), "10.1.2.3");
  auto both = Parse({"--coordinator", "c:1", "--model", "/m", "--listen-host", "10.1.2.3", "--grpc-host", "0.0.0.0"});
  ASSERT_FALSE(both.ok());
  EXPECT_THAT(std::string(both.status().message()), HasSubstr("--listen-host"));
  EXPECT_THAT(std::string(Parse({"--coordinator", "c:1", "--model", "/m", "--grpc-host", ""}).status().message()),
              HasSubstr("--grpc-host"));
}

TEST(WorkerConfigTest, ThreadsZeroTakesThisWorkersShareOfTheUsableCores) {
  auto all = Parse({"--coordinator", "c:1", "--model", "/m"});
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->ComputeThreads(8), 8);
  auto shared = Parse({"--coordinator", "c:1", "--model", "/m", "--workers-per-host", "3"});
  ASSERT_TRUE(shared.ok()) << shared.status();
  EXPECT_EQ(shared->ComputeThreads(8), 2);  // rounded down: 3 x 2 <= 8
  EXPECT_EQ(shared->ComputeThreads(2), 1);  // never 0
  auto fixed = Parse({"--coordinator", "c:1", "--model", "/m", "--threads", "5", "--workers-per-host", "4"});
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  EXPECT_EQ(fixed->ComputeThreads(2), 5);  // an explicit count wins
}

}  // namespace
}  // namespace joule::worker
