// Random ids are 128 unguessable bits in hex; secrets compare equal only when
// equal (whatever their lengths); a key file keeps its keys and skips comments.
#include "common/secrets.h"

#include <cstdio>
#include <fstream>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;

TEST(SecretsTest, RequestIdsAre128RandomBitsInHex) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    const std::string id = NewRequestId("chatcmpl");
    ASSERT_THAT(id, MatchesRegex("chatcmpl-[0-9a-f]{32}"));
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 1000u);  // no repeats, so no counter to step
  // Two ids in a row share no structure a counter would leave (same high half).
  const std::string a = NewRequestId("x"), b = NewRequestId("x");
  EXPECT_NE(a.substr(2, 16), b.substr(2, 16));
  EXPECT_THAT(RandomHex(4), MatchesRegex("[0-9a-f]{8}"));
}

TEST(SecretsTest, SecretEqualsComparesContentAndLength) {
  EXPECT_TRUE(SecretEquals("sekret", "sekret"));
  EXPECT_FALSE(SecretEquals("sekret", "sekreT"));
  EXPECT_FALSE(SecretEquals("sekret", "sekret2"));  // a prefix is not a match
  EXPECT_FALSE(SecretEquals("sekret", ""));
  EXPECT_TRUE(SecretEquals("", ""));
}

TEST(SecretsTest, MatchesAnyOfSeveralKeys) {
  const std::vector<std::string> keys = {"alpha-key", "beta-key-longer"};
  EXPECT_TRUE(MatchesAnySecret("alpha-key", keys));
  EXPECT_TRUE(MatchesAnySecret("beta-key-longer", keys));
  EXPECT_FALSE(MatchesAnySecret("beta-key", keys));
  EXPECT_FALSE(MatchesAnySecret("", keys));
  EXPECT_FALSE(MatchesAnySecret("alpha-key", {}));
}

TEST(SecretsTest, KeyFileSkipsBlankLinesAndComments) {
  const std::string path = ::testing::TempDir() + "/keys.txt";
  {
    std::ofstream out(path);
    out << "# team A\nkey-one\n\n  key-two  \n# key-three is retired\n";
  }
  auto keys = ReadSecretsFile(path, "--api-key-file");
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_THAT(*keys, ElementsAre("key-one", "key-two"));

  {
    std::ofstream out(path);
    out << "# nothing but comments\n\n";
  }
  auto none = ReadSecretsFile(path, "--api-key-file");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("--api-key-file"));
  std::remove(path.c_str());
  auto missing = ReadSecretsFile(path, "--api-key-file");
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("--api-key-file"));
}

}  // namespace
}  // namespace joule
