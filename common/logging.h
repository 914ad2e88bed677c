// Minimal leveled logging to stderr. Abseil 20220623 (Debian 12) predates absl/log.
#pragma once

#include <sstream>
#include <string_view>

namespace joule {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Messages below this level are dropped. Set from JOULE_LOG_LEVEL (debug|info|warning|error).
LogLevel MinLogLevel();
void SetMinLogLevel(LogLevel level);

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

}  // namespace joule

#define JOULE_LOG(level)                                                             \
  if (::joule::LogLevel::k##level < ::joule::MinLogLevel()) {                        \
  } else                                                                             \
    ::joule::LogMessage(::joule::LogLevel::k##level, __FILE__, __LINE__).stream()
