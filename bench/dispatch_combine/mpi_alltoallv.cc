// Baseline for the transport benchmark: MPI_Alltoallv on the same payloads as
// joule-transport-bench (tokens x top_k rows of hidden BF16 values, spread
// evenly over the ranks). Plain MPI and the C++ standard library only.
//
//   mpirun -np W joule-mpi-alltoallv-bench --hidden 2048,7168 --tokens 1,..,4096 [--top-k 8]
//       [--mode alltoallv|dispatch-combine] [--self-copy 0|1] [--out FILE]
//
// A rank's own share stays out of the exchange (count 0), as in Joule's
// executor; --self-copy 1 passes it through MPI_Alltoallv as well.
//
// --mode dispatch-combine is the baseline for joule-dispatch-combine-bench:
// one iteration is what ExpertParallelExecutor exchanges for a MoE layer
// under uniform routing — an MPI_Allgather of the per-destination row counts
// (W + 2 int64 per rank), an MPI_Alltoallv of the dispatch rows (hidden BF16
// values + a 4-byte expert id each) and an MPI_Alltoallv of the combine rows
// (hidden BF16 values) back — with rows spread evenly and no packing.
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
  bool self_copy = false;
  std::string out_path, mode = "alltoallv";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--hidden") hidden = ParseList(v);
    else if (k == "--tokens") tokens = ParseList(v);
    else if (k == "--top-k") top_k = std::atoi(v.c_str());
    else if (k == "--out") out_path = v;
    else if (k == "--mode") mode = v;
    else if (k == "--self-copy") self_copy = v == "1" || v == "true";
  }
  if (mode != "alltoallv" && mode != "dispatch-combine") {
    if (rank == 0) std::fprintf(stderr, "--mode: alltoallv or dispatch-combine, got %s\n", mode.c_str());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  const bool dc = mode == "dispatch-combine";
  FILE* out = stdout;
  if (rank == 0 && !out_path.empty()) out = std::fopen(out_path.c_str(), "a");
  for (int h : hidden) {
    for (int t : tokens) {
      if (dc) {
        // Byte counts (MPI_BYTE); a rank's buffers stay below 2 GiB for the sweep's shapes.
        const long rows = long(t) * top_k;
        const long dstride = 2L * h + 4, cstride = 2L * h;
        std::vector<int> rows_to(w), dcount(w), ddispl(w), ccount(w), cdispl(w);
        for (int p = 0; p < w; ++p) rows_to[p] = int(rows / w + (p < rows % w ? 1 : 0));
        long dtotal = 0, ctotal = 0;
        for (int p = 0; p < w; ++p) {
          dcount[p] = int(rows_to[p] * dstride);
          ddispl[p] = int(dtotal);
          dtotal += dcount[p];
          ccount[p] = int(rows_to[p] * cstride);
          cdispl[p] = int(ctotal);
          ctotal += ccount[p];
        }
        // Rank p receives rows_to[p] rows from everyone (and sends them back).
        std::vector<int> rdcount(w, dcount[rank]), rddispl(w), rccount(w, ccount[rank]), rcdispl(w);
        for (int p = 0; p < w; ++p) {
          rddispl[p] = p * dcount[rank];
          rcdispl[p] = p * ccount[rank];
        }
        std::vector<char> send(dtotal, 1), recv(long(w) * dcount[rank] + 1, 0);
        // Buffers and displacements keep room for the own share either way.
        const long self_bytes = dcount[rank] + ccount[rank];
        if (!self_copy) dcount[rank] = rdcount[rank] = ccount[rank] = rccount[rank] = 0;
        std::vector<long long> row(w + 2, 1), all_rows(long(w) * (w + 2));
        auto once = [&] {
          MPI_Allgather(row.data(), w + 2, MPI_LONG_LONG, all_rows.data(), w + 2, MPI_LONG_LONG,
                        MPI_COMM_WORLD);
          MPI_Alltoallv(send.data(), dcount.data(), ddispl.data(), MPI_BYTE, recv.data(),
                        rdcount.data(), rddispl.data(), MPI_BYTE, MPI_COMM_WORLD);
          MPI_Alltoallv(recv.data(), rccount.data(), rcdispl.data(), MPI_BYTE, send.data(),
                        ccount.data(), cdispl.data(), MPI_BYTE, MPI_COMM_WORLD);
        };
        once();
        MPI_Barrier(MPI_COMM_WORLD);
        double start = MPI_Wtime();
        once();
        int iters = int(std::clamp(0.25 / (MPI_Wtime() - start), 3.0, 1000.0));
        MPI_Bcast(&iters, 1, MPI_INT, 0, MPI_COMM_WORLD);
        std::vector<double> us(iters);
        for (int i = 0; i < iters; ++i) {
          MPI_Barrier(MPI_COMM_WORLD);  // as joule-dispatch-combine-bench does before each Run
          start = MPI_Wtime();
          once();
          us[i] = (MPI_Wtime() - start) * 1e6;
        }
        // The slowest rank's time per iteration, then the median.
        std::vector<double> slowest(iters);
        MPI_Reduce(us.data(), slowest.data(), iters, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        std::vector<double> sorted = slowest;
        std::sort(sorted.begin(), sorted.end());
        const double median = sorted[iters / 2];
        double mean = 0;
        for (double x : slowest) mean += x / iters;
        const long to_peers = dtotal + ctotal - self_bytes;
        if (rank == 0) {
          std::fprintf(out,
                       "{\"impl\":\"mpi-dispatch-combine\",\"self_copy\":%s,\"ep\":%d,\"hidden\":%d,\"tokens\":%d,"
                       "\"top_k\":%d,\"bytes_per_rank\":%ld,\"bytes_per_peer\":%ld,\"iters\":%d,"
                       "\"latency_us_median\":%.2f,\"latency_us_mean\":%.2f,\"algbw_GBps\":%.4f}\n",
                       self_copy ? "true" : "false", w, h, t, top_k, to_peers,
                       long(dcount[(rank + 1) % w]), iters, median, mean,
                       to_peers / median / 1e3);
          std::fflush(out);
        }
        continue;
      }
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
      const long self_elems = counts[rank];
      std::vector<int> scounts = counts;
      if (!self_copy) scounts[rank] = rcounts[rank] = 0;
      auto once = [&] {
        MPI_Alltoallv(send.data(), scounts.data(), displs.data(), MPI_SHORT, recv.data(),
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
      const long to_peers = bytes_total - self_elems * 2;
      if (rank == 0) {
        std::fprintf(out,
                     "{\"impl\":\"mpi-alltoallv\",\"self_copy\":%s,\"ep\":%d,\"hidden\":%d,\"tokens\":%d,"
                     "\"top_k\":%d,\"bytes_per_rank\":%ld,\"bytes_per_peer\":%ld,\"iters\":%d,"
                     "\"latency_us_median\":%.2f,\"latency_us_mean\":%.2f,\"algbw_GBps\":%.4f}\n",
                     self_copy ? "true" : "false", w, h, t, top_k, bytes_total, per_peer, iters,
                     median, mean,
                     to_peers / median / 1e3);
        std::fflush(out);
      }
    }
  }
  if (out != stdout) std::fclose(out);
  MPI_Finalize();
  return 0;
}
