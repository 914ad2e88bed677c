// ExchangeWindows: mapped together, grown geometrically, released in the
// order the mapper's memory needs (the Release callback before the free).
#include "worker/ep/exchange_windows.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

namespace joule::ep {
namespace {

class TestWindows : public SharedWindows {
 public:
  TestWindows(size_t bytes, std::vector<std::string>* log)
      : SharedWindows(1, bytes), log_(log) {}
  ~TestWindows() override { log_->push_back("free " + std::to_string(bytes())); }

 private:
  std::vector<std::string>* log_;
};

struct Recorder {
  std::vector<std::string> log;
  absl::Status release_status;
  ExchangeWindows Make() {
    return ExchangeWindows(
        [this](size_t bytes) -> absl::StatusOr<std::unique_ptr<SharedWindows>> {
          log.push_back("map " + std::to_string(bytes));
          return std::make_unique<TestWindows>(bytes, &log);
        },
        /*enabled=*/true, /*rank=*/0,
        [this](SharedWindows& w) {
          log.push_back("release " + std::to_string(w.bytes()));
          return release_status;
        });
  }
};

TEST(ExchangeWindows, GrowReleasesBeforeFreeingAndMapsTheLarger) {
  Recorder r;
  ExchangeWindows windows = r.Make();
  ASSERT_EQ(windows.Ensure(10, 20).value_or(false), true);
  ASSERT_EQ(windows.Ensure(10, 30).value_or(false), true);  // dispatch grows to 2 x 20
  EXPECT_EQ(r.log, (std::vector<std::string>{"map 10", "map 20", "release 20", "free 20", "map 40"}));
}

// An executor replaced while its group goes on: both windows released (the
// callback, then the free), and the next Ensure maps anew.
TEST(ExchangeWindows, ReleaseFreesBothAfterTheCallbackAndEnsureMapsAgain) {
  Recorder r;
  ExchangeWindows windows = r.Make();
  ASSERT_EQ(windows.Ensure(10, 20).value_or(false), true);
  r.log.clear();
  ASSERT_TRUE(windows.ReleaseAll().ok());
  EXPECT_EQ(r.log, (std::vector<std::string>{"release 10", "free 10", "release 20", "free 20"}));
  EXPECT_EQ(windows.combine(), nullptr);
  EXPECT_EQ(windows.dispatch(), nullptr);
  ASSERT_TRUE(windows.ReleaseAll().ok());  // nothing mapped: nothing to do
  EXPECT_EQ(r.log.size(), 4u);
  r.log.clear();
  ASSERT_EQ(windows.Ensure(10, 20).value_or(false), true);
  EXPECT_EQ(r.log, (std::vector<std::string>{"map 10", "map 20"}));
}

TEST(ExchangeWindows, AFailedReleaseIsReturned) {
  Recorder r;
  ExchangeWindows windows = r.Make();
  ASSERT_EQ(windows.Ensure(10, 20).value_or(false), true);
  r.release_status = absl::UnavailableError("barrier: peer 1 gone");
  const absl::Status s = windows.ReleaseAll();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(s.message(), "barrier: peer 1 gone");
}

}  // namespace
}  // namespace joule::ep
