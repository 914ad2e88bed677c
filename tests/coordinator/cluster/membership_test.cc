#include "coordinator/cluster/membership.h"

#include <limits>
#include <map>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "coordinator/cluster/fake_clock.h"
#include "common/placement_proto.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule::cluster {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kFingerprint[] = "fnv1a64:0123456789abcdef";

ModelSummary TinySummary() {
  ModelSummary m;
  m.name = "tiny";
  m.architecture = "Qwen3MoeForCausalLM";
  m.vocab_size = 100;
  m.hidden_size = 16;
  m.num_layers = 4;
  m.num_experts = 8;
  m.top_k = 2;
  m.max_context = 64;
  m.moe_layer = {true, false, true, true};
  return m;
}

MembershipOptions Options(int world_size) {
  return MembershipOptions{.world_size = world_size,
                           .model_dir = "/models/tiny",
                           .model_fingerprint = kFingerprint,
                           .transport = v1::TRANSPORT_KIND_UCX,
                           .heartbeat_interval = absl::Milliseconds(500)};
}

v1::RegisterRequest Worker(const std::string& id, int requested_rank = -1) {
  v1::RegisterRequest r;
  r.set_protocol_version(v1::PROTOCOL_VERSION_1);
  r.set_model_fingerprint(kFingerprint);
  r.set_requested_rank(requested_rank);
  r.set_worker_id(id);
  r.set_host("host-a");
  r.set_device("cpu");
  r.set_transport(v1::TRANSPORT_KIND_UCX);
  r.set_transport_address("ucx-address-of-" + id);
  r.set_worker_endpoint(id + ":5000");
  return r;
}

// The worker_secret of each worker id's last registration: what a worker
// sends back with its Rendezvous and Heartbeat calls.
class WorkerSecrets {
 public:
  void Set(const std::string& worker_id, const std::string& secret) {
    absl::MutexLock lock(&mu_);
    secrets_[worker_id] = secret;
  }
  std::string Get(const std::string& worker_id) const {
    absl::MutexLock lock(&mu_);
    auto it = secrets_.find(worker_id);
    return it == secrets_.end() ? "" : it->second;
  }

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, std::string> secrets_ ABSL_GUARDED_BY(mu_);
};

WorkerSecrets& Secrets() {
  static WorkerSecrets* secrets = new WorkerSecrets();
  return *secrets;
}

// Membership calls as a worker makes them: the secret its registration got
// goes with its Rendezvous and Heartbeat calls (unless the request sets one).
absl::Status RegisterWorker(Membership& m, const v1::RegisterRequest& r, v1::RegisterReply* reply) {
  absl::Status s = m.Register(r, reply);
  if (s.ok()) Secrets().Set(r.worker_id(), reply->worker_secret());
  return s;
}
absl::Status SendHeartbeat(Membership& m, v1::HeartbeatRequest hb, v1::HeartbeatReply* reply) {
  if (hb.worker_secret().empty()) hb.set_worker_secret(Secrets().Get(hb.worker_id()));
  return m.Heartbeat(hb, reply);
}
absl::Status SendRendezvous(Membership& m, v1::RendezvousRequest req, absl::Time deadline,
                            v1::RendezvousReply* reply) {
  if (req.worker_secret().empty()) req.set_worker_secret(Secrets().Get(req.worker_id()));
  return m.Rendezvous(req, deadline, reply);
}

class MembershipTest : public ::testing::Test {
 protected:
  void Make(int world_size, bool elastic = true) {
    MembershipOptions options = Options(world_size);
    options.elastic = elastic;
    auto m = Membership::Create(options, TinySummary(), &clock_);
    ASSERT_TRUE(m.ok()) << m.status();
    membership_ = *std::move(m);
  }
  absl::StatusOr<int> Register(const v1::RegisterRequest& r) {
    v1::RegisterReply reply;
    absl::Status s = RegisterWorker(*membership_, r, &reply);
    if (!s.ok()) return s;
    return reply.rank();
  }
  absl::Status Beat(const std::string& id, int rank, bool ready = true, int running = 0) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(id);
    hb.set_rank(rank);
    hb.set_ready(ready);
    hb.set_running(running);
    hb.set_placement_epoch(membership_->placement_epoch());
    v1::HeartbeatReply reply;
    return SendHeartbeat(*membership_, hb, &reply);
  }

  FakeClock clock_;
  std::unique_ptr<Membership> membership_;
};

TEST_F(MembershipTest, AssignsLowestFreeRankOrTheRequestedOne) {
  Make(3);
  EXPECT_EQ(*Register(Worker("w-a", 2)), 2);
  EXPECT_EQ(*Register(Worker("w-b")), 0);
  EXPECT_EQ(*Register(Worker("w-c")), 1);
  auto ranks = membership_->Ranks();
  EXPECT_EQ(ranks[0].worker_id, "w-b");
  EXPECT_EQ(ranks[1].worker_id, "w-c");
  EXPECT_EQ(ranks[2].worker_id, "w-a");
  EXPECT_EQ(ranks[2].state, RankState::kRegistered);
  EXPECT_EQ(ranks[2].worker_endpoint, "w-a:5000");
}

TEST_F(MembershipTest, ReplyCarriesWorldSizeContiguousPlacementAndIntervals) {
  Make(2);
  v1::RegisterReply reply;
  ASSERT_TRUE(RegisterWorker(*membership_, Worker("w-a"), &reply).ok());
  EXPECT_EQ(reply.world_size(), 2);
  EXPECT_EQ(reply.heartbeat_interval_ms(), 500);
  EXPECT_EQ(reply.step_timeout_ms(), 10000);
  EXPECT_TRUE(reply.elastic()) << "survivors of a death wait for the re-formed group";
  const v1::Placement& p = reply.placement();
  EXPECT_EQ(p.epoch(), 1u);
  EXPECT_EQ(p.num_ranks(), 2);
  EXPECT_EQ(p.num_experts(), 8);
  ASSERT_EQ(p.layers_size(), 3);  // MoE layers only: 0, 2, 3
  EXPECT_EQ(p.layers(0).layer(), 0);
  EXPECT_EQ(p.layers(1).layer(), 2);
  EXPECT_EQ(p.layers(2).layer(), 3);
  // Experts 0-3 on rank 0, 4-7 on rank 1.
  for (int e = 0; e < 8; ++e) {
    EXPECT_THAT(p.layers(1).experts(e).ranks(), ::testing::ElementsAre(e / 4)) << "expert " << e;
  }
  auto back = PlacementFromProto(p, TinySummary().num_experts, TinySummary().moe_layer);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->Validate().ok());
  EXPECT_TRUE(back->replicas[1].empty());
  EXPECT_EQ(back->LocalExperts(1, 0), (std::vector<int32_t>{4, 5, 6, 7}));
}

TEST_F(MembershipTest, RefusesWrongProtocolVersion) {
  Make(2);
  v1::RegisterRequest r = Worker("w-a");
  r.set_protocol_version(v1::PROTOCOL_VERSION_UNSPECIFIED);
  absl::Status s = Register(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("protocol_version PROTOCOL_VERSION_UNSPECIFIED (0) is not supported"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("speaks PROTOCOL_VERSION_1 (1)"));
  r.set_protocol_version(static_cast<v1::ProtocolVersion>(7));
  EXPECT_THAT(std::string(Register(r).status().message()), HasSubstr("unknown (7)"));
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kFree);
}

TEST_F(MembershipTest, RefusesAnotherModel) {
  Make(2);
  v1::RegisterRequest r = Worker("w-a");
  r.set_model_fingerprint("fnv1a64:ffffffffffffffff");
  absl::Status s = Register(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("model fingerprint does not match the coordinator's model"));
  // The coordinator's fingerprint and model path are for its log, not for the caller.
  EXPECT_THAT(std::string(s.message()), Not(HasSubstr("0123456789abcdef")));
  EXPECT_THAT(std::string(s.message()), Not(HasSubstr("/models/tiny")));
}

TEST_F(MembershipTest, RefusesAnotherTransport) {
  Make(2);
  v1::RegisterRequest r = Worker("w-a");
  r.set_transport(v1::TRANSPORT_KIND_NCCL);
  absl::Status s = Register(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("transport: this worker uses nccl (joule-worker --transport nccl) but the "
                        "group uses ucx (joule-coordinator --transport ucx); every rank of a group "
                        "uses one transport"));
}

TEST_F(MembershipTest, RefusesAnotherTransportInOneGroupNamingItsRanks) {
  Make(3);
  ASSERT_EQ(*Register(Worker("w-a")), 0);
  ASSERT_EQ(*Register(Worker("w-b")), 1);
  v1::RegisterRequest nccl = Worker("w-c");
  nccl.set_transport(v1::TRANSPORT_KIND_NCCL);
  nccl.clear_transport_address();
  absl::Status s = Register(nccl).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("this worker uses nccl (joule-worker --transport nccl) but the group uses "
                        "ucx (joule-coordinator --transport ucx; ranks 0, 1 registered with it)"));
  EXPECT_THAT(std::string(s.message()), Not(HasSubstr("w-a")));  // other workers' ids
  EXPECT_THAT(std::string(s.message()), Not(HasSubstr("w-b")));
  // The rank stays free for a worker with the group's transport.
  EXPECT_EQ(*Register(Worker("w-d")), 2);
}

TEST_F(MembershipTest, RefusesAnotherKindOfDeviceInOneGroup) {
  Make(3);
  v1::RegisterRequest gpu = Worker("w-a");
  gpu.set_device("cuda:0");
  ASSERT_EQ(*Register(gpu), 0);
  v1::RegisterRequest other_gpu = Worker("w-b");
  other_gpu.set_device("cuda:1");  // another GPU of the same kind is fine
  ASSERT_EQ(*Register(other_gpu), 1);
  absl::Status s = Register(Worker("w-c")).status();  // a CPU worker
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("this worker computes on cpu but rank 0 on cuda"));
  EXPECT_THAT(std::string(s.message()), Not(HasSubstr("w-a")));  // another worker's id
  // The same worker registering again is not a conflict with itself.
  EXPECT_EQ(*Register(gpu), 0);
}

TEST_F(MembershipTest, RefusesDuplicateRankHeldByLiveWorker) {
  Make(2);
  ASSERT_EQ(*Register(Worker("w-a", 1)), 1);
  absl::Status s = Register(Worker("w-b", 1)).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(s.message(), "rank 1 is taken");  // not the holder's id or address
  EXPECT_EQ(membership_->Ranks()[1].worker_id, "w-a");
}

TEST_F(MembershipTest, RefusesRankOutOfRangeAndMissingFields) {
  Make(2);
  absl::Status s = Register(Worker("w-a", 2)).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("requested_rank 2 is out of range [0, 2)"));
  EXPECT_EQ(Register(Worker("w-a", -5)).status().code(), absl::StatusCode::kInvalidArgument);
  v1::RegisterRequest r = Worker("");
  EXPECT_THAT(std::string(Register(r).status().message()), HasSubstr("worker_id"));
  r = Worker("w-a");
  r.clear_worker_endpoint();
  EXPECT_THAT(std::string(Register(r).status().message()), HasSubstr("worker_endpoint"));
}

TEST_F(MembershipTest, RefusesNegativeEngineLimitsNamingTheField) {
  Make(1);
  v1::RegisterRequest r = Worker("w-a");
  r.set_max_running(-1);
  absl::Status s = Register(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_running: must not be negative, got -1"));
  r = Worker("w-a");
  r.set_max_batch_tokens(-512);
  s = Register(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_batch_tokens: must not be negative"));
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kFree);
}

TEST_F(MembershipTest, KeepsEachRanksEngineLimitsFromItsLatestRegistration) {
  Make(2);
  v1::RegisterRequest a = Worker("w-a");
  a.set_max_running(64);
  a.set_max_batch_tokens(256);
  ASSERT_EQ(*Register(a), 0);
  ASSERT_EQ(*Register(Worker("w-b")), 1);  // an older worker: unknown
  std::vector<RankInfo> ranks = membership_->Ranks();
  EXPECT_EQ(ranks[0].max_running, 64);
  EXPECT_EQ(ranks[0].max_batch_tokens, 256);
  EXPECT_EQ(ranks[1].max_running, 0);
  EXPECT_EQ(ranks[1].max_batch_tokens, 0);
  // The same worker registering again replaces them.
  a.set_max_running(32);
  ASSERT_EQ(*Register(a), 0);
  EXPECT_EQ(membership_->Ranks()[0].max_running, 32);
  // So does a new worker taking the rank over.
  ASSERT_TRUE(membership_->MarkDead(0, "gone"));
  v1::RegisterRequest c = Worker("w-c", 0);
  c.set_max_running(16);
  ASSERT_EQ(*Register(c), 0);
  ranks = membership_->Ranks();
  EXPECT_EQ(ranks[0].max_running, 16);
  EXPECT_EQ(ranks[0].max_batch_tokens, 0);
  EXPECT_EQ(ranks[1].max_running, 0) << "another rank's registration changes nothing here";
}

TEST_F(MembershipTest, RefusesWhenFull) {
  Make(2);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  absl::Status s = Register(Worker("w-c")).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("cluster is full: all 2 ranks are held by live workers"));
}

TEST_F(MembershipTest, SameWorkerRegisteringAgainKeepsItsRank) {
  Make(2);
  ASSERT_EQ(*Register(Worker("w-a")), 0);
  EXPECT_EQ(*Register(Worker("w-a")), 0);
  EXPECT_EQ(*Register(Worker("w-a", 0)), 0);
  EXPECT_EQ(Register(Worker("w-a", 1)).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(*Register(Worker("w-b")), 1);
}

TEST_F(MembershipTest, HeartbeatsMakeRanksReadyAndSilenceMakesThemSuspects) {
  Make(2);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  ASSERT_TRUE(Beat("w-a", 0).ok());
  ASSERT_TRUE(Beat("w-b", 1, /*ready=*/false).ok());
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady);
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kRegistered);

  // Half the limit (3 x 500 ms) of silence is fine; beyond it, a suspect to probe.
  clock_.Advance(absl::Milliseconds(750));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  HeartbeatExpiry expiry = membership_->ExpireHeartbeats();
  EXPECT_TRUE(expiry.dead.empty());
  EXPECT_TRUE(expiry.suspects.empty());
  clock_.Advance(absl::Milliseconds(100));
  expiry = membership_->ExpireHeartbeats();
  EXPECT_TRUE(expiry.dead.empty());
  ASSERT_EQ(expiry.suspects.size(), 1u);
  const SuspectRank suspect = expiry.suspects[0];
  EXPECT_EQ(suspect.rank, 1);
  EXPECT_EQ(suspect.worker_id, "w-b");
  EXPECT_EQ(suspect.worker_endpoint, "w-b:5000");
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kRegistered) << "not dead before its probe";
  expiry = membership_->ExpireHeartbeats();
  EXPECT_TRUE(expiry.suspects.empty()) << "one probe at a time";

  // The probe failed within the limit: dead once the limit passes, saying why.
  EXPECT_FALSE(
      membership_->SuspectDead(suspect, absl::UnavailableError("connection refused")).has_value())
      << "still within the limit";
  clock_.Advance(absl::Milliseconds(650));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  EXPECT_TRUE(membership_->ExpireHeartbeats().dead.empty()) << "1500 ms: not past the limit";
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kRegistered);
  clock_.Advance(absl::Milliseconds(100));
  expiry = membership_->ExpireHeartbeats();
  EXPECT_TRUE(expiry.suspects.empty());
  ASSERT_EQ(expiry.dead.size(), 1u);
  const DeadRank dead = expiry.dead[0];
  EXPECT_EQ(dead.rank, 1);
  EXPECT_THAT(dead.reason, HasSubstr("heartbeat lost (none for 1600 ms, limit 3 x 500 ms); "
                                      "status probe: connection refused"));
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kDead);
  EXPECT_EQ(membership_->Ranks()[1].dead_reason, dead.reason);
  EXPECT_FALSE(membership_->SuspectDead(suspect, absl::UnavailableError("again")).has_value())
      << "reported once";
  EXPECT_TRUE(membership_->ExpireHeartbeats().suspects.empty());
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady);

  // A dead rank's slot can be taken by a replacement worker.
  EXPECT_EQ(*Register(Worker("w-new")), 1);
  EXPECT_EQ(membership_->Ranks()[1].worker_id, "w-new");
  EXPECT_EQ(Beat("w-b", 1).code(), absl::StatusCode::kNotFound);
}

// Late heartbeats (an overloaded host): a probe that answers keeps the rank
// for one more limit; a heartbeat then starts afresh, while more silence
// means its heartbeats do not arrive at all.
TEST_F(MembershipTest, ASuspectWhoseProbeAnswersIsKeptOnce) {
  Make(2);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  ASSERT_TRUE(Beat("w-a", 0).ok());
  ASSERT_TRUE(Beat("w-b", 1).ok());
  clock_.Advance(absl::Milliseconds(1600));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  std::vector<SuspectRank> suspects = membership_->ExpireHeartbeats().suspects;
  ASSERT_EQ(suspects.size(), 1u);
  clock_.Advance(absl::Milliseconds(200));  // the probe's round trip
  EXPECT_TRUE(membership_->KeepSuspect(suspects[0]));
  EXPECT_FALSE(membership_->KeepSuspect(suspects[0])) << "answered once";
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kReady);
  EXPECT_EQ(membership_->stats().heartbeats_late, 1u);

  // Its late heartbeat arrives; the next silence is probed again.
  ASSERT_TRUE(Beat("w-b", 1).ok());
  clock_.Advance(absl::Milliseconds(1600));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  suspects = membership_->ExpireHeartbeats().suspects;
  ASSERT_EQ(suspects.size(), 1u);
  EXPECT_TRUE(membership_->KeepSuspect(suspects[0]));

  // No heartbeat for a whole limit after that answer: dead without a probe.
  clock_.Advance(absl::Milliseconds(1500));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  HeartbeatExpiry expiry = membership_->ExpireHeartbeats();
  EXPECT_TRUE(expiry.suspects.empty());
  EXPECT_TRUE(expiry.dead.empty()) << "still within the limit";
  clock_.Advance(absl::Milliseconds(100));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  expiry = membership_->ExpireHeartbeats();
  EXPECT_TRUE(expiry.suspects.empty());
  ASSERT_EQ(expiry.dead.size(), 1u);
  EXPECT_EQ(expiry.dead[0].rank, 1);
  EXPECT_THAT(expiry.dead[0].reason,
              HasSubstr("heartbeat lost (none for 3200 ms, limit 3 x 500 ms); its status probe "
                        "answered 1600 ms ago, yet no heartbeat since"));
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kDead);
  EXPECT_EQ(membership_->stats().heartbeats_late, 2u);
}

// A probe that answers before the limit waits for it: the rank is kept (and
// counted late) only once silent past the limit, then gets one more limit.
TEST_F(MembershipTest, AnEarlyAnswerIsJudgedAtTheLimit) {
  Make(2);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  ASSERT_TRUE(Beat("w-a", 0).ok());
  ASSERT_TRUE(Beat("w-b", 1).ok());
  auto advance_and_expire = [&](int ms) {
    clock_.Advance(absl::Milliseconds(ms));
    EXPECT_TRUE(Beat("w-a", 0).ok());
    return membership_->ExpireHeartbeats();
  };
  std::vector<SuspectRank> suspects = advance_and_expire(800).suspects;
  ASSERT_EQ(suspects.size(), 1u);
  EXPECT_TRUE(membership_->KeepSuspect(suspects[0]));
  EXPECT_EQ(membership_->stats().heartbeats_late, 0u) << "not late yet";
  HeartbeatExpiry expiry = advance_and_expire(700);
  EXPECT_TRUE(expiry.dead.empty() && expiry.suspects.empty()) << "1500 ms";
  EXPECT_EQ(membership_->stats().heartbeats_late, 0u);
  expiry = advance_and_expire(100);
  EXPECT_TRUE(expiry.dead.empty() && expiry.suspects.empty()) << "1600 ms: kept";
  EXPECT_EQ(membership_->stats().heartbeats_late, 1u);
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kReady);
  EXPECT_FALSE(membership_->KeepSuspect(suspects[0])) << "judged once";
  EXPECT_TRUE(advance_and_expire(1500).dead.empty()) << "a whole limit from the judgement";
  expiry = advance_and_expire(100);
  ASSERT_EQ(expiry.dead.size(), 1u);
  EXPECT_THAT(expiry.dead[0].reason, HasSubstr("none for 3200 ms, limit 3 x 500 ms); its status "
                                               "probe answered 1600 ms ago, yet no heartbeat since"));
}

// A heartbeat between an early probe failure and the limit voids the failure.
TEST_F(MembershipTest, AHeartbeatBeforeTheLimitVoidsAnEarlyFailure) {
  Make(2);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  ASSERT_TRUE(Beat("w-a", 0).ok());
  ASSERT_TRUE(Beat("w-b", 1).ok());
  clock_.Advance(absl::Milliseconds(800));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  const std::vector<SuspectRank> suspects = membership_->ExpireHeartbeats().suspects;
  ASSERT_EQ(suspects.size(), 1u);
  EXPECT_FALSE(membership_->SuspectDead(suspects[0], absl::DeadlineExceededError("late")));
  clock_.Advance(absl::Milliseconds(100));
  ASSERT_TRUE(Beat("w-b", 1).ok());
  clock_.Advance(absl::Milliseconds(700));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  EXPECT_TRUE(membership_->ExpireHeartbeats().dead.empty());
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kReady);
  EXPECT_FALSE(membership_->KeepSuspect(suspects[0])) << "void";
  EXPECT_EQ(membership_->stats().rank_failures, 0u);

  // Silent again, and this probe fails past the limit: dead at once.
  clock_.Advance(absl::Milliseconds(800));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  const std::vector<SuspectRank> again = membership_->ExpireHeartbeats().suspects;
  ASSERT_EQ(again.size(), 1u);
  clock_.Advance(absl::Milliseconds(100));
  const std::optional<DeadRank> dead =
      membership_->SuspectDead(again[0], absl::DeadlineExceededError("deadline exceeded"));
  ASSERT_TRUE(dead.has_value());
  EXPECT_THAT(dead->reason, HasSubstr("heartbeat lost (none for 1600 ms, limit 3 x 500 ms); "
                                      "status probe: deadline exceeded"));
}

TEST_F(MembershipTest, AHeartbeatDuringTheProbeOrANewHolderVoidsItsOutcome) {
  Make(2, /*elastic=*/false);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  ASSERT_TRUE(Beat("w-a", 0).ok());
  ASSERT_TRUE(Beat("w-b", 1).ok());
  clock_.Advance(absl::Milliseconds(1600));
  std::vector<SuspectRank> suspects = membership_->ExpireHeartbeats().suspects;
  ASSERT_EQ(suspects.size(), 2u);
  // Rank 0's heartbeat arrives while its probe times out: it is alive.
  ASSERT_TRUE(Beat("w-a", 0).ok());
  EXPECT_FALSE(membership_->SuspectDead(suspects[0], absl::DeadlineExceededError("late")).has_value());
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady);
  // Rank 1 died otherwise and a new worker took it before w-b's probe ended.
  ASSERT_TRUE(membership_->MarkDead(1, "worker unreachable"));
  ASSERT_EQ(*Register(Worker("w-c")), 1);
  EXPECT_FALSE(membership_->SuspectDead(suspects[1], absl::UnavailableError("refused")).has_value());
  EXPECT_FALSE(membership_->KeepSuspect(suspects[1]));
  EXPECT_EQ(membership_->Ranks()[1].worker_id, "w-c");
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kRegistered);
  EXPECT_EQ(membership_->stats().rank_failures, 1u);
  EXPECT_EQ(membership_->stats().heartbeats_late, 0u);
}

TEST_F(MembershipTest, LoadingRankGetsTheStartupTimeoutBeforeItsFirstHeartbeat) {
  Make(2, /*elastic=*/false);  // the dead rank is replaced, not left behind
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  ASSERT_TRUE(Beat("w-a", 0).ok());
  // w-b loads weights for minutes without heartbeating: not dead...
  for (int i = 0; i < 9; ++i) {
    clock_.Advance(absl::Minutes(1));
    ASSERT_TRUE(Beat("w-a", 0).ok());
    const HeartbeatExpiry expiry = membership_->ExpireHeartbeats();
    EXPECT_TRUE(expiry.dead.empty() && expiry.suspects.empty()) << "minute " << i + 1;
  }
  // ...and a rendezvous call counts as a sign of life.
  v1::RendezvousRequest req;
  req.set_worker_id("w-b");
  req.set_rank(1);
  v1::RendezvousReply reply;
  ASSERT_TRUE(SendRendezvous(*membership_, req, absl::Now(), &reply).ok());
  clock_.Advance(absl::Minutes(9));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  EXPECT_TRUE(membership_->ExpireHeartbeats().dead.empty());
  // Silent past the startup timeout (10 min): dead at once (no probe), saying why.
  clock_.Advance(absl::Minutes(2));
  ASSERT_TRUE(Beat("w-a", 0).ok());
  const HeartbeatExpiry expiry = membership_->ExpireHeartbeats();
  EXPECT_TRUE(expiry.suspects.empty());
  const std::vector<DeadRank>& dead = expiry.dead;
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].rank, 1);
  EXPECT_THAT(dead[0].reason, HasSubstr("no heartbeat within 660 s of registering (startup timeout 600 s)"));
  // After its first heartbeat, the short limit applies (and a probe).
  ASSERT_EQ(*Register(Worker("w-c")), 1);
  ASSERT_TRUE(Beat("w-c", 1).ok());
  clock_.Advance(absl::Milliseconds(1600));
  ASSERT_EQ(membership_->ExpireHeartbeats().suspects.size(), 2u);
}

TEST_F(MembershipTest, UcxAddressesMayArriveWithTheRendezvous) {
  Make(2);
  v1::RegisterRequest a = Worker("w-a"), b = Worker("w-b");
  a.clear_transport_address();
  b.clear_transport_address();
  ASSERT_TRUE(Register(a).ok());
  ASSERT_TRUE(Register(b).ok());
  v1::RendezvousRequest ra;
  ra.set_worker_id("w-a");
  ra.set_rank(0);
  ra.set_transport_address("ucx-a");
  v1::RendezvousReply reply;
  absl::Status s = SendRendezvous(*membership_, ra, absl::Now() + absl::Milliseconds(30), &reply);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(s.message()), HasSubstr("1 (registered, no transport address yet)"));
  v1::RendezvousRequest rb;
  rb.set_worker_id("w-b");
  rb.set_rank(1);
  rb.set_transport_address("ucx-b");
  ASSERT_TRUE(SendRendezvous(*membership_, rb, absl::Now() + absl::Seconds(1), &reply).ok());
  EXPECT_EQ(reply.peers(0).transport_address(), "ucx-a");
  EXPECT_EQ(reply.peers(1).transport_address(), "ucx-b");
}

TEST_F(MembershipTest, DeadRankHeartbeatingAgainIsAlive) {
  Make(1);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  EXPECT_TRUE(membership_->MarkDead(0, "worker unreachable: connection refused"));
  EXPECT_FALSE(membership_->MarkDead(0, "again")) << "already dead";
  EXPECT_EQ(membership_->Ranks()[0].dead_reason, "worker unreachable: connection refused");
  ASSERT_TRUE(Beat("w-a", 0).ok());
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady);
  EXPECT_EQ(membership_->Ranks()[0].dead_reason, "");
}

TEST_F(MembershipTest, HeartbeatFromUnknownWorkerAsksToRegister) {
  Make(2);
  absl::Status s = Beat("w-x", 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("register again"));
  EXPECT_EQ(Beat("w-x", 9).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(MembershipTest, RendezvousWaitsForEveryRankThenListsAddresses) {
  Make(2);
  ASSERT_EQ(*Register(Worker("w-a")), 0);
  v1::RendezvousRequest req;
  req.set_worker_id("w-a");
  req.set_rank(0);
  v1::RendezvousReply early;
  absl::Status s = SendRendezvous(*membership_, req, absl::Now() + absl::Milliseconds(50), &early);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(s.message()), HasSubstr("still waiting for rank(s) 1 (free) of 2"));

  v1::RendezvousReply reply;
  absl::Status waited;
  std::thread waiter([&] { waited = SendRendezvous(*membership_, req, absl::Now() + absl::Seconds(10), &reply); });
  absl::SleepFor(absl::Milliseconds(20));
  ASSERT_EQ(*Register(Worker("w-b")), 1);
  waiter.join();
  ASSERT_TRUE(waited.ok()) << waited;
  ASSERT_EQ(reply.peers_size(), 2);
  EXPECT_EQ(reply.peers(0).rank(), 0);
  EXPECT_EQ(reply.peers(0).transport_address(), "ucx-address-of-w-a");
  EXPECT_EQ(reply.peers(1).transport_address(), "ucx-address-of-w-b");
  EXPECT_EQ(reply.peers(1).worker_endpoint(), "w-b:5000");

  req.set_worker_id("w-b");  // rank 0 belongs to w-a
  EXPECT_EQ(SendRendezvous(*membership_, req, absl::Now(), &reply).code(), absl::StatusCode::kNotFound);
}

TEST_F(MembershipTest, NcclRendezvousCarriesRankZerosUniqueId) {
  MembershipOptions o = Options(2);
  o.transport = v1::TRANSPORT_KIND_NCCL;
  membership_ = *Membership::Create(o, TinySummary(), &clock_);
  v1::RegisterRequest a = Worker("w-a"), b = Worker("w-b");
  a.set_transport(v1::TRANSPORT_KIND_NCCL);
  b.set_transport(v1::TRANSPORT_KIND_NCCL);
  ASSERT_TRUE(Register(a).ok());
  ASSERT_TRUE(Register(b).ok());
  v1::RendezvousRequest rb;
  rb.set_worker_id("w-b");
  rb.set_rank(1);
  v1::RendezvousReply reply;
  // Everyone registered, but rank 1 must wait for rank 0's id.
  EXPECT_EQ(SendRendezvous(*membership_, rb, absl::Now() + absl::Milliseconds(30), &reply).code(),
            absl::StatusCode::kDeadlineExceeded);
  v1::RendezvousRequest ra;
  ra.set_worker_id("w-a");
  ra.set_rank(0);
  ra.set_nccl_unique_id("nccl-id-bytes");
  ASSERT_TRUE(SendRendezvous(*membership_, ra, absl::Now() + absl::Seconds(1), &reply).ok());
  v1::RendezvousReply reply_b;
  ASSERT_TRUE(SendRendezvous(*membership_, rb, absl::Now() + absl::Seconds(1), &reply_b).ok());
  EXPECT_EQ(reply_b.nccl_unique_id(), "nccl-id-bytes");
}

TEST_F(MembershipTest, ShutdownEndsRendezvousWaits) {
  Make(2);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  v1::RendezvousRequest req;
  req.set_worker_id("w-a");
  req.set_rank(0);
  absl::Status waited;
  std::thread waiter([&] {
    v1::RendezvousReply reply;
    waited = SendRendezvous(*membership_, req, absl::Now() + absl::Seconds(30), &reply);
  });
  absl::SleepFor(absl::Milliseconds(20));
  membership_->Shutdown();
  waiter.join();
  EXPECT_EQ(waited.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(Register(Worker("w-b")).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(MembershipTest, RebalanceReplicatesHotExpertsAndPushesNewEpoch) {
  Make(2);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  // Expert 5 (on rank 1) is hot in every MoE layer.
  v1::HeartbeatRequest hb;
  hb.set_worker_id("w-a");
  hb.set_rank(0);
  hb.set_ready(true);
  hb.set_placement_epoch(1);
  for (int layer : {0, 2, 3}) {
    v1::ExpertLoad* el = hb.add_expert_load();
    el->set_layer(layer);
    for (int e = 0; e < 8; ++e) el->add_tokens(e == 5 ? 1000 : 10);
  }
  v1::HeartbeatReply reply;
  ASSERT_TRUE(SendHeartbeat(*membership_, hb, &reply).ok());
  EXPECT_FALSE(reply.has_placement()) << "worker already runs the current epoch";
  EXPECT_EQ(membership_->expert_load()[2][5], 1000);

  auto epoch = membership_->Rebalance(1);
  ASSERT_TRUE(epoch.ok()) << epoch.status();
  EXPECT_EQ(*epoch, 2u);
  Placement p = membership_->placement();
  EXPECT_EQ(p.replicas[0][5], (std::vector<int32_t>{1, 0}));
  EXPECT_TRUE(p.replicas[1].empty());
  EXPECT_EQ(membership_->expert_load()[2][5], 0) << "load restarts after a rebalance";

  // The next heartbeat of a worker on epoch 1 carries epoch 2; then nothing.
  hb.clear_expert_load();
  ASSERT_TRUE(SendHeartbeat(*membership_, hb, &reply).ok());
  ASSERT_TRUE(reply.has_placement());
  EXPECT_EQ(reply.placement().epoch(), 2u);
  EXPECT_THAT(reply.placement().layers(0).experts(5).ranks(), ::testing::ElementsAre(1, 0));
  hb.set_placement_epoch(2);
  v1::HeartbeatReply after;
  ASSERT_TRUE(SendHeartbeat(*membership_, hb, &after).ok());
  EXPECT_FALSE(after.has_placement());
  EXPECT_EQ(membership_->Ranks()[0].placement_epoch, 2u);

  // 0 goes back to contiguous sharding; absurd counts are refused with the field.
  EXPECT_EQ(*membership_->Rebalance(0), 3u);
  EXPECT_EQ(membership_->placement().replicas[0][5], (std::vector<int32_t>{1}));
  absl::Status too_many = membership_->Rebalance(9).status();
  EXPECT_EQ(too_many.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_many.message()), HasSubstr("redundant_experts"));
  EXPECT_EQ(membership_->Rebalance(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(MembershipTest, RebalanceDefaultsToConfiguredRedundantExperts) {
  MembershipOptions o = Options(2);
  o.redundant_experts = 2;
  membership_ = *Membership::Create(o, TinySummary(), &clock_);
  ASSERT_TRUE(membership_->Rebalance(std::nullopt).ok());
  const Placement p = membership_->placement();
  int replicas = 0;
  for (const auto& ranks : p.replicas[0]) replicas += ranks.size();
  EXPECT_EQ(replicas, 8 + 2);
}

TEST_F(MembershipTest, BadExpertLoadIsRefusedNamingTheField) {
  Make(1);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  v1::HeartbeatRequest hb;
  hb.set_worker_id("w-a");
  hb.set_rank(0);
  hb.add_expert_load()->set_layer(1);  // dense
  v1::HeartbeatReply reply;
  absl::Status s = SendHeartbeat(*membership_, hb, &reply);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("expert_load[0].layer: 1 is not a MoE layer"));
  hb.mutable_expert_load(0)->set_layer(0);
  hb.mutable_expert_load(0)->add_tokens(1);
  EXPECT_THAT(std::string(SendHeartbeat(*membership_, hb, &reply).message()),
              HasSubstr("expert_load[0].tokens: has 1 entries, expected one per expert (8)"));
}

TEST_F(MembershipTest, MeasuredStepsReachTheStepObserverInOrder) {
  Make(2);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  std::vector<std::pair<int, scheduler::StepSample>> seen;
  membership_->SetStepObserver([&](int rank, const std::vector<scheduler::StepSample>& steps) {
    for (const scheduler::StepSample& s : steps) seen.emplace_back(rank, s);
  });
  v1::HeartbeatRequest hb;
  hb.set_worker_id("w-b");
  hb.set_rank(1);
  hb.set_ready(true);
  for (int i = 1; i <= 3; ++i) {
    v1::StepRecord* r = hb.add_steps();
    r->set_batch_tokens(8 * i);
    r->set_context_tokens(100 * i);
    r->set_seconds(0.01 * i);
    r->set_energy_joules(2.5 * i);
    r->set_ended_unix_micros(1'700'000'000'000'000 + i);
  }
  v1::HeartbeatReply reply;
  ASSERT_TRUE(SendHeartbeat(*membership_, hb, &reply).ok());
  ASSERT_EQ(seen.size(), 3u);
  for (int i = 1; i <= 3; ++i) {
    const auto& [rank, s] = seen[i - 1];
    EXPECT_EQ(rank, 1);
    EXPECT_EQ(s.batch_tokens, 8 * i);
    EXPECT_EQ(s.context_tokens, 100 * i);
    EXPECT_NEAR(absl::ToDoubleSeconds(s.duration), 0.01 * i, 1e-12);
    EXPECT_DOUBLE_EQ(s.energy_joules, 2.5 * i);
    EXPECT_EQ(absl::ToUnixMicros(s.ended_at), 1'700'000'000'000'000 + i);
  }
  // A heartbeat without steps does not call it; after the observer is
  // cleared nothing is delivered.
  ASSERT_TRUE(Beat("w-a", 0).ok());
  EXPECT_EQ(seen.size(), 3u);
  membership_->SetStepObserver(nullptr);
  ASSERT_TRUE(SendHeartbeat(*membership_, hb, &reply).ok());
  EXPECT_EQ(seen.size(), 3u);
}

TEST_F(MembershipTest, BadStepRecordIsRefusedNamingTheField) {
  Make(1);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  int calls = 0;
  membership_->SetStepObserver([&](int, const std::vector<scheduler::StepSample>&) { ++calls; });
  v1::HeartbeatRequest hb;
  hb.set_worker_id("w-a");
  hb.set_rank(0);
  v1::StepRecord* good = hb.add_steps();
  good->set_batch_tokens(4);
  good->set_seconds(0.01);
  v1::StepRecord* bad = hb.add_steps();
  bad->set_batch_tokens(4);
  bad->set_seconds(-1);
  v1::HeartbeatReply reply;
  absl::Status s = SendHeartbeat(*membership_, hb, &reply);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("steps[1].seconds"));
  bad->set_seconds(0.01);
  bad->set_energy_joules(std::numeric_limits<double>::quiet_NaN());
  EXPECT_THAT(std::string(SendHeartbeat(*membership_, hb, &reply).message()),
              HasSubstr("steps[1].energy_joules"));
  bad->set_energy_joules(1);
  bad->set_batch_tokens(0);
  EXPECT_THAT(std::string(SendHeartbeat(*membership_, hb, &reply).message()),
              HasSubstr("steps[1].batch_tokens"));
  EXPECT_EQ(calls, 0) << "nothing of a refused heartbeat is delivered";
}

// A worker id shows in logs and status; only the worker holds its secret.
TEST_F(MembershipTest, EveryRegistrationGetsItsOwnRandomSecret) {
  Make(2);
  v1::RegisterReply a, b, again;
  ASSERT_TRUE(membership_->Register(Worker("w-a"), &a).ok());
  ASSERT_TRUE(membership_->Register(Worker("w-b"), &b).ok());
  EXPECT_EQ(a.worker_secret().size(), 32u) << "128 bits, hex";
  EXPECT_NE(a.worker_secret(), b.worker_secret());
  // Registering again (a restarted client) gets a new secret; the old one stops working.
  ASSERT_TRUE(membership_->Register(Worker("w-a"), &again).ok());
  EXPECT_EQ(again.rank(), a.rank());
  EXPECT_NE(again.worker_secret(), a.worker_secret());
  v1::HeartbeatRequest hb;
  hb.set_worker_id("w-a");
  hb.set_rank(a.rank());
  hb.set_worker_secret(a.worker_secret());
  v1::HeartbeatReply reply;
  EXPECT_EQ(membership_->Heartbeat(hb, &reply).code(), absl::StatusCode::kPermissionDenied);
  hb.set_worker_secret(again.worker_secret());
  EXPECT_TRUE(membership_->Heartbeat(hb, &reply).ok());
}

TEST_F(MembershipTest, ForgedHeartbeatWithTheRightWorkerIdChangesNothing) {
  Make(1);
  v1::RegisterReply registered;
  ASSERT_TRUE(RegisterWorker(*membership_, Worker("w-a"), &registered).ok());
  ASSERT_TRUE(Beat("w-a", 0, /*ready=*/true, /*running=*/1).ok());
  const int running = membership_->Ranks()[0].running;
  const auto load = membership_->expert_load();
  for (const std::string& secret : {std::string(), std::string("0123456789abcdef0123456789abcdef"),
                                    registered.worker_secret() + "0"}) {
    v1::HeartbeatRequest forged;
    forged.set_worker_id("w-a");
    forged.set_rank(0);
    forged.set_worker_secret(secret);
    forged.set_ready(false);
    forged.set_running(50);
    v1::ExpertLoad* el = forged.add_expert_load();
    el->set_layer(2);
    el->mutable_tokens()->Resize(8, 1000);
    v1::HeartbeatReply reply;
    absl::Status s = membership_->Heartbeat(forged, &reply);
    EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << "secret '" << secret << "': " << s;
    EXPECT_THAT(std::string(s.message()), Not(HasSubstr(registered.worker_secret())));
  }
  EXPECT_EQ(membership_->Ranks()[0].running, running);
  EXPECT_EQ(membership_->Ranks()[0].state, RankState::kReady);
  EXPECT_EQ(membership_->expert_load(), load) << "rank 0's load is what its own worker reported";
}

// Heartbeats relay each rank's meter; the coordinator's per-rank total only
// grows, whoever holds the rank and however often its worker restarts.
TEST_F(MembershipTest, RankEnergyAccumulatesAcrossWorkersAndRestarts) {
  Make(2);
  ASSERT_TRUE(Register(Worker("w-a")).ok());
  ASSERT_TRUE(Register(Worker("w-b")).ok());
  auto meter = [&](const std::string& id, int rank, double joules, double watts, const std::string& source) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(id);
    hb.set_rank(rank);
    hb.set_ready(true);
    hb.set_placement_epoch(membership_->placement_epoch());
    hb.set_energy_joules(joules);
    hb.set_power_watts(watts);
    hb.set_energy_source(source);
    v1::HeartbeatReply reply;
    return SendHeartbeat(*membership_, hb, &reply);
  };
  auto metered = [&]() {
    std::map<int, double> joules;
    for (const RankInfo& r : membership_->stats().metered) joules[r.rank] = r.energy_joules;
    return joules;
  };
  ASSERT_TRUE(meter("w-a", 0, 10, 20, "model").ok());
  ASSERT_TRUE(meter("w-b", 1, 0, 0, "").ok());  // no meter: not listed
  EXPECT_EQ(metered(), (std::map<int, double>{{0, 10}}));
  ASSERT_TRUE(meter("w-a", 0, 25, 21, "model").ok());
  EXPECT_EQ(metered(), (std::map<int, double>{{0, 25}}));
  // The same worker id reports less: its meter restarted; what it reports now is new.
  ASSERT_TRUE(meter("w-a", 0, 4, 19, "model").ok());
  EXPECT_EQ(metered(), (std::map<int, double>{{0, 29}}));
  // Registering again (e.g. to a restarted coordinator) keeps the worker's meter going.
  ASSERT_TRUE(Register(Worker("w-a", 0)).ok());
  ASSERT_TRUE(meter("w-a", 0, 6, 19, "model").ok());
  EXPECT_EQ(metered(), (std::map<int, double>{{0, 31}}));
  const MembershipStats stats = membership_->stats();
  ASSERT_EQ(stats.metered.size(), 1u);
  EXPECT_EQ(stats.metered[0].power_watts, 19);
  EXPECT_EQ(stats.metered[0].energy_source, "model");
}

TEST_F(MembershipTest, RendezvousWithoutTheSecretIsRefused) {
  Make(1);
  v1::RegisterReply registered;
  ASSERT_TRUE(membership_->Register(Worker("w-a"), &registered).ok());
  v1::RendezvousRequest req;
  req.set_worker_id("w-a");
  req.set_rank(0);
  req.set_transport_address("forged-address");
  v1::RendezvousReply reply;
  EXPECT_EQ(membership_->Rendezvous(req, absl::Now(), &reply).code(),
            absl::StatusCode::kPermissionDenied);
  req.set_transport_address("");
  req.set_worker_secret(registered.worker_secret());
  ASSERT_TRUE(membership_->Rendezvous(req, absl::Now() + absl::Seconds(1), &reply).ok());
  EXPECT_EQ(reply.peers(0).transport_address(), "ucx-address-of-w-a")
      << "the refused call did not replace the address";
}

}  // namespace
// Every rank of a world of `n` registered, rendezvoused (the first group)
// and ready.
void FormGroup(Membership& m, int n, FakeClock& clock) {
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    v1::RegisterReply reply;
    ASSERT_TRUE(RegisterWorker(m, Worker(absl::StrCat("w-", r), r), &reply).ok());
  }
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&m, r] {
      v1::RendezvousRequest req;
      req.set_worker_id(absl::StrCat("w-", r));
      req.set_rank(r);
      v1::RendezvousReply reply;
      EXPECT_TRUE(SendRendezvous(m, req, absl::Now() + absl::Seconds(10), &reply).ok());
      EXPECT_EQ(reply.group_epoch(), 1u);
    });
  }
  for (auto& t : threads) t.join();
}

v1::HeartbeatReply BeatIn(Membership& m, int rank, uint64_t group_epoch) {
  v1::HeartbeatRequest hb;
  hb.set_worker_id(absl::StrCat("w-", rank));
  hb.set_rank(rank);
  hb.set_ready(true);
  hb.set_group_epoch(group_epoch);
  hb.set_placement_epoch(m.placement_epoch());
  v1::HeartbeatReply reply;
  EXPECT_TRUE(SendHeartbeat(m, hb, &reply).ok());
  return reply;
}

// A member dies: the live ones form the next group, renumbered in rank order,
// with a placement over them that still holds every expert; each learns its
// new transport rank from its heartbeat, meets the others at that epoch's
// rendezvous, and requests run again once every member serves in it.
TEST_F(MembershipTest, SurvivorsOfADeadMemberFormTheNextGroup) {
  Make(3);
  FormGroup(*membership_, 3, clock_);
  for (int r = 0; r < 3; ++r) BeatIn(*membership_, r, 1);
  EXPECT_TRUE(membership_->group().serving);
  const uint64_t placement_before = membership_->placement_epoch();

  ASSERT_TRUE(membership_->MarkDead(1, "worker unreachable"));
  GroupInfo g = membership_->group();
  EXPECT_EQ(g.epoch, 2u);
  EXPECT_EQ(g.members, (std::vector<int>{0, 2}));
  EXPECT_FALSE(g.serving);
  EXPECT_THAT(g.reason, HasSubstr("rank 1 died: worker unreachable"));
  const Placement p = membership_->placement();
  EXPECT_EQ(p.num_ranks, 2);
  EXPECT_GT(membership_->placement_epoch(), placement_before);
  for (int l : {0, 2, 3}) {
    for (int e = 0; e < 8; ++e) EXPECT_FALSE(p.replicas[l][e].empty()) << l << "/" << e;
  }

  const v1::HeartbeatReply r0 = BeatIn(*membership_, 0, 1);
  const v1::HeartbeatReply r2 = BeatIn(*membership_, 2, 1);
  ASSERT_TRUE(r2.has_group());
  EXPECT_EQ(r2.group().epoch(), 2u);
  EXPECT_EQ(r2.group().world_size(), 2);
  EXPECT_EQ(r0.group().rank(), 0);
  EXPECT_EQ(r2.group().rank(), 1);
  EXPECT_EQ(r2.group().placement().num_ranks(), 2);
  EXPECT_FALSE(r2.has_placement());  // the group update carries it

  std::vector<v1::RendezvousReply> replies(2);
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&, i] {
      const int rank = i == 0 ? 0 : 2;
      v1::RendezvousRequest req;
      req.set_worker_id(absl::StrCat("w-", rank));
      req.set_rank(rank);
      req.set_group_epoch(2);
      req.set_transport_address(absl::StrCat("epoch2-address-of-", rank));
      EXPECT_TRUE(SendRendezvous(*membership_, req, absl::Now() + absl::Seconds(10), &replies[i]).ok());
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_EQ(replies[1].peers_size(), 2);
  EXPECT_EQ(replies[1].peers(1).transport_address(), "epoch2-address-of-2");
  EXPECT_EQ(replies[0].peers(0).transport_address(), "epoch2-address-of-0");
  EXPECT_EQ(replies[0].group_epoch(), 2u);

  clock_.Advance(absl::Milliseconds(700));
  BeatIn(*membership_, 0, 2);
  EXPECT_FALSE(membership_->group().serving);  // rank 2 has not regrouped yet
  EXPECT_FALSE(BeatIn(*membership_, 2, 2).has_group());
  EXPECT_TRUE(membership_->group().serving);
  const std::vector<RankInfo> ranks = membership_->Ranks();
  EXPECT_EQ(ranks[2].group_rank, 1);
  EXPECT_EQ(ranks[1].group_rank, -1);
  const MembershipStats stats = membership_->stats();
  EXPECT_EQ(stats.group_epoch, 2u);
  EXPECT_EQ(stats.rank_failures, 1u);
  EXPECT_EQ(stats.recovery_seconds, (std::vector<double>{0.7})) << "the death -> serving again";
}

// The placement after a death keeps every replica the survivors hold: what a
// redundant replica covers needs no loading, and only the dead rank's own
// experts move.
TEST_F(MembershipTest, ADeathKeepsTheSurvivorsReplicas) {
  Make(3);
  FormGroup(*membership_, 3, clock_);
  ASSERT_TRUE(membership_->Rebalance(4).ok());
  const Placement before = membership_->placement();
  ASSERT_TRUE(membership_->MarkDead(1, "gone"));
  const Placement after = membership_->placement();
  ASSERT_EQ(after.num_ranks, 2);
  ASSERT_TRUE(after.Validate().ok()) << after.Validate();
  int covered = 0;
  for (int l : {0, 2, 3}) {
    for (int e = 0; e < 8; ++e) {
      for (int r : before.replicas[l][e]) {
        if (r == 1) continue;
        EXPECT_TRUE(after.Holds(r == 0 ? 0 : 1, l, e)) << "layer " << l << " expert " << e;
      }
      const auto& was = before.replicas[l][e];
      covered += was.size() > 1 && std::find(was.begin(), was.end(), 1) != was.end();
    }
  }
  EXPECT_GT(covered, 0) << "some expert of rank 1 had a replica elsewhere";
}

TEST_F(MembershipTest, ARendezvousOvertakenByAnotherDeathIsAborted) {
  Make(3);
  FormGroup(*membership_, 3, clock_);
  ASSERT_TRUE(membership_->MarkDead(2, "gone"));
  std::thread waiter([&] {
    v1::RendezvousRequest req;
    req.set_worker_id("w-0");
    req.set_rank(0);
    req.set_group_epoch(2);
    req.set_transport_address("a0");
    v1::RendezvousReply reply;
    absl::Status s = SendRendezvous(*membership_, req, absl::Now() + absl::Seconds(10), &reply);
    EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("moved on to epoch 3"));
  });
  absl::SleepFor(absl::Milliseconds(100));
  clock_.Advance(absl::Milliseconds(300));
  ASSERT_TRUE(membership_->MarkDead(1, "also gone"));
  waiter.join();
  EXPECT_EQ(membership_->group().members, (std::vector<int>{0}));
  // The placement of epoch 3 still holds every expert, all on the one survivor.
  const Placement p = membership_->placement();
  EXPECT_EQ(p.num_ranks, 1);
  for (int l : {0, 2, 3}) {
    for (int e = 0; e < 8; ++e) EXPECT_EQ(p.replicas[l][e], (std::vector<int>{0})) << l << "/" << e;
  }
  // One recovery, from the first death until epoch 3 serves.
  clock_.Advance(absl::Milliseconds(200));
  BeatIn(*membership_, 0, 3);
  EXPECT_TRUE(membership_->group().serving);
  EXPECT_EQ(membership_->stats().rank_failures, 2u);
  EXPECT_EQ(membership_->stats().recovery_seconds, (std::vector<double>{0.5}));
}

// A dead member stays out: its worker coming back is told to stop. A new
// worker for its rank joins the running group: it registers (joining), loads,
// asks to join, and the next group epoch takes it in with a placement over
// every member; the others hear of it with their next heartbeat.
TEST_F(MembershipTest, ALeftRankStaysOutAndANewWorkerJoinsTheRunningGroup) {
  Make(2);
  FormGroup(*membership_, 2, clock_);
  ASSERT_TRUE(membership_->MarkDead(1, "stopped"));
  const v1::HeartbeatReply back = BeatIn(*membership_, 1, 1);
  EXPECT_TRUE(back.shutdown());
  EXPECT_THAT(back.shutdown_reason(), HasSubstr("no longer in the expert-parallel group"));
  BeatIn(*membership_, 0, 2);
  ASSERT_TRUE(membership_->group().serving);  // rank 0 alone, epoch 2

  v1::RegisterReply reply;
  ASSERT_TRUE(RegisterWorker(*membership_, Worker("w-new", 1), &reply).ok());
  EXPECT_TRUE(reply.joining());
  EXPECT_EQ(reply.rank(), 1);
  v1::HeartbeatRequest hb;
  hb.set_worker_id("w-new");
  hb.set_rank(1);
  v1::HeartbeatReply loading;
  ASSERT_TRUE(SendHeartbeat(*membership_, hb, &loading).ok());
  EXPECT_FALSE(loading.shutdown());
  EXPECT_FALSE(loading.has_group()) << "still loading: the group is not disturbed";
  EXPECT_EQ(membership_->group().epoch, 2u);

  hb.set_join(true);
  v1::HeartbeatReply joined;
  ASSERT_TRUE(SendHeartbeat(*membership_, hb, &joined).ok());
  ASSERT_TRUE(joined.has_group());
  EXPECT_EQ(joined.group().epoch(), 3u);
  EXPECT_EQ(joined.group().world_size(), 2);
  EXPECT_EQ(joined.group().rank(), 1);
  EXPECT_EQ(joined.group().placement().num_ranks(), 2);
  EXPECT_THAT(joined.group().reason(), HasSubstr("rank 1 joined"));
  const GroupInfo g = membership_->group();
  EXPECT_EQ(g.members, (std::vector<int>{0, 1}));
  EXPECT_FALSE(g.serving);
  const v1::HeartbeatReply r0 = BeatIn(*membership_, 0, 2);
  ASSERT_TRUE(r0.has_group());
  EXPECT_EQ(r0.group().epoch(), 3u);
  EXPECT_EQ(r0.group().rank(), 0);

  BeatIn(*membership_, 0, 3);
  v1::HeartbeatRequest ready = hb;
  ready.set_join(false);
  ready.set_ready(true);
  ready.set_group_epoch(3);
  v1::HeartbeatReply serving;
  ASSERT_TRUE(SendHeartbeat(*membership_, ready, &serving).ok());
  EXPECT_TRUE(membership_->group().serving);
  EXPECT_EQ(membership_->stats().recovery_seconds.size(), 1u) << "a join is not a recovery";
}

// A drained rank leaves like a dead one, but its worker is told to stop
// cleanly and no failure is counted; what cannot be drained says why.
TEST_F(MembershipTest, DrainTakesARankOutOfTheGroup) {
  Make(3);
  FormGroup(*membership_, 3, clock_);
  for (int r = 0; r < 3; ++r) BeatIn(*membership_, r, 1);
  EXPECT_EQ(membership_->Drain(7).status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<uint64_t> epoch = membership_->Drain(1);
  ASSERT_TRUE(epoch.ok()) << epoch.status();
  EXPECT_EQ(*epoch, 2u);
  EXPECT_EQ(membership_->group().members, (std::vector<int>{0, 2}));
  EXPECT_THAT(membership_->group().reason, HasSubstr("rank 1 drained"));
  EXPECT_EQ(membership_->Ranks()[1].state, RankState::kDead);
  const v1::HeartbeatReply told = BeatIn(*membership_, 1, 1);
  EXPECT_TRUE(told.shutdown());
  EXPECT_TRUE(told.shutdown_reason().empty()) << "a clean stop: " << told.shutdown_reason();
  EXPECT_EQ(membership_->stats().rank_failures, 0u);
  absl::Status again = membership_->Drain(1).status();
  EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(again.message()), HasSubstr("not a member"));
  ASSERT_TRUE(membership_->Drain(2).ok());
  absl::Status last = membership_->Drain(0).status();
  EXPECT_EQ(last.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(last.message()), HasSubstr("last member"));
}

TEST_F(MembershipTest, WithoutElasticGroupsADeathLeavesTheGroupAsItWas) {
  Make(2, /*elastic=*/false);
  FormGroup(*membership_, 2, clock_);
  ASSERT_TRUE(membership_->MarkDead(1, "gone"));
  EXPECT_EQ(membership_->group().epoch, 1u);
  EXPECT_FALSE(BeatIn(*membership_, 0, 1).has_group());
  EXPECT_FALSE(membership_->group().serving);
  v1::RegisterReply reply;
  ASSERT_TRUE(RegisterWorker(*membership_, Worker("w-1", 1), &reply).ok());
  EXPECT_FALSE(reply.elastic()) << "survivors of a death fail their requests at once";
  EXPECT_EQ(membership_->Drain(0).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace joule::cluster
