// Message translation: bad requests are refused naming the field; placements
// survive the wire both ways.
#include "worker/service/convert.h"

#include <functional>
#include <map>

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
  EXPECT_EQ(g->sampling.repetition_penalty, 1.0f);  // 0: off
  EXPECT_FALSE(g->sampling.ProcessesLogits());
  EXPECT_FALSE(g->sampling.NeedsHostLogits());
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

TEST(ConvertTest, CopiesPenaltiesBiasAndLogprobs) {
  v1::GenerateRequest r = Valid();
  v1::SamplingParams* s = r.mutable_sampling();
  s->set_presence_penalty(0.5f);
  s->set_frequency_penalty(-1.25f);
  s->set_repetition_penalty(1.1f);
  (*s->mutable_logit_bias())[5] = -100.0f;
  (*s->mutable_logit_bias())[9] = 2.5f;
  s->set_logprobs(true);
  s->set_top_logprobs(20);
  s->set_prompt_logprobs(true);
  auto g = ToGenerationRequest(r);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->sampling.presence_penalty, 0.5f);
  EXPECT_EQ(g->sampling.frequency_penalty, -1.25f);
  EXPECT_EQ(g->sampling.repetition_penalty, 1.1f);
  EXPECT_EQ(g->sampling.logit_bias, (std::map<int32_t, float>{{5, -100.0f}, {9, 2.5f}}));
  EXPECT_TRUE(g->sampling.logprobs);
  EXPECT_EQ(g->sampling.top_logprobs, 20);
  EXPECT_TRUE(g->sampling.prompt_logprobs);
}

TEST(ConvertTest, BadPenaltiesBiasOrLogprobsNameTheField) {
  auto message = [](const std::function<void(v1::SamplingParams*)>& set) {
    v1::GenerateRequest r = Valid();
    set(r.mutable_sampling());
    const absl::Status s = ToGenerationRequest(r).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    return std::string(s.message());
  };
  EXPECT_EQ(message([](auto* s) { s->set_presence_penalty(2.5f); }),
            "sampling.presence_penalty: must be in [-2, 2], got 2.5");
  EXPECT_THAT(message([](auto* s) { s->set_frequency_penalty(-3); }), HasSubstr("sampling.frequency_penalty"));
  EXPECT_THAT(message([](auto* s) { s->set_repetition_penalty(-1); }), HasSubstr("sampling.repetition_penalty"));
  EXPECT_EQ(message([](auto* s) { (*s->mutable_logit_bias())[-4] = 1; }),
            "sampling.logit_bias: token id -4 must be >= 0");
  EXPECT_EQ(message([](auto* s) { (*s->mutable_logit_bias())[4] = 101; }),
            "sampling.logit_bias: bias 101 for token id 4 must be in [-100, 100]");
  EXPECT_EQ(message([](auto* s) {
              s->set_logprobs(true);
              s->set_top_logprobs(21);
            }),
            "sampling.top_logprobs: must be in [0, 20], got 21");
  EXPECT_THAT(message([](auto* s) { s->set_top_logprobs(2); }), HasSubstr("sampling.top_logprobs: needs logprobs"));
}

TEST(ConvertTest, LogprobsGoOnTheWireMostLikelyFirst) {
  v1::TokenLogprob out;
  ToProto(TokenLogprob{.token = 7, .logprob = -0.25f, .top = {{3, -0.1f}, {7, -0.25f}}}, &out);
  EXPECT_EQ(out.token_id(), 7);
  EXPECT_EQ(out.logprob(), -0.25f);
  ASSERT_EQ(out.top_size(), 2);
  EXPECT_EQ(out.top(0).token_id(), 3);
  EXPECT_EQ(out.top(0).logprob(), -0.1f);
  EXPECT_EQ(out.top(1).token_id(), 7);
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
