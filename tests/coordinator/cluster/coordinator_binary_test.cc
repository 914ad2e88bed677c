// joule-coordinator and joule-cli as a script drives them: port file, the
// "listening on" line, status through the CLI (with a registered worker's
// engine limits), clean exit on SIGTERM, and a clear message for a bad flag.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/strings/numbers.h"
#include "common/model_fingerprint.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/joule/v1/cluster.grpc.pb.h"
#include "tests/testing/listen_address.h"
#include "tests/coordinator/cluster/test_model.h"

extern char** environ;

namespace joule::cluster {
namespace {

using ::testing::HasSubstr;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Starts `argv` with stdout and stderr redirected to files.
pid_t Spawn(const std::vector<std::string>& args, const std::string& out, const std::string& err) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  EXPECT_EQ(posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&actions);
  return pid;
}

// Exit status, or -1 if it did not exit within `timeout` (then it is killed).
int WaitExit(pid_t pid, absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  int status = 0;
  while (absl::Now() < give_up) {
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    absl::SleepFor(absl::Milliseconds(10));
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

// What `joule-cli status` prints, after checking it exited with 0.
std::string CliStatus(const std::string& dir, const std::string& port) {
  pid_t cli = Spawn({JOULE_CLI_BIN, "status", "--coordinator", absl::StrCat("127.0.0.1:", port)},
                    dir + "/cli-out", dir + "/cli-err");
  EXPECT_EQ(WaitExit(cli, absl::Seconds(20)), 0) << ReadFile(dir + "/cli-err");
  return ReadFile(dir + "/cli-out");
}

// Registers a worker for rank 0 that reports these engine limits (it never
// heartbeats, so the rank stays "registered").
grpc::Status RegisterRank0(const std::string& model_dir, const std::string& port, int max_running,
                           int max_batch_tokens) {
  v1::RegisterRequest r;
  r.set_protocol_version(v1::PROTOCOL_VERSION_1);
  r.set_model_fingerprint(*ModelFingerprint(model_dir));
  r.set_requested_rank(0);
  r.set_worker_id("w0");
  r.set_transport(v1::TRANSPORT_KIND_UCX);
  r.set_transport_address("addr-w0");
  r.set_worker_endpoint("127.0.0.1:1");
  r.set_max_running(max_running);
  r.set_max_batch_tokens(max_batch_tokens);
  auto stub = v1::Coordinator::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  v1::RegisterReply reply;
  return stub->Register(&ctx, r, &reply);
}

TEST(CoordinatorBinary, ServesOnAnEphemeralPortAndExitsCleanlyOnSigterm) {
  testing::TinyModelDir model;
  const std::string dir = model.path();
  const std::string port_file = dir + "/port";
  pid_t pid = Spawn({JOULE_COORDINATOR_BIN, "--model", dir, "--workers", "2", "--port", "0",
                     "--port-file", port_file, "--heartbeat-ms", "200"},
                    dir + "/out", dir + "/err");
  ASSERT_GT(pid, 0);
  std::string port;
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (port.empty() && absl::Now() < give_up) {
    port = ReadFile(port_file);
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_FALSE(port.empty()) << "no port file; stderr:\n" << ReadFile(dir + "/err");
  while (!port.empty() && port.back() == '\n') port.pop_back();
  absl::SleepFor(absl::Milliseconds(50));
  // Says exactly what listens where; by default that is this host only.
  EXPECT_THAT(ReadFile(dir + "/out"), HasSubstr(absl::StrCat("grpc listening on 127.0.0.1:", port, "\n")));
  int port_number = 0;
  ASSERT_TRUE(absl::SimpleAtoi(port, &port_number));
  EXPECT_TRUE(joule::testing::ListensOnLoopbackOnly(port_number));

  std::string status = CliStatus(dir, port);
  EXPECT_THAT(status, HasSubstr("world_size: 2"));
  // No worker yet: limits unknown, not zero.
  EXPECT_THAT(status, HasSubstr("rank 0: free endpoint=- running=0 waiting=0 kv_usage=0.00 max_running=- max_batch_tokens=-\n"));
  EXPECT_THAT(status, HasSubstr("rank 1: free"));

  pid_t cli = Spawn({JOULE_CLI_BIN, "generate", "--coordinator", absl::StrCat("127.0.0.1:", port),
               "--prompt-ids", "1,2,3", "--max-tokens", "4"},
              dir + "/gen-out", dir + "/gen-err");
  EXPECT_EQ(WaitExit(cli, absl::Seconds(20)), 1);
  EXPECT_THAT(ReadFile(dir + "/gen-err"), HasSubstr("error: UNAVAILABLE: no worker is ready"));

  const grpc::Status registered = RegisterRank0(dir, port, /*max_running=*/7, /*max_batch_tokens=*/333);
  ASSERT_TRUE(registered.ok()) << registered.error_message();
  status = CliStatus(dir, port);
  EXPECT_THAT(status, HasSubstr("rank 0: registered endpoint=127.0.0.1:1 running=0 waiting=0 kv_usage=0.00 max_running=7 "
                                "max_batch_tokens=333\n"));
  EXPECT_THAT(status, HasSubstr("rank 1: free endpoint=- running=0 waiting=0 kv_usage=0.00 max_running=- max_batch_tokens=-\n"));

  ASSERT_EQ(kill(pid, SIGTERM), 0);
  EXPECT_EQ(WaitExit(pid, absl::Seconds(10)), 0) << ReadFile(dir + "/err");
  EXPECT_THAT(ReadFile(dir + "/err"), HasSubstr("fingerprint fnv1a64:"));
}

TEST(CoordinatorBinary, BadFlagsNameTheFlag) {
  testing::TinyModelDir model;
  const std::string dir = model.path();
  pid_t pid = Spawn({JOULE_COORDINATOR_BIN, "--model", dir, "--workers", "zero"}, dir + "/out",
                    dir + "/err");
  EXPECT_EQ(WaitExit(pid, absl::Seconds(10)), 2);
  EXPECT_THAT(ReadFile(dir + "/err"), HasSubstr("--workers: 'zero' is not an integer"));

  pid = Spawn({JOULE_COORDINATOR_BIN, "--model", dir + "/missing"}, dir + "/out", dir + "/err");
  EXPECT_EQ(WaitExit(pid, absl::Seconds(10)), 1);
  EXPECT_THAT(ReadFile(dir + "/err"), HasSubstr("/missing/config.json"));
}

}  // namespace
}  // namespace joule::cluster
