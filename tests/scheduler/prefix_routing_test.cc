// Routing for prefix-cache hits: the coordinator's PrefixIndex and the
// policies' use of it (prefer the rank holding a prompt's prefix, balanced
// against load; a cached prefill counts as cheap in ipw's load).
#include <numeric>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "scheduler/fake_clock.h"
#include "scheduler/prefix_index.h"
#include "scheduler/scheduler.h"

namespace joule::scheduler {
namespace {

using ::testing::IsEmpty;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;

std::vector<int32_t> Tokens(int n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(PrefixIndexTest, BlockHashesAreChainedOverFullBlocks) {
  const std::vector<int32_t> a = Tokens(40, 0);
  const std::vector<uint64_t> ha = PrefixIndex::BlockHashes(a, 16);
  ASSERT_EQ(ha.size(), 2u);  // the 8 tokens of a partial block have none
  std::vector<int32_t> b = a;
  b[20] = 999;  // second block differs
  const std::vector<uint64_t> hb = PrefixIndex::BlockHashes(b, 16);
  EXPECT_EQ(ha[0], hb[0]);
  EXPECT_NE(ha[1], hb[1]);
  std::vector<int32_t> c = a;
  c[0] = 999;  // the first block differs: so does every later hash (chained)
  const std::vector<uint64_t> hc = PrefixIndex::BlockHashes(c, 16);
  EXPECT_NE(ha[0], hc[0]);
  EXPECT_NE(ha[1], hc[1]);
  EXPECT_THAT(PrefixIndex::BlockHashes(Tokens(15, 0), 16), IsEmpty());
}

TEST(PrefixIndexTest, LeadingBlocksPerRank) {
  PrefixIndex index(100);
  const std::vector<uint64_t> sys = PrefixIndex::BlockHashes(Tokens(64, 0), 16);
  const std::vector<uint64_t> longer =
      PrefixIndex::BlockHashes(Concat(Tokens(64, 0), Tokens(32, 500)), 16);
  index.Insert(0, longer);
  index.Insert(1, sys);
  EXPECT_THAT(index.LeadingBlocks(longer), UnorderedElementsAre(Pair(0, 6), Pair(1, 4)));
  EXPECT_THAT(index.LeadingBlocks(PrefixIndex::BlockHashes(Tokens(64, 1), 16)), IsEmpty());
  index.ForgetRank(0);
  EXPECT_THAT(index.LeadingBlocks(longer), UnorderedElementsAre(Pair(1, 4)));
  EXPECT_EQ(index.size(), 4u);  // rank 0's own blocks are gone
}

TEST(PrefixIndexTest, ForgetsTheLeastRecentlySentBlocksFirst) {
  PrefixIndex index(4);
  const std::vector<uint64_t> a = PrefixIndex::BlockHashes(Tokens(32, 0), 16);
  const std::vector<uint64_t> b = PrefixIndex::BlockHashes(Tokens(32, 100), 16);
  const std::vector<uint64_t> c = PrefixIndex::BlockHashes(Tokens(32, 200), 16);
  index.Insert(0, a);
  index.Insert(0, b);
  index.Insert(1, a);  // a is recent again
  index.Insert(0, c);  // over capacity: b goes
  EXPECT_EQ(index.size(), 4u);
  EXPECT_THAT(index.LeadingBlocks(b), IsEmpty());
  EXPECT_THAT(index.LeadingBlocks(a), UnorderedElementsAre(Pair(0, 2), Pair(1, 2)));
  EXPECT_THAT(index.LeadingBlocks(c), UnorderedElementsAre(Pair(0, 2)));
}

ClusterView Ranks(int n) {
  ClusterView v;
  for (int r = 0; r < n; ++r) v.ranks.push_back({r, true});
  return v;
}

class PrefixRoutingTest : public ::testing::TestWithParam<PolicyKind> {
 protected:
  std::unique_ptr<Scheduler> Make(const SchedulerConfig& c) {
    auto s = Scheduler::Create(c, &clock_);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  }
  SchedulerConfig Config() const {
    SchedulerConfig c;
    c.policy = GetParam();
    return c;
  }
  // Submits and dispatches one standard request; returns its rank.
  int Send(Scheduler& s, uint64_t id, const std::vector<int32_t>& prompt) {
    RequestInfo info{.id = id, .tier = Tier::kStandard,
                     .prompt_tokens = static_cast<int64_t>(prompt.size()), .max_tokens = 8,
                     .prefix_blocks = PrefixIndex::BlockHashes(prompt, 16)};
    EXPECT_TRUE(s.Submit(info).ok());
    std::vector<Assignment> a = s.Dispatch(Ranks(2));
    EXPECT_EQ(a.size(), 1u);
    return a.empty() ? -1 : a[0].rank;
  }
  FakeClock clock_;
};

TEST_P(PrefixRoutingTest, SendsASharedPrefixToTheRankHoldingIt) {
  auto s = Make(Config());
  const std::vector<int32_t> system = Tokens(256, 1000);
  EXPECT_EQ(Send(*s, 1, Concat(system, Tokens(20, 1))), 0);
  // Least loaded would be rank 1; rank 0 holds the system prompt.
  EXPECT_EQ(Send(*s, 2, Concat(system, Tokens(20, 50))), 0);
  EXPECT_EQ(Send(*s, 3, Concat(system, Tokens(20, 80))), 0);
  // Nothing shared: load decides.
  EXPECT_EQ(Send(*s, 4, Tokens(300, 5000)), 1);
}

TEST_P(PrefixRoutingTest, LoadWinsBeyondTheGap) {
  SchedulerConfig c = Config();
  c.prefix_affinity.max_load_gap = 1;
  auto s = Make(c);
  const std::vector<int32_t> system = Tokens(256, 1000);
  EXPECT_EQ(Send(*s, 1, Concat(system, Tokens(20, 1))), 0);
  EXPECT_EQ(Send(*s, 2, Concat(system, Tokens(20, 50))), 0);  // 1 busier: within the gap
  EXPECT_EQ(Send(*s, 3, Concat(system, Tokens(20, 80))), 1);  // 2 busier: beyond it
  // Both hold it now; load decides between them.
  EXPECT_EQ(Send(*s, 4, Concat(system, Tokens(20, 90))), 1);
}

TEST_P(PrefixRoutingTest, OffOrTooShortOrRankLostMeansLoadDecides) {
  SchedulerConfig off = Config();
  off.prefix_affinity.enabled = false;
  auto s = Make(off);
  const std::vector<int32_t> system = Tokens(256, 1000);
  EXPECT_EQ(Send(*s, 1, Concat(system, Tokens(20, 1))), 0);
  EXPECT_EQ(Send(*s, 2, Concat(system, Tokens(20, 50))), 1);

  auto t = Make(Config());
  const std::vector<int32_t> short_prefix = Tokens(16, 1000);  // below min_match_tokens (32)
  EXPECT_EQ(Send(*t, 1, Concat(short_prefix, Tokens(20, 1))), 0);
  EXPECT_EQ(Send(*t, 2, Concat(short_prefix, Tokens(20, 50))), 1);

  auto u = Make(Config());
  EXPECT_EQ(Send(*u, 1, Concat(system, Tokens(20, 1))), 0);
  u->OnRankLost(0);  // its cache is gone with it
  EXPECT_EQ(Send(*u, 2, Concat(system, Tokens(20, 50))), 0);  // rank 0 is back, empty
  EXPECT_EQ(Send(*u, 3, Concat(system, Tokens(20, 60))), 0);  // ...and holds it again
}

INSTANTIATE_TEST_SUITE_P(Policies, PrefixRoutingTest,
                         ::testing::Values(PolicyKind::kFcfs, PolicyKind::kPriority,
                                           PolicyKind::kIpw),
                         [](const auto& info) { return std::string(PolicyName(info.param)); });

// ipw balances interactive work by the prefill its ranks still owe: a prompt
// whose prefix its rank holds owes almost none.
TEST(PrefixCostTest, IpwCountsACachedPrefillAsCheap) {
  FakeClock clock;
  SchedulerConfig c;
  c.policy = PolicyKind::kIpw;
  auto s = std::move(*Scheduler::Create(c, &clock));
  auto send = [&](uint64_t id, const std::vector<int32_t>& prompt) {
    EXPECT_TRUE(s->Submit({.id = id, .tier = Tier::kStandard,
                           .prompt_tokens = static_cast<int64_t>(prompt.size()), .max_tokens = 8,
                           .prefix_blocks = PrefixIndex::BlockHashes(prompt, 16)})
                    .ok());
    std::vector<Assignment> a = s->Dispatch(Ranks(2));
    return a.size() == 1 ? a[0].rank : -1;
  };
  const std::vector<int32_t> document = Tokens(1024, 1000);
  ASSERT_EQ(send(1, document), 0);
  s->OnTokens(1, 1);
  s->OnFinished(1);
  ASSERT_EQ(send(2, document), 0);          // held by rank 0; owes 1 token of prefill
  ASSERT_EQ(send(3, Tokens(300, 9000)), 1);  // rank 1 owes 300
  // 1 + 1 on rank 0 against 1 + 300 on rank 1; counted in full, the 1024
  // tokens of request 2 would send it to rank 1.
  EXPECT_EQ(send(4, Tokens(100, 20000)), 0);
}

}  // namespace
}  // namespace joule::scheduler
