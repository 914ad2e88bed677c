// Whole-file reads for the small text files Joule loads (config.json,
// tokenizer.json, index files, scheduler configs).
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace joule {

// The file's bytes. Errors come from errno and name the path: NotFound for a
// missing file, PermissionDenied, ... ("cannot open PATH: ...").
absl::StatusOr<std::string> ReadFile(const std::string& path);

}  // namespace joule
