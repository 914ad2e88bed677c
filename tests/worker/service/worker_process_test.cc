// joule-worker as a process, against an in-test coordinator: ranks in separate
// processes over UCX produce the single-process engine's tokens; a killed peer
// makes the survivor fail its streams with a clear error and exit non-zero
// within the step timeout; SIGTERM stops every rank cleanly; a rank's resident
// memory holds only its share of the experts.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cctype>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/joule/v1/cluster.grpc.pb.h"
#include "proto/joule/v1/generate.grpc.pb.h"
#include "tests/worker/service/runtime_cluster.h"
#include "worker/service/convert.h"

extern char** environ;

namespace joule::worker {
namespace {

using ::testing::HasSubstr;
using testing_util::Greedy;
using testing_util::Prompt;
using testing_util::ReferenceTokens;

// Just enough of a coordinator: ranks in registration order, a contiguous
// placement, rendezvous over the addresses the workers send, heartbeats recorded.
class TestCoordinator final : public v1::Coordinator::Service {
 public:
  TestCoordinator(int world, const ModelConfig& config) : world_(world), slots_(world) {
    auto p = ContiguousPlacement(world, config.num_layers, config.num_experts);
    for (int l = 0; l < config.num_layers; ++l) {
      if (!config.IsMoeLayer(l)) p->replicas[l].clear();
    }
    placement_ = PlacementToProto(*p, 1);
  }

  grpc::Status Register(grpc::ServerContext*, const v1::RegisterRequest* req,
                        v1::RegisterReply* reply) override {
    absl::MutexLock lock(&mu_);
    if (req->protocol_version() != v1::PROTOCOL_VERSION_1 || req->model_fingerprint().empty()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "bad version or fingerprint");
    }
    int rank = req->requested_rank();
    if (rank < 0) {
      for (rank = 0; rank < world_ && !slots_[rank].worker_id.empty(); ++rank) {
      }
    }
    if (rank >= world_ || !slots_[rank].worker_id.empty()) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "rank taken");
    }
    slots_[rank].worker_id = req->worker_id();
    slots_[rank].endpoint = req->worker_endpoint();
    reply->set_rank(rank);
    reply->set_world_size(world_);
    *reply->mutable_placement() = placement_;
    reply->set_heartbeat_interval_ms(100);
    reply->set_worker_secret(Secret(rank));
    return grpc::Status::OK;
  }

  grpc::Status Rendezvous(grpc::ServerContext* ctx, const v1::RendezvousRequest* req,
                          v1::RendezvousReply* reply) override {
    // The worker must send back what its registration got.
    if (req->worker_secret() != Secret(req->rank())) {
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "wrong worker_secret");
    }
    absl::MutexLock lock(&mu_);
    slots_[req->rank()].address = req->transport_address();
    auto all = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (const Slot& s : slots_) if (s.address.empty()) return false;
      return true;
    };
    if (!mu_.AwaitWithDeadline(absl::Condition(&all), absl::FromChrono(ctx->deadline()))) {
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "waiting for ranks");
    }
    for (int r = 0; r < world_; ++r) {
      v1::PeerInfo* p = reply->add_peers();
      p->set_rank(r);
      p->set_transport_address(slots_[r].address);
      p->set_worker_endpoint(slots_[r].endpoint);
    }
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req,
                         v1::HeartbeatReply* reply) override {
    if (req->worker_secret() != Secret(req->rank())) {
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "wrong worker_secret");
    }
    absl::MutexLock lock(&mu_);
    Slot& s = slots_[req->rank()];
    s.ready = req->ready();
    ++s.heartbeats;
    if (!req->ready() && s.heartbeats > 1) s.reported_not_ready = true;
    return grpc::Status::OK;
  }

  bool WaitAllReady(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (const Slot& s : slots_) if (!s.ready) return false;
      return true;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  }
  std::string endpoint(int rank) {
    absl::MutexLock lock(&mu_);
    return slots_[rank].endpoint;
  }
  bool reported_not_ready(int rank) {
    absl::MutexLock lock(&mu_);
    return slots_[rank].reported_not_ready;
  }

 private:
  static std::string Secret(int rank) { return absl::StrCat("secret-of-rank-", rank); }
  struct Slot {
    std::string worker_id, endpoint, address;
    bool ready = false;
    bool reported_not_ready = false;
    int heartbeats = 0;
  };
  const int world_;
  v1::Placement placement_;
  absl::Mutex mu_;
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);
};

class WorkerProcessTest : public ::testing::Test {
 protected:
  void StartCluster(const std::string& model_dir, int world, std::vector<std::string> extra_flags = {},
                    std::vector<std::string> env = {}) {
    auto config = LoadModelConfig(model_dir);
    ASSERT_TRUE(config.ok()) << config.status();
    coordinator_ = std::make_unique<TestCoordinator>(world, *config);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(coordinator_.get());
    server_ = builder.BuildAndStart();
    ASSERT_GT(port, 0);
    for (int r = 0; r < world; ++r) {
      std::vector<std::string> args = {JOULE_WORKER_BIN, "--coordinator", absl::StrCat("127.0.0.1:", port),
                                       "--model", model_dir, "--rank", std::to_string(r),
                                       "--listen-host", "127.0.0.1", "--threads", "1",
                                       "--kv-cache-mb", "8", "--payload", "f32",
                                       "--step-timeout-ms", "3000", "--shutdown-grace-ms", "300"};
      args.insert(args.end(), extra_flags.begin(), extra_flags.end());
      pids_.push_back(Spawn(args, env, absl::StrCat(::testing::TempDir(), "/worker", r, ".log")));
    }
    ASSERT_TRUE(coordinator_->WaitAllReady(absl::Seconds(60))) << Logs();
  }

  void TearDown() override {
    for (pid_t pid : pids_) {
      if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
      }
    }
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
  }

  pid_t Spawn(const std::vector<std::string>& args, const std::vector<std::string>& env,
              const std::string& log) {
    logs_.push_back(log);
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    std::vector<std::string> env_strings;
    for (char** e = environ; *e; ++e) env_strings.push_back(*e);
    env_strings.insert(env_strings.end(), env.begin(), env.end());
    std::vector<char*> envp;
    for (const std::string& e : env_strings) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid = -1;
    EXPECT_EQ(posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp.data()), 0);
    posix_spawn_file_actions_destroy(&fa);
    return pid;
  }

  // Exit code of worker r, or -1 if it did not exit within `timeout`.
  int WaitExit(int r, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      int status = 0;
      if (waitpid(pids_[r], &status, WNOHANG) == pids_[r]) {
        pids_[r] = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return -1;
  }

  std::string Logs() {
    std::string out;
    for (const std::string& log : logs_) {
      std::ifstream f(log);
      std::stringstream ss;
      ss << f.rdbuf();
      absl::StrAppend(&out, "---- ", log, "\n", ss.str());
    }
    return out;
  }

  std::unique_ptr<v1::Worker::Stub> Stub(int rank) {
    return v1::Worker::NewStub(
        grpc::CreateChannel(coordinator_->endpoint(rank), grpc::InsecureChannelCredentials()));
  }

  static v1::GenerateRequest Request(const std::string& id, const std::vector<int32_t>& prompt,
                                     int max_tokens) {
    v1::GenerateRequest r;
    r.set_request_id(id);
    r.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    return r;
  }

  // Streams one request to the end; the tokens and the final status.
  static std::pair<std::vector<int32_t>, grpc::Status> Generate(v1::Worker::Stub* stub,
                                                                const v1::GenerateRequest& r) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub->Generate(&ctx, r);
    std::vector<int32_t> tokens;
    v1::GenerateResponse msg;
    while (reader->Read(&msg)) tokens.insert(tokens.end(), msg.token_ids().begin(), msg.token_ids().end());
    return {tokens, reader->Finish()};
  }

  v1::WorkerStatusReply Status(int rank) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::WorkerStatusReply reply;
    EXPECT_TRUE(Stub(rank)->Status(&ctx, v1::WorkerStatusRequest(), &reply).ok());
    return reply;
  }

  std::unique_ptr<TestCoordinator> coordinator_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<pid_t> pids_;
  std::vector<std::string> logs_;
};

class WorkerProcessUcx : public WorkerProcessTest,
                         public ::testing::WithParamInterface<std::string> {};

TEST_P(WorkerProcessUcx, TwoRanksMatchTheEngineThenAKilledPeerFailsTheOther) {
  const std::string dir = testing::TinyModelDir("qwen3_moe-tiny");
  std::vector<std::string> env;
  if (!GetParam().empty()) env.push_back("UCX_TLS=" + GetParam());
  StartCluster(dir, 2, {}, env);
  for (int r = 0; r < 2; ++r) {
    const std::vector<int32_t> prompt = Prompt(7 + r, 20 + r);
    auto stub = Stub(r);
    auto [tokens, status] = Generate(stub.get(), Request(absl::StrCat("r", r), prompt, 12));
    ASSERT_TRUE(status.ok()) << status.error_message() << Logs();
    EXPECT_EQ(tokens, ReferenceTokens(dir, prompt, Greedy(12))) << "rank " << r;
    const v1::WorkerStatusReply s = Status(r);
    EXPECT_EQ(s.rank(), r);
    EXPECT_TRUE(s.ready());
    EXPECT_GT(s.resident_bytes(), 0);
  }

  // A long generation on rank 0 while rank 1's process dies.
  auto stub = Stub(0);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&ctx, Request("long", Prompt(10, 3), 450));
  v1::GenerateResponse msg;
  ASSERT_TRUE(reader->Read(&msg)) << Logs();
  kill(pids_[1], SIGKILL);
  const absl::Time killed = absl::Now();
  while (reader->Read(&msg)) {
  }
  const grpc::Status status = reader->Finish();
  const absl::Duration took = absl::Now() - killed;
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("expert-parallel step failed")) << Logs();
  EXPECT_LE(took, absl::Milliseconds(3000 + 1500)) << "step timeout is 3 s";
  // The survivor reports not ready, then exits non-zero.
  EXPECT_EQ(WaitExit(0, absl::Seconds(10)), 1) << Logs();
  EXPECT_TRUE(coordinator_->reported_not_ready(0)) << Logs();
}

INSTANTIATE_TEST_SUITE_P(Transports, WorkerProcessUcx, ::testing::Values("", "shm", "tcp"),
                         [](const auto& info) { return info.param.empty() ? "default" : info.param; });

TEST_F(WorkerProcessTest, SigtermStopsEveryRankCleanly) {
  StartCluster(testing::TinyModelDir("mixtral-tiny"), 2);
  auto stub = Stub(1);
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, Request("r", Prompt(10, 3), 450));
  v1::GenerateResponse msg;
  ASSERT_TRUE(reader->Read(&msg)) << Logs();
  kill(pids_[0], SIGTERM);
  while (reader->Read(&msg)) {
  }
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(status.error_message(), HasSubstr("worker shutting down: rank 0 is shutting down"));
  EXPECT_EQ(WaitExit(0, absl::Seconds(10)), 0) << Logs();
  // Rank 1 stopped because a peer did: it cannot serve alone, and says so.
  EXPECT_EQ(WaitExit(1, absl::Seconds(10)), 1) << Logs();
}

// The default --grpc-host (127.0.0.1) with an address the coordinator would
// dial elsewhere: nothing would listen there, so the worker says which flag to
// set instead of registering an unreachable endpoint.
TEST_F(WorkerProcessTest, LoopbackBindWithAnotherAdvertisedAddressRefusesToStart) {
  pids_.push_back(Spawn({JOULE_WORKER_BIN, "--coordinator", "127.0.0.1:1", "--model",
                         testing::TinyModelDir("mixtral-tiny"), "--advertise-host", "10.9.9.9", "--threads", "1"},
                        {}, absl::StrCat(::testing::TempDir(), "/refused.log")));
  EXPECT_EQ(WaitExit(0, absl::Seconds(20)), 1) << Logs();
  EXPECT_THAT(Logs(), HasSubstr("--grpc-host 127.0.0.1 listens on this host only"));
  EXPECT_THAT(Logs(), HasSubstr("set --grpc-host 0.0.0.0 or 10.9.9.9"));
}

// Resident bytes of `pid`'s mappings of files whose path contains `needle`
// (/proc/PID/smaps): how much of the checkpoint that process has touched.
int64_t MappedRssBytes(pid_t pid, const std::string& needle) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/smaps"));
  std::string line;
  bool in_mapping = false;
  int64_t total = 0;
  while (std::getline(f, line)) {
    // Mapping header lines start with an address range "start-end perms ...".
    const size_t dash = line.find('-');
    if (dash != std::string::npos && dash > 0 && line.find(' ') > dash &&
        std::isxdigit(static_cast<unsigned char>(line[0]))) {
      in_mapping = line.find(needle) != std::string::npos;
      continue;
    }
    if (in_mapping && line.rfind("Rss:", 0) == 0) {
      total += std::stoll(line.substr(4)) * 1024;
    }
  }
  return total;
}

TEST_F(WorkerProcessTest, ResidentMemoryHoldsItsShareOfTheExperts) {
  // A model whose experts dominate its weights (~200 MB BF16, 32 experts).
  const std::string dir = testing::BinaryDir() + "/models/qwen3_moe-mini";
  if (access((dir + "/config.json").c_str(), F_OK) != 0) {
    const std::string cmd = absl::StrCat(JOULE_MAKE_MODEL_BIN, " --family qwen3_moe --preset mini --out ",
                                         dir, " > /dev/null");
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }
  const std::vector<int32_t> prompt = Prompt(128, 5);
  struct Measured {
    int64_t loaded = 0;         // weight bytes the rank holds (Status)
    int64_t resident = 0;       // process RSS (Status)
    int64_t checkpoint_rss = 0; // resident pages of the mmapped checkpoint
  };
  auto measure = [&](int world) {
    StartCluster(dir, world);
    auto stub = Stub(0);
    auto [tokens, status] = Generate(stub.get(), Request("m", prompt, 2));
    EXPECT_TRUE(status.ok()) << status.error_message() << Logs();
    std::vector<Measured> out;
    for (int r = 0; r < world; ++r) {
      const v1::WorkerStatusReply s = Status(r);
      out.push_back({s.loaded_weight_bytes(), s.resident_bytes(), MappedRssBytes(pids_[r], ".safetensors")});
    }
    for (int r = 0; r < world; ++r) kill(pids_[r], SIGTERM);
    for (int r = 0; r < world; ++r) EXPECT_EQ(WaitExit(r, absl::Seconds(15)), 0) << Logs();
    server_->Shutdown(std::chrono::system_clock::now());
    pids_.clear();
    logs_.clear();
    return out;
  };
  const std::vector<Measured> one = measure(1);
  const std::vector<Measured> four = measure(4);
  ASSERT_EQ(one.size(), 1u);
  ASSERT_EQ(four.size(), 4u);
  ASSERT_GT(one[0].checkpoint_rss, 0) << "no checkpoint mapping found in /proc/PID/smaps";
  const double mib = 1 << 20;
  int64_t sum_rss = 0;
  for (int r = 0; r < 4; ++r) {
    const Measured& m = four[r];
    std::printf("EP=4 rank %d: holds %.1f MiB of weights (EP=1: %.1f), checkpoint resident %.1f MiB "
                "(EP=1: %.1f, ratio %.2f), process RSS %.1f MiB (EP=1: %.1f)\n",
                r, m.loaded / mib, one[0].loaded / mib, m.checkpoint_rss / mib,
                one[0].checkpoint_rss / mib, double(m.checkpoint_rss) / one[0].checkpoint_rss,
                m.resident / mib, one[0].resident / mib);
    // A quarter of the experts plus the replicated attention/dense weights.
    EXPECT_LT(m.loaded, 0.35 * one[0].loaded) << "rank " << r;
    // Nothing it does not hold becomes resident (a little fault-around slack).
    EXPECT_LE(m.checkpoint_rss, m.loaded + (int64_t{2} << 20)) << "rank " << r;
    EXPECT_LT(m.checkpoint_rss, 0.45 * one[0].checkpoint_rss) << "rank " << r;
    sum_rss += m.checkpoint_rss;
  }
  // Every page the single rank needed for these tokens is resident on some
  // rank of four: the experts were split, not skipped.
  EXPECT_GE(sum_rss, 0.95 * one[0].checkpoint_rss);
}

}  // namespace
}  // namespace joule::worker
