#include "common/safetensors.h"

#include <stdlib.h>
#include <sys/stat.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = testing::TempDir() + "/safetensors_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  static void WriteBytes(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(out.good()) << path;
  }

  static std::string LengthPrefix(uint64_t n) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    return s;
  }

  // A raw safetensors file: length prefix, header padded to 8 bytes, data.
  std::string WriteRaw(const std::string& name, std::string header, size_t data_bytes) {
    header.append((8 - header.size() % 8) % 8, ' ');
    std::string path = Path(name);
    WriteBytes(path, LengthPrefix(header.size()) + header + std::string(data_bytes, '\x01'));
    return path;
  }

  static std::string ReadBytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  // Opening `path` must fail with InvalidArgument naming the file and every
  // string in `needles` (tensor names, dtype, ...).
  static void ExpectOpenError(const std::string& path, const std::vector<std::string>& needles) {
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok()) << path;
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(path));
    for (const std::string& n : needles) {
      EXPECT_THAT(std::string(file.status().message()), HasSubstr(n));
    }
  }

  std::string dir_;
};

TEST_F(SafetensorsTest, RoundTripPreservesBytesShapesDtypesAndAlignment) {
  std::vector<float> f32 = {1.f, -2.f, 3.5f, 0.f, 1e-3f, 42.f};
  std::vector<uint16_t> f16 = {F32ToF16(1.f), F32ToF16(-0.5f), F32ToF16(65504.f)};  // 6 bytes
  std::vector<uint16_t> bf16 = {F32ToBf16(1.f), F32ToBf16(2.f), F32ToBf16(-3.f), F32ToBf16(4.f)};
  std::vector<float> f32_after = {7.f, 8.f, 9.f};  // would be misaligned if laid out after f16
  float scalar = 3.25f;
  std::vector<uint8_t> f8 = {0x38, 0xfe, 0x01};  // 1, -448, 2^-9: 3 bytes, laid out last

  std::vector<TensorToWrite> tensors = {
      {"model.embed_tokens.weight", DType::kF32, {2, 3}, f32.data()},
      {"layers.0.norm.weight", DType::kF16, {3}, f16.data()},
      {"layers.0.mlp.gate.weight", DType::kBF16, {4, 1}, bf16.data()},
      {"layers.0.after_f16", DType::kF32, {3}, f32_after.data()},
      {"scalar", DType::kF32, {}, &scalar},
      {"empty", DType::kF16, {0, 5}, nullptr},
      {"layers.0.mlp.down_proj.weight", DType::kF8E4M3, {1, 3}, f8.data()},
  };
  std::map<std::string, std::string> metadata = {{"format", "pt"}, {"joule", "test"}};
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, metadata).ok());
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  // Layout: header padded to 8, __metadata__ first, data contiguous (no gaps).
  std::string raw = ReadBytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(raw[i]);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(raw.compare(8, 16, "{\"__metadata__\":"), 0) << raw.substr(8, 40);
  size_t total = 0;
  for (const auto& t : tensors) {
    size_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<size_t>(d);
    total += numel * DTypeSize(t.dtype);
  }
  EXPECT_EQ(raw.size(), 8 + n + total);

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), metadata);
  EXPECT_EQ((*file)->tensors().size(), tensors.size());
  for (const auto& t : tensors) {
    SCOPED_TRACE(t.name);
    const TensorView* v = (*file)->Find(t.name);
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(v->name, t.name);
    EXPECT_EQ(v->dtype, t.dtype);
    EXPECT_EQ(v->shape, t.shape);
    EXPECT_EQ(v->file, path);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v->data) % DTypeSize(t.dtype), 0u);
    EXPECT_EQ(v->nbytes, static_cast<size_t>(v->numel()) * DTypeSize(t.dtype));
    if (v->nbytes > 0) {
      EXPECT_EQ(std::memcmp(v->data, t.data, v->nbytes), 0);
    }
  }
  EXPECT_EQ((*file)->Find("scalar")->numel(), 1);
  EXPECT_EQ((*file)->Find("empty")->numel(), 0);
  EXPECT_EQ((*file)->Find("missing"), nullptr);
  EXPECT_EQ(reinterpret_cast<const float*>((*file)->Find("layers.0.after_f16")->data)[2], 9.f);
}

TEST_F(SafetensorsTest, RewriteReplacesFileAtomically) {
  const std::string path = Path("w.safetensors");
  float a = 1.f, b = 2.f;
  ASSERT_TRUE(WriteSafetensors(path, {{"a", DType::kF32, {1}, &a}}).ok());
  ASSERT_TRUE(WriteSafetensors(path, {{"b", DType::kF32, {1}, &b}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Find("a"), nullptr);
  ASSERT_NE((*file)->Find("b"), nullptr);
  EXPECT_TRUE((*file)->metadata().empty());
}

TEST_F(SafetensorsTest, WriteErrorsNameThePath) {
  float a = 1.f;
  const std::string path = Path("no_such_dir/x.safetensors");
  absl::Status s = WriteSafetensors(path, {{"a", DType::kF32, {1}, &a}});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(path));

  s = WriteSafetensors(Path("dup.safetensors"),
                       {{"a", DType::kF32, {1}, &a}, {"a", DType::kF32, {1}, &a}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("duplicate tensor 'a'"));
  s = WriteSafetensors(Path("utf8.safetensors"), {{"bad\xff", DType::kF32, {1}, &a}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr(Path("utf8.safetensors")));
  s = WriteSafetensors(Path("neg.safetensors"), {{"n", DType::kF32, {-1}, &a}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(Path("neg.safetensors")));
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  auto file = SafetensorsFile::Open(Path("absent.safetensors"));
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(Path("absent.safetensors")));
}

TEST_F(SafetensorsTest, FileShorterThanLengthPrefix) {
  const std::string path = Path("short.safetensors");
  WriteBytes(path, "\x05\x00\x00");
  ExpectOpenError(path, {"shorter than the 8-byte header length"});
  WriteBytes(path, "");
  ExpectOpenError(path, {"shorter than"});
}

TEST_F(SafetensorsTest, HeaderLengthPastEndOfFile) {
  const std::string path = Path("past.safetensors");
  WriteBytes(path, LengthPrefix(1000) + "{}");
  ExpectOpenError(path, {"header length 1000", "past the end"});
}

TEST_F(SafetensorsTest, AbsurdHeaderLength) {
  const std::string path = Path("absurd.safetensors");
  WriteBytes(path, LengthPrefix(uint64_t{1} << 62) + "{}");
  ExpectOpenError(path, {"exceeds"});
}

TEST_F(SafetensorsTest, InvalidJson) {
  ExpectOpenError(WriteRaw("bad.safetensors", "{\"a\": {", 0), {"not valid JSON"});
}

TEST_F(SafetensorsTest, HeaderNotAnObject) {
  ExpectOpenError(WriteRaw("arr.safetensors", "[1, 2]", 0), {"must be a JSON object", "array"});
}

TEST_F(SafetensorsTest, EntryNotAnObject) {
  ExpectOpenError(WriteRaw("e.safetensors", R"({"w": 3})", 0), {"'w'", "JSON object"});
}

TEST_F(SafetensorsTest, MissingDtype) {
  ExpectOpenError(
      WriteRaw("nodtype.safetensors", R"({"w.weight": {"shape": [1], "data_offsets": [0, 4]}})", 4),
      {"'w.weight'", "missing 'dtype'"});
}

TEST_F(SafetensorsTest, MissingShapeAndOffsets) {
  ExpectOpenError(WriteRaw("noshape.safetensors",
                           R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", 4),
                  {"'w'", "missing 'shape'"});
  ExpectOpenError(WriteRaw("nooffs.safetensors", R"({"w": {"dtype": "F32", "shape": [1]}})", 4),
                  {"'w'", "missing 'data_offsets'"});
}

TEST_F(SafetensorsTest, UnsupportedDtypes) {
  for (const char* dtype : {"I64", "F8_E5M2", "BOOL", "F64", "bf16", "f8_e4m3"}) {
    SCOPED_TRACE(dtype);
    std::string header =
        std::string(R"({"layers.3.w": {"dtype": ")") + dtype + R"(", "shape": [1], "data_offsets": [0, 8]}})";
    ExpectOpenError(WriteRaw("dt.safetensors", header, 8),
                    {std::string("unsupported dtype ") + dtype, "'layers.3.w'"});
  }
}

TEST_F(SafetensorsTest, BadShapeEntries) {
  ExpectOpenError(WriteRaw("neg.safetensors",
                           R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4),
                  {"'w'", "non-negative integers"});
  ExpectOpenError(WriteRaw("flt.safetensors",
                           R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", 4),
                  {"'w'", "non-negative integers"});
  ExpectOpenError(
      WriteRaw("ovf.safetensors",
               R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})",
               4),
      {"'w'", "overflows"});
}

TEST_F(SafetensorsTest, ShapeDoesNotMatchByteSize) {
  ExpectOpenError(
      WriteRaw("mismatch.safetensors",
               R"({"w.weight": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 24]}})", 24),
      {"'w.weight'", "needs 12 bytes", "span 24"});
}

TEST_F(SafetensorsTest, BadOffsets) {
  ExpectOpenError(WriteRaw("rev.safetensors",
                           R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8),
                  {"'w'", "begin 8 is after end 4"});
  ExpectOpenError(WriteRaw("one.safetensors",
                           R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4]}})", 8),
                  {"'w'", "[begin, end]"});
}

TEST_F(SafetensorsTest, OffsetsPastDataBuffer) {
  ExpectOpenError(
      WriteRaw("oob.safetensors",
               R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "big": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
               16),
      {"'big'", "exceed the data buffer of 16 bytes"});
}

TEST_F(SafetensorsTest, TruncatedFile) {
  const std::string path = Path("trunc.safetensors");
  std::vector<float> data(64, 1.f);
  ASSERT_TRUE(WriteSafetensors(path, {{"model.norm.weight", DType::kF32, {64}, data.data()}}).ok());
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 10);
  ExpectOpenError(path, {"'model.norm.weight'", "truncated"});
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  ExpectOpenError(
      WriteRaw("overlap.safetensors",
               R"({"first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                   "second": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
               16),
      {"'second'", "overlap", "'first'"});
}

TEST_F(SafetensorsTest, EmptyTensorsDoNotOverlap) {
  auto file = SafetensorsFile::Open(
      WriteRaw("empty.safetensors",
               R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}})",
               8));
  EXPECT_TRUE(file.ok()) << file.status();
}

TEST_F(SafetensorsTest, MisalignedTensor) {
  ExpectOpenError(
      WriteRaw("align.safetensors",
               R"({"h": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
                   "f": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}})",
               8),
      {"'f'", "not aligned to 4 bytes"});
}

TEST_F(SafetensorsTest, BadMetadata) {
  ExpectOpenError(WriteRaw("meta1.safetensors", R"({"__metadata__": {"format": 1}})", 0),
                  {"__metadata__", "'format'", "string"});
  ExpectOpenError(WriteRaw("meta2.safetensors", R"({"__metadata__": "pt"})", 0),
                  {"__metadata__", "object"});
}

// ---------------------------------------------------------------------------
// Checkpoint
// ---------------------------------------------------------------------------

TEST_F(SafetensorsTest, SingleFileCheckpoint) {
  float w[4] = {1, 2, 3, 4};
  ASSERT_TRUE(WriteSafetensors(Path("model.safetensors"), {{"a", DType::kF32, {4}, w},
                                                           {"b", DType::kF32, {2, 2}, w}})
                  .ok());
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->dir(), dir_);
  EXPECT_EQ((*ckpt)->TensorNames(), (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE((*ckpt)->Has("b"));
  EXPECT_FALSE((*ckpt)->Has("c"));
  auto b = (*ckpt)->Get("b");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(std::memcmp((*b)->data, w, 16), 0);

  auto missing = (*ckpt)->Get("lm_head.weight");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()),
              AllOf(HasSubstr("tensor 'lm_head.weight' not found in checkpoint"), HasSubstr(dir_)));
}

TEST_F(SafetensorsTest, SingleFileCheckpointValidatesAtOpen) {
  WriteRaw("model.safetensors", R"({"w": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}})",
           8);
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_THAT(std::string(ckpt.status().message()),
              AllOf(HasSubstr("unsupported dtype I8"), HasSubstr("'w'"),
                    HasSubstr(Path("model.safetensors"))));
}

TEST_F(SafetensorsTest, EmptyDirectoryIsNotFound) {
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(ckpt.status().message()),
              AllOf(HasSubstr(Path("model.safetensors.index.json")),
                    HasSubstr(Path("model.safetensors"))));
}

TEST_F(SafetensorsTest, ShardedCheckpointOpensShardsLazily) {
  float x[2] = {1, 2};
  uint16_t y[3] = {F32ToBf16(1), F32ToBf16(2), F32ToBf16(3)};
  ASSERT_TRUE(WriteSafetensors(Path("model-00001-of-00002.safetensors"),
                               {{"embed", DType::kF32, {2}, x}, {"norm", DType::kF32, {1}, x}})
                  .ok());
  // The second shard is corrupt: Open must not read it, only the first Get of
  // one of its tensors does.
  WriteBytes(Path("model-00002-of-00002.safetensors"), LengthPrefix(999) + "{}");
  WriteBytes(Path("model.safetensors.index.json"), R"({
    "metadata": {"total_size": 18},
    "weight_map": {
      "embed": "model-00001-of-00002.safetensors",
      "norm": "model-00001-of-00002.safetensors",
      "lm_head": "model-00002-of-00002.safetensors"
    }})");
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames(), (std::vector<std::string>{"embed", "lm_head", "norm"}));
  auto embed = (*ckpt)->Get("embed");
  ASSERT_TRUE(embed.ok()) << embed.status();
  EXPECT_EQ((*embed)->file, Path("model-00001-of-00002.safetensors"));
  EXPECT_EQ(reinterpret_cast<const float*>((*embed)->data)[1], 2.f);

  auto head = (*ckpt)->Get("lm_head");
  ASSERT_FALSE(head.ok());
  EXPECT_THAT(std::string(head.status().message()),
              AllOf(HasSubstr("'lm_head'"), HasSubstr(Path("model-00002-of-00002.safetensors"))));

  // Repair the shard: the failed open was not cached.
  ASSERT_TRUE(WriteSafetensors(Path("model-00002-of-00002.safetensors"),
                               {{"lm_head", DType::kBF16, {3}, y}})
                  .ok());
  head = (*ckpt)->Get("lm_head");
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ((*head)->dtype, DType::kBF16);
  EXPECT_EQ(std::memcmp((*head)->data, y, sizeof(y)), 0);
  // Views from earlier Gets stay valid and stable.
  EXPECT_EQ(*(*ckpt)->Get("embed"), *embed);
}

TEST_F(SafetensorsTest, ShardedCheckpointConcurrentGets) {
  std::vector<float> x(256, 1.f);
  std::string index = R"({"weight_map": {)";
  for (int s = 0; s < 4; ++s) {
    std::string shard = absl::StrCat("shard", s, ".safetensors");
    std::string name = absl::StrCat("t", s);
    ASSERT_TRUE(WriteSafetensors(Path(shard), {{name, DType::kF32, {256}, x.data()}}).ok());
    absl::StrAppend(&index, s ? "," : "", "\"", name, "\": \"", shard, "\"");
  }
  WriteBytes(Path("model.safetensors.index.json"), index + "}}");
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  std::vector<std::thread> threads;
  std::vector<int> ok(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        auto v = (*ckpt)->Get(absl::StrCat("t", (t + i) % 4));
        if (v.ok() && (*v)->nbytes == 1024) ++ok[t];
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(ok[t], 50);
}

TEST_F(SafetensorsTest, IndexPointingToMissingShard) {
  float x = 1;
  ASSERT_TRUE(WriteSafetensors(Path("a.safetensors"), {{"w1", DType::kF32, {1}, &x}}).ok());
  WriteBytes(Path("model.safetensors.index.json"),
             R"({"weight_map": {"w1": "a.safetensors", "layers.7.w2": "gone.safetensors"}})");
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_FALSE(ckpt.ok());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(ckpt.status().message()),
              AllOf(HasSubstr(Path("gone.safetensors")), HasSubstr("'layers.7.w2'"),
                    HasSubstr("model.safetensors.index.json")));
}

TEST_F(SafetensorsTest, TensorListedInIndexButAbsentFromShard) {
  float x = 1;
  ASSERT_TRUE(WriteSafetensors(Path("a.safetensors"), {{"w1", DType::kF32, {1}, &x}}).ok());
  WriteBytes(Path("model.safetensors.index.json"),
             R"({"weight_map": {"w1": "a.safetensors", "ghost": "a.safetensors"}})");
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE((*ckpt)->Get("w1").ok());
  auto ghost = (*ckpt)->Get("ghost");
  ASSERT_FALSE(ghost.ok());
  EXPECT_EQ(ghost.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(ghost.status().message()),
              AllOf(HasSubstr("'ghost'"), HasSubstr(Path("a.safetensors"))));
}

TEST_F(SafetensorsTest, BadIndexFiles) {
  struct Case {
    const char* index;
    const char* needle;
  };
  const Case cases[] = {
      {"{not json", "not valid JSON"},
      {"[]", "must be a JSON object"},
      {R"({"metadata": {}})", "missing 'weight_map'"},
      {R"({"weight_map": []})", "'weight_map' must be an object"},
      {R"({"weight_map": {"w": 3}})", "tensor 'w' must be a string"},
      {R"({"weight_map": {"w": "../model.safetensors"}})", "'../model.safetensors'"},
      {R"({"weight_map": {"w": "sub/x.safetensors"}})", "plain file name"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.index);
    WriteBytes(Path("model.safetensors.index.json"), c.index);
    auto ckpt = Checkpoint::Open(dir_);
    ASSERT_FALSE(ckpt.ok());
    EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(ckpt.status().message()),
                AllOf(HasSubstr(c.needle), HasSubstr(Path("model.safetensors.index.json"))));
  }
}

}  // namespace
}  // namespace joule
