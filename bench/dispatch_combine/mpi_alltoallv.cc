// Baseline for the transport benchmark: MPI_Alltoallv on the same payloads as
// joule-transport-bench (tokens x top_k rows of hidden BF16 values, spread
// evenly over the ranks). Plain MPI and the C++ standard library only.
//
//   mpirun -np W joule-mpi-alltoallv-bench --hidden 2048,7168 --tokens 1,..,4096 [--top-k 8] [--out FILE]
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<int> ParseList(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    if (!item.empty()) v.push_back(std::atoi(item.c_str()));
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, w = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &w);
  std::vector<int> hidden, tokens;
  int top_k = 8;
  std::string out_path;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--hidden") hidden = ParseList(v);
    else if (k == "--tokens") tokens = ParseList(v);
    else if (k == "--top-k") top_k = std::atoi(v.c_str());
    else if (k == "--out") out_path = v;
  }
  FILE* out = stdout;
  if (rank == 0 && !out_path.empty()) out = std::fopen(out_path.c_str(), "a");
  for (int h : hidden) {
    for (int t : tokens) {
      // MPI counts are int: count in BF16 elements (MPI_SHORT, 2 bytes).
      const long rows = long(t) * top_k;
      std::vector<int> counts(w), displs(w);
      long total = 0;
      for (int p = 0; p < w; ++p) {
        counts[p] = int((rows / w + (p < rows % w ? 1 : 0)) * h);
        displs[p] = int(total);
        total += counts[p];
      }
      std::vector<int> rcounts(w, counts[rank]), rdispls(w);
      for (int p = 0; p < w; ++p) rdispls[p] = p * counts[rank];
      std::vector<short> send(total, 1), recv(long(w) * counts[rank] + 1);
      auto once = [&] {
        MPI_Alltoallv(send.data(), counts.data(), displs.data(), MPI_SHORT, recv.data(),
                      rcounts.data(), rdispls.data(), MPI_SHORT, MPI_COMM_WORLD);
      };
      for (int i = 0; i < 3; ++i) once();
      MPI_Barrier(MPI_COMM_WORLD);
      double start = MPI_Wtime();
      once();
      int iters = int(std::clamp(0.3 / (MPI_Wtime() - start), 5.0, 2000.0));
      MPI_Bcast(&iters, 1, MPI_INT, 0, MPI_COMM_WORLD);
      std::vector<double> us(iters);
      MPI_Barrier(MPI_COMM_WORLD);
      for (int i = 0; i < iters; ++i) {
        start = MPI_Wtime();
        once();
        us[i] = (MPI_Wtime() - start) * 1e6;
      }
      std::vector<double> sorted = us;
      std::sort(sorted.begin(), sorted.end());
      const double median = sorted[iters / 2];
      double mean = 0;
      for (double x : us) mean += x / iters;
      const long bytes_total = total * 2;
      const long per_peer = long(counts[(rank + 1) % w]) * 2;
      const long to_peers = bytes_total - long(counts[rank]) * 2;
      if (rank == 0) {
        std::fprintf(out,
                     "{\"impl\":\"mpi-alltoallv\",\"ep\":%d,\"hidden\":%d,\"tokens\":%d,"
                     "\"top_k\":%d,\"bytes_per_rank\":%ld,\"bytes_per_peer\":%ld,\"iters\":%d,"
                     "\"latency_us_median\":%.2f,\"latency_us_mean\":%.2f,\"algbw_GBps\":%.4f}\n",
                     w, h, t, top_k, bytes_total, per_peer, iters, median, mean,
                     to_peers / median / 1e3);
        std::fflush(out);
      }
    }
  }
  if (out != stdout) std::fclose(out);
  MPI_Finalize();
  return 0;
}
