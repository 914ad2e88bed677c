#include "bench/energy/report.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace joule::bench {
namespace {

double Mean(const std::vector<double>& v) {
  return v.empty() ? NAN : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

// Tokens of `r` that arrived inside [a, b]: text chunks in the window, each worth
// output_tokens / chunks (a chunk may carry more than one token).
double TokensIn(const RequestRecord& r, double a, double b) {
  if (r.chunk_s.empty()) return 0;
  const double per_chunk = static_cast<double>(r.output_tokens()) / static_cast<double>(r.chunk_s.size());
  int64_t n = 0;
  for (double t : r.chunk_s) n += (t >= a && t <= b) ? 1 : 0;
  return per_chunk * static_cast<double>(n);
}

std::string ErrorClass(const RequestRecord& r) {
  if (r.http_status != 0 && r.http_status != 200) return std::to_string(r.http_status);
  if (r.http_status == 200) return "stream";
  return "connection";
}

void SetAttainment(TierSummary* s) {
  auto ratio = [s](int64_t met) {
    return s->requests == 0 ? NAN : static_cast<double>(met) / static_cast<double>(s->requests);
  };
  s->slo_attainment = ratio(s->slo_met);
  s->ttft_attainment = ratio(s->ttft_met);
  s->tpot_attainment = ratio(s->tpot_met);
}

// Latency percentiles, errors and SLO attainment of the requests (tokens are
// counted separately, by arrival time).
void FillLatencies(const std::vector<const RequestRecord*>& reqs, double ttft_ms_target, double tpot_ms_target,
                   TierSummary* s) {
  std::vector<double> ttft, tpot, itl, e2e;
  for (const RequestRecord* r : reqs) {
    ++s->requests;
    if (!r->ok()) {
      ++s->errors;
      ++s->errors_by_status[ErrorClass(*r)];
      continue;
    }
    ++s->completed;
    if (!std::isnan(r->ttft_s())) ttft.push_back(r->ttft_s() * 1e3);
    if (!std::isnan(r->tpot_s())) tpot.push_back(r->tpot_s() * 1e3);
    for (size_t i = 1; i < r->chunk_s.size(); ++i) itl.push_back((r->chunk_s[i] - r->chunk_s[i - 1]) * 1e3);
    e2e.push_back(r->e2e_s() * 1e3);
    const bool ttft_ok = !std::isnan(r->ttft_s()) && r->ttft_s() * 1e3 <= ttft_ms_target;
    const bool tpot_ok = std::isnan(r->tpot_s()) || r->tpot_s() * 1e3 <= tpot_ms_target;
    s->slo_met += (ttft_ok && tpot_ok) ? 1 : 0;
    s->ttft_met += ttft_ok ? 1 : 0;
    s->tpot_met += tpot_ok ? 1 : 0;
  }
  s->mean_tpot_ms = Mean(tpot);
  s->interactivity_tok_s_user = std::isnan(s->mean_tpot_ms) || s->mean_tpot_ms <= 0 ? NAN : 1e3 / s->mean_tpot_ms;
  s->ttft_p50_ms = Percentile(ttft, 50);
  s->ttft_p99_ms = Percentile(ttft, 99);
  s->tpot_p50_ms = Percentile(tpot, 50);
  s->tpot_p99_ms = Percentile(tpot, 99);
  s->itl_p50_ms = Percentile(itl, 50);
  s->itl_p99_ms = Percentile(itl, 99);
  s->e2e_p50_ms = Percentile(e2e, 50);
  s->e2e_p99_ms = Percentile(e2e, 99);
  SetAttainment(s);
}

void SetEnergy(double joules, double joules_excl_idle, TierSummary* s) {
  s->joules = joules;
  s->joules_excl_idle = joules_excl_idle;
  if (s->output_tokens > 0) {
    s->j_per_token = joules / s->output_tokens;
    s->j_per_token_excl_idle = joules_excl_idle / s->output_tokens;
  }
  if (joules > 0) s->tokens_per_joule = s->output_tokens / joules;
  if (joules_excl_idle > 0) s->tokens_per_joule_excl_idle = s->output_tokens / joules_excl_idle;
}

// NaN (no such number: no requests, no energy) becomes null, as JSON readers expect.
void NullNans(nlohmann::json* j) {
  if (j->is_number_float() && std::isnan(j->get<double>())) {
    *j = nullptr;
  } else if (j->is_structured()) {
    for (auto& child : *j) NullNans(&child);
  }
}

}  // namespace

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return NAN;
  std::sort(values.begin(), values.end());
  const double rank = p / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(values.size() - 1, lo + 1);
  return values[lo] + (values[hi] - values[lo]) * (rank - static_cast<double>(lo));
}

RunSummary Summarize(const RunResult& run, const SloTargets& slo, double min_energy_window_s) {
  RunSummary out;
  out.warnings = run.warnings;
  const double ws = run.window_start_s, we = run.window_end_s;
  out.window_s = std::max(0.0, we - ws);

  std::array<std::vector<const RequestRecord*>, kNumTiers> by_tier;
  std::vector<const RequestRecord*> all;
  std::array<double, kNumTiers> reported{};
  int64_t done_in_window = 0, with_energy = 0;
  for (const RequestRecord& r : run.requests) {
    const int t = static_cast<int>(r.tier);
    const double tokens = TokensIn(r, ws, we);
    out.tiers[t].output_tokens += tokens;
    out.all.output_tokens += tokens;
    if (r.ok() && r.done_s >= ws && r.done_s <= we) {
      ++done_in_window;
      if (!std::isnan(r.energy_joules)) {
        ++with_energy;
        reported[t] += r.energy_joules;
      }
    }
    // Latency and SLO: requests that arrived in the window (warm-up excluded).
    if (r.scheduled_s >= ws && r.scheduled_s < we) {
      by_tier[t].push_back(&r);
      all.push_back(&r);
    }
  }
  for (Tier tier : kAllTiers) {
    const int t = static_cast<int>(tier);
    TierSummary& s = out.tiers[t];
    s.tier = std::string(TierName(tier));
    FillLatencies(by_tier[t], slo.ttft_ms[t], slo.tpot_ms[t], &s);
    s.throughput_tok_s = out.window_s > 0 ? s.output_tokens / out.window_s : NAN;
    if (with_energy > 0) s.reported_energy_joules = reported[t];
  }
  // "all": every request against its own tier's target.
  out.all.tier = "all";
  {
    FillLatencies(all, INFINITY, INFINITY, &out.all);
    out.all.slo_met = out.all.ttft_met = out.all.tpot_met = 0;
    for (const TierSummary& s : out.tiers) {
      out.all.slo_met += s.slo_met;
      out.all.ttft_met += s.ttft_met;
      out.all.tpot_met += s.tpot_met;
    }
    SetAttainment(&out.all);
  }
  out.all.throughput_tok_s = out.window_s > 0 ? out.all.output_tokens / out.window_s : NAN;
  if (with_energy > 0) {
    out.all.reported_energy_joules = std::accumulate(reported.begin(), reported.end(), 0.0);
  }

  // Energy.
  if (run.idle_start && run.idle_end && run.idle_end->t_s > run.idle_start->t_s) {
    out.idle_watts = (run.idle_end->joules - run.idle_start->joules) / (run.idle_end->t_s - run.idle_start->t_s);
  }
  if (run.window_start && run.window_end) {
    std::set<std::string> sources = run.window_start->sources;
    sources.insert(run.window_end->sources.begin(), run.window_end->sources.end());
    out.energy_source = absl::StrJoin(sources, "+");
    if (sources.count("model")) absl::StrAppend(&out.energy_source, " (estimate)");
    const double e = run.window_end->joules - run.window_start->joules;
    out.window_joules = e;
    if (out.window_s < min_energy_window_s) {
      out.warnings.push_back(absl::StrFormat(
          "energy window %.2f s is shorter than %.1f s: counters update every ~100 ms, expect noise",
          out.window_s, min_energy_window_s));
    }
    if (e < 0) out.warnings.push_back("the energy counter went backwards (a worker restarted?)");
    const double idle = std::clamp(out.idle_watts.value_or(0) * out.window_s, 0.0, std::max(0.0, e));
    const double active = e - idle;
    // Active energy goes to tiers by the server's attribution when every request
    // finished in the window reported one, else by token share; idle by token share.
    const bool use_reported = with_energy > 0 && with_energy == done_in_window;
    const double reported_all = std::accumulate(reported.begin(), reported.end(), 0.0);
    out.energy_split = use_reported && reported_all > 0 ? "reported" : "tokens";
    for (TierSummary& s : out.tiers) {
      const double token_share = out.all.output_tokens > 0 ? s.output_tokens / out.all.output_tokens : 0;
      const double active_share = out.energy_split == "reported"
                                      ? reported[&s - out.tiers.data()] / reported_all
                                      : token_share;
      if (s.output_tokens > 0 || s.requests > 0) SetEnergy(active * active_share + idle * token_share, active * active_share, &s);
    }
    SetEnergy(e, active, &out.all);
    for (const auto& [name, end] : run.window_end->counters) {
      if (auto start = run.window_start->counters.find(name); start != run.window_start->counters.end()) {
        out.window_counters[name] = end - start->second;
      }
    }
  }
  return out;
}

nlohmann::json SummaryJson(const RunSummary& s, const nlohmann::json& meta) {
  auto tier_json = [](const TierSummary& t) {
    nlohmann::json errors = nlohmann::json::object();
    for (const auto& [k, v] : t.errors_by_status) errors[k] = v;
    return nlohmann::json{
        {"tier", t.tier},
        {"requests", t.requests},
        {"completed", t.completed},
        {"errors", t.errors},
        {"errors_by_status", errors},
        {"output_tokens", t.output_tokens},
        {"throughput_tok_s", t.throughput_tok_s},
        {"mean_tpot_ms", t.mean_tpot_ms},
        {"interactivity_tok_s_user", t.interactivity_tok_s_user},
        {"ttft_ms", {{"p50", t.ttft_p50_ms}, {"p99", t.ttft_p99_ms}}},
        {"tpot_ms", {{"p50", t.tpot_p50_ms}, {"p99", t.tpot_p99_ms}}},
        {"itl_ms", {{"p50", t.itl_p50_ms}, {"p99", t.itl_p99_ms}}},
        {"e2e_ms", {{"p50", t.e2e_p50_ms}, {"p99", t.e2e_p99_ms}}},
        {"slo_attainment", t.slo_attainment},
        {"ttft_attainment", t.ttft_attainment},
        {"tpot_attainment", t.tpot_attainment},
        {"joules", t.joules},
        {"joules_excl_idle", t.joules_excl_idle},
        {"j_per_token", t.j_per_token},
        {"j_per_token_excl_idle", t.j_per_token_excl_idle},
        {"tokens_per_joule", t.tokens_per_joule},
        {"tokens_per_joule_excl_idle", t.tokens_per_joule_excl_idle},
        {"reported_energy_joules", t.reported_energy_joules},
    };
  };
  nlohmann::json tiers = nlohmann::json::array();
  for (const TierSummary& t : s.tiers) {
    if (t.requests > 0 || t.output_tokens > 0) tiers.push_back(tier_json(t));
  }
  nlohmann::json energy = {
      {"source", s.energy_source},
      {"window_joules", s.window_joules ? nlohmann::json(*s.window_joules) : nlohmann::json()},
      {"idle_watts", s.idle_watts ? nlohmann::json(*s.idle_watts) : nlohmann::json()},
      {"split", s.energy_split},
  };
  nlohmann::json counters = nlohmann::json::object();
  for (const auto& [name, increase] : s.window_counters) counters[name] = increase;
  nlohmann::json doc{{"meta", meta},      {"window_s", s.window_s}, {"energy", energy},
                     {"all", tier_json(s.all)}, {"tiers", tiers},   {"warnings", s.warnings},
                     {"window_counters", counters}};
  NullNans(&doc);
  return doc;
}

std::string SummaryCsv(const RunSummary& s, const std::string& label, double rate) {
  std::string out =
      "label,rate,tier,requests,completed,errors,throughput_tok_s,interactivity_tok_s_user,"
      "ttft_p50_ms,ttft_p99_ms,tpot_p50_ms,tpot_p99_ms,e2e_p50_ms,e2e_p99_ms,slo_attainment,"
      "j_per_token,j_per_token_excl_idle,tokens_per_joule,tokens_per_joule_excl_idle,idle_watts,energy_source,"
      "ttft_attainment,tpot_attainment\n";
  auto num = [](double v) { return std::isnan(v) ? std::string() : absl::StrFormat("%.6g", v); };
  auto row = [&](const TierSummary& t) {
    absl::StrAppend(&out, label, ",", num(rate), ",", t.tier, ",", t.requests, ",", t.completed, ",", t.errors, ",",
                    num(t.throughput_tok_s), ",", num(t.interactivity_tok_s_user), ",", num(t.ttft_p50_ms), ",",
                    num(t.ttft_p99_ms), ",", num(t.tpot_p50_ms), ",", num(t.tpot_p99_ms), ",", num(t.e2e_p50_ms),
                    ",", num(t.e2e_p99_ms), ",", num(t.slo_attainment), ",", num(t.j_per_token), ",",
                    num(t.j_per_token_excl_idle), ",", num(t.tokens_per_joule), ",",
                    num(t.tokens_per_joule_excl_idle), ",", num(s.idle_watts.value_or(NAN)), ",",
                    s.energy_source, ",", num(t.ttft_attainment), ",", num(t.tpot_attainment), "\n");
  };
  for (const TierSummary& t : s.tiers) {
    if (t.requests > 0) row(t);
  }
  row(s.all);
  return out;
}

}  // namespace joule::bench
