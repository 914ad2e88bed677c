// Placements survive the wire both ways, and a message that does not fit the
// model is refused naming the field.
#include "common/placement_proto.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Four decoder layers, layer 1 dense, eight experts on two ranks.
const std::vector<bool> kMoeLayer = {true, false, true, true};
constexpr int kExperts = 8;

Placement TwoRanks() {
  auto p = ContiguousPlacement(2, 4, kExperts);
  EXPECT_TRUE(p.ok()) << p.status();
  p->replicas[1].clear();      // dense
  p->replicas[2][3] = {1, 0};  // a replica
  return *p;
}

std::string Error(const v1::Placement& wire) {
  return std::string(PlacementFromProto(wire, kExperts, kMoeLayer).status().message());
}

TEST(PlacementProtoTest, RoundTripsAndLeavesDenseLayersOffTheWire) {
  const Placement p = TwoRanks();
  const v1::Placement wire = PlacementToProto(p, 9);
  EXPECT_EQ(wire.epoch(), 9u);
  EXPECT_EQ(wire.num_ranks(), 2);
  EXPECT_EQ(wire.num_experts(), kExperts);
  ASSERT_EQ(wire.layers_size(), 3);
  EXPECT_EQ(wire.layers(0).layer(), 0);
  EXPECT_EQ(wire.layers(1).layer(), 2);
  EXPECT_EQ(wire.layers(2).layer(), 3);
  EXPECT_THAT(wire.layers(1).experts(3).ranks(), ElementsAre(1, 0));
  auto back = PlacementFromProto(wire, kExperts, kMoeLayer);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->num_ranks, 2);
  EXPECT_EQ(back->num_layers, 4);
  EXPECT_EQ(back->num_experts, kExperts);
  EXPECT_EQ(back->replicas, p.replicas);
  EXPECT_EQ(back->LocalExperts(1, 0), (std::vector<int32_t>{4, 5, 6, 7}));
}

TEST(PlacementProtoTest, MessageThatDoesNotFitTheModelIsRefused) {
  const v1::Placement good = PlacementToProto(TwoRanks(), 1);

  v1::Placement wire = good;
  wire.set_num_experts(kExperts + 1);
  EXPECT_THAT(Error(wire), HasSubstr("placement.num_experts: 9 but the model has 8"));

  wire = good;
  wire.mutable_layers(2)->set_layer(4);
  EXPECT_THAT(Error(wire), HasSubstr("layer 4 is out of range [0, 4)"));
  wire.mutable_layers(2)->set_layer(-1);
  EXPECT_THAT(Error(wire), HasSubstr("layer -1 is out of range"));

  wire = good;
  wire.mutable_layers(2)->set_layer(1);
  EXPECT_THAT(Error(wire), HasSubstr("layer 1 is not a MoE layer"));

  wire = good;
  wire.mutable_layers(2)->set_layer(2);
  EXPECT_THAT(Error(wire), HasSubstr("layer 2 listed twice"));

  wire = good;
  wire.mutable_layers(0)->mutable_experts()->RemoveLast();
  EXPECT_THAT(Error(wire), HasSubstr("placement.layers[layer 0].experts: 7 entries, expected 8"));

  wire = good;
  wire.mutable_layers()->RemoveLast();
  EXPECT_THAT(Error(wire), HasSubstr("MoE layer 3 is missing"));

  wire = good;
  wire.mutable_layers(0)->mutable_experts(5)->set_ranks(0, 2);  // only ranks 0 and 1 exist
  EXPECT_THAT(Error(wire), HasSubstr("placement: layer 0 expert 5 is placed on rank 2, outside [0, 2)"));
  EXPECT_EQ(PlacementFromProto(wire, kExperts, kMoeLayer).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace joule
