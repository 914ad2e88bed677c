// UcxTransport: the conformance suite with ranks as real processes
// (ucx_transport_peer), over shared memory and over TCP, selected only by
// UCX_TLS; plus an absent rank, a late one (waiting costs no core), a rank
// killed with SIGKILL mid-run, and the argument checks. Every child is
// reaped, every wait bounded.
#include <signal.h>
#include <sys/wait.h>

#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/worker/ep/transport/conformance.h"
#include "tests/worker/ep/transport/process_group.h"
#include "worker/ep/ucx_transport.h"

namespace joule::ep {
namespace {

using testing::DescribeExit;

struct Setup {
  std::string tls;  // UCX_TLS
  int world;
};

class UcxProcesses : public ::testing::TestWithParam<Setup> {
 protected:
  void SetUp() override {
    auto dir = testing::MakeTempDir("joule-ucx-test-");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
  }
  void TearDown() override {
    for (pid_t pid : pids_) {
      if (pid > 0) (void)testing::WaitFor(pid, absl::Now());  // kills stragglers
    }
    testing::RemoveDir(dir_);
  }

  std::map<std::string, std::string> Env() const {
    std::map<std::string, std::string> env = {{"UCX_TLS", GetParam().tls},
                                              {"UCX_WARN_UNUSED_ENV_VARS", "n"}};
    // Loopback is the interface every machine has for the TCP case.
    if (GetParam().tls.find("tcp") != std::string::npos) env["UCX_NET_DEVICES"] = "lo";
    return env;
  }

  void Launch(const std::string& scenario, absl::Duration timeout) {
    for (int r = 0; r < GetParam().world; ++r) {
      auto pid = testing::Spawn({JOULE_UCX_PEER_PATH, std::to_string(r),
                                 std::to_string(GetParam().world), dir_, scenario,
                                 std::to_string(absl::ToInt64Milliseconds(timeout))},
                                Env());
      ASSERT_TRUE(pid.ok()) << pid.status();
      pids_.push_back(*pid);
    }
  }

  // Waits for rank `r`; "" when it exited 0, else what happened.
  std::string Outcome(int r, absl::Time deadline) {
    auto status = testing::WaitFor(pids_[r], deadline);
    pids_[r] = -1;
    if (!status.ok()) return status.status().ToString();
    return WIFEXITED(*status) && WEXITSTATUS(*status) == 0 ? "" : DescribeExit(*status);
  }

  // Runs `scenario` with collective timeout `timeout`; every rank must exit 0
  // within `limit`.
  void ExpectEveryRankPasses(const std::string& scenario, absl::Duration timeout,
                             absl::Duration limit) {
    Launch(scenario, timeout);
    const absl::Time deadline = absl::Now() + limit;
    for (int r = 0; r < GetParam().world; ++r) EXPECT_EQ(Outcome(r, deadline), "") << "rank " << r;
  }

  // Starts `scenario` (a "killed" one), SIGKILLs the last rank once all run,
  // and expects the survivors to report the failure within the timeout.
  void KillOneRank(const std::string& scenario);

  std::string dir_;
  std::vector<pid_t> pids_;
};

TEST_P(UcxProcesses, PassesConformanceSuite) {
  ExpectEveryRankPasses("conformance", absl::Seconds(10), absl::Seconds(60));
}

// With peer error handling UCX picks other protocols (no CMA zero-copy on
// one host); the contract holds all the same.
TEST_P(UcxProcesses, PassesConformanceSuiteWithPeerErrorHandling) {
  ExpectEveryRankPasses("conformance-peer-errors", absl::Seconds(10), absl::Seconds(60));
}

TEST_P(UcxProcesses, KilledRankFailsSurvivorsWithPeerErrorHandling) {
  KillOneRank("killed-peer-errors");
}

TEST_P(UcxProcesses, AbsentRankTimesOutEveryOtherRank) {
  ExpectEveryRankPasses("absent", absl::Milliseconds(1500), absl::Seconds(30));
}

TEST_P(UcxProcesses, WaitingForALateRankDoesNotSpendACore) {
  ExpectEveryRankPasses("late", absl::Seconds(10), absl::Seconds(60));
}

TEST_P(UcxProcesses, KilledRankFailsSurvivorsWithinTimeout) { KillOneRank("killed"); }

TEST_P(UcxProcesses, SharedWindowsMapOverSharedMemoryOnly) {
  const bool shm = GetParam().tls.find("shm") != std::string::npos;
  ExpectEveryRankPasses(shm ? "windows-shm" : "windows-none", absl::Seconds(10),
                        absl::Seconds(30));
}

// UcxOptions::receive_thread, handed every collective: the same contract
// (conformance, a killed, an absent and a late rank, shared windows), the
// thread does take the receives, and a group that disagrees on it is refused.
TEST_P(UcxProcesses, PassesConformanceSuiteWithReceiveThread) {
  ExpectEveryRankPasses("conformance-recv-thread", absl::Seconds(10), absl::Seconds(60));
}

TEST_P(UcxProcesses, KilledRankFailsSurvivorsWithReceiveThread) {
  KillOneRank("killed-recv-thread");
}

// The step timeout is long; a membership change must not wait for it.
TEST_P(UcxProcesses, InterruptEndsAWaitForAnAbsentRank) {
  ExpectEveryRankPasses("interrupt", absl::Seconds(30), absl::Seconds(30));
}

TEST_P(UcxProcesses, AbsentRankTimesOutWithReceiveThread) {
  ExpectEveryRankPasses("absent-recv-thread", absl::Milliseconds(1500), absl::Seconds(30));
}

TEST_P(UcxProcesses, WaitingForALateRankWithReceiveThreadDoesNotSpendACore) {
  ExpectEveryRankPasses("late-recv-thread", absl::Seconds(10), absl::Seconds(60));
}

TEST_P(UcxProcesses, SharedWindowsMapWithReceiveThread) {
  const bool shm = GetParam().tls.find("shm") != std::string::npos;
  ExpectEveryRankPasses(shm ? "windows-shm-recv-thread" : "windows-none-recv-thread",
                        absl::Seconds(10), absl::Seconds(30));
}

TEST_P(UcxProcesses, ReceiveThreadTakesTheReceives) {
  ExpectEveryRankPasses("recv-copies", absl::Seconds(10), absl::Seconds(60));
}

TEST_P(UcxProcesses, GroupThatDisagreesOnTheReceiveThreadIsRefused) {
  ExpectEveryRankPasses("mixed", absl::Seconds(5), absl::Seconds(30));
}

void UcxProcesses::KillOneRank(const std::string& scenario) {
  const absl::Duration timeout = absl::Seconds(2);
  Launch(scenario, timeout);
  const int world = GetParam().world;
  const int victim = world - 1;
  // Wait until every rank is looping through collectives.
  const absl::Time started_by = absl::Now() + absl::Seconds(30);
  for (int r = 0; r < world; ++r) {
    while (!testing::Exists(dir_, absl::StrCat("started.", r)) && absl::Now() < started_by) {
      for (int q = 0; q < world; ++q) {  // a rank that gave up early fails the test now
        int status = 0;
        if (pids_[q] > 0 && waitpid(pids_[q], &status, WNOHANG) == pids_[q]) {
          pids_[q] = -1;
          FAIL() << "rank " << q << " " << DescribeExit(status) << " before the kill";
        }
      }
      absl::SleepFor(absl::Milliseconds(5));
    }
    ASSERT_TRUE(testing::Exists(dir_, absl::StrCat("started.", r))) << "rank " << r << " never started";
  }
  absl::SleepFor(absl::Milliseconds(50));
  ASSERT_EQ(kill(pids_[victim], SIGKILL), 0);
  const absl::Time killed_at = absl::Now();
  // Survivors return the error within the timeout; teardown adds at most a second or two.
  const absl::Time deadline = killed_at + timeout + absl::Seconds(4);
  for (int r = 0; r < world; ++r) {
    if (r == victim) continue;
    EXPECT_EQ(Outcome(r, deadline), "") << "rank " << r;
  }
  EXPECT_LE(absl::Now() - killed_at, timeout + absl::Seconds(4));
  auto victim_status = testing::WaitFor(pids_[victim], absl::Now() + absl::Seconds(5));
  pids_[victim] = -1;
  ASSERT_TRUE(victim_status.ok());
  EXPECT_TRUE(WIFSIGNALED(*victim_status)) << DescribeExit(*victim_status);
}

INSTANTIATE_TEST_SUITE_P(
    Tls, UcxProcesses,
    ::testing::Values(Setup{"shm,self", 2}, Setup{"shm,self", 4}, Setup{"tcp,self", 2},
                      Setup{"tcp,self", 4}),
    [](const auto& info) {
      return absl::StrCat(info.param.tls.substr(0, info.param.tls.find(',')), "_world",
                          info.param.world);
    });

TEST(UcxTransport, RejectsBadArguments) {
  EXPECT_TRUE(absl::IsInvalidArgument(UcxTransport::Create(2, 2).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(UcxTransport::Create(-1, 2).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(UcxTransport::Create(0, 0).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(UcxTransport::Create(0, 1, {.timeout = absl::ZeroDuration()}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      UcxTransport::Create(0, 1, {}, {.spin_before_naps = absl::Microseconds(-1)}).status()));
  auto t = UcxTransport::Create(0, 2);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE((*t)->address().empty());
  EXPECT_TRUE(absl::IsInvalidArgument((*t)->Connect({(*t)->address()})));  // one address for two ranks
  EXPECT_TRUE(absl::IsInvalidArgument((*t)->Connect({(*t)->address(), ""})));
  EXPECT_TRUE(absl::IsFailedPrecondition((*t)->Barrier()));  // not connected
}

TEST(UcxTransport, SingleRankPassesConformanceSuite) {
  auto t = UcxTransport::Create(0, 1);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->Connect({(*t)->address()}).ok());
  EXPECT_TRUE(absl::IsFailedPrecondition((*t)->Connect({(*t)->address()})));
  absl::Status s = testing::RunConformance(**t);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ((*t)->name(), "ucx");
}

}  // namespace
}  // namespace joule::ep
