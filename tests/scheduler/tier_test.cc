#include "scheduler/tier.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule::scheduler {
namespace {

using ::testing::HasSubstr;

TEST(Tier, ParsesOpenAiServiceTier) {
  EXPECT_EQ(ParseServiceTier("fast").value(), Tier::kFast);
  EXPECT_EQ(ParseServiceTier("priority").value(), Tier::kPriority);
  EXPECT_EQ(ParseServiceTier("default").value(), Tier::kStandard);
  EXPECT_EQ(ParseServiceTier("auto").value(), Tier::kStandard);
  EXPECT_EQ(ParseServiceTier("").value(), Tier::kStandard);
  EXPECT_EQ(ParseServiceTier("flex").value(), Tier::kBatch);
}

TEST(Tier, RejectsUnknownValuesNamingTheField) {
  for (std::string bad : {"scale", "FAST", "standard", "batch", " fast"}) {
    auto tier = ParseServiceTier(bad);
    ASSERT_FALSE(tier.ok()) << bad;
    EXPECT_EQ(tier.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(tier.status().message(), HasSubstr("service_tier"));
    EXPECT_THAT(tier.status().message(), HasSubstr("\"" + bad + "\""));
    EXPECT_THAT(tier.status().message(),
                HasSubstr("\"fast\", \"priority\", \"default\", \"auto\" and \"flex\""));
  }
}

TEST(Tier, BoundsTheEchoedValue) {
  auto tier = ParseServiceTier(std::string(10000, 'x'));
  ASSERT_FALSE(tier.ok());
  EXPECT_LT(tier.status().message().size(), 300u);
}

TEST(Tier, Names) {
  EXPECT_EQ(TierName(Tier::kFast), "fast");
  EXPECT_EQ(TierName(Tier::kPriority), "priority");
  EXPECT_EQ(TierName(Tier::kStandard), "standard");
  EXPECT_EQ(TierName(Tier::kBatch), "batch");
  EXPECT_EQ(OpenAiServiceTier(Tier::kFast), "fast");
  EXPECT_EQ(OpenAiServiceTier(Tier::kPriority), "priority");
  EXPECT_EQ(OpenAiServiceTier(Tier::kStandard), "default");
  EXPECT_EQ(OpenAiServiceTier(Tier::kBatch), "flex");
}

TEST(Tier, OpenAiValueRoundTrips) {
  for (Tier tier : kAllTiers) {
    auto parsed = ParseServiceTier(OpenAiServiceTier(tier));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, tier) << TierName(tier);
  }
}

}  // namespace
}  // namespace joule::scheduler
