// Program options, declared once and read in one place by every Joule binary.
//
// A binary declares its options as an X-macro table of rows
// X(type, field, default, help) beside the struct that holds them:
//
//   #define JOULE_WORKER_FLAGS(X)
//     X(int64_t, kv_cache_mb, 256, "KV cache size in MiB") ...   (continued with '\')
//   struct WorkerConfig {
//     JOULE_WORKER_FLAGS(JOULE_OPTION_FIELD)
//     std::vector<Option> Options() { return {JOULE_WORKER_FLAGS(JOULE_OPTION_BIND)}; }
//     absl::Status Validate() const;
//   };
//
// and ParseConfig<WorkerConfig>(...) reads the environment (PREFIX_KV_CACHE_MB)
// and then the command line (--kv-cache-mb 64, --kv-cache-mb=64, --kv_cache_mb 64;
// a bool flag alone means true), and DescribeConfig prints "--name=value" lines
// for the start-up log.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace joule {

// One option. Its type is the type of the field it sets; its default is the
// field's value before parsing (the table's initializer), so neither is written
// twice.
struct Option {
  using Field = std::variant<std::string*, int*, int64_t*, uint64_t*, float*, double*, bool*>;
  std::string name;  // the field's name; typed with dashes or underscores after "--"
  Field field;
  std::string help;
};

// Expand a table row into a struct field, and into an Option bound to that
// field of `this` (inside a member function returning std::vector<Option>).
#define JOULE_OPTION_FIELD(type, field, def, help) type field = def;
#define JOULE_OPTION_BIND(type, field, def, help) ::joule::Option{#field, &this->field, help},

struct OptionsSpec {
  std::string usage;       // first line(s) of --help, e.g. "usage: joule-worker --model DIR [flags]"
  std::string env_prefix;  // "JOULE_WORKER_": --kv-cache-mb is also JOULE_WORKER_KV_CACHE_MB
  std::vector<Option> options;
};

// Sets the bound fields from the environment, then from argv[1..] (flags win).
// InvalidArgument naming the flag for an unknown flag, a missing or malformed
// value, or a positional argument. "--help" or "-h" gives Cancelled whose
// message is the usage text (see IsHelpRequest).
absl::Status ParseOptions(const OptionsSpec& spec, int argc, const char* const* argv);

// The usage line, then one entry per option with its type, the bound field's
// current value as the default, and its help.
std::string OptionsUsage(const OptionsSpec& spec);

// One "  --name=value" line per option, for the start-up log.
std::string DescribeOptions(const std::vector<Option>& options);

// True when a parse stopped at --help; the status message is the usage text.
bool IsHelpRequest(const absl::Status& status);

// For main() after a failed parse: --help prints the usage on stdout and gives
// exit status 0; anything else prints "program: message" on stderr and gives 2.
int ReportOptionsError(absl::string_view program, const absl::Status& status);

// Config: a struct with `std::vector<Option> Options()` binding its fields
// (JOULE_OPTION_BIND) and `absl::Status Validate() const`, checked after parsing.
template <typename Config>
absl::StatusOr<Config> ParseConfig(std::string usage, std::string env_prefix, int argc,
                                   const char* const* argv) {
  Config config;
  absl::Status status =
      ParseOptions(OptionsSpec{std::move(usage), std::move(env_prefix), config.Options()}, argc, argv);
  if (status.ok()) status = config.Validate();
  if (!status.ok()) return status;
  return config;
}

template <typename Config>
std::string DescribeConfig(const Config& config) {
  Config copy = config;  // Options() binds mutable fields
  return DescribeOptions(copy.Options());
}

}  // namespace joule
