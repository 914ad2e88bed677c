// Typed, exception-free access to the fields of config.json (internal to
// worker/model: config.cc and the per-family parsers).
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "worker/model/config.h"

namespace joule::config_internal {

using json = nlohmann::json;

inline std::string Describe(const json& v) {
  if (v.is_number() || v.is_boolean()) return absl::StrCat(v.type_name(), " ", v.dump());
  return v.type_name();
}

// A JSON null counts as absent (Hugging Face writes null for unset optional
// fields). Errors are InvalidArgument "SOURCE: field 'NAME' ...".
class Fields {
 public:
  Fields(const json& root, const std::string& source, std::string prefix = "")
      : root_(root), source_(source), prefix_(std::move(prefix)) {}
  // The fields of the object `value` of field `field` (errors name them
  // "field.key").
  Fields Nested(absl::string_view field, const json& value) const {
    return Fields(value, source_, absl::StrCat(prefix_, field, "."));
  }
  const json& root() const { return root_; }

  absl::Status Error(absl::string_view field, absl::string_view msg) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ": field '", prefix_, field, "' ", msg));
  }
  absl::Status TypeError(absl::string_view field, absl::string_view want, const json& got) const {
    return Error(field, absl::StrCat("must be ", want, ", got ", Describe(got)));
  }

  const json* Find(absl::string_view field) const {
    auto it = root_.find(std::string(field));
    if (it == root_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  bool Has(absl::string_view field) const { return Find(field) != nullptr; }
  // Present at all, null included.
  bool Contains(absl::string_view field) const { return root_.contains(std::string(field)); }

  absl::StatusOr<std::optional<int64_t>> OptInt(absl::string_view field) const {
    const json* v = Find(field);
    if (v == nullptr) return std::optional<int64_t>();
    return AsInt(field, *v);
  }
  absl::StatusOr<int64_t> AsInt(absl::string_view field, const json& v) const {
    if (v.is_number_unsigned()) {
      uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Error(field, absl::StrCat("is out of range: ", v.dump()));
      }
      return static_cast<int64_t>(u);
    }
    if (v.is_number_integer()) return v.get<int64_t>();
    return TypeError(field, "an integer", v);
  }
  absl::StatusOr<int64_t> RequiredInt(absl::string_view field) const {
    ASSIGN_OR_RETURN(std::optional<int64_t> v, OptInt(field));
    if (!v) return Error(field, "is required");
    return *v;
  }
  // A strictly positive integer that fits `int`, from the field or `fallback`.
  absl::StatusOr<int64_t> Positive(absl::string_view field, std::optional<int64_t> fallback,
                                   bool fits_int = false) const {
    ASSIGN_OR_RETURN(std::optional<int64_t> v, OptInt(field));
    if (!v) v = fallback;
    if (!v) return Error(field, "is required");
    if (*v <= 0) return Error(field, absl::StrCat("must be positive, got ", *v));
    if (fits_int && *v > std::numeric_limits<int>::max()) {
      return Error(field, absl::StrCat("is too large: ", *v));
    }
    return *v;
  }
  absl::StatusOr<float> PositiveFloat(absl::string_view field, float fallback) const {
    const json* v = Find(field);
    if (v == nullptr) return fallback;
    return AsPositiveFloat(field, *v);
  }
  // A number that stays positive and finite as a float (the engine computes in
  // float: 1e300 would become inf and 1e-50 zero).
  absl::StatusOr<float> AsPositiveFloat(absl::string_view field, const json& v) const {
    if (!v.is_number()) return TypeError(field, "a number", v);
    const double d = v.get<double>();
    if (!(d >= std::numeric_limits<float>::denorm_min()) || d > std::numeric_limits<float>::max()) {
      return Error(field, absl::StrCat("must be a positive number within float range, got ", v.dump()));
    }
    return static_cast<float>(d);
  }
  absl::StatusOr<bool> Bool(absl::string_view field, bool fallback) const {
    const json* v = Find(field);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) return TypeError(field, "a boolean", *v);
    return v->get<bool>();
  }
  absl::StatusOr<std::optional<std::string>> OptString(absl::string_view field) const {
    const json* v = Find(field);
    if (v == nullptr) return std::optional<std::string>();
    if (!v->is_string()) return TypeError(field, "a string", *v);
    return std::optional<std::string>(v->get<std::string>());
  }
  // An integer, a list of integers, or null/absent (empty list).
  absl::StatusOr<std::vector<int64_t>> IntOrList(absl::string_view field) const {
    std::vector<int64_t> out;
    const json* v = Find(field);
    if (v == nullptr) return out;
    if (v->is_array()) {
      for (const json& e : *v) {
        if (!e.is_number_integer()) return TypeError(field, "an integer or a list of integers", e);
        ASSIGN_OR_RETURN(int64_t i, AsInt(field, e));
        out.push_back(i);
      }
      return out;
    }
    if (!v->is_number_integer()) return TypeError(field, "an integer or a list of integers", *v);
    ASSIGN_OR_RETURN(int64_t i, AsInt(field, *v));
    out.push_back(i);
    return out;
  }

 private:
  const json& root_;
  const std::string& source_;
  std::string prefix_;
};

// The DeepseekV3ForCausalLM fields of `f` into `c` (whose family, architecture
// and model_type are set): config_deepseek_v3.cc.
absl::Status ParseDeepseekV3(const Fields& f, ModelConfig* c);

}  // namespace joule::config_internal
