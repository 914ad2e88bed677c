// Where tests find the source tree and the build tree: compiled in by
// joule_add_test (tests/CMakeLists.txt), overridable from the environment.
#pragma once

#include <cstdlib>
#include <string>

namespace joule::testing {

inline std::string SourceDir() {
  const char* d = std::getenv("JOULE_SOURCE_DIR");
  return d ? d : JOULE_SOURCE_DIR;
}

inline std::string BinaryDir() {
  const char* d = std::getenv("JOULE_BINARY_DIR");
  return d ? d : JOULE_BINARY_DIR;
}

// A built-in tiny model made by the tiny_models ctest fixture, e.g. "qwen3_moe-tiny".
inline std::string TinyModelDir(const std::string& name) { return BinaryDir() + "/models/" + name; }

}  // namespace joule::testing
