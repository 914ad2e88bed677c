// A fixed pool of worker threads for data-parallel CPU kernels.
// The calling thread takes part in every ParallelFor, so a pool of N threads
// uses N cores with N-1 helpers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace joule::kernels::cpu {

// The cores this process may use: the CPUs in its affinity mask (taskset,
// cpusets), further capped by a cgroup CPU quota (v2 cpu.max or v1
// cpu.cfs_quota_us of its cgroup or an ancestor, rounded up), at least 1. std::thread::hardware_concurrency()
// counts every CPU of the host, so a container limited to 2 CPUs on a 64-core
// host would otherwise start 64 spinning threads.
int UsableCores();

// The cgroup v2 CPU limit in cores (quota / period, rounded up) that applies
// to the cgroup named in `proc_self_cgroup` (the text of /proc/self/cgroup),
// with the cgroup2 hierarchy mounted at `cgroup_root`: the smallest cpu.max
// of it and its ancestors, or 0 when none is set (or none can be read).
int CgroupCpuLimit(const std::string& proc_self_cgroup, const std::string& cgroup_root);

// The same for a cgroup v1 hierarchy with the cpu controller, found in
// `mountinfo` (the text of /proc/self/mountinfo; its mount point is read as a
// path): the smallest cpu.cfs_quota_us / cpu.cfs_period_us of the process's
// cpu cgroup and its ancestors below the mount, or 0 when none is set (-1).
int CgroupV1CpuLimit(const std::string& proc_self_cgroup, const std::string& mountinfo);

class ThreadPool {
 public:
  // num_threads <= 0 means UsableCores().
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(begin, end) on disjoint chunks covering [0, n), each at least
  // `grain` long (except the last), and returns when all have run.
  // Not reentrant: fn must not call ParallelFor on the same pool.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void WorkerLoop(int index);
  void RunChunks();

  int num_threads_;
  std::vector<std::thread> threads_;
  // Serializes concurrent callers; each ParallelFor owns the pool while it runs.
  std::mutex call_mu_;
  // Sleeping workers and a sleeping caller wait on these; the hot path spins on
  // the atomics below and only takes mu_ to go to sleep or to wake sleepers.
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::atomic<bool> stop_{false};
  // Job word: generation (bumped once per ParallelFor) << 16 | closed bit |
  // number of helpers that joined. Helpers join by CAS while the job is open;
  // the caller closes it once every chunk is claimed and waits only for the
  // helpers that joined, so a descheduled helper never delays a call.
  std::atomic<uint64_t> state_{0};
  std::atomic<int> finished_{0};  // joined helpers done with the current job
  // Current job.
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t chunk_ = 0;
  std::atomic<int64_t> next_{0};
};

// The CPU "stream": where a kernel runs. A null pool runs single-threaded.
struct CpuStream {
  ThreadPool* pool = nullptr;
};

// Convenience: runs on stream.pool when present, inline otherwise.
void ParallelFor(CpuStream stream, int64_t n, int64_t grain,
                 const std::function<void(int64_t, int64_t)>& fn);

}  // namespace joule::kernels::cpu
