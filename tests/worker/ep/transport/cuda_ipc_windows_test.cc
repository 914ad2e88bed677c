// CUDA IPC windows (worker/ep/cuda_ipc_windows.h) with ranks as real
// processes (cuda_ipc_windows_peer), UCX over TCP on loopback as the control
// transport: EP 2 and EP 4 on one GPU (how a single-GPU host runs them) and,
// with two or more GPUs, spread over them; and a rank reporting another host
// makes every rank fall back. Without a device every test skips with the
// reason (fails instead under JOULE_REQUIRE_GPU=1). Every child is reaped,
// every wait bounded.
//
// The peer's path is compiled in; JOULE_CUDA_IPC_PEER overrides it (the GPU
// bundle carries the peer elsewhere, tests/gpu/run.sh).
#include <sys/wait.h>

#include <cstdlib>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/kernels/cuda/cuda_test_util.h"
#include "tests/worker/ep/transport/process_group.h"

namespace joule::ep {
namespace {

using testing::DescribeExit;

const char* PeerPath() {
  const char* path = std::getenv("JOULE_CUDA_IPC_PEER");
  return path != nullptr && *path != '\0' ? path : JOULE_CUDA_IPC_PEER_PATH;
}

struct Setup {
  int world;
  bool spread;  // rank r on device r % count; else every rank on device 0
};
void PrintTo(const Setup& s, std::ostream* os) {
  *os << s.world << " ranks " << (s.spread ? "spread over the GPUs" : "on GPU 0");
}

class CudaIpcProcesses : public ::testing::TestWithParam<Setup> {
 protected:
  void SetUp() override {
    JOULE_SKIP_WITHOUT_CUDA_DEVICE();
    if (GetParam().spread && kernels::cuda::DeviceCount() < 2) {
      GTEST_SKIP() << "ranks spread over GPUs need 2 or more, this host has "
                   << kernels::cuda::DeviceCount();
    }
    auto dir = testing::MakeTempDir("joule-cuda-ipc-test-");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
  }
  void TearDown() override {
    for (pid_t pid : pids_) {
      if (pid > 0) (void)testing::WaitFor(pid, absl::Now());  // kills stragglers
    }
    if (!dir_.empty()) testing::RemoveDir(dir_);
  }

  // Runs `scenario` on every rank; rank `foreign` (if any) reports host
  // identity "elsewhere/not-this-boot". Every rank must exit 0 within `limit`.
  void ExpectEveryRankPasses(const std::string& scenario, int foreign, absl::Duration limit) {
    const int world = GetParam().world;
    for (int r = 0; r < world; ++r) {
      std::map<std::string, std::string> env = {{"UCX_TLS", "tcp,self"},
                                                {"UCX_NET_DEVICES", "lo"},
                                                {"UCX_WARN_UNUSED_ENV_VARS", "n"}};
      if (r == foreign) env["JOULE_CUDA_IPC_TEST_HOST"] = "elsewhere/not-this-boot";
      auto pid = testing::Spawn({PeerPath(), std::to_string(r), std::to_string(world), dir_,
                                 scenario, "30000", GetParam().spread ? "spread" : "one", "2024"},
                                env);
      ASSERT_TRUE(pid.ok()) << pid.status();
      pids_.push_back(*pid);
    }
    const absl::Time deadline = absl::Now() + limit;
    for (int r = 0; r < world; ++r) {
      auto status = testing::WaitFor(pids_[r], deadline);
      pids_[r] = -1;
      ASSERT_TRUE(status.ok()) << "rank " << r << ": " << status.status();
      EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
          << "rank " << r << " " << DescribeExit(*status) << " (its stderr is above)";
    }
  }

  std::string dir_;
  std::vector<pid_t> pids_;
};

// Zero-filled windows; every rank's chunk lands in every rank's window; a
// larger mapping after the first was released; rounds of random sizes.
TEST_P(CudaIpcProcesses, EveryRankFindsEveryPeersChunk) {
  ExpectEveryRankPasses("exchange", -1, absl::Seconds(120));
}

TEST_P(CudaIpcProcesses, ARankOnAnotherHostMakesEveryRankFallBack) {
  ExpectEveryRankPasses("foreign-host", GetParam().world - 1, absl::Seconds(60));
}

INSTANTIATE_TEST_SUITE_P(Ranks, CudaIpcProcesses,
                         ::testing::Values(Setup{2, false}, Setup{4, false}, Setup{2, true},
                                           Setup{4, true}),
                         [](const auto& info) {
                           return absl::StrCat("world", info.param.world,
                                               info.param.spread ? "_spread" : "_one_gpu");
                         });

}  // namespace
}  // namespace joule::ep
