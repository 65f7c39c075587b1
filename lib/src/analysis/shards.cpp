#include "pathkernel/analysis/shards.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "pathkernel/io/csv.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"

namespace pathkernel {
namespace fs = std::filesystem;

std::vector<int64_t> shard_bounds(int64_t begin, int64_t end, const std::vector<int64_t>& checkpoints, int64_t n) {
  if (end - begin < n) {
    throw InputError("cannot split steps " + std::to_string(begin) + ".." + std::to_string(end - 1) + " into " +
                     std::to_string(n) + " shards: a shard needs a step (use at most " + std::to_string(end - begin) +
                     ")");
  }
  std::vector<int64_t> bounds = {begin};
  for (int64_t i = 1; i < n; ++i) {
    const double target = static_cast<double>(begin) + static_cast<double>(i) * static_cast<double>(end - begin) / n;
    int64_t best = -1;
    for (int64_t c : checkpoints) {
      // Strictly inside what is left, and leaving a step for each shard still to come.
      if (c <= bounds.back() || c > end - (n - i)) continue;
      if (best < 0 || std::fabs(static_cast<double>(c) - target) < std::fabs(static_cast<double>(best) - target)) best = c;
    }
    if (best < 0) {
      throw InputError("cannot split steps " + std::to_string(begin) + ".." + std::to_string(end - 1) + " into " +
                       std::to_string(n) + " shards at stored checkpoints: the run has too few (train with a smaller "
                       "--checkpoint-every, or use fewer shards)");
    }
    bounds.push_back(best);
  }
  bounds.push_back(end);
  return bounds;
}

namespace {

/// A steps.csv cell as write_analysis wrote it: an empty cell (S without --second-order, the
/// exact kernel's columns without --exact) is the row's default 0; "nan" stays NaN.
double cell(const Table& t, const std::string& col, size_t row, const fs::path& file) {
  const double v = t.at(col, file)[row];
  const bool optional = col == "S_norm" || col == "higher_norm" || col == "Kexact_norm" || col == "quad_error";
  return optional && std::isnan(v) ? 0.0 : v;
}

std::vector<StepRow> read_step_rows(const fs::path& file) {
  const Table t = read_csv(file);
  std::vector<StepRow> rows(t.rows);
  for (size_t i = 0; i < t.rows; ++i) {
    StepRow& s = rows[i];
    auto c = [&](const char* col) { return cell(t, col, i, file); };
    s.step = static_cast<int64_t>(c("step"));
    s.lr = c("lr");
    s.loss_before = c("batch_loss_before");
    s.loss_after = c("batch_loss_after");
    s.loss_up = c("loss_went_up") != 0;
    s.grad_norm = c("grad_norm");
    s.update_norm = c("update_norm");
    s.d_norm = c("D_norm");
    s.f_norm = c("F_norm");
    s.k_norm = c("K_norm");
    s.u_norm = c("U_norm");
    s.u_round_norm = c("U_round_norm");
    s.u_wd_norm = c("U_wd_norm");
    s.u_mom_norm = c("U_mom_norm");
    s.r_norm = c("R_norm");
    s.s_norm = c("S_norm");
    s.higher_norm = c("higher_norm");
    s.r = c("r");
    s.in_tc = c("in_Tc") != 0;
    s.kexact_norm = c("Kexact_norm");
    s.quad_error = c("quad_error");
    s.kopt_norm = c("Kopt_norm");
    s.uopt_wd_norm = c("Uopt_wd_norm");
    s.uopt_round_norm = c("Uopt_round_norm");
    // Issue 13's signals, empty where not computed (NaN); absent in older analyses.
    auto o = [&](const char* col) { return t.cols.count(col) ? t.cols.at(col)[i] : NAN; };
    s.grad_cos = o("grad_cos_prev");
    s.kinks_probes = o("kinks_probes");
    s.kinks_batch = o("kinks_batch");
    s.kink_pieces = o("kink_pieces");
    s.lambda_train = o("lambda_max_train");
    s.lambda_batch = o("lambda_max_batch");
    s.lanczos_iterations = o("lanczos_iterations");
    s.lanczos_residual = o("lanczos_residual");
    s.subset_loss_before = o("subset_loss_before");
    s.subset_loss_after = o("subset_loss_after");
    // Issue 23's verification of recorded steps (empty for a trained run).
    s.verify_loss_error = o("verify_loss_error");
    s.verify_gradient_error = o("verify_gradient_error");
    const double v = o("verified");
    s.verified = std::isnan(v) ? -1 : static_cast<int>(v);
    if (t.cols.count("U_stats_norm")) s.extra.emplace_back("U_stats_norm", o("U_stats_norm"));  // BatchNorm runs
  }
  return rows;
}

at::Tensor array(const fs::path& dir, const std::string& name, bool required = true) {
  const fs::path p = dir / "arrays" / (name + ".npy");
  if (!required && !fs::exists(p)) return {};
  return load_npy(p);
}

std::vector<int64_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

AnalyzeConfig config_from_settings(const nlohmann::json& s) {
  AnalyzeConfig c;
  c.run = s.at("run").get<std::string>();
  c.probes = s.at("probes").get<int64_t>();
  c.balanced = s.at("balanced").get<bool>();
  c.probe_indices_file = s.at("probe_indices_file").get<std::string>();
  c.split = s.at("split").get<std::string>();
  c.outputs = s.at("outputs").get<std::string>();
  c.step_begin = s.at("step_begin").get<int64_t>();
  c.step_end = s.at("step_end").get<int64_t>();
  c.every = s.at("every").get<int64_t>();
  c.second_order = s.at("second_order").get<bool>();
  c.exact_nodes = s.at("exact_nodes").get<int64_t>();
  c.kernel_route = s.at("kernel_route").get<std::string>();
  c.products = s.value("products", "auto");
  c.tc_rule = s.at("tc_rule").get<std::string>();
  c.tau = s.at("tau").get<double>();
  c.tc_window = s.at("tc_window").get<int64_t>();
  c.tc_kappa = s.at("tc_kappa").get<double>();
  c.identity_tolerance = s.at("identity_tolerance").get<double>();
  c.check_every = s.at("check_every").get<int64_t>();
  c.threads = s.at("threads").get<int>();
  c.kink_split = s.value("kinks", false);
  c.kinks_examples = s.value("kinks_examples", int64_t{0});
  c.kinks_max = s.value("kinks_max", int64_t{0});
  c.allow_unverified = s.value("allow_unverified", false);
  c.sharpness_every = s.value("sharpness_every", int64_t{0});
  c.sharpness_examples = s.value("sharpness_examples", int64_t{1000});
  c.sharpness_iterations = s.value("sharpness_iterations", int64_t{100});
  return c;
}

}  // namespace

StoredAnalysis read_analysis(const fs::path& dir) {
  StoredAnalysis a;
  a.dir = dir;
  const fs::path summary_file = dir / "summary.json";
  a.summary = read_json(summary_file);
  if (a.summary.value("format", "") != kAnalysisFormat) {
    throw InputError(summary_file.string() + ": not an analysis (format " + a.summary.value("format", "?") + ")");
  }
  try {
    a.config = config_from_settings(a.summary.at("settings"));
    AnalysisResult& r = a.result;
    r.steps = read_step_rows(dir / "steps.csv");
    r.d = array(dir, "D");
    r.f = array(dir, "F");
    r.k = array(dir, "K");
    r.u = array(dir, "U");
    r.r = array(dir, "R");
    r.kopt = array(dir, "Kopt");
    r.uopt_wd = array(dir, "Uopt_wd");
    r.uopt_round = array(dir, "Uopt_round");
    r.s = array(dir, "S", /*required=*/false);
    r.u_stats = array(dir, "U_stats", false);
    r.kexact = array(dir, "Kexact", false);
    r.uexact = array(dir, "Uexact", false);
    r.koptexact = array(dir, "Koptexact", false);
    r.uoptexact = array(dir, "Uoptexact", false);
    r.outputs = array(dir, "outputs");
    r.probe_indices = to_vector(array(dir, "probe"));
    r.probe_labels = to_vector(array(dir, "label"));
    const int64_t steps = static_cast<int64_t>(r.steps.size()), np = r.outputs.size(0), nc = r.outputs.size(1);
    for (const at::Tensor* t : {&r.d, &r.f, &r.k, &r.u, &r.r, &r.kopt, &r.uopt_wd, &r.uopt_round, &r.s, &r.kexact,
                                &r.uexact, &r.koptexact, &r.uoptexact, &r.u_stats}) {
      if (t->defined() && (t->dim() != 3 || t->size(0) != steps || t->size(1) != np || t->size(2) != nc)) {
        throw InputError(dir.string() + "/arrays: an array's shape does not match steps.csv and outputs.npy");
      }
    }
    // f at both ends, from probes.csv (one row per probe and output, in array order).
    const Table probes = read_csv(dir / "probes.csv");
    if (static_cast<int64_t>(probes.rows) != np * nc) throw InputError((dir / "probes.csv").string() + ": wrong row count");
    r.f_initial = at::tensor(probes.at("f_initial", dir / "probes.csv"), at::kDouble).reshape({np, nc});
    r.f_final = at::tensor(probes.at("f_final", dir / "probes.csv"), at::kDouble).reshape({np, nc});
    const nlohmann::json& s = a.summary;
    r.optimizer = s.at("optimizer").get<std::string>();
    r.loss = s.at("loss").get<std::string>();
    r.model = s.at("model").get<std::string>();
    r.route = s.at("kernel_route_used").get<std::string>();
    r.route_reason = s.value("kernel_route_reason", "");
    r.products = s.value("products_used", "");
    r.products_why = s.value("products_reason", "");
    r.rows_used = s.value("probe_rows_used", "");
    r.uses_kopt = s.at("kernel_term").get<std::string>() == "Kopt";
    r.contiguous = s.at("identity_applies").get<bool>();
    r.kernel_split_error = s.at("max_kernel_split_error").get<double>();
    r.kernel_split_checked = s.at("kernel_split_checked_steps").get<int64_t>();
    r.smooth = s.at("smooth_model").get<bool>();
    r.seconds = s.at("seconds").get<double>();
    r.startup_seconds = s.at("startup_seconds").get<double>();
    r.threads = s.at("threads").get<int>();
    r.blas = s.at("blas").get<std::string>();
    r.blas_core = s.at("blas_core").get<std::string>();
    if (s.contains("run") && s["run"].is_object()) {
      r.run_path = s["run"].value("path", "");
      r.run_manifest_sha256 = s["run"].value("manifest_sha256", "");
      r.run_complete = s["run"].value("complete", true);
    }
    if (s.at("shard").is_object()) {
      r.shard_index = s["shard"].at("index").get<int64_t>();
      r.shard_count = s["shard"].at("count").get<int64_t>();
      r.whole_begin = s["shard"].at("whole_begin").get<int64_t>();
      r.whole_end = s["shard"].at("whole_end").get<int64_t>();
    }
  } catch (const nlohmann::json::exception& e) {
    throw InputError(summary_file.string() + ": malformed (" + std::string(e.what()) + ")");
  }
  if (a.result.steps.empty()) throw InputError((dir / "steps.csv").string() + ": no steps");
  return a;
}

namespace {

/// Settings that must agree between shards: all but the threads (results equal across them).
nlohmann::json comparable(nlohmann::json settings) {
  settings.erase("threads");
  return settings;
}

at::Tensor cat_arrays(const std::vector<StoredAnalysis>& parts, at::Tensor AnalysisResult::*member) {
  std::vector<at::Tensor> ts;
  for (const auto& p : parts) ts.push_back(p.result.*member);
  return ts.front().defined() ? at::cat(ts) : at::Tensor();
}

}  // namespace

AnalysisResult join_parts(const std::vector<StoredAnalysis>& parts) {
  AnalysisResult m = parts.front().result;
  m.steps.clear();
  m.kernel_split_error = 0;
  m.kernel_split_checked = 0;
  m.seconds = m.startup_seconds = 0;
  for (const auto& p : parts) {
    m.steps.insert(m.steps.end(), p.result.steps.begin(), p.result.steps.end());
    m.kernel_split_error = std::max(m.kernel_split_error, p.result.kernel_split_error);
    m.kernel_split_checked += p.result.kernel_split_checked;
    m.seconds += p.result.seconds;
    m.startup_seconds += p.result.startup_seconds;
    m.run_complete = m.run_complete && p.result.run_complete;  // a part analyzed before the run ended
  }
  for (at::Tensor AnalysisResult::*member :
       {&AnalysisResult::d, &AnalysisResult::f, &AnalysisResult::k, &AnalysisResult::u, &AnalysisResult::r,
        &AnalysisResult::s, &AnalysisResult::kopt, &AnalysisResult::uopt_wd, &AnalysisResult::uopt_round,
        &AnalysisResult::kexact, &AnalysisResult::uexact, &AnalysisResult::koptexact, &AnalysisResult::uoptexact,
        &AnalysisResult::u_stats}) {
    m.*member = cat_arrays(parts, member);
  }
  m.f_final = parts.back().result.f_final;
  return m;
}

namespace {

/// What lstat says is at `p`, without following a link.
fs::file_type entry_type(const fs::path& p) {
  std::error_code ec;
  return fs::symlink_status(p, ec).type();
}

/// The segments folder of an interrupted analysis: a real folder this command made, holding
/// finished segments (seg_<step>) and the staging folders of one cut off (.seg_<step>.staging-*,
/// .seg_<step>.replaced-*).
/// Anything else, a symbolic link above all, is refused: it is not ours to read or delete.
std::vector<fs::path> segment_dirs(const fs::path& segments) {
  std::vector<fs::path> found;
  const fs::file_type t = entry_type(segments);
  if (t == fs::file_type::not_found) return found;
  if (t != fs::file_type::directory) {
    throw InputError(segments.string() + ": is not a folder this command made (" +
                     (t == fs::file_type::symlink ? "a symbolic link" : "not a folder") +
                     "); pathkernel neither follows nor deletes it: remove it, or give another --out");
  }
  for (const auto& e : fs::directory_iterator(segments)) {
    const std::string name = e.path().filename().string();
    const fs::file_type et = entry_type(e.path());
    if (name.rfind("seg_", 0) == 0 && et == fs::file_type::directory) {
      found.push_back(e.path());
    } else if (name.rfind(".seg_", 0) == 0 &&
               (name.find(".staging-") != std::string::npos || name.find(".replaced-") != std::string::npos) &&
               et == fs::file_type::directory) {
      std::error_code ec;
      fs::remove_all(e.path(), ec);  // a segment whose writing was cut off (StagedOutput's folders)
    } else {
      throw InputError(e.path().string() + ": not a segment of an interrupted analysis (" +
                       (et == fs::file_type::symlink ? "a symbolic link" : "an unexpected entry") +
                       "); pathkernel neither follows nor deletes it: remove it, or give another --out");
    }
  }
  std::sort(found.begin(), found.end());  // seg_<first step, 8 digits>
  return found;
}

}  // namespace

std::vector<StoredAnalysis> open_progress(const fs::path& dir, const nlohmann::json& key, bool force) {
  const fs::path marker = dir / "partial.json", segments = dir / "segments";
  const nlohmann::json want = {{"format", kPartialAnalysisFormat}, {"key", key}};
  if (entry_type(dir) == fs::file_type::symlink) {
    throw InputError(dir.string() + ": is a symbolic link; give a real folder");
  }
  if (is_partial_analysis(dir.string())) {
    const nlohmann::json have = read_json(marker);
    const std::vector<fs::path> old = segment_dirs(segments);  // refused before anything is removed
    // Continued or discarded, the folder ends replaced by a complete analysis: nothing the user
    // put there may go with it.
    if (const fs::path extra = foreign_entry(dir); !extra.empty()) {
      throw InputError(dir.string() + ": holds " + (dir / extra).string() +
                       ", which is not the interrupted analysis's own; it would be removed with the folder when "
                       "the analysis completes: move it out first, or give another --out");
    }
    if (have.value("key", nlohmann::json()) != key) {
      if (!force) {
        throw InputError(dir.string() + ": holds an interrupted analysis of another command (other run, settings or "
                         "shard: see " + marker.string() + "); run that command again to continue it, or give "
                         "another --out (--force discards it)");
      }
      std::error_code ec;
      fs::remove_all(segments, ec);  // checked above: a real folder of segments
      atomic_write(marker, want.dump(2) + "\n");
    }
  } else {
    fs::create_directories(dir);
    atomic_write(marker, want.dump(2) + "\n");
  }
  std::vector<StoredAnalysis> done;
  for (const auto& f : segment_dirs(segments)) done.push_back(read_analysis(f));
  return done;
}

void write_segment(const fs::path& dir, const AnalysisResult& segment, AnalyzeConfig c) {
  c.out = (dir / "segments" / fmt::format("seg_{:08d}", segment.steps.front().step)).string();
  c.progress_dir.clear();
  c.force = false;
  write_analysis(segment, c);
}

void check_shard_set(std::vector<ShardInfo>& shards) {
  std::sort(shards.begin(), shards.end(), [](const ShardInfo& a, const ShardInfo& b) { return a.index < b.index; });
  const ShardInfo& first = shards.front();
  const int64_t n = first.count;
  const std::string first_file = (first.dir / "summary.json").string();
  for (size_t i = 0; i < shards.size(); ++i) {
    const ShardInfo& p = shards[i];
    const std::string file = (p.dir / "summary.json").string();
    if (p.count == 0) throw InputError(file + ": not a shard (--shard I/N writes shards)");
    if (p.count != n) throw InputError(file + ": shard of " + std::to_string(p.count) + ", the others of " + std::to_string(n));
    if (comparable(p.settings) != comparable(first.settings)) {
      throw InputError(file + ": another run or other settings than " + first_file);
    }
    if (p.core != first.core) {
      throw InputError(file + ": computed on OpenBLAS core " + p.core + ", " + first.dir.string() + " on " + first.core +
                       " (their last bits differ)");
    }
    if (p.whole_begin != first.whole_begin || p.whole_end != first.whole_end) {
      throw InputError(file + ": a shard of another range of steps");
    }
    if (i > 0 && p.index == shards[i - 1].index) {
      throw InputError(file + ": shard " + std::to_string(p.index) + " given twice (also " + shards[i - 1].dir.string() + ")");
    }
    if (p.index != static_cast<int64_t>(i) + 1) {
      throw InputError("shard " + std::to_string(i + 1) + " of " + std::to_string(n) + " is missing (next given: " + file + ")");
    }
    const int64_t want_first = i == 0 ? p.whole_begin : shards[i - 1].last + 1;
    if (p.first != want_first) {
      throw InputError(file + ": begins at step " + std::to_string(p.first) + ", expected " + std::to_string(want_first) +
                       " (shards overlap or leave a gap)");
    }
  }
  if (static_cast<int64_t>(shards.size()) != n) {
    throw InputError("shard " + std::to_string(shards.size() + 1) + " of " + std::to_string(n) + " is missing");
  }
  if (shards.back().last + 1 != first.whole_end) {
    throw InputError((shards.back().dir / "summary.json").string() + ": the last shard ends before step " +
                     std::to_string(first.whole_end));
  }
}

std::pair<AnalysisResult, AnalyzeConfig> merge_shards(const MergeConfig& c) {
  c.validate();
  std::vector<StoredAnalysis> parts;
  for (const auto& d : c.shards) parts.push_back(read_analysis(d));
  std::sort(parts.begin(), parts.end(),
            [](const StoredAnalysis& a, const StoredAnalysis& b) { return a.result.shard_index < b.result.shard_index; });
  std::vector<ShardInfo> infos;
  for (const auto& p : parts) {
    const AnalysisResult& r = p.result;
    infos.push_back({p.dir, p.summary.at("settings"), r.blas_core, r.shard_index, r.shard_count, r.steps.front().step,
                     r.steps.back().step, r.whole_begin, r.whole_end});
  }
  check_shard_set(infos);
  AnalysisResult m = join_parts(parts);
  m.shard_index = m.shard_count = m.whole_begin = m.whole_end = 0;
  AnalyzeConfig config = parts.front().config;
  config.out = c.out;
  config.force = c.force;
  finish_analysis(m, config);
  return {m, config};
}

}  // namespace pathkernel
