// explain's files: attributions (.csv, .npy), top.csv, grids, summary.json, a worker's part, and
// the table printed after them.
#include "pathkernel/explain/explain.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>

#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/gnuplot.h"
#include "pathkernel/io/idx.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/train_config.h"
#include "pathkernel/trajectory/class_names.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {
namespace fs = std::filesystem;

namespace {


/// Indices of the `k` largest values of v (descending), or the smallest when !largest.
std::vector<int64_t> top_k(const at::Tensor& v, int64_t k, bool largest) {
  const auto [vals, idx] = at::topk(v, std::min(k, v.size(0)), 0, largest, /*sorted=*/true);
  std::vector<int64_t> out(idx.data_ptr<int64_t>(), idx.data_ptr<int64_t>() + idx.numel());
  return out;
}

}  // namespace

namespace {

/// The examples attributions.csv lists for probe p: --csv all, every one; --csv top, those of
/// top.csv, in example order.
std::vector<int64_t> csv_rows(const ExplainResult& r, const ExplainConfig& c, int64_t p) {
  const int64_t n = r.attributions.size(1);
  std::vector<int64_t> rows;
  if (c.csv == "all") {
    rows.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) rows[static_cast<size_t>(i)] = i;
  } else {
    rows = top_k(r.attributions[p], c.top, true);
    for (int64_t i : top_k(r.attributions[p], c.top, false)) rows.push_back(i);
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  }
  return rows;
}

/// attributions.npy (and _exact), example_labels.npy, times_drawn.npy and attributions.csv.
void write_attributions(const fs::path& out, const ExplainResult& r, const ExplainConfig& c,
                        const at::Tensor& train_labels) {
  const bool exact = r.attributions_exact.defined();
  save_npy(out / "attributions.npy", r.attributions);
  if (exact) save_npy(out / "attributions_exact.npy", r.attributions_exact);
  // The coordinates of the attributions' columns, for readers that skip the CSV.
  save_npy(out / "example_labels.npy", train_labels);
  save_npy(out / "times_drawn.npy", r.times_drawn);
  const int64_t np = r.attributions.size(0), n = r.attributions.size(1);
  const at::Tensor attr = r.attributions.contiguous();
  const double* a = attr.data_ptr<double>();
  const at::Tensor attr_ex = exact ? r.attributions_exact.contiguous() : at::Tensor();
  const int64_t* drawn = r.times_drawn.data_ptr<int64_t>();
  const int64_t* labels = train_labels.data_ptr<int64_t>();
  std::string csv = exact ? "probe,output,example,label,a,a_exact,times_drawn,steps\n"
                          : "probe,output,example,label,a,times_drawn,steps\n";
  for (int64_t p = 0; p < np; ++p) {
    for (int64_t i : csv_rows(r, c, p)) {
      csv += fmt::format("{},{},{},{},{}", r.probe_indices[p], r.outputs[p], i, labels[i], csv_float(a[p * n + i]));
      if (exact) csv += "," + csv_float(attr_ex.data_ptr<double>()[p * n + i]);
      csv += fmt::format(",{},{}\n", drawn[i], fmt::join(r.drawn_at[static_cast<size_t>(i)], ";"));
    }
  }
  atomic_write(out / "attributions.csv", csv);
}

/// What the pictures show: the run's training images, and the names of their classes.
struct Pictures {
  const Trajectory& run;
  const ExplainConfig& c;
  std::vector<std::string> names;  ///< per class (Fashion-MNIST's built in, --class-names for other data)
  bool plots = false;              ///< gnuplot is there and the inputs are single-channel images
  const std::string& name(int64_t k) const { return names.at(static_cast<size_t>(k)); }
};

/// top.csv (each probe's top proponents and opponents) and, for the first --grids probes, a PNG
/// grid of the probe and those examples.
void write_top(const fs::path& out, const ExplainResult& r, const Pictures& pic, const at::Tensor& train_labels) {
  const ExplainConfig& c = pic.c;
  const int64_t np = r.attributions.size(0), n = r.attributions.size(1);
  const at::Tensor attr = r.attributions.contiguous();
  const double* a = attr.data_ptr<double>();
  const int64_t* labels = train_labels.data_ptr<int64_t>();
  std::string top = "probe,output,kind,rank,example,label,a\n";
  for (int64_t p = 0; p < np; ++p) {
    const at::Tensor row = r.attributions[p];
    const auto pro = top_k(row, c.top, true), opp = top_k(row, c.top, false);
    std::vector<GridImage> tiles;
    if (pic.plots && p < c.grids) {
      tiles.push_back({pic.run.image(c.split, r.probe_indices[p]),
                       fmt::format("probe {}: {}", r.probe_indices[p], pic.name(r.probe_labels[p]))});
    }
    for (int64_t j = 1; !tiles.empty() && j < std::min<int64_t>(c.top, 8); ++j) {
      tiles.push_back({at::zeros_like(tiles[0].pixels), ""});
    }
    for (const auto& [kind, list] : {std::pair{"proponent", pro}, {"opponent", opp}}) {
      for (size_t j = 0; j < list.size(); ++j) {
        const int64_t i = list[j];
        top += fmt::format("{},{},{},{},{},{},{}\n", r.probe_indices[p], r.outputs[p], kind, j + 1, i, labels[i],
                           csv_float(a[p * n + i]));
        if (!tiles.empty()) {
          tiles.push_back({pic.run.image("train", i), fmt::format("#{} {} a={:+.2g}", i, pic.name(labels[i]), a[p * n + i])});
        }
      }
    }
    if (pic.plots && p < c.grids) {
      render_image_grid(out / "grids" / fmt::format("probe_{}.png", r.probe_indices[p]), tiles,
                        static_cast<int>(std::min<int64_t>(c.top, 8)),
                        fmt::format("probe {} ({}), {} {}: row 1 the probe, then top proponents, then top opponents "
                                    "(a_i = summed kernel term)",
                                    r.probe_indices[p], pic.name(r.probe_labels[p]),
                                    c.output < 0 ? "predicted" : "logit of", pic.name(r.outputs[p])));
    }
  }
  atomic_write(out / "top.csv", top);
}

/// self_influence.npy, .csv (every example by rank) and .png (the 32 highest).
void write_self_influence(const fs::path& out, const ExplainResult& r, const Pictures& pic,
                          const at::Tensor& train_labels) {
  save_npy(out / "self_influence.npy", r.self_influence);
  const int64_t* drawn = r.times_drawn.data_ptr<int64_t>();
  const int64_t* labels = train_labels.data_ptr<int64_t>();
  const auto order = top_k(r.self_influence, r.attributions.size(1), true);
  std::string s = "rank,example,label,self_influence,times_drawn\n";
  std::vector<GridImage> tiles;
  for (size_t j = 0; j < order.size(); ++j) {
    const int64_t i = order[j];
    const double v = r.self_influence[i].item<double>();
    s += fmt::format("{},{},{},{},{}\n", j + 1, i, labels[i], csv_float(v), drawn[i]);
    if (j < 32 && pic.plots) tiles.push_back({pic.run.image("train", i), fmt::format("#{} {} {:.3g}", i, pic.name(labels[i]), v)});
  }
  atomic_write(out / "self_influence.csv", s);
  if (pic.plots) {
    render_image_grid(out / "self_influence.png", tiles, 8,
                      "highest self-influence (TracIn: sum of lr / |B| |grad l_i|^2 over the steps that drew i)");
  }
}

/// summary.json: the settings, the sum check, the projection, and per probe the check's terms.
/// The settings an explanation was made with, as its summary.json records them (stored_config reads them).
nlohmann::json explanation_settings(const ExplainConfig& c) {
  return {{"split", c.split},     {"output", c.output},   {"top", c.top},
          {"exact_nodes", c.exact_nodes}, {"self_influence", c.self_influence},
          {"csv", c.csv},         {"threads", c.threads}, {"project", c.project},
          {"project_seed", c.project_seed}, {"route", c.route},
          {"kernel_route", c.kernel_route}, {"grids", c.grids}};
}

/// A --probe-part worker's output, for explain --workers' join only (join_probe_parts): its rows'
/// attributions over the whole run (attributions.npy, _exact), times_drawn.npy, self_influence.npy,
/// and its stretch's analysis of every probe: part_f.npy ([2, P]: before its first step, after its
/// last), part_u.npy, part_r.npy (and part_uexact.npy) ([steps, P]); summary.json says which.
void write_probe_part(const ExplainResult& r, const ExplainConfig& c) {
  const ProbePart& p = r.part;
  StagedOutput staged(c.out);
  const fs::path out = staged.path();
  save_npy(out / "attributions.npy", r.attributions);
  if (r.attributions_exact.defined()) save_npy(out / "attributions_exact.npy", r.attributions_exact);
  save_npy(out / "times_drawn.npy", r.times_drawn);
  if (r.self_influence.defined()) save_npy(out / "self_influence.npy", r.self_influence);
  save_npy(out / "part_f.npy", at::stack({p.f_initial, p.f_final}));
  save_npy(out / "part_u.npy", p.u.contiguous());
  save_npy(out / "part_r.npy", p.r.contiguous());
  if (p.uexact.defined()) save_npy(out / "part_uexact.npy", p.uexact.contiguous());
  const nlohmann::json j = {
      {"format", kExplainPartFormat},
      {"run", c.run},
      {"settings", explanation_settings(c)},
      {"optimizer", r.optimizer},
      {"probes", p.probe_indices},
      {"labels", p.probe_labels},
      {"outputs", p.outputs},
      {"part", {{"index", p.index}, {"count", p.count}, {"rows_begin", p.rows_begin}, {"rows_end", p.rows_end}}},
      {"attributed_steps", {r.first_step, r.last_step}},
      {"analyzed_steps", {p.first_step, p.last_step}},
      {"max_quad_error", p.max_quad_error},
      {"projection", c.project > 0 ? nlohmann::json{{"dims", r.project_dims}, {"max_batch_sum_error", p.projection_error}}
                                   : nlohmann::json(nullptr)},
      {"seconds", r.seconds}};
  atomic_write(out / "summary.json", j.dump(2) + "\n");
  staged.commit();
}

nlohmann::json explanation_summary(const ExplainResult& r, const ExplainConfig& c) {
  const bool exact = r.attributions_exact.defined();
  nlohmann::json j = {{"format", kExplainFormat},
                      {"run", c.run},
                      {"probes", r.probe_indices},
                      {"outputs", r.outputs},
                      {"max_sum_error", r.sum_check_in_merge ? nlohmann::json(nullptr) : nlohmann::json(r.sum_error)},
                      {"optimizer", r.optimizer},
                      {"attribution", r.through_optimizer ? "aopt: through the optimizer, over all earlier steps"
                                                          : "a: the note's kernel term of each step"},
                      {"seconds", r.seconds},
                      {"first_step", r.first_step},
                      {"last_step", r.last_step},
                      {"shard", r.shard_count > 0 ? nlohmann::json{{"index", r.shard_index}, {"count", r.shard_count},
                                                                   {"whole_begin", r.whole_begin},
                                                                   {"whole_end", r.whole_end},
                                                                   {"carry", r.carry},
                                                                   {"sum_check_in_merge", r.sum_check_in_merge}}
                                                  : nlohmann::json(nullptr)},
                      {"settings", explanation_settings(c)}};
  // The projection and its measured error (the sum check above measures it too: sum a_i is then
  // the projected kernel's, the rest of the identity exact).
  j["projection"] = c.project > 0 ? nlohmann::json{{"requested", c.project},
                                                   {"seed", c.project_seed},
                                                   {"dims", r.project_dims},
                                                   {"max_batch_sum_error", r.projection_error},
                                                   {"max_sum_error", r.sum_error}}
                                  : nlohmann::json(nullptr);
  // Per probe, the terms of the sum check, for scripts (sum_u: U, or Uopt_wd + Uopt_round).
  nlohmann::json per = nlohmann::json::array();
  const at::Tensor sum_a = r.attributions.sum(1);
  for (int64_t p = 0; p < r.attributions.size(0); ++p) {
    nlohmann::json row = {{"probe", r.probe_indices[p]},
                          {"label", r.probe_labels[p]},
                          {"output", r.outputs[p]},
                          {"f_initial", r.f_initial[p].item<double>()},
                          {"f_final", r.f_final[p].item<double>()},
                          {"sum_a", sum_a[p].item<double>()},
                          {"sum_u", r.sum_u[p].item<double>()},
                          {"sum_r", r.sum_r[p].item<double>()}};
    if (exact) {
      row["sum_a_exact"] = r.attributions_exact[p].sum().item<double>();
      row["sum_u_exact"] = r.sum_uexact[p].item<double>();
    }
    per.push_back(row);
  }
  j["per_probe"] = per;
  if (exact) {
    j["max_sum_error_exact"] = r.sum_check_in_merge ? nlohmann::json(nullptr) : nlohmann::json(r.sum_error_exact);
    j["max_quad_error"] = r.max_quad_error;
  }
  return j;
}

}  // namespace

void write_explanation(const ExplainResult& r, const ExplainConfig& c) {
  check_output_dir(c.out, c.force, "summary.json", kExplainFormat);
  if (r.part.count > 0) return write_probe_part(r, c);
  const std::shared_ptr<Trajectory> run = r.trajectory ? r.trajectory : std::shared_ptr<Trajectory>(open_trajectory(c.run));
  const int64_t n_train = run->split_size("train");
  if (n_train != r.attributions.size(1)) {
    throw InputError(c.run + ": holds " + std::to_string(n_train) + " training examples, the explanation " +
                     std::to_string(r.attributions.size(1)));
  }
  const at::Tensor train_labels = run->labels("train", at::arange(n_train, at::kLong)).contiguous();
  StagedOutput staged(c.out);
  const fs::path out = staged.path();
  write_attributions(out, r, c, train_labels);

  Pictures pic{*run, c, {}, false};
  const bool images = run->image("train", 0).defined();
  pic.plots = gnuplot_available() && images;
  if (!gnuplot_available()) spdlog::warn("gnuplot not found (apt-get install gnuplot-nox): no PNG grids; the CSVs are written");
  if (!images) spdlog::warn("{}: the inputs are not single-channel images: no PNG grids; the CSVs are written", c.run);
  if (pic.plots && c.grids > 0) fs::create_directories(out / "grids");
  int64_t classes = train_labels.numel() ? train_labels.max().item<int64_t>() + 1 : 0;
  for (int64_t l : r.probe_labels) classes = std::max(classes, l + 1);
  for (int64_t o : r.outputs) classes = std::max(classes, o + 1);
  pic.names = class_names(c.run, classes, c.class_names_file);
  write_top(out, r, pic, train_labels);
  if (r.self_influence.defined()) write_self_influence(out, r, pic, train_labels);
  // A shard through the optimizer: what the earlier shards receive from its steps (merge reads it).
  if (r.phi_begin.defined()) save_npy(out / "phi_begin.npy", r.phi_begin);
  if (r.phi_exact_begin.defined()) save_npy(out / "phi_exact_begin.npy", r.phi_exact_begin);
  atomic_write(out / "summary.json", explanation_summary(r, c).dump(2) + "\n");
  staged.commit();
}

std::string explain_table(const ExplainResult& r, const ExplainConfig& c) {
  const bool exact = r.attributions_exact.defined();
  std::string s = r.through_optimizer
                      ? fmt::format("optimizer {}: attribution through it (aopt_i, every earlier step's batch); "
                                    "U = Uopt_wd + Uopt_round\n", r.optimizer)
                      : std::string();
  s += exact ? "  probe  logit    f_N - f_0  =  sum_i a_i  +  sum U      +  sum R      | exact: sum_i a_i  +  sum Uexact\n"
             : "  probe  logit    f_N - f_0  =  sum_i a_i  +  sum U      +  sum R\n";
  const at::Tensor sum_a = r.attributions.sum(1);
  for (size_t p = 0; p < std::min<size_t>(r.probe_indices.size(), 10); ++p) {
    s += fmt::format("  {:>5}  {:>5}    {:<+10.4g} =  {:<+10.4g} +  {:<+10.4g} +  {:<+10.4g}", r.probe_indices[p],
                     r.outputs[p], (r.f_final[p] - r.f_initial[p]).item<double>(), sum_a[p].item<double>(),
                     r.sum_u[p].item<double>(), r.sum_r[p].item<double>());
    if (exact) {
      s += fmt::format(" | {:<+10.4g} +  {:<+10.4g}", r.attributions_exact[p].sum().item<double>(),
                       r.sum_uexact[p].item<double>());
    }
    s += "\n";
  }
  if (r.probe_indices.size() > 10) s += fmt::format("  ... ({} probes in all)\n", r.probe_indices.size());
  if (c.project > 0) {
    s += fmt::format("projected to {} dims per row (--project {}, seed {}): the sum check measures the projection: "
                     "max error {:.2e} (relative to max |f_N - f_0|; not gated)\n",
                     r.project_dims, c.project, c.project_seed, r.sum_error);
    if (!r.through_optimizer) {
      s += fmt::format("  per step, the projected split summed over the batch against the exact K: max error {:.2e}\n",
                       r.projection_error);
    }
  } else if (r.sum_check_in_merge) {
    s += "sum check: when the shards are merged (the earlier steps' gradients move this shard's steps too, "
         "through the optimizer's memory; merge adds their share)\n";
  } else {
    s += fmt::format("sum check: max error {:.2e} (relative to max |f_N - f_0|, tolerance {:.0e})\n", r.sum_error,
                     c.tolerance);
  }
  if (exact && !r.sum_check_in_merge) {
    s += fmt::format("exact path kernel: max error {:.2e} with no residual left (quadrature error <= {:.2e})\n",
                     r.sum_error_exact, r.max_quad_error);
  }
  return s;
}

}  // namespace pathkernel
