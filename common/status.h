// Status helpers shared by every component. Errors are values (absl::Status);
// these macros keep call sites short and preserve the original message.
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define JOULE_STATUS_CONCAT_INNER_(a, b) a##b
#define JOULE_STATUS_CONCAT_(a, b) JOULE_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` is not OK.
#define RETURN_IF_ERROR(expr)                        \
  do {                                               \
    ::absl::Status joule_status_ = (expr);           \
    if (!joule_status_.ok()) return joule_status_;   \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the error.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  ASSIGN_OR_RETURN_IMPL_(JOULE_STATUS_CONCAT_(joule_statusor_, __LINE__), lhs, rexpr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                           \
  if (!tmp.ok()) return std::move(tmp).status(); \
  lhs = std::move(tmp).value()

namespace joule {

// Prefixes a non-OK status with context ("loading layer 3: ...") keeping its code.
inline absl::Status Annotate(const absl::Status& s, std::string_view context) {
  if (s.ok()) return s;
  // Debian's Abseil has its own absl::string_view (not std::string_view), which
  // StrCat does not take from a std::string_view: convert explicitly.
  return absl::Status(s.code(),
                      absl::StrCat(absl::string_view(context.data(), context.size()), ": ",
                                   s.message()));
}

}  // namespace joule
