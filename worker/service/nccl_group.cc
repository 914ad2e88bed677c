#include "worker/service/nccl_group.h"

#include <map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace joule::worker {
namespace {

constexpr std::string_view kFormat = "joule-nccl/";
constexpr std::string_view kVersion = "joule-nccl/1";

std::string ToHex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * bytes.size());
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool FromHex(std::string_view hex, std::string* bytes) {
  if (hex.size() % 2 != 0) return false;
  bytes->clear();
  for (size_t i = 0; i < hex.size(); i += 2) {
    const int hi = HexDigit(hex[i]), lo = HexDigit(hex[i + 1]);
    if (hi < 0 || lo < 0) return false;
    bytes->push_back(static_cast<char>(hi << 4 | lo));
  }
  return true;
}

std::string_view Sv(absl::string_view s) { return std::string_view(s.data(), s.size()); }

}  // namespace

std::string EncodeNcclDescriptor(const NcclRankDescriptor& d) {
  std::string out = absl::StrCat(absl::string_view(kVersion.data(), kVersion.size()),
                                 ";host=", d.host, ";device=", d.device, ";pci=", d.pci_bus_id);
  if (!d.unique_id.empty()) absl::StrAppend(&out, ";id=", ToHex(d.unique_id));
  return out;
}

absl::StatusOr<NcclRankDescriptor> ParseNcclDescriptor(std::string_view text) {
  const std::vector<absl::string_view> fields =
      absl::StrSplit(absl::string_view(text.data(), text.size()), ';');
  const std::string_view head = Sv(fields[0]);
  if (head.substr(0, kFormat.size()) != kFormat) {
    return absl::InvalidArgumentError(
        "not a joule-nccl descriptor (a worker with another --transport?)");
  }
  if (head != kVersion) {
    return absl::InvalidArgumentError(absl::StrCat(
        "descriptor version ", absl::string_view(head.data(), head.size()), ", this worker reads ",
        absl::string_view(kVersion.data(), kVersion.size()),
        " (run one joule-worker release on every rank)"));
  }
  NcclRankDescriptor d;
  for (size_t i = 1; i < fields.size(); ++i) {
    const size_t eq = fields[i].find('=');
    if (eq == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("field '", fields[i], "' is not key=value"));
    }
    const absl::string_view key = fields[i].substr(0, eq), value = fields[i].substr(eq + 1);
    if (key == "host") {
      d.host = std::string(value);
    } else if (key == "device") {
      d.device = std::string(value);
    } else if (key == "pci") {
      d.pci_bus_id = std::string(value);
    } else if (key == "id") {
      if (!FromHex(Sv(value), &d.unique_id)) {
        return absl::InvalidArgumentError("id: not an even number of hex digits");
      }
    }  // a later version's keys: ignored
  }
  if (d.device.empty()) return absl::InvalidArgumentError("device: missing");
  return d;
}

absl::StatusOr<std::string> CheckNcclGroup(const std::vector<std::string>& descriptors) {
  std::vector<NcclRankDescriptor> ranks;
  for (size_t r = 0; r < descriptors.size(); ++r) {
    absl::StatusOr<NcclRankDescriptor> d = ParseNcclDescriptor(descriptors[r]);
    if (!d.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rendezvous: rank ", r, "'s transport address: ", d.status().message(),
          "; every rank of an NCCL group runs joule-worker --transport nccl of the same release"));
    }
    ranks.push_back(*std::move(d));
  }
  std::vector<std::string> on_cpu;
  for (size_t r = 0; r < ranks.size(); ++r) {
    if (!absl::StartsWith(ranks[r].device, "cuda")) {
      on_cpu.push_back(absl::StrCat(r, " (", ranks[r].device, " on ", ranks[r].host, ")"));
    }
  }
  if (!on_cpu.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--transport nccl needs --device cuda:N: rank", on_cpu.size() > 1 ? "s " : " ",
        absl::StrJoin(on_cpu, ", "),
        on_cpu.size() > 1 ? " compute" : " computes",
        " on a CPU; NCCL moves GPU memory only (CPU workers use --transport ucx)"));
  }
  // One GPU per rank: by host and PCI bus id (the device ordinal where the
  // bus id is unknown; CUDA_VISIBLE_DEVICES renumbers ordinals per process).
  std::map<std::pair<std::string, std::string>, std::vector<size_t>> by_gpu;
  for (size_t r = 0; r < ranks.size(); ++r) {
    const std::string& gpu = ranks[r].pci_bus_id.empty() ? ranks[r].device : ranks[r].pci_bus_id;
    by_gpu[{ranks[r].host, gpu}].push_back(r);
  }
  std::vector<std::string> shared;
  for (const auto& [gpu, members] : by_gpu) {
    if (members.size() < 2) continue;
    std::vector<std::string> devices;
    for (size_t r : members) devices.push_back(ranks[r].device);
    shared.push_back(absl::StrCat("ranks ", absl::StrJoin(members, " and "),
                                  " compute on one GPU of host ", gpu.first, " (",
                                  ranks[members[0]].pci_bus_id.empty()
                                      ? ""
                                      : absl::StrCat("PCI ", ranks[members[0]].pci_bus_id, ", "),
                                  absl::StrJoin(devices, " / "), ")"));
  }
  if (!shared.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        absl::StrJoin(shared, "; "),
        ": NCCL cannot put two ranks on one device; use --transport ucx: rows then go through "
        "CUDA IPC windows"));
  }
  if (ranks.empty() || ranks[0].unique_id.empty()) {
    return absl::InvalidArgumentError("rendezvous: rank 0 sent no NCCL unique id");
  }
  return ranks[0].unique_id;
}

}  // namespace joule::worker
