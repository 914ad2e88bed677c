// Helpers for tests that run transport ranks as real processes: marker files
// and spawning/reaping child processes with bounded waits. The address
// rendezvous itself is worker/ep/file_rendezvous.h.
#pragma once

#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace joule::ep::testing {

// Creates an empty marker file <dir>/<name>.
absl::Status Touch(const std::string& dir, const std::string& name);
// True once <dir>/<name> exists.
bool Exists(const std::string& dir, const std::string& name);

// A fresh temporary directory (under $TMPDIR or /tmp) and its recursive removal.
absl::StatusOr<std::string> MakeTempDir(const std::string& prefix);
void RemoveDir(const std::string& dir);

// Starts `argv[0]` with `argv`, the current environment plus `env` overrides.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv,
                            const std::map<std::string, std::string>& env);

// Waits for `pid` until `deadline`; returns its exit status as waitpid
// reports it. Past the deadline the child is killed (SIGKILL), reaped, and
// DeadlineExceeded returned, so no child outlives the test.
absl::StatusOr<int> WaitFor(pid_t pid, absl::Time deadline);

// "exited 0", "killed by signal 9", ...
std::string DescribeExit(int wait_status);

}  // namespace joule::ep::testing
