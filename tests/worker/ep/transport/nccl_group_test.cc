// joule-worker --transport nccl at the rendezvous (worker/service/nccl_group.h):
// the descriptor every rank sends, and the verdict every rank reaches alike:
// rank 0's unique id, or a refusal naming the ranks. Runs without a GPU.
#include "worker/service/nccl_group.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace joule::worker {
namespace {

using ::testing::HasSubstr;

std::string Id() {
  std::string id(128, '\0');
  for (int i = 0; i < 128; ++i) id[i] = static_cast<char>(i * 37 + 5);  // every byte value kind
  return id;
}

std::string Gpu(const std::string& host, int ordinal, const std::string& pci, bool rank0 = false) {
  return EncodeNcclDescriptor({.host = host,
                               .device = "cuda:" + std::to_string(ordinal),
                               .pci_bus_id = pci,
                               .unique_id = rank0 ? Id() : ""});
}

TEST(NcclDescriptor, RoundTripsEveryField) {
  const NcclRankDescriptor d{.host = "gpu-node-3",
                             .device = "cuda:1",
                             .pci_bus_id = "00000000:1B:00.0",
                             .unique_id = Id()};
  const std::string text = EncodeNcclDescriptor(d);
  EXPECT_THAT(text, HasSubstr("joule-nccl/1;host=gpu-node-3;device=cuda:1;pci=00000000:1B:00.0;id="));
  absl::StatusOr<NcclRankDescriptor> back = ParseNcclDescriptor(text);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->host, d.host);
  EXPECT_EQ(back->device, d.device);
  EXPECT_EQ(back->pci_bus_id, d.pci_bus_id);
  EXPECT_EQ(back->unique_id, d.unique_id);
  // A later version's keys are ignored.
  back = ParseNcclDescriptor(text + ";nvlink=yes");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->unique_id, d.unique_id);
}

TEST(NcclDescriptor, RefusesWhatIsNotOne) {
  // A UCX worker address (binary), another version, a broken field.
  EXPECT_THAT(std::string(ParseNcclDescriptor(std::string("\x01\x00ucx", 5)).status().message()),
              HasSubstr("not a joule-nccl descriptor"));
  EXPECT_THAT(std::string(ParseNcclDescriptor("joule-nccl/2;host=a;device=cuda:0").status().message()),
              HasSubstr("descriptor version joule-nccl/2, this worker reads joule-nccl/1"));
  EXPECT_FALSE(ParseNcclDescriptor("joule-nccl/1;host=a;device=cuda:0;id=abc").ok());
  EXPECT_FALSE(ParseNcclDescriptor("joule-nccl/1;host=a;device=cuda:0;id=zz").ok());
  EXPECT_FALSE(ParseNcclDescriptor("joule-nccl/1;host=a;cuda:0").ok());
  EXPECT_FALSE(ParseNcclDescriptor("joule-nccl/1;host=a").ok());  // no device
}

TEST(NcclGroup, GivesRankZerosUniqueId) {
  absl::StatusOr<std::string> id = CheckNcclGroup(
      {Gpu("h1", 0, "00000000:1B:00.0", true), Gpu("h1", 1, "00000000:2C:00.0"),
       Gpu("h2", 0, "00000000:1B:00.0")});  // the same bus id on another host is another GPU
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(*id, Id());
}

TEST(NcclGroup, RefusesTwoRanksOnOneGpuNamingThem) {
  absl::StatusOr<std::string> id =
      CheckNcclGroup({Gpu("h1", 0, "00000000:1B:00.0", true), Gpu("h1", 1, "00000000:2C:00.0"),
                      Gpu("h1", 0, "00000000:1B:00.0")});
  EXPECT_EQ(id.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(id.status().message()),
              HasSubstr("ranks 0 and 2 compute on one GPU of host h1 (PCI 00000000:1B:00.0, "
                        "cuda:0 / cuda:0): NCCL cannot put two ranks on one device; use "
                        "--transport ucx: rows then go through CUDA IPC windows"));
  // Without bus ids, by device ordinal.
  id = CheckNcclGroup({Gpu("h1", 0, "", true), Gpu("h1", 0, "")});
  EXPECT_THAT(std::string(id.status().message()),
              HasSubstr("ranks 0 and 1 compute on one GPU of host h1 (cuda:0 / cuda:0)"));
}

TEST(NcclGroup, RefusesCpuRanksNamingThem) {
  const std::string cpu = EncodeNcclDescriptor({.host = "h1", .device = "cpu"});
  absl::StatusOr<std::string> id = CheckNcclGroup({cpu, cpu});
  EXPECT_EQ(id.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(id.status().message()),
              HasSubstr("--transport nccl needs --device cuda:N: ranks 0 (cpu on h1), 1 (cpu on "
                        "h1) compute on a CPU"));
  id = CheckNcclGroup({Gpu("h1", 0, "00000000:1B:00.0", true), cpu});
  EXPECT_THAT(std::string(id.status().message()),
              HasSubstr("--transport nccl needs --device cuda:N: rank 1 (cpu on h1) computes"));
}

TEST(NcclGroup, RefusesUnreadableDescriptorsAndAMissingId) {
  absl::StatusOr<std::string> id =
      CheckNcclGroup({Gpu("h1", 0, "00000000:1B:00.0", true), "ucx-address"});
  EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(id.status().message()),
              HasSubstr("rank 1's transport address: not a joule-nccl descriptor"));
  id = CheckNcclGroup({Gpu("h1", 0, "00000000:1B:00.0"), Gpu("h1", 1, "00000000:2C:00.0")});
  EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(id.status().message()), HasSubstr("rank 0 sent no NCCL unique id"));
}

}  // namespace
}  // namespace joule::worker
