// A model fingerprint: identifies a checkpoint so that the coordinator can
// refuse a worker that serves a different model (or a different version of it).
//
// The fingerprint covers config.json (parsed and re-serialized with sorted
// keys, so whitespace and key order do not matter) and every tensor's name,
// dtype and shape, but not the weight bytes: it is cheap (headers only) and two
// hosts holding copies of the same checkpoint compute the same value.
// Format: "fnv1a64:" followed by 16 lowercase hex digits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace joule {

struct TensorSignature {
  std::string name;
  std::string dtype;  // "F32", "F16", "BF16"
  std::vector<int64_t> shape;
};

// Pure function of its inputs; the order of `tensors` does not matter.
// InvalidArgument when config_json is not valid JSON.
absl::StatusOr<std::string> ComputeModelFingerprint(const std::string& config_json,
                                                    std::vector<TensorSignature> tensors);

// Reads DIR/config.json and the safetensors headers of checkpoint DIR.
// Errors name the file that could not be read.
absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir);

}  // namespace joule
