#include "common/model_fingerprint.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/file.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace joule {
namespace {

// FNV-1a, 64 bit: tiny, dependency-free and stable across platforms. This is
// an identity check against mistakes, not a defence against forgery.
class Fnv1a64 {
 public:
  void Add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) {
      h_ ^= p[i];
      h_ *= 0x100000001b3ull;
    }
  }
  // Length-prefixed, so ("ab","c") and ("a","bc") hash differently.
  void AddString(const std::string& s) {
    AddU64(s.size());
    Add(s.data(), s.size());
  }
  void AddU64(uint64_t v) {
    unsigned char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(v >> (8 * i));
    Add(b, sizeof(b));
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xcbf29ce484222325ull;
};

}  // namespace

absl::StatusOr<std::string> ComputeModelFingerprint(const std::string& config_json,
                                                    std::vector<TensorSignature> tensors) {
  nlohmann::json config = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded()) {
    return absl::InvalidArgumentError("model fingerprint: config.json is not valid JSON");
  }
  std::sort(tensors.begin(), tensors.end(),
            [](const TensorSignature& a, const TensorSignature& b) { return a.name < b.name; });
  Fnv1a64 h;
  h.AddString("joule-model-fingerprint-v1");
  // nlohmann::json keeps object keys sorted, so dump() is canonical.
  h.AddString(config.dump());
  h.AddU64(tensors.size());
  for (const TensorSignature& t : tensors) {
    h.AddString(t.name);
    h.AddString(t.dtype);
    h.AddU64(t.shape.size());
    for (int64_t d : t.shape) h.AddU64(static_cast<uint64_t>(d));
  }
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(h.value()));
  return absl::StrCat("fnv1a64:", hex);
}

absl::StatusOr<std::string> ModelFingerprint(const std::string& model_dir) {
  const std::string config_path = model_dir + "/config.json";
  absl::StatusOr<std::string> text = ReadFile(config_path);
  if (!text.ok()) return Annotate(text.status(), "model fingerprint");

  auto checkpoint = Checkpoint::Open(model_dir);
  if (!checkpoint.ok()) return Annotate(checkpoint.status(), "model fingerprint");
  std::vector<TensorSignature> tensors;
  for (const std::string& name : (*checkpoint)->TensorNames()) {
    ASSIGN_OR_RETURN(const TensorView* view, (*checkpoint)->Get(name));
    tensors.push_back(TensorSignature{
        .name = name, .dtype = std::string(DTypeName(view->dtype)), .shape = view->shape});
  }
  auto fp = ComputeModelFingerprint(*text, std::move(tensors));
  if (!fp.ok()) return Annotate(fp.status(), config_path);
  return fp;
}

}  // namespace joule
