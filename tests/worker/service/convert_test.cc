// Message translation: bad requests are refused naming the field; placements
// survive the wire both ways.
#include "worker/service/convert.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/paths.h"

namespace joule::worker {
namespace {

using ::testing::HasSubstr;

v1::GenerateRequest Valid() {
  v1::GenerateRequest r;
  r.set_request_id("r1");
  r.add_prompt_token_ids(1);
  r.add_prompt_token_ids(2);
  return r;
}

TEST(ConvertTest, UnsetSamplingFieldsTakeDefaults) {
  auto g = ToGenerationRequest(Valid());
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->prompt, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(g->sampling.temperature, 0.0f);
  EXPECT_EQ(g->sampling.top_p, 1.0f);
  EXPECT_EQ(g->sampling.max_tokens, kDefaultMaxTokens);
  EXPECT_FALSE(g->sampling.seed.has_value());
}

TEST(ConvertTest, CopiesSampling) {
  v1::GenerateRequest r = Valid();
  r.mutable_sampling()->set_temperature(0.7f);
  r.mutable_sampling()->set_top_p(0.9f);
  r.mutable_sampling()->set_top_k(5);
  r.mutable_sampling()->set_seed(42);
  r.mutable_sampling()->set_max_tokens(33);
  r.mutable_sampling()->add_stop_token_ids(7);
  r.mutable_sampling()->set_ignore_eos(true);
  auto g = ToGenerationRequest(r);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->sampling.temperature, 0.7f);
  EXPECT_EQ(g->sampling.top_p, 0.9f);
  EXPECT_EQ(g->sampling.top_k, 5);
  EXPECT_EQ(g->sampling.seed, 42u);
  EXPECT_EQ(g->sampling.max_tokens, 33);
  EXPECT_EQ(g->sampling.stop_token_ids, (std::vector<int32_t>{7}));
  EXPECT_TRUE(g->sampling.ignore_eos);
}

TEST(ConvertTest, BadRequestsNameTheField) {
  v1::GenerateRequest r = Valid();
  r.clear_request_id();
  EXPECT_THAT(std::string(ToGenerationRequest(r).status().message()), HasSubstr("request_id"));
  r = Valid();
  r.clear_prompt_token_ids();
  EXPECT_THAT(std::string(ToGenerationRequest(r).status().message()), HasSubstr("prompt_token_ids"));
  r = Valid();
  r.mutable_sampling()->set_temperature(-1);
  auto s = ToGenerationRequest(r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("sampling.temperature"));
  r = Valid();
  r.mutable_sampling()->set_max_tokens(-3);
  EXPECT_THAT(std::string(ToGenerationRequest(r).status().message()), HasSubstr("sampling.max_tokens"));
  r = Valid();
  r.mutable_sampling()->set_top_p(1.5f);
  EXPECT_THAT(std::string(ToGenerationRequest(r).status().message()), HasSubstr("sampling.top_p"));
  r = Valid();
  r.set_token_interval_us(-1);
  EXPECT_THAT(std::string(ToGenerationRequest(r).status().message()), HasSubstr("token_interval_us"));
}

TEST(ConvertTest, CopiesTheSchedulersHints) {
  v1::GenerateRequest r = Valid();
  r.set_priority(2);
  r.set_step_token_cap(48);
  r.set_token_interval_us(96'000);
  auto g = ToGenerationRequest(r);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->priority, 2);
  EXPECT_EQ(g->step_token_cap, 48);
  EXPECT_EQ(g->token_interval, absl::Milliseconds(96));
}

TEST(ConvertTest, PlacementRoundTripsOverTheWire) {
  auto config = LoadModelConfig(testing::TinyModelDir("qwen3_moe-tiny"));
  ASSERT_TRUE(config.ok()) << config.status();
  auto p = ContiguousPlacement(2, config->num_layers, config->num_experts);
  ASSERT_TRUE(p.ok());
  for (int l = 0; l < config->num_layers; ++l) {
    if (!config->IsMoeLayer(l)) p->replicas[l].clear();
  }
  p->replicas[0][3] = {1, 0};  // a replica
  const v1::Placement wire = PlacementToProto(*p, 9);
  EXPECT_EQ(wire.epoch(), 9u);
  int moe_layers = 0;
  for (int l = 0; l < config->num_layers; ++l) moe_layers += config->IsMoeLayer(l);
  EXPECT_EQ(wire.layers_size(), moe_layers);  // dense layers are not on the wire
  auto back = PlacementFromProto(wire, *config);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->replicas, p->replicas);
  EXPECT_EQ(back->num_ranks, 2);
}

TEST(ConvertTest, PlacementThatDoesNotFitTheModelIsRefused) {
  auto config = LoadModelConfig(testing::TinyModelDir("qwen3_moe-tiny"));
  ASSERT_TRUE(config.ok());
  auto p = ContiguousPlacement(2, config->num_layers, config->num_experts);
  ASSERT_TRUE(p.ok());
  v1::Placement wire = PlacementToProto(*p, 1);  // lists the dense layer 1 too
  EXPECT_THAT(std::string(PlacementFromProto(wire, *config).status().message()), HasSubstr("not a MoE layer"));
  wire.set_num_experts(config->num_experts + 1);
  EXPECT_THAT(std::string(PlacementFromProto(wire, *config).status().message()), HasSubstr("num_experts"));
  v1::Placement empty;
  empty.set_num_ranks(1);
  empty.set_num_experts(config->num_experts);
  EXPECT_THAT(std::string(PlacementFromProto(empty, *config).status().message()), HasSubstr("is missing"));
}

}  // namespace
}  // namespace joule::worker
