// Expert placement: contiguous sharding, validation messages a operator can
// act on, and the replica choice every rank makes without coordination.
#include "common/placement.h"

#include <map>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(PlacementTest, ContiguousShardsAreBalancedAndInOrder) {
  for (int ranks = 1; ranks <= 8; ++ranks) {
    for (int experts = 1; experts <= 20; ++experts) {
      SCOPED_TRACE(::testing::Message() << ranks << " ranks, " << experts << " experts");
      auto p = ContiguousPlacement(ranks, 3, experts);
      ASSERT_TRUE(p.ok()) << p.status();
      ASSERT_TRUE(p->Validate().ok());
      std::vector<int> held(ranks, 0);
      int last = 0;
      for (int e = 0; e < experts; ++e) {
        ASSERT_EQ(p->replicas[1][e].size(), 1u);
        const int r = p->replicas[1][e][0];
        EXPECT_GE(r, last) << "contiguous: ranks never go back";
        last = r;
        ++held[r];
      }
      const auto [lo, hi] = std::minmax_element(held.begin(), held.end());
      EXPECT_LE(*hi - *lo, 1) << "shard sizes differ by at most one";
      if (experts >= ranks) {
        EXPECT_GE(*lo, 1) << "every rank holds an expert";
      }
      if (experts % ranks == 0) {
        for (int e = 0; e < experts; ++e) EXPECT_EQ(p->replicas[0][e][0], e / (experts / ranks));
      }
    }
  }
}

TEST(PlacementTest, HoldsAndLocalExperts) {
  auto p = ContiguousPlacement(3, 2, 8);  // ranks hold experts {0,1,2}, {3,4,5}, {6,7}
  ASSERT_TRUE(p.ok());
  EXPECT_THAT(p->LocalExperts(0, 1), ElementsAre(0, 1, 2));
  EXPECT_THAT(p->LocalExperts(1, 1), ElementsAre(3, 4, 5));
  EXPECT_THAT(p->LocalExperts(2, 1), ElementsAre(6, 7));
  p->replicas[1][7].push_back(0);
  EXPECT_THAT(p->LocalExperts(0, 1), ElementsAre(0, 1, 2, 7));
  EXPECT_THAT(p->LocalExperts(0, 0), ElementsAre(0, 1, 2));
  EXPECT_TRUE(p->Holds(0, 1, 7));
  EXPECT_FALSE(p->Holds(0, 0, 7));
  EXPECT_FALSE(p->Holds(0, 5, 0)) << "out-of-range layers hold nothing";
  EXPECT_FALSE(p->Holds(0, 0, 99));
  EXPECT_TRUE(p->LocalExperts(0, 9).empty());
}

TEST(PlacementTest, ValidateNamesWhatIsWrong) {
  auto good = ContiguousPlacement(4, 3, 8);
  ASSERT_TRUE(good.ok());
  auto message = [](const Placement& p) {
    absl::Status s = p.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    return std::string(s.message());
  };
  Placement p = *good;
  p.replicas.pop_back();
  EXPECT_THAT(message(p), HasSubstr("2 layers, expected num_layers = 3"));
  p = *good;
  p.replicas[1].pop_back();
  EXPECT_THAT(message(p), HasSubstr("layer 1 lists 7 experts, expected num_experts = 8"));
  p = *good;
  p.replicas[2][5] = {};
  EXPECT_THAT(message(p), HasSubstr("layer 2 expert 5 has no replica"));
  p = *good;
  p.replicas[0][3] = {1, 4};
  EXPECT_THAT(message(p), HasSubstr("layer 0 expert 3 is placed on rank 4, outside [0, 4)"));
  p = *good;
  p.replicas[0][3] = {-1};
  EXPECT_THAT(message(p), HasSubstr("rank -1"));
  p = *good;
  p.replicas[1][6] = {3, 2, 3};
  EXPECT_THAT(message(p), HasSubstr("layer 1 expert 6 lists rank 3 twice"));
  p = *good;
  p.num_ranks = 0;
  EXPECT_THAT(message(p), HasSubstr("num_ranks"));
  p = *good;
  p.replicas[1].clear();  // a dense layer has no experts
  EXPECT_TRUE(p.Validate().ok());

  EXPECT_EQ(ContiguousPlacement(0, 2, 8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ContiguousPlacement(2, 2, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PlacementTest, LoadImbalanceIsTheBusiestRankOverTheMean) {
  // 2 ranks, 3 layers (layer 1 dense), 4 experts: experts 0-1 on rank 0, 2-3 on rank 1.
  absl::StatusOr<Placement> p = ContiguousPlacement(2, 3, 4);
  ASSERT_TRUE(p.ok());
  p->replicas[1].clear();
  std::vector<std::vector<int64_t>> load = {{5, 5, 5, 5}, {}, {1, 1, 1, 1}};
  EXPECT_DOUBLE_EQ(LoadImbalance(*p, load), 1.0);
  load = {{10, 0, 0, 0}, {}, {0, 0, 0, 0}};
  EXPECT_DOUBLE_EQ(LoadImbalance(*p, load), 2.0);  // all on rank 0: max / mean = 10 / 5
  // A replica of expert 0 on rank 1 halves rank 0's share of it.
  p->replicas[0][0] = {0, 1};
  EXPECT_DOUBLE_EQ(LoadImbalance(*p, load), 1.0);
  EXPECT_EQ(LoadImbalance(*p, {{0, 0, 0, 0}, {}, {0, 0, 0, 0}}), 0) << "no load";
  EXPECT_EQ(LoadImbalance(*p, {{1, 2, 3}, {}, {1, 1, 1, 1}}), 0) << "a load of another shape";
}

TEST(PlacementTest, ChooseReplicaPrefersLocalThenSpreadsEvenly) {
  auto p = ContiguousPlacement(4, 1, 4);
  ASSERT_TRUE(p.ok());
  p->replicas[0][0] = {1, 3};
  p->replicas[0][1] = {0, 2, 3};
  // A single replica is the answer whoever asks.
  for (int src = 0; src < 4; ++src) EXPECT_EQ(ChooseReplica(*p, 0, 2, 7, src), 2);
  // A replica on the asking rank itself: no transfer.
  for (int64_t t = 0; t < 10; ++t) {
    EXPECT_EQ(ChooseReplica(*p, 0, 0, t, 3), 3);
    EXPECT_EQ(ChooseReplica(*p, 0, 1, t, 2), 2);
  }
  // Otherwise round-robin over the replicas by token, offset by the source rank.
  EXPECT_EQ(ChooseReplica(*p, 0, 0, 0, 0), 1);
  EXPECT_EQ(ChooseReplica(*p, 0, 0, 1, 0), 3);
  EXPECT_EQ(ChooseReplica(*p, 0, 0, 2, 0), 1);
  EXPECT_EQ(ChooseReplica(*p, 0, 0, 0, 2), 1);
  EXPECT_EQ(ChooseReplica(*p, 0, 1, 0, 1), 2);  // (0 + 1) % 3 -> second replica
  // Even spread: many tokens from rank 1 over expert 1's three replicas.
  std::map<int, int> hits;
  for (int64_t t = 0; t < 300; ++t) ++hits[ChooseReplica(*p, 0, 1, t, 1)];
  EXPECT_EQ(hits, (std::map<int, int>{{0, 100}, {2, 100}, {3, 100}}));
  // Decode-sized batches (one token per rank) still spread over ranks.
  p->replicas[0][2] = {0, 1};
  std::map<int, int> spread;
  for (int src : {2, 3}) ++spread[ChooseReplica(*p, 0, 2, 0, src)];
  EXPECT_EQ(spread, (std::map<int, int>{{0, 1}, {1, 1}}));
}

}  // namespace
}  // namespace joule
