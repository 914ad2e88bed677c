// The table-driven option parser every binary uses: defaults, both spellings,
// the environment under the flags, every type, and errors naming the flag.
#include "common/options.h"

#include <cstdlib>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule {
namespace {

using ::testing::HasSubstr;

#define TEST_FLAGS(X)                                        \
  X(std::string, name, "joule", "a string")                  \
  X(int, count, 3, "an int")                                 \
  X(int64_t, big, -5, "an int64")                            \
  X(uint64_t, seed, 1234, "a uint64")                        \
  X(float, ratio, 0.5f, "a float")                           \
  X(double, scale, 2.0, "a double")                          \
  X(bool, verbose, false, "a bool")                          \
  X(int, max_batch_tokens, 512, "a name with underscores")

struct TestFlags {
  TEST_FLAGS(JOULE_OPTION_FIELD)

  std::vector<Option> Options() { return {TEST_FLAGS(JOULE_OPTION_BIND)}; }
  absl::Status Validate() const {
    if (count < 0) return absl::InvalidArgumentError("--count: must be >= 0");
    return absl::OkStatus();
  }
};

absl::StatusOr<TestFlags> Parse(std::vector<const char*> args) {
  args.insert(args.begin(), "prog");
  return ParseConfig<TestFlags>("usage: prog [flags]", "JOULE_OPTIONS_TEST_", static_cast<int>(args.size()),
                                args.data());
}

std::string Error(std::vector<const char*> args) { return std::string(Parse(std::move(args)).status().message()); }

TEST(OptionsTest, DefaultsAreTheTableInitializers) {
  auto f = Parse({});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->name, "joule");
  EXPECT_EQ(f->count, 3);
  EXPECT_EQ(f->big, -5);
  EXPECT_EQ(f->seed, 1234u);
  EXPECT_EQ(f->ratio, 0.5f);
  EXPECT_EQ(f->scale, 2.0);
  EXPECT_FALSE(f->verbose);
  EXPECT_EQ(f->max_batch_tokens, 512);
}

TEST(OptionsTest, EveryTypeAndBothSpellings) {
  auto f = Parse({"--name", "x y", "--count=7", "--big", "-9000000000", "--seed=18446744073709551615",
                  "--ratio", "0.25", "--scale=1e-3", "--verbose", "--max-batch-tokens", "64"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->name, "x y");
  EXPECT_EQ(f->count, 7);
  EXPECT_EQ(f->big, -9000000000);
  EXPECT_EQ(f->seed, 18446744073709551615ull);
  EXPECT_EQ(f->ratio, 0.25f);
  EXPECT_EQ(f->scale, 1e-3);
  EXPECT_TRUE(f->verbose);
  EXPECT_EQ(f->max_batch_tokens, 64);

  f = Parse({"--max_batch_tokens=8", "--verbose=false", "--name="});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->max_batch_tokens, 8);
  EXPECT_FALSE(f->verbose);
  EXPECT_EQ(f->name, "");
}

TEST(OptionsTest, LastValueWins) {
  auto f = Parse({"--count", "1", "--count", "2"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->count, 2);
}

TEST(OptionsTest, EnvironmentUnderFlags) {
  setenv("JOULE_OPTIONS_TEST_COUNT", "11", 1);
  setenv("JOULE_OPTIONS_TEST_MAX_BATCH_TOKENS", "99", 1);
  setenv("JOULE_OPTIONS_TEST_VERBOSE", "true", 1);
  auto f = Parse({"--count", "12"});
  unsetenv("JOULE_OPTIONS_TEST_COUNT");
  unsetenv("JOULE_OPTIONS_TEST_MAX_BATCH_TOKENS");
  unsetenv("JOULE_OPTIONS_TEST_VERBOSE");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->count, 12);
  EXPECT_EQ(f->max_batch_tokens, 99);
  EXPECT_TRUE(f->verbose);
}

TEST(OptionsTest, MalformedEnvironmentNamesTheVariableAndTheFlag) {
  setenv("JOULE_OPTIONS_TEST_BIG", "lots", 1);
  const std::string error = Error({});
  unsetenv("JOULE_OPTIONS_TEST_BIG");
  EXPECT_THAT(error, HasSubstr("JOULE_OPTIONS_TEST_BIG (--big): 'lots' is not an integer"));
}

TEST(OptionsTest, ErrorsNameTheFlag) {
  EXPECT_THAT(Error({"--count", "x"}), HasSubstr("--count: 'x' is not an integer"));
  EXPECT_THAT(Error({"--count", "99999999999"}), HasSubstr("--count: '99999999999' is not an integer"));
  EXPECT_THAT(Error({"--seed", "-1"}), HasSubstr("--seed: '-1' is not a non-negative integer"));
  EXPECT_THAT(Error({"--ratio=fast"}), HasSubstr("--ratio: 'fast' is not a number"));
  EXPECT_THAT(Error({"--scale", ""}), HasSubstr("--scale: '' is not a number"));
  EXPECT_THAT(Error({"--verbose=maybe"}), HasSubstr("--verbose: 'maybe' is not true or false"));
  EXPECT_THAT(Error({"--bogus", "1"}), HasSubstr("unknown flag --bogus"));
  EXPECT_THAT(Error({"--name"}), HasSubstr("--name: missing value"));
  EXPECT_THAT(Error({"stray"}), HasSubstr("unexpected argument 'stray'"));
  EXPECT_THAT(Error({"-count", "1"}), HasSubstr("unexpected argument '-count'"));
  EXPECT_THAT(Error({"--verbose", "true"}), HasSubstr("unexpected argument 'true'"));  // bool takes no value
  EXPECT_THAT(Error({"--count", "-1"}), HasSubstr("--count: must be >= 0"));           // Validate runs
  EXPECT_EQ(Parse({"--bogus"}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(OptionsTest, HelpGivesUsageWithDefaults) {
  // The usage shows the defaults even when the environment sets a value.
  setenv("JOULE_OPTIONS_TEST_COUNT", "11", 1);
  absl::Status help = Parse({"--count", "5", "--help"}).status();
  unsetenv("JOULE_OPTIONS_TEST_COUNT");
  ASSERT_TRUE(IsHelpRequest(help)) << help;
  const std::string usage(help.message());
  EXPECT_THAT(usage, HasSubstr("usage: prog [flags]"));
  EXPECT_THAT(usage, HasSubstr("JOULE_OPTIONS_TEST_<NAME>"));
  EXPECT_THAT(usage, HasSubstr("--count (int, default '3')\n      an int"));
  EXPECT_THAT(usage, HasSubstr("--max-batch-tokens (int, default '512')"));
  EXPECT_THAT(usage, HasSubstr("--verbose (bool, default 'false')"));
  EXPECT_TRUE(IsHelpRequest(Parse({"-h"}).status()));
  EXPECT_FALSE(IsHelpRequest(Parse({"--bogus"}).status()));
}

TEST(OptionsTest, DescribeListsEveryValue) {
  auto f = Parse({"--count", "8", "--verbose", "--ratio", "0.75"});
  ASSERT_TRUE(f.ok()) << f.status();
  const std::string text = DescribeConfig(*f);
  EXPECT_THAT(text, HasSubstr("  --name=joule\n"));
  EXPECT_THAT(text, HasSubstr("  --count=8\n"));
  EXPECT_THAT(text, HasSubstr("  --seed=1234\n"));
  EXPECT_THAT(text, HasSubstr("  --ratio=0.75\n"));
  EXPECT_THAT(text, HasSubstr("  --verbose=true\n"));
  EXPECT_THAT(text, HasSubstr("  --max-batch-tokens=512\n"));
}

TEST(OptionsTest, ParseOptionsSetsOnlyTheBoundFields) {
  std::string host = "h";
  int port = 1;
  OptionsSpec spec{"usage: x", "", {{"host", &host, "host"}, {"port", &port, "port"}}};
  const char* argv[] = {"x", "--port=9"};
  ASSERT_TRUE(ParseOptions(spec, 2, argv).ok());
  EXPECT_EQ(host, "h");
  EXPECT_EQ(port, 9);
  // Without a prefix the environment is not read, and usage does not mention it.
  EXPECT_THAT(OptionsUsage(spec), ::testing::Not(HasSubstr("environment")));
}

}  // namespace
}  // namespace joule
