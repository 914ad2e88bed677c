#include "kernels/cpu/thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common/file.h"

namespace joule::kernels::cpu {
namespace {

// ParallelFor runs 10-20 times per layer per step with little serial work in
// between, so helpers spin this long before sleeping on the condition variable
// (a futex wake costs tens of microseconds; a spin hand-off well under one).
constexpr auto kSpinTime = std::chrono::microseconds(200);

// Chunks per thread: enough for dynamic balance when chunks cost unevenly.
constexpr int64_t kChunksPerThread = 4;

// Layout of ThreadPool::state_.
constexpr int kGenShift = 16;
constexpr uint64_t kClosed = uint64_t{1} << 15;
constexpr uint64_t kJoinedMask = kClosed - 1;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Spins until done() holds or kSpinTime passes; returns whether done() held.
template <typename Pred>
bool SpinUntil(Pred done) {
  auto deadline = std::chrono::steady_clock::now() + kSpinTime;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      CpuRelax();
    }
    if (std::chrono::steady_clock::now() > deadline) return done();
  }
}

// A quota of `quota` microseconds per `period` in whole cores, rounded up;
// 0 (no limit) for "max", -1 (v1's "none") or anything unparsable.
int CoresFromQuota(const std::string& quota, int64_t period) {
  if (quota == "max" || period <= 0) return 0;
  int64_t q = 0;
  try {
    q = std::stoll(quota);
  } catch (const std::exception&) {
    return 0;
  }
  if (q <= 0) return 0;
  return static_cast<int>(std::max<int64_t>(1, (q + period - 1) / period));
}

// cpu.max is "max PERIOD" (no limit) or "QUOTA PERIOD" in microseconds.
int CoresFromCpuMax(const std::string& text) {
  std::istringstream in(text);
  std::string quota;
  int64_t period = 0;
  if (!(in >> quota >> period)) return 0;
  return CoresFromQuota(quota, period);
}

// v1 splits the same pair over cpu.cfs_quota_us and cpu.cfs_period_us.
int CoresFromCfsFiles(const std::string& dir) {
  std::istringstream quota(ReadFile(dir + "/cpu.cfs_quota_us").value_or(""));
  std::istringstream period(ReadFile(dir + "/cpu.cfs_period_us").value_or(""));
  std::string q;
  int64_t p = 0;
  if (!(quota >> q) || !(period >> p)) return 0;
  return CoresFromQuota(q, p);
}

// Walks `path` ("/a/b") and its ancestors up to "/", keeping the smallest
// positive limit that `at` reports for each.
template <typename LimitAt>
int TightestOnPath(std::string path, LimitAt at) {
  int limit = 0;
  for (;;) {
    const int cores = at(path == "/" ? std::string() : path);
    if (cores > 0 && (limit == 0 || cores < limit)) limit = cores;
    if (path == "/") break;
    const size_t slash = path.rfind('/');
    path = slash == 0 ? "/" : path.substr(0, slash);
  }
  return limit;
}

bool HasItem(const std::string& list, const std::string& item) {
  std::istringstream in(list);
  for (std::string x; std::getline(in, x, ',');) {
    if (x == item) return true;
  }
  return false;
}

int AffinityCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 0;
  return CPU_COUNT(&set);
}

}  // namespace

int CgroupCpuLimit(const std::string& proc_self_cgroup, const std::string& cgroup_root) {
  // cgroup v2 has a single line "0::/PATH"; v1 lines ("N:controllers:/PATH") are ignored.
  std::istringstream lines(proc_self_cgroup);
  std::string line, path;
  while (std::getline(lines, line)) {
    if (line.rfind("0::", 0) == 0) path = line.substr(3);
  }
  if (path.empty() || path[0] != '/') return 0;
  return TightestOnPath(path, [&](const std::string& p) {
    return CoresFromCpuMax(ReadFile(cgroup_root + p + "/cpu.max").value_or(""));
  });
}

int CgroupV1CpuLimit(const std::string& proc_self_cgroup, const std::string& mountinfo) {
  // "N:cpu,cpuacct:/PATH": the line whose controller list names cpu.
  std::istringstream lines(proc_self_cgroup);
  std::string line, path;
  while (std::getline(lines, line)) {
    const size_t a = line.find(':');
    const size_t b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b != std::string::npos && HasItem(line.substr(a + 1, b - a - 1), "cpu")) {
      path = line.substr(b + 1);
    }
  }
  if (path.empty() || path[0] != '/') return 0;
  // mountinfo: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - cgroup SOURCE SUPEROPTIONS";
  // the v1 hierarchy with the cpu controller, ROOT being the cgroup mounted there.
  std::istringstream mounts(mountinfo);
  while (std::getline(mounts, line)) {
    std::istringstream in(line);
    std::vector<std::string> f;
    for (std::string x; in >> x;) f.push_back(x);
    const auto dash = std::find(f.begin(), f.end(), "-");
    if (f.size() < 5 || dash == f.end() || f.end() - dash < 4 || dash[1] != "cgroup" ||
        !HasItem(dash[3], "cpu")) {
      continue;
    }
    const std::string& root = f[3];
    const std::string& mount_point = f[4];
    // Inside a container the mount's root is the container's cgroup, and
    // /proc/self/cgroup may name it from the host's view or as "/": walk the
    // part below the root, or read the mount point alone.
    std::string below = "/";
    if (root == "/") {
      below = path;
    } else if (path.rfind(root, 0) == 0 && (path.size() == root.size() || path[root.size()] == '/')) {
      below = path.size() == root.size() ? "/" : path.substr(root.size());
    }
    return TightestOnPath(below, [&](const std::string& p) {
      return CoresFromCfsFiles(mount_point + p);
    });
  }
  return 0;
}

int UsableCores() {
  int cores = AffinityCores();
  if (cores <= 0) cores = static_cast<int>(std::thread::hardware_concurrency());
  const std::string proc_self_cgroup = ReadFile("/proc/self/cgroup").value_or("");
  for (const int quota :
       {CgroupCpuLimit(proc_self_cgroup, "/sys/fs/cgroup"),
        CgroupV1CpuLimit(proc_self_cgroup, ReadFile("/proc/self/mountinfo").value_or(""))}) {
    if (quota > 0) cores = cores > 0 ? std::min(cores, quota) : quota;
  }
  return std::max(1, cores);
}

ThreadPool::ThreadPool(int num_threads)
    : num_threads_(num_threads > 0 ? num_threads : UsableCores()) {
  threads_.reserve(num_threads_ - 1);
  for (int i = 1; i < num_threads_; ++i) threads_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true, std::memory_order_release);
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::RunChunks() {
  const auto& fn = *fn_;
  for (;;) {
    int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (begin >= n_) return;
    fn(begin, std::min(n_, begin + chunk_));
  }
}

void ThreadPool::WorkerLoop(int /*index*/) {
  uint64_t seen = 0;  // generation of the last job this helper looked at
  for (;;) {
    auto ready = [&] {
      return (state_.load(std::memory_order_acquire) >> kGenShift) != seen ||
             stop_.load(std::memory_order_acquire);
    };
    if (!SpinUntil(ready)) {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, ready);
    }
    if (stop_.load(std::memory_order_acquire)) return;
    uint64_t s = state_.load(std::memory_order_acquire);
    seen = s >> kGenShift;
    // Join unless the caller already closed this job (then it needs no help).
    bool joined = false;
    while (!(s & kClosed) && (s >> kGenShift) == seen) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        joined = true;
        break;
      }
    }
    if (!joined) continue;
    RunChunks();
    finished_.fetch_add(1, std::memory_order_acq_rel);
    // Lock so the notify cannot slip between the caller's check and its wait.
    std::lock_guard<std::mutex> lock(mu_);
    done_cv_.notify_one();
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t chunk =
      std::max(grain, (n + num_threads_ * kChunksPerThread - 1) / (num_threads_ * kChunksPerThread));
  if (num_threads_ == 1 || chunk >= n) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mu_);
  fn_ = &fn;
  n_ = n;
  chunk_ = chunk;
  next_.store(0, std::memory_order_relaxed);
  finished_.store(0, std::memory_order_relaxed);
  {
    // Publishing under mu_ pairs with the predicate check of a helper going to sleep.
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> kGenShift) + 1;
    state_.store(gen << kGenShift, std::memory_order_release);
  }
  work_cv_.notify_all();  // cheap when nobody sleeps
  RunChunks();
  // Every chunk is claimed: close the job and wait for the helpers inside it.
  const int joined = static_cast<int>(state_.fetch_or(kClosed, std::memory_order_acq_rel) & kJoinedMask);
  auto done = [&] { return finished_.load(std::memory_order_acquire) == joined; };
  if (!SpinUntil(done)) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, done);
  }
  fn_ = nullptr;
}

void ParallelFor(CpuStream stream, int64_t n, int64_t grain,
                 const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (stream.pool != nullptr) {
    stream.pool->ParallelFor(n, grain, fn);
  } else {
    fn(0, n);
  }
}

}  // namespace joule::kernels::cpu
