// Reading and writing Hugging Face safetensors files.
//
// A file is mmapped read-only; tensors are views into the mapping, so a worker
// that touches only its own experts keeps only those pages resident. A
// `Checkpoint` is a directory holding either `model.safetensors` or a sharded
// set described by `model.safetensors.index.json`.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace joule {

struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // points into the file's mapping
  size_t nbytes = 0;
  std::string file;  // path of the file holding it, for error messages

  int64_t numel() const;
};

// One mmapped .safetensors file. Open() validates the whole header: JSON shape,
// dtypes, shapes against byte ranges, ranges inside the file, no overlaps.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // nullptr when absent.
  const TensorView* Find(std::string_view name) const;
  const std::map<std::string, TensorView, std::less<>>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory: single file or sharded via model.safetensors.index.json.
// Shards are opened lazily on first access to one of their tensors; every shard
// the index names must exist when Open() runs. Get() is safe to call from
// several threads; returned views stay valid for the Checkpoint's lifetime.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // Error names the tensor and the checkpoint when absent.
  absl::StatusOr<const TensorView*> Get(std::string_view name) const;
  bool Has(std::string_view name) const;
  // Every tensor name in the checkpoint.
  std::vector<std::string> TensorNames() const;

 private:
  Checkpoint() = default;
  absl::StatusOr<const SafetensorsFile*> Shard(const std::string& file) const;

  std::string dir_;
  std::map<std::string, std::string, std::less<>> weight_map_;  // tensor -> shard file name
  mutable std::mutex mu_;  // guards shards_
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
};

// Tensor to be written. `data` must hold numel * DTypeSize(dtype) bytes.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// Writes a safetensors file atomically (PATH.tmp, then rename). The header is
// padded so data starts 8-byte aligned; tensors are laid out in the given order
// except that wider dtypes precede narrower ones (F32, then F16/BF16, then
// F8_E4M3), which keeps every tensor aligned to its element size without gaps
// (the reference readers reject gaps).
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace joule
