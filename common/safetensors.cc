#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace joule {
namespace {

using json = nlohmann::json;

// The safetensors reference implementation refuses larger headers; so do we,
// which also bounds what a corrupt length field can make us parse.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr char kMetadataKey[] = "__metadata__";
constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr char kSingleFile[] = "model.safetensors";

absl::Status ErrnoError(int err, absl::string_view what, const std::string& path) {
  return absl::ErrnoToStatus(err, absl::StrCat(what, " ", path));
}

absl::Status FileError(const std::string& path, absl::string_view msg) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors file ", path, ": ", msg));
}

absl::Status TensorError(const std::string& path, absl::string_view tensor,
                         absl::string_view msg) {
  return absl::InvalidArgumentError(
      absl::StrCat("tensor '", tensor, "' in safetensors file ", path, ": ", msg));
}

// Debian's Abseil string_view is not std::string_view; StrCat needs this bridge.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

std::optional<DType> ParseDType(std::string_view s) {
  if (s == "F32") return DType::kF32;
  if (s == "F16") return DType::kF16;
  if (s == "BF16") return DType::kBF16;
  if (s == "F8_E4M3") return DType::kF8E4M3;
  return std::nullopt;
}

// A non-negative JSON integer that fits int64, or nullopt.
std::optional<int64_t> NonNegativeInt(const json& v) {
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i < 0) return std::nullopt;
    return i;
  }
  return std::nullopt;
}

// Product of dims; nullopt on int64 overflow.
std::optional<int64_t> CheckedNumel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, d, &n)) return std::nullopt;
  }
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool PathExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  if (dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

// Writes all of `size` bytes, retrying on EINTR and short writes.
absl::Status WriteAll(int fd, const void* data, size_t size, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, "cannot write", path);
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, "cannot open safetensors file", path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoError(err, "cannot stat safetensors file", path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return FileError(path, "not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return FileError(path, absl::StrCat("file is ", file_size,
                                        " bytes, shorter than the 8-byte header length"));
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (map == MAP_FAILED) return ErrnoError(map_errno, "cannot mmap safetensors file", path);

  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = file_size;
  ::madvise(map, file_size, MADV_NORMAL);

  const auto* bytes = static_cast<const unsigned char*>(map);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxHeaderBytes) {
    return FileError(path, absl::StrCat("header length ", header_len, " exceeds the ",
                                        kMaxHeaderBytes, "-byte limit (corrupt file?)"));
  }
  if (header_len > file_size - 8) {
    return FileError(path, absl::StrCat("header length ", header_len, " runs past the end of the ",
                                        file_size, "-byte file (truncated?)"));
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
  json header = json::parse(header_begin, header_begin + header_len, nullptr,
                            /*allow_exceptions=*/false);
  if (header.is_discarded()) return FileError(path, "header is not valid JSON");
  if (!header.is_object()) {
    return FileError(path, absl::StrCat("header must be a JSON object, got ", header.type_name()));
  }

  const uint64_t data_offset = 8 + header_len;
  const uint64_t data_size = file_size - data_offset;
  const unsigned char* data = bytes + data_offset;

  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  ranges.reserve(header.size());

  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) {
        return FileError(path, absl::StrCat("'__metadata__' must be an object, got ",
                                            entry.type_name()));
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return FileError(path, absl::StrCat("'__metadata__' value for key '", key,
                                              "' must be a string, got ", value.type_name()));
        }
        file->metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    if (!entry.is_object()) {
      return TensorError(path, name,
                         absl::StrCat("entry must be a JSON object, got ", entry.type_name()));
    }
    auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end()) return TensorError(path, name, "missing 'dtype'");
    if (!dtype_it->is_string()) {
      return TensorError(path, name,
                         absl::StrCat("'dtype' must be a string, got ", dtype_it->type_name()));
    }
    const std::string dtype_name = dtype_it->get<std::string>();
    std::optional<DType> dtype = ParseDType(dtype_name);
    if (!dtype) {
      return absl::InvalidArgumentError(
          absl::StrCat("unsupported dtype ", dtype_name, " for tensor '", name, "' in ", path,
                       " (supported: F32, F16, BF16)"));
    }

    auto shape_it = entry.find("shape");
    if (shape_it == entry.end()) return TensorError(path, name, "missing 'shape'");
    if (!shape_it->is_array()) {
      return TensorError(path, name,
                         absl::StrCat("'shape' must be an array, got ", shape_it->type_name()));
    }
    std::vector<int64_t> shape;
    shape.reserve(shape_it->size());
    for (const json& d : *shape_it) {
      std::optional<int64_t> v = NonNegativeInt(d);
      if (!v) {
        return TensorError(path, name,
                           absl::StrCat("'shape' entries must be non-negative integers, got ",
                                        d.dump()));
      }
      shape.push_back(*v);
    }

    auto offsets_it = entry.find("data_offsets");
    if (offsets_it == entry.end()) return TensorError(path, name, "missing 'data_offsets'");
    if (!offsets_it->is_array() || offsets_it->size() != 2) {
      return TensorError(path, name,
                         absl::StrCat("'data_offsets' must be [begin, end], got ",
                                      offsets_it->dump()));
    }
    std::optional<int64_t> begin = NonNegativeInt((*offsets_it)[0]);
    std::optional<int64_t> end = NonNegativeInt((*offsets_it)[1]);
    if (!begin || !end) {
      return TensorError(path, name,
                         absl::StrCat("'data_offsets' must be non-negative integers, got ",
                                      offsets_it->dump()));
    }
    if (*begin > *end) {
      return TensorError(path, name,
                         absl::StrCat("'data_offsets' begin ", *begin, " is after end ", *end));
    }

    std::optional<int64_t> numel = CheckedNumel(shape);
    int64_t expected_bytes = 0;
    if (!numel || __builtin_mul_overflow(*numel, static_cast<int64_t>(DTypeSize(*dtype)),
                                         &expected_bytes)) {
      return TensorError(path, name,
                         absl::StrCat("shape ", ShapeString(shape), " overflows the element count"));
    }
    const int64_t actual_bytes = *end - *begin;
    if (expected_bytes != actual_bytes) {
      return TensorError(path, name,
                         absl::StrCat("shape ", ShapeString(shape), " of ", dtype_name, " needs ",
                                      expected_bytes, " bytes but data_offsets [", *begin, ", ",
                                      *end, "] span ", actual_bytes));
    }
    if (static_cast<uint64_t>(*end) > data_size) {
      return TensorError(path, name,
                         absl::StrCat("data_offsets [", *begin, ", ", *end,
                                      "] exceed the data buffer of ", data_size,
                                      " bytes (truncated file?)"));
    }
    if ((data_offset + static_cast<uint64_t>(*begin)) % DTypeSize(*dtype) != 0) {
      return TensorError(path, name,
                         absl::StrCat("data at file offset ", data_offset + *begin,
                                      " is not aligned to ", DTypeSize(*dtype), " bytes for ",
                                      dtype_name));
    }

    TensorView view;
    view.name = name;
    view.dtype = *dtype;
    view.shape = std::move(shape);
    view.data = data + *begin;
    view.nbytes = static_cast<size_t>(actual_bytes);
    view.file = path;
    auto [it, inserted] = file->tensors_.emplace(name, std::move(view));
    ranges.push_back({static_cast<uint64_t>(*begin), static_cast<uint64_t>(*end), &it->first});
  }

  // Empty tensors occupy no bytes and cannot overlap anything.
  ranges.erase(std::remove_if(ranges.begin(), ranges.end(),
                              [](const Range& r) { return r.begin == r.end; }),
               ranges.end());
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      return TensorError(path, *ranges[i].name,
                         absl::StrCat("data_offsets [", ranges[i].begin, ", ", ranges[i].end,
                                      "] overlap tensor '", *ranges[i - 1].name, "' at [",
                                      ranges[i - 1].begin, ", ", ranges[i - 1].end, "]"));
    }
  }
  return file;
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

// ---------------------------------------------------------------------------
// Checkpoint
// ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;
  const std::string index_path = JoinPath(dir, kIndexFile);
  const std::string single_path = JoinPath(dir, kSingleFile);

  if (PathExists(index_path)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(index_path));
    json index = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": not valid JSON"));
    }
    if (!index.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": must be a JSON object, got ", index.type_name()));
    }
    auto wm = index.find("weight_map");
    if (wm == index.end()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": missing 'weight_map'"));
    }
    if (!wm->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": 'weight_map' must be an object, got ", wm->type_name()));
    }
    // shard -> first tensor mapped to it, for the error message.
    std::map<std::string, std::string> shards;
    for (const auto& [tensor, shard] : wm->items()) {
      if (!shard.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": 'weight_map' entry for tensor '", tensor,
                         "' must be a string, got ", shard.type_name()));
      }
      std::string file = shard.get<std::string>();
      if (file.empty() || file == "." || file.find('/') != std::string::npos ||
          file.find("..") != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": shard '", file, "' for tensor '", tensor,
                         "' must be a plain file name in the checkpoint directory"));
      }
      shards.emplace(file, tensor);
      ckpt->weight_map_.emplace(tensor, std::move(file));
    }
    for (const auto& [file, tensor] : shards) {
      const std::string shard_path = JoinPath(dir, file);
      if (!PathExists(shard_path)) {
        return absl::NotFoundError(absl::StrCat("shard ", shard_path, " (holding tensor '", tensor,
                                                "', listed in ", index_path, ") does not exist"));
      }
    }
    return ckpt;
  }

  if (PathExists(single_path)) {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(single_path));
    for (const auto& [name, view] : file->tensors()) ckpt->weight_map_.emplace(name, kSingleFile);
    ckpt->shards_.emplace(kSingleFile, std::move(file));
    return ckpt;
  }

  return absl::NotFoundError(absl::StrCat("no checkpoint in ", dir, ": looked for ", index_path,
                                          " and ", single_path));
}

absl::StatusOr<const SafetensorsFile*> Checkpoint::Shard(const std::string& file) const {
  // Callers hold mu_.
  auto it = shards_.find(file);
  if (it != shards_.end()) return it->second.get();
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> opened,
                   SafetensorsFile::Open(JoinPath(dir_, file)));
  const SafetensorsFile* raw = opened.get();
  shards_.emplace(file, std::move(opened));
  return raw;
}

absl::StatusOr<const TensorView*> Checkpoint::Get(std::string_view name) const {
  auto it = weight_map_.find(name);
  if (it == weight_map_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", Sv(name), "' not found in checkpoint ", dir_));
  }
  const SafetensorsFile* shard = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto opened = Shard(it->second);
    if (!opened.ok()) {
      return Annotate(opened.status(), absl::StrCat("loading tensor '", Sv(name), "'"));
    }
    shard = *opened;
  }
  // Shards are never closed while the Checkpoint lives, so the view stays valid.
  const TensorView* view = shard->Find(name);
  if (view == nullptr) {
    return absl::NotFoundError(absl::StrCat("tensor '", Sv(name), "' is listed in ",
                                            JoinPath(dir_, kIndexFile), " under shard '",
                                            it->second, "' but is absent from ", shard->path()));
  }
  return view;
}

bool Checkpoint::Has(std::string_view name) const {
  return weight_map_.find(name) != weight_map_.end();
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(weight_map_.size());
  for (const auto& [name, file] : weight_map_) names.push_back(name);
  return names;
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  // Wider dtypes first (stable otherwise), so every tensor is aligned to its
  // element size with no gaps: readers following the reference implementation
  // reject buffers with holes.
  std::vector<const TensorToWrite*> order;
  order.reserve(tensors.size());
  for (const TensorToWrite& t : tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    return DTypeSize(a->dtype) > DTypeSize(b->dtype);
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header[kMetadataKey] = std::move(meta);
  }
  std::set<std::string_view> seen;
  std::vector<size_t> sizes;
  sizes.reserve(order.size());
  uint64_t offset = 0;
  for (const TensorToWrite* t : order) {
    if (t->name.empty() || t->name == kMetadataKey) {
      return absl::InvalidArgumentError(
          absl::StrCat("writing ", path, ": invalid tensor name '", t->name, "'"));
    }
    if (!seen.insert(t->name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("writing ", path, ": duplicate tensor '", t->name, "'"));
    }
    for (int64_t d : t->shape) {
      if (d < 0) {
        return absl::InvalidArgumentError(absl::StrCat("writing ", path, ": tensor '", t->name,
                                                       "' has negative dimension in shape ",
                                                       ShapeString(t->shape)));
      }
    }
    std::optional<int64_t> numel = CheckedNumel(t->shape);
    int64_t nbytes = 0;
    if (!numel || __builtin_mul_overflow(*numel, static_cast<int64_t>(DTypeSize(t->dtype)),
                                         &nbytes)) {
      return absl::InvalidArgumentError(absl::StrCat("writing ", path, ": tensor '", t->name,
                                                     "' shape ", ShapeString(t->shape),
                                                     " overflows"));
    }
    if (nbytes > 0 && t->data == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("writing ", path, ": tensor '", t->name, "' has no data"));
    }
    header[t->name] = {{"dtype", std::string(DTypeName(t->dtype))},
                       {"shape", t->shape},
                       {"data_offsets", {offset, offset + static_cast<uint64_t>(nbytes)}}};
    offset += static_cast<uint64_t>(nbytes);
    sizes.push_back(static_cast<size_t>(nbytes));
  }

  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // invalid UTF-8 in a name or metadata
    return absl::InvalidArgumentError(
        absl::StrCat("writing ", path, ": cannot encode header: ", e.what()));
  }
  // Pad with spaces (valid JSON whitespace) so the data buffer starts 8-byte aligned.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  unsigned char len_bytes[8];
  uint64_t len = header_text.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(len >> (8 * i));

  const std::string tmp_path = path + ".tmp";
  int fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(errno, "cannot create", tmp_path);
  auto fail = [&](absl::Status s) {
    ::close(fd);
    ::unlink(tmp_path.c_str());
    return s;
  };
  absl::Status s = WriteAll(fd, len_bytes, sizeof(len_bytes), tmp_path);
  if (!s.ok()) return fail(s);
  s = WriteAll(fd, header_text.data(), header_text.size(), tmp_path);
  if (!s.ok()) return fail(s);
  for (size_t i = 0; i < order.size(); ++i) {
    if (sizes[i] == 0) continue;
    s = WriteAll(fd, order[i]->data, sizes[i], tmp_path);
    if (!s.ok()) return fail(s);
  }
  if (::fsync(fd) != 0) return fail(ErrnoError(errno, "cannot fsync", tmp_path));
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp_path.c_str());
    return ErrnoError(err, "cannot close", tmp_path);
  }
  if (::rename(tmp_path.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp_path.c_str());
    return ErrnoError(err, absl::StrCat("cannot rename ", tmp_path, " to"), path);
  }
  return absl::OkStatus();
}

}  // namespace joule
