#include <dlfcn.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/telemetry/fake_energy_meter.h"
#include "worker/telemetry/make_energy_meter.h"
#include "worker/telemetry/model_energy_meter.h"
#include "worker/telemetry/nvml_energy_meter.h"
#include "worker/telemetry/rapl_energy_meter.h"

namespace joule::telemetry {
namespace {

namespace fs = std::filesystem;
using ::testing::DoubleNear;
using ::testing::HasSubstr;

// A fake sysfs tree in a fresh temporary directory.
class FakeSysfs {
 public:
  FakeSysfs() {
    char tmpl[] = "/tmp/joule-sysfs-XXXXXX";
    root_ = mkdtemp(tmpl);
  }
  ~FakeSysfs() { fs::remove_all(root_); }
  const std::string& root() const { return root_; }
  void Write(const std::string& rel, const std::string& text) {
    const fs::path p = fs::path(root_) / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  void Zone(const std::string& dir, const std::string& name, uint64_t energy_uj, uint64_t max_uj) {
    Write("class/powercap/" + dir + "/name", name + "\n");
    Write("class/powercap/" + dir + "/energy_uj", std::to_string(energy_uj) + "\n");
    Write("class/powercap/" + dir + "/max_energy_range_uj", std::to_string(max_uj) + "\n");
  }
  void SetEnergy(const std::string& dir, uint64_t energy_uj) {
    Write("class/powercap/" + dir + "/energy_uj", std::to_string(energy_uj) + "\n");
  }

 private:
  std::string root_;
};

TEST(RaplEnergyMeterTest, SumsPackagesAndIgnoresSubZonesAndPsys) {
  FakeSysfs sys;
  sys.Zone("intel-rapl:0", "package-0", 1'000'000, 262'143'328'850);
  sys.Zone("intel-rapl:1", "package-1", 5'000'000, 262'143'328'850);
  sys.Zone("intel-rapl:0:0", "core", 0, 262'143'328'850);   // part of package-0
  sys.Zone("intel-rapl:0:1", "dram", 0, 262'143'328'850);
  sys.Zone("intel-rapl:2", "psys", 0, 262'143'328'850);     // overlaps the packages
  auto m = RaplEnergyMeter::Create({.sysfs_root = sys.root()});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->source(), "rapl");
  EXPECT_EQ((*m)->Describe(), "2 RAPL packages (package-0, package-1)");
  EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(0, 1e-9));  // origin: the first read

  sys.SetEnergy("intel-rapl:0", 3'000'000);   // +2 J
  sys.SetEnergy("intel-rapl:1", 5'500'000);   // +0.5 J
  sys.SetEnergy("intel-rapl:0:0", 9'000'000); // a sub-zone moving must not count
  sys.SetEnergy("intel-rapl:2", 9'000'000);
  EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(2.5, 1e-9));
  sys.SetEnergy("intel-rapl:1", 6'500'000);   // +1 J
  EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(3.5, 1e-9));
}

TEST(RaplEnergyMeterTest, AddsTheRangeBackWhenACounterWraps) {
  FakeSysfs sys;
  const uint64_t range = 10'000'000;  // wraps at 10 J
  sys.Zone("intel-rapl:0", "package-0", 9'000'000, range);
  auto m = RaplEnergyMeter::Create({.sysfs_root = sys.root()});
  ASSERT_TRUE(m.ok()) << m.status();
  sys.SetEnergy("intel-rapl:0", 9'800'000);  // +0.8 J
  EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(0.8, 1e-9));
  sys.SetEnergy("intel-rapl:0", 1'200'000);  // +0.2 J to the range, +1.2 J after it
  EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(2.2, 1e-9));
  sys.SetEnergy("intel-rapl:0", 1'200'000);  // no change: still monotonic, no phantom wrap
  EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(2.2, 1e-9));
  sys.SetEnergy("intel-rapl:0", 500'000);    // wraps again: +8.8 + 0.5
  EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(11.5, 1e-9));
}

TEST(RaplEnergyMeterTest, TakesAmdRaplZonesAndTheAmdEnergyHwmon) {
  {
    FakeSysfs sys;
    sys.Zone("amd-rapl:0", "package-0", 0, 1'000'000'000);
    auto m = RaplEnergyMeter::Create({.sysfs_root = sys.root()});
    ASSERT_TRUE(m.ok()) << m.status();
    sys.SetEnergy("amd-rapl:0", 4'000'000);
    EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(4.0, 1e-9));
  }
  FakeSysfs sys;
  sys.Write("class/hwmon/hwmon0/name", "k10temp\n");
  sys.Write("class/hwmon/hwmon3/name", "amd_energy\n");
  sys.Write("class/hwmon/hwmon3/energy1_label", "Ecore000\n");
  sys.Write("class/hwmon/hwmon3/energy1_input", "100\n");
  sys.Write("class/hwmon/hwmon3/energy2_label", "Esocket0\n");
  sys.Write("class/hwmon/hwmon3/energy2_input", "1000000\n");
  auto m = RaplEnergyMeter::Create({.sysfs_root = sys.root()});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->Describe(), "1 RAPL package (Esocket0)");
  sys.Write("class/hwmon/hwmon3/energy1_input", "9000000\n");  // a core: inside the socket
  sys.Write("class/hwmon/hwmon3/energy2_input", "3000000\n");
  EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(2.0, 1e-9));
}

TEST(RaplEnergyMeterTest, NoCountersIsUnavailableNamingTheDirectory) {
  FakeSysfs sys;
  sys.Zone("intel-rapl:0:0", "core", 0, 100);  // a sub-zone alone is not a package
  auto m = RaplEnergyMeter::Create({.sysfs_root = sys.root()});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr(sys.root() + "/class/powercap"));
}

TEST(RaplEnergyMeterTest, MissingAndMalformedFilesAreClearErrors) {
  FakeSysfs sys;
  sys.Zone("intel-rapl:0", "package-0", 0, 1000);
  fs::remove(fs::path(sys.root()) / "class/powercap/intel-rapl:0/max_energy_range_uj");
  auto m = RaplEnergyMeter::Create({.sysfs_root = sys.root()});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(m.status().message(), HasSubstr("max_energy_range_uj"));

  sys.Zone("intel-rapl:0", "package-0", 0, 1000);
  m = RaplEnergyMeter::Create({.sysfs_root = sys.root()});
  ASSERT_TRUE(m.ok()) << m.status();
  sys.SetEnergy("intel-rapl:0", 100);
  ASSERT_TRUE((*m)->ReadJoules().ok());
  fs::remove(fs::path(sys.root()) / "class/powercap/intel-rapl:0/energy_uj");
  absl::StatusOr<double> r = (*m)->ReadJoules();
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("intel-rapl:0/energy_uj"));
  sys.Write("class/powercap/intel-rapl:0/energy_uj", "n/a\n");
  r = (*m)->ReadJoules();
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("not an unsigned integer"));
  // Once readable again, the meter continues from where it was.
  sys.SetEnergy("intel-rapl:0", 400);
  EXPECT_THAT(*(*m)->ReadJoules(), DoubleNear(400e-6, 1e-12));
}

TEST(RaplEnergyMeterTest, RootOnlyCounterIsPermissionDeniedWithAHint) {
  FakeSysfs sys;
  sys.Zone("intel-rapl:0", "package-0", 0, 1000);
  // Tests may run as root, where chmod 000 does not stop reads: inject the
  // reader to fail the way an unprivileged read of energy_uj fails.
  RaplOptions options{.sysfs_root = sys.root()};
  options.reader = [](const std::string& path) -> absl::StatusOr<std::string> {
    if (path.ends_with("energy_uj")) return absl::PermissionDeniedError("cannot read " + path + ": Permission denied");
    return ReadSysfsFile(path);
  };
  auto m = RaplEnergyMeter::Create(options);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(m.status().message(), HasSubstr("root-only"));
  EXPECT_THAT(m.status().message(), HasSubstr("intel-rapl:0/energy_uj"));
}

TEST(ReadSysfsFileTest, MapsErrnoToStatus) {
  FakeSysfs sys;
  sys.Write("f", "42\n");
  EXPECT_EQ(*ReadSysfsFile(sys.root() + "/f"), "42\n");
  EXPECT_EQ(ReadSysfsFile(sys.root() + "/absent").status().code(), absl::StatusCode::kNotFound);
  if (geteuid() != 0) {  // root reads through mode 000
    fs::permissions(fs::path(sys.root()) / "f", fs::perms::none);
    EXPECT_EQ(ReadSysfsFile(sys.root() + "/f").status().code(), absl::StatusCode::kPermissionDenied);
  }
}

// Wall and CPU time that move only when told to.
class FakeProcessClock final : public ProcessClock {
 public:
  FakeProcessClock(double* wall, double* cpu) : wall_(wall), cpu_(cpu) {}
  double WallSeconds() override { return *wall_; }
  absl::StatusOr<double> CpuSeconds() override { return *cpu_; }

 private:
  double* wall_;
  double* cpu_;
};

TEST(ModelEnergyMeterTest, IdlePowerTimesWallPlusEnergyPerCpuSecond) {
  double wall = 1000, cpu = 7;  // arbitrary origins
  auto m = ModelEnergyMeter::Create({.idle_watts = 30, .joules_per_cpu_second = 12},
                                    std::make_unique<FakeProcessClock>(&wall, &cpu));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->source(), "model");
  EXPECT_THAT((*m)->Describe(), HasSubstr("estimate"));
  EXPECT_DOUBLE_EQ(*(*m)->ReadJoules(), 0);
  wall += 2;  // idle 2 s: 60 J
  EXPECT_DOUBLE_EQ(*(*m)->ReadJoules(), 60);
  wall += 1;
  cpu += 1.5;  // 1 s at 1.5 busy cores: +30 + 18
  EXPECT_DOUBLE_EQ(*(*m)->ReadJoules(), 108);
  EXPECT_EQ((*m)->ReadPowerWatts().status().code(), absl::StatusCode::kUnimplemented);
}

TEST(ModelEnergyMeterTest, RejectsNegativeParametersNamingTheField) {
  auto m = ModelEnergyMeter::Create({.idle_watts = -1});
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), HasSubstr("energy_model_idle_watts"));
  m = ModelEnergyMeter::Create({.joules_per_cpu_second = std::nan("")});
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), HasSubstr("energy_model_joules_per_cpu_second"));
}

TEST(ModelEnergyMeterTest, RealClockChargesThisProcessesCpuWork) {
  auto m = ModelEnergyMeter::Create({.idle_watts = 0, .joules_per_cpu_second = 100});
  ASSERT_TRUE(m.ok());
  const double before = *(*m)->ReadJoules();
  volatile double x = 0;
  for (int i = 0; i < 20'000'000; ++i) x = x + i * 1e-9;  // ~tens of ms of CPU
  const double after = *(*m)->ReadJoules();
  EXPECT_GT(after - before, 0.1);  // >= 1 ms of CPU at 100 J/s
}

TEST(NvmlEnergyMeterTest, MissingLibraryIsUnavailableNamingIt) {
  auto m = NvmlEnergyMeter::Create({.library = "/nonexistent/libnvidia-ml.so.1"});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr("/nonexistent/libnvidia-ml.so.1"));
}

TEST(NvmlEnergyMeterTest, LibraryWithoutNvmlSymbolsIsUnavailable) {
  // libc loads but is not NVML.
  auto m = NvmlEnergyMeter::Create({.library = "libc.so.6"});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr("missing symbol nvmlInit_v2"));
}

// Functions of the fake NVML library, reached through the same dlopen handle.
struct FakeNvml {
  FakeNvml() {
    handle = dlopen(JOULE_FAKE_NVML_PATH, RTLD_NOW | RTLD_LOCAL);
    if (!handle) return;
    set_energy = reinterpret_cast<void (*)(unsigned long long)>(dlsym(handle, "FakeNvmlSetEnergyMj"));
    set_instant = reinterpret_cast<void (*)(bool)>(dlsym(handle, "FakeNvmlSetInstantField"));
    set_init = reinterpret_cast<void (*)(int)>(dlsym(handle, "FakeNvmlSetInitResult"));
    set_gpu_energy =
        reinterpret_cast<void (*)(unsigned, unsigned long long)>(dlsym(handle, "FakeNvmlSetGpuEnergyMj"));
    field_calls = reinterpret_cast<int (*)()>(dlsym(handle, "FakeNvmlFieldCalls"));
  }
  ~FakeNvml() {
    if (handle) dlclose(handle);
  }
  void* handle = nullptr;
  void (*set_energy)(unsigned long long) = nullptr;
  void (*set_instant)(bool) = nullptr;
  void (*set_init)(int) = nullptr;
  void (*set_gpu_energy)(unsigned, unsigned long long) = nullptr;
  int (*field_calls)() = nullptr;
};

TEST(NvmlEnergyMeterTest, ReadsTheEnergyCounterAndInstantPowerThroughDlopen) {
  FakeNvml fake;
  ASSERT_NE(fake.handle, nullptr) << dlerror();
  fake.set_init(0);
  fake.set_instant(true);
  fake.set_energy(5000);
  auto m = NvmlEnergyMeter::Create({.library = JOULE_FAKE_NVML_PATH, .device_index = 0});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->source(), "nvml");
  EXPECT_EQ((*m)->Describe(), "GPU 0 (Fake GPU)");
  EXPECT_DOUBLE_EQ(*(*m)->ReadJoules(), 5.0);
  fake.set_energy(7250);
  EXPECT_DOUBLE_EQ(*(*m)->ReadJoules(), 7.25);
  EXPECT_DOUBLE_EQ(*(*m)->ReadPowerWatts(), 312.5);  // field 186, milliwatts

  // A driver without field 186 falls back to nvmlDeviceGetPowerUsage, and stops asking.
  fake.set_instant(false);
  EXPECT_DOUBLE_EQ(*(*m)->ReadPowerWatts(), 150.0);
  const int calls = fake.field_calls();
  EXPECT_DOUBLE_EQ(*(*m)->ReadPowerWatts(), 150.0);
  EXPECT_EQ(fake.field_calls(), calls);
}

TEST(NvmlEnergyMeterTest, NoDeviceOrFailedInitIsUnavailable) {
  FakeNvml fake;
  ASSERT_NE(fake.handle, nullptr) << dlerror();
  fake.set_init(0);
  auto m = NvmlEnergyMeter::Create({.library = JOULE_FAKE_NVML_PATH, .device_index = 3});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr("no GPU at NVML index 3"));
  fake.set_init(9);  // NVML_ERROR_DRIVER_NOT_LOADED
  m = NvmlEnergyMeter::Create({.library = JOULE_FAKE_NVML_PATH});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr("nvmlInit_v2"));
  fake.set_init(0);
}

TEST(NvmlEnergyMeterTest, PciBusIdsAreWrittenAsNvmlDoesOrRejectedNamingTheField) {
  // CUDA's spelling (cudaDeviceGetPCIBusId), NVML's, and the short forms NVML accepts.
  EXPECT_EQ(*CanonicalPciBusId("0000:1b:00.0"), "00000000:1B:00.0");
  EXPECT_EQ(*CanonicalPciBusId("00000000:1B:00.0"), "00000000:1B:00.0");
  EXPECT_EQ(*CanonicalPciBusId("1b:00.0"), "00000000:1B:00.0");
  EXPECT_EQ(*CanonicalPciBusId("0001:c3:1f"), "00000001:C3:1F.0");
  EXPECT_EQ(*CanonicalPciBusId("a:3:4.7"), "0000000A:03:04.7");
  for (const char* bad : {"", "1b", "1b:00", "zz:00.0", "0000:1b:20.0", "0000:1b:00.8", "0000:100:00.0",
                          "123456789:1b:00.0", "0:0:1b:00.0", "0000:1b:00.0 ", "-1:00.0", "0000:1b:.0"}) {
    const absl::StatusOr<std::string> id = CanonicalPciBusId(bad);
    ASSERT_FALSE(id.ok()) << "'" << bad << "' -> " << *id;
    EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(id.status().message(), HasSubstr("nvml_pci_bus_id"));
    EXPECT_THAT(id.status().message(), HasSubstr(absl::StrCat("'", bad, "'")));
  }
}

TEST(NvmlEnergyMeterTest, FindsTheGpuByPciBusIdNotByIndex) {
  FakeNvml fake;
  ASSERT_NE(fake.handle, nullptr) << dlerror();
  fake.set_init(0);
  fake.set_instant(true);
  fake.set_energy(5000);
  fake.set_gpu_energy(1, 90000);
  // The index says GPU 0; the bus id (as CUDA writes it) is GPU 1's, and wins.
  auto m = NvmlEnergyMeter::Create(
      {.library = JOULE_FAKE_NVML_PATH, .pci_bus_id = "0000:3d:00.0", .device_index = 0});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->Describe(), "GPU 00000000:3D:00.0 (Fake GPU B, NVML index 1)");
  EXPECT_DOUBLE_EQ(*(*m)->ReadJoules(), 90.0);
  fake.set_gpu_energy(1, 91500);
  fake.set_energy(6000);
  EXPECT_DOUBLE_EQ(*(*m)->ReadJoules(), 91.5);
  EXPECT_DOUBLE_EQ(*(*m)->ReadPowerWatts(), 420.0);

  auto first = NvmlEnergyMeter::Create({.library = JOULE_FAKE_NVML_PATH, .pci_bus_id = "1B:00.0"});
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ((*first)->Describe(), "GPU 00000000:1B:00.0 (Fake GPU, NVML index 0)");
  EXPECT_DOUBLE_EQ(*(*first)->ReadJoules(), 6.0);
  EXPECT_DOUBLE_EQ(*(*first)->ReadPowerWatts(), 312.5);
  fake.set_gpu_energy(1, 90000);
  fake.set_energy(5000);
}

TEST(NvmlEnergyMeterTest, UnknownOrMalformedPciBusIdIsAClearError) {
  FakeNvml fake;
  ASSERT_NE(fake.handle, nullptr) << dlerror();
  fake.set_init(0);
  auto m = NvmlEnergyMeter::Create({.library = JOULE_FAKE_NVML_PATH, .pci_bus_id = "0000:af:00.0"});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr("no GPU at PCI bus id 00000000:AF:00.0"));
  EXPECT_THAT(m.status().message(), HasSubstr("Not Found"));
  m = NvmlEnergyMeter::Create({.library = JOULE_FAKE_NVML_PATH, .pci_bus_id = "GPU-1b"});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(), HasSubstr("'GPU-1b'"));
}

// Set by tests/gpu/run.sh on a GPU host: there, a meter that cannot open the real GPU
// fails instead of skipping (a broken driver must not pass as "no GPU").
bool RequireGpu() {
  const char* require = std::getenv("JOULE_REQUIRE_GPU");
  return require != nullptr && std::string(require) == "1";
}

// The real driver, where there is one (skips elsewhere, e.g. on CI): the counter must
// advance, over 1.5 s (15 of NVML's ~100 ms updates), at a power a GPU can draw, and agree
// with the instant power reading within a loose band (the GPU may change state meanwhile).
TEST(NvmlEnergyMeterTest, RealGpuCounterAdvancesAtAPlausiblePower) {
  auto m = NvmlEnergyMeter::Create({});
  if (!m.ok()) {
    if (RequireGpu()) FAIL() << "JOULE_REQUIRE_GPU=1 but " << m.status();
    GTEST_SKIP() << m.status();
  }
  EXPECT_THAT((*m)->Describe(), HasSubstr("GPU 0"));
  const absl::StatusOr<double> j0 = (*m)->ReadJoules();
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(j0.ok()) << j0.status();
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const absl::StatusOr<double> j1 = (*m)->ReadJoules();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(j1.ok()) << j1.status();
  const double counter_watts = (*j1 - *j0) / seconds;
  const absl::StatusOr<double> instant = (*m)->ReadPowerWatts();
  ASSERT_TRUE(instant.ok()) << instant.status();
  std::printf("%s: %.1f J total, %.1f W from the counter, %.1f W instant\n", (*m)->Describe().c_str(),
              *j1, counter_watts, *instant);
  EXPECT_GT(counter_watts, 5.0);  // an idle datacenter GPU draws tens of watts
  EXPECT_LT(counter_watts, 2000.0);
  EXPECT_GT(*instant, 5.0);
  EXPECT_LT(*instant, 2000.0);
  EXPECT_LT(std::abs(*instant - counter_watts), 0.5 * counter_watts + 50.0);
}

// The real driver by PCI bus id: tests/gpu/run.sh passes GPU 0's as nvidia-smi prints it.
// NVML must name the same GPU as its index 0, and both handles read one counter.
TEST(NvmlEnergyMeterTest, RealGpuIsFoundByItsPciBusId) {
  const char* bus_id = std::getenv("JOULE_TEST_NVML_PCI_BUS_ID");
  if (bus_id == nullptr || *bus_id == '\0') {
    if (RequireGpu()) FAIL() << "JOULE_REQUIRE_GPU=1 needs JOULE_TEST_NVML_PCI_BUS_ID (GPU 0's bus id)";
    GTEST_SKIP() << "JOULE_TEST_NVML_PCI_BUS_ID is not set (tests/gpu/run.sh sets it)";
  }
  auto by_bus_id = NvmlEnergyMeter::Create({.pci_bus_id = bus_id});
  ASSERT_TRUE(by_bus_id.ok()) << by_bus_id.status();
  auto by_index = NvmlEnergyMeter::Create({.device_index = 0});
  ASSERT_TRUE(by_index.ok()) << by_index.status();
  std::printf("by bus id: %s; by index: %s\n", (*by_bus_id)->Describe().c_str(),
              (*by_index)->Describe().c_str());
  EXPECT_THAT((*by_bus_id)->Describe(), HasSubstr(*CanonicalPciBusId(bus_id)));
  EXPECT_THAT((*by_bus_id)->Describe(), HasSubstr("NVML index 0"));
  const double via_index = *(*by_index)->ReadJoules();
  const double via_bus_id = *(*by_bus_id)->ReadJoules();
  // Back to back: at most a couple of ~100 ms counter updates apart, even at full power.
  EXPECT_LT(std::abs(via_bus_id - via_index), 300.0);
}

TEST(MakeEnergyMeterTest, AWorkerOnAGpuMetersThatGpuByBusId) {
  FakeNvml fake;
  ASSERT_NE(fake.handle, nullptr) << dlerror();
  fake.set_init(0);
  FakeSysfs sys;
  sys.Zone("intel-rapl:0", "package-0", 0, 1000);
  EnergyMeterOptions o;
  o.nvml_library = JOULE_FAKE_NVML_PATH;
  o.rapl_sysfs_root = sys.root();
  // The worker's CUDA device fills the bus id; an operator's --nvml-pci-bus-id wins.
  EXPECT_EQ(ForComputeDevice(o, "0000:3d:00.0").nvml_pci_bus_id, "0000:3d:00.0");
  EXPECT_EQ(ForComputeDevice(o, "").nvml_pci_bus_id, "");
  EnergyMeterOptions named = o;
  named.nvml_pci_bus_id = "1b:00.0";
  EXPECT_EQ(ForComputeDevice(named, "0000:3d:00.0").nvml_pci_bus_id, "1b:00.0");

  auto m = MakeEnergyMeter(ForComputeDevice(o, "0000:3d:00.0"));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->source(), "nvml");
  EXPECT_THAT((*m)->Describe(), HasSubstr("00000000:3D:00.0 (Fake GPU B"));
  // A bus id NVML does not know: auto falls back (with a warning), nvml fails naming it.
  o.nvml_pci_bus_id = "0000:af:00.0";
  EXPECT_EQ((*MakeEnergyMeter(o))->source(), "rapl");
  o.energy_source = "nvml";
  m = MakeEnergyMeter(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(m.status().message(), HasSubstr("00000000:AF:00.0"));
  // A malformed one is bad input, whatever the source.
  o.energy_source = "auto";
  o.nvml_pci_bus_id = "bus 3";
  m = MakeEnergyMeter(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(), HasSubstr("nvml_pci_bus_id"));
}

TEST(MakeEnergyMeterTest, PrefersNvmlThenRaplThenModel) {
  FakeSysfs sys;
  sys.Zone("intel-rapl:0", "package-0", 0, 1000);
  EnergyMeterOptions o;
  o.nvml_library = JOULE_FAKE_NVML_PATH;
  o.rapl_sysfs_root = sys.root();
  EXPECT_EQ((*MakeEnergyMeter(o))->source(), "nvml");
  o.nvml_library = "/nonexistent/libnvidia-ml.so.1";
  EXPECT_EQ((*MakeEnergyMeter(o))->source(), "rapl");
  o.rapl_sysfs_root = sys.root() + "/empty";
  EXPECT_EQ((*MakeEnergyMeter(o))->source(), "model");
}

TEST(MakeEnergyMeterTest, ANamedSourceIsUsedOrFailsClearly) {
  FakeSysfs sys;
  sys.Zone("intel-rapl:0", "package-0", 0, 1000);
  EnergyMeterOptions o;
  o.nvml_library = JOULE_FAKE_NVML_PATH;
  o.rapl_sysfs_root = sys.root();
  o.energy_source = "model";
  EXPECT_EQ((*MakeEnergyMeter(o))->source(), "model");
  o.energy_source = "rapl";
  EXPECT_EQ((*MakeEnergyMeter(o))->source(), "rapl");
  o.energy_source = "nvml";
  o.nvml_library = "/nonexistent/libnvidia-ml.so.1";
  auto m = MakeEnergyMeter(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable);
  o.energy_source = "gpu";
  m = MakeEnergyMeter(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(), HasSubstr("energy_source"));
}

}  // namespace
}  // namespace joule::telemetry
