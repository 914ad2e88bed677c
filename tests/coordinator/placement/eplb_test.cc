// EPLB: redundant replicas go to the hottest experts, on the least-loaded
// ranks, never twice on one rank, and the same inputs give the same placement.
// RemoveRank: a placement repaired after a rank left keeps every replica on the
// others and spreads only what the leaver alone held.
#include "coordinator/placement/eplb.h"

#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<std::vector<int64_t>> Load(int layers, std::vector<int64_t> per_expert) {
  return std::vector<std::vector<int64_t>>(layers, per_expert);
}

TEST(EplbTest, HotExpertGetsReplicasOnLeastLoadedRanks) {
  auto base = ContiguousPlacement(4, 1, 8);  // rank r holds experts 2r, 2r+1
  ASSERT_TRUE(base.ok());
  // Expert 0 is hot; rank 0 (experts 0 and 1) carries most of the load.
  auto load = Load(1, {1000, 10, 10, 10, 10, 10, 10, 10});
  auto one = RebalancePlacement(*base, load, 1);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_THAT(one->replicas[0][0], ElementsAre(0, 1)) << "ties between equally loaded ranks: lowest";
  for (int e = 1; e < 8; ++e) EXPECT_EQ(one->replicas[0][e], base->replicas[0][e]);

  // Still the hottest per replica (1000/2 > 10): spreads to every rank.
  auto three = RebalancePlacement(*base, load, 3);
  ASSERT_TRUE(three.ok());
  EXPECT_THAT(three->replicas[0][0], ElementsAre(0, 1, 2, 3));
  // Once it is everywhere, the next hottest gets the next replica.
  auto four = RebalancePlacement(*base, load, 4);
  ASSERT_TRUE(four.ok());
  EXPECT_THAT(four->replicas[0][0], ElementsAre(0, 1, 2, 3));
  int extra = 0;
  for (int e = 1; e < 8; ++e) extra += static_cast<int>(four->replicas[0][e].size()) - 1;
  EXPECT_EQ(extra, 1);
}

TEST(EplbTest, TwoHotExpertsGoToDifferentColdRanks) {
  auto base = ContiguousPlacement(4, 2, 8);
  ASSERT_TRUE(base.ok());
  std::vector<std::vector<int64_t>> load = {{900, 0, 0, 0, 0, 600, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}};
  auto p = RebalancePlacement(*base, load, 2);
  ASSERT_TRUE(p.ok());
  // Expert 0 (900) first, to an idle rank (1); then expert 5 (600 > 450 per
  // replica of expert 0) to the idle rank left (3), not to rank 0 or 1 (450 each).
  EXPECT_THAT(p->replicas[0][0], ElementsAre(0, 1));
  EXPECT_THAT(p->replicas[0][5], ElementsAre(2, 3));
  // A layer without traffic still gets the replicas asked for, spread over
  // experts (ties: fewer replicas, then the lower id) rather than piled on one.
  EXPECT_THAT(p->replicas[1][0], ElementsAre(0, 1));
  EXPECT_THAT(p->replicas[1][1], ElementsAre(0, 1));
  for (int e = 2; e < 8; ++e) EXPECT_EQ(p->replicas[1][e].size(), 1u);
}

TEST(EplbTest, RandomLoadsNeverDuplicateAndAreDeterministic) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int ranks = 1 + rng() % 6, experts = 1 + rng() % 12, layers = 1 + rng() % 3;
    auto base = ContiguousPlacement(ranks, layers, experts);
    ASSERT_TRUE(base.ok());
    std::vector<std::vector<int64_t>> load(layers, std::vector<int64_t>(experts));
    for (auto& l : load) for (auto& v : l) v = rng() % 1000;
    const int redundant = rng() % (experts * ranks + 3);
    auto p = RebalancePlacement(*base, load, redundant);
    ASSERT_TRUE(p.ok()) << p.status();
    ASSERT_TRUE(p->Validate().ok()) << "no duplicates, ranks in range";
    for (int l = 0; l < layers; ++l) {
      int total = 0;
      for (const auto& r : p->replicas[l]) total += static_cast<int>(r.size());
      EXPECT_EQ(total, experts + std::min(redundant, experts * (ranks - 1)));
      for (int e = 0; e < experts; ++e) {
        EXPECT_EQ(p->replicas[l][e][0], base->replicas[l][e][0]) << "the base replica stays first";
      }
    }
    auto again = RebalancePlacement(*base, load, redundant);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->replicas, p->replicas);
  }
}

TEST(EplbTest, DenseLayersAndMissingObservationsAreLeftAlone) {
  auto base = ContiguousPlacement(2, 3, 4);
  ASSERT_TRUE(base.ok());
  base->replicas[1].clear();  // dense layer
  std::vector<std::vector<int64_t>> load = {{5, 1, 1, 1}, {}, {}};
  auto p = RebalancePlacement(*base, load, 1);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_THAT(p->replicas[0][0], ElementsAre(0, 1));
  EXPECT_TRUE(p->replicas[1].empty());
  EXPECT_EQ(p->replicas[2], base->replicas[2]);
}

TEST(EplbTest, BadInputsGetClearErrors) {
  auto base = ContiguousPlacement(2, 2, 4);
  ASSERT_TRUE(base.ok());
  auto load = Load(2, {1, 2, 3, 4});
  auto message = [](const absl::StatusOr<Placement>& p) {
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(p.status().message());
  };
  EXPECT_THAT(message(RebalancePlacement(*base, load, -1)), HasSubstr("redundant_experts"));
  EXPECT_THAT(message(RebalancePlacement(*base, Load(3, {1, 2, 3, 4}), 1)), HasSubstr("load has 3 layers"));
  EXPECT_THAT(message(RebalancePlacement(*base, Load(2, {1, 2, 3}), 1)),
              HasSubstr("load of layer 0 has 3 experts, expected 4"));
  auto negative = load;
  negative[1][2] = -5;
  EXPECT_THAT(message(RebalancePlacement(*base, negative, 1)), HasSubstr("layer 1 expert 2 is negative"));
  Placement broken = *base;
  broken.replicas[0][1] = {7};
  EXPECT_THAT(message(RebalancePlacement(broken, load, 1)), HasSubstr("base placement"));
}

TEST(EplbTest, RemoveRankKeepsReplicasAndSpreadsTheOrphans) {
  // 3 ranks, 6 experts: contiguous {0,1} {2,3} {4,5}, plus a replica of 2 on rank 0.
  auto p = ContiguousPlacement(3, 1, 6);
  ASSERT_TRUE(p.ok());
  p->replicas[0][2] = {1, 0};
  auto repaired = RemoveRank(*p, 1);
  ASSERT_TRUE(repaired.ok()) << repaired.status();
  EXPECT_EQ(repaired->num_ranks, 2);
  ASSERT_TRUE(repaired->Validate().ok()) << repaired->Validate();
  const auto& r = repaired->replicas[0];
  EXPECT_THAT(r[0], ElementsAre(0));
  EXPECT_THAT(r[1], ElementsAre(0));
  EXPECT_THAT(r[2], ElementsAre(0)) << "its replica covers it: nothing to load";
  EXPECT_THAT(r[3], ElementsAre(1)) << "orphan: to the rank with fewer experts (old rank 2)";
  EXPECT_THAT(r[4], ElementsAre(1)) << "old rank 2 is rank 1 now";
  EXPECT_THAT(r[5], ElementsAre(1));
  // Every expert a survivor held, it still holds.
  for (int e : {0, 1, 2}) EXPECT_TRUE(repaired->Holds(0, 0, e));
  for (int e : {4, 5}) EXPECT_TRUE(repaired->Holds(1, 0, e));
}

TEST(EplbTest, RemoveRankBalancesOrphansAndRefusesBadRanks) {
  auto p = ContiguousPlacement(4, 2, 8);  // two per rank
  ASSERT_TRUE(p.ok());
  p->replicas[1].clear();  // a dense layer stays empty
  auto repaired = RemoveRank(*p, 0);
  ASSERT_TRUE(repaired.ok());
  std::vector<int> per_rank(3, 0);
  for (const auto& ranks : repaired->replicas[0]) {
    ASSERT_EQ(ranks.size(), 1u);
    ++per_rank[ranks[0]];
  }
  EXPECT_THAT(per_rank, ElementsAre(3, 3, 2)) << "orphans go to the least loaded, lowest first";
  EXPECT_TRUE(repaired->replicas[1].empty());
  EXPECT_THAT(std::string(RemoveRank(*p, 4).status().message()), HasSubstr("out of range"));
  auto one = ContiguousPlacement(1, 1, 2);
  ASSERT_TRUE(one.ok());
  EXPECT_THAT(std::string(RemoveRank(*one, 0).status().message()), HasSubstr("only rank"));
}

}  // namespace
}  // namespace joule
