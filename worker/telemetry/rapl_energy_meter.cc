#include "worker/telemetry/rapl_energy_meter.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <regex>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "common/status.h"

namespace joule::telemetry {
namespace {

namespace fs = std::filesystem;

absl::StatusOr<uint64_t> ReadCounter(const SysfsReader& read, const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, read(path));
  uint64_t v = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &v)) {
    return absl::DataLossError(absl::StrCat(path, ": not an unsigned integer: '",
                                            absl::StripAsciiWhitespace(text), "'"));
  }
  return v;
}

std::vector<fs::path> SortedEntries(const fs::path& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

absl::StatusOr<std::string> ReadSysfsFile(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) {
    const int err = errno;
    const std::string msg = absl::StrCat("cannot read ", path, ": ", std::strerror(err));
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
    if (err == ENOENT) return absl::NotFoundError(msg);
    return absl::UnavailableError(msg);
  }
  char buf[256];
  const size_t n = std::fread(buf, 1, sizeof(buf), f);
  const int err = std::ferror(f) ? errno : 0;
  std::fclose(f);
  if (err != 0) {
    const std::string msg = absl::StrCat("cannot read ", path, ": ", std::strerror(err));
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
    return absl::UnavailableError(msg);
  }
  return std::string(buf, n);
}

absl::StatusOr<std::unique_ptr<RaplEnergyMeter>> RaplEnergyMeter::Create(const RaplOptions& options) {
  SysfsReader read = options.reader ? options.reader : SysfsReader(ReadSysfsFile);
  std::vector<Counter> counters;
  const fs::path root(options.sysfs_root);

  // Top-level zones only: "intel-rapl:0" is a package, "intel-rapl:0:1" a sub-zone.
  static const std::regex kZone(R"((intel|amd)-rapl:\d+)");
  for (const fs::path& zone : SortedEntries(root / "class" / "powercap")) {
    if (!std::regex_match(zone.filename().string(), kZone)) continue;
    absl::StatusOr<std::string> name = read((zone / "name").string());
    if (!name.ok()) continue;  // not a zone we can identify: skip rather than double count
    const std::string zone_name(absl::StripAsciiWhitespace(*name));
    if (!absl::StartsWith(zone_name, "package")) continue;  // psys overlaps the packages
    Counter c;
    c.name = zone_name;
    c.energy_path = (zone / "energy_uj").string();
    ASSIGN_OR_RETURN(c.max_range_uj, ReadCounter(read, (zone / "max_energy_range_uj").string()));
    counters.push_back(std::move(c));
  }
  if (counters.empty()) {
    // The amd_energy hwmon driver: 64-bit accumulated microjoules per socket.
    for (const fs::path& hwmon : SortedEntries(root / "class" / "hwmon")) {
      absl::StatusOr<std::string> name = read((hwmon / "name").string());
      if (!name.ok() || absl::StripAsciiWhitespace(*name) != "amd_energy") continue;
      for (int i = 1; i <= 1024; ++i) {
        absl::StatusOr<std::string> label = read((hwmon / absl::StrCat("energy", i, "_label")).string());
        if (!label.ok()) break;
        const std::string l(absl::StripAsciiWhitespace(*label));
        if (!absl::StartsWith(l, "Esocket")) continue;  // per-core counters are inside the socket
        counters.push_back(Counter{l, (hwmon / absl::StrCat("energy", i, "_input")).string(), 0, 0});
      }
    }
  }
  if (counters.empty()) {
    return absl::UnavailableError(absl::StrCat(
        "RAPL not available: no package energy counter under ", (root / "class" / "powercap").string(),
        " (intel-rapl:N / amd-rapl:N) or an amd_energy hwmon"));
  }
  // The first read is the origin; it also surfaces root-only counters at start-up.
  for (Counter& c : counters) {
    absl::StatusOr<uint64_t> v = ReadCounter(read, c.energy_path);
    if (!v.ok()) {
      if (absl::IsPermissionDenied(v.status())) {
        return absl::PermissionDeniedError(absl::StrCat(
            v.status().message(),
            " (RAPL energy is root-only since Linux 5.10: run as root or grant read access, e.g. "
            "chmod o+r ",
            c.energy_path, ")"));
      }
      return Annotate(v.status(), absl::StrCat("RAPL ", c.name));
    }
    c.last_uj = *v;
  }
  return std::unique_ptr<RaplEnergyMeter>(new RaplEnergyMeter(std::move(read), std::move(counters)));
}

RaplEnergyMeter::RaplEnergyMeter(SysfsReader reader, std::vector<Counter> counters)
    : reader_(std::move(reader)), counters_(std::move(counters)) {}

absl::StatusOr<double> RaplEnergyMeter::ReadJoules() {
  absl::MutexLock lock(&mu_);
  // Read every package first, so a failure leaves no package half-advanced.
  std::vector<uint64_t> now(counters_.size());
  for (size_t i = 0; i < counters_.size(); ++i) {
    ASSIGN_OR_RETURN(now[i], ReadCounter(reader_, counters_[i].energy_path));
  }
  for (size_t i = 0; i < counters_.size(); ++i) {
    Counter& c = counters_[i];
    uint64_t delta_uj = 0;
    if (now[i] >= c.last_uj) {
      delta_uj = now[i] - c.last_uj;
    } else if (c.max_range_uj > c.last_uj) {
      // Wrapped once since the last read: up to the range, then from zero.
      delta_uj = (c.max_range_uj - c.last_uj) + now[i];
    }  // else: a counter went backwards without a known range (reset): count nothing
    c.last_uj = now[i];
    total_joules_ += static_cast<double>(delta_uj) * 1e-6;
  }
  return total_joules_;
}

std::string RaplEnergyMeter::Describe() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> names;
  for (const Counter& c : counters_) names.push_back(c.name);
  return absl::StrCat(counters_.size(), " RAPL package", counters_.size() == 1 ? "" : "s", " (",
                      absl::StrJoin(names, ", "), ")");
}

}  // namespace joule::telemetry
