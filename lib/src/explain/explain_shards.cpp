// Explanations in shards (explain --shard I/N) added up by `pathkernel merge`: a_i is a sum over
// the steps that drew i, so the whole run's is the sum of the parts' (shards.h, explain.h);
// through the optimizer, plus each part's share of the later parts' steps (attribution.h).
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "pathkernel/analysis/shards.h"
#include "pathkernel/explain/attribution.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/sha256.h"
#include "pathkernel/trajectory/trajectory.h"

namespace pathkernel {
namespace fs = std::filesystem;

namespace {

/// An explanation on disk. Its attributions ([rows, N_train] float64, the large part) are read
/// when they are added up, one part at a time (`matrix`), not held for every part at once.
struct StoredExplanation {
  fs::path dir;
  nlohmann::json summary;
  std::vector<int64_t> shape;  ///< attributions.npy's, from its header
  bool exact = false;          ///< attributions_exact.npy is there
  at::Tensor times_drawn, self_influence;

  /// attributions.npy (or attributions_exact.npy with `exact_one`), checked against `shape`.
  at::Tensor matrix(bool exact_one = false) const {
    const fs::path f = dir / (exact_one ? "attributions_exact.npy" : "attributions.npy");
    at::Tensor t = load_npy(f);
    if (t.scalar_type() != at::kDouble || t.sizes() != at::IntArrayRef(shape)) {
      throw InputError(f.string() + ": must be float64 of attributions.npy's shape");
    }
    return t;
  }
};

StoredExplanation read_explanation(const fs::path& dir) {
  StoredExplanation e;
  e.dir = dir;
  e.summary = read_json(dir / "summary.json");
  e.shape = npy_info(dir / "attributions.npy").shape;
  e.exact = fs::exists(dir / "attributions_exact.npy");
  e.times_drawn = load_npy(dir / "times_drawn.npy");
  if (fs::exists(dir / "self_influence.npy")) e.self_influence = load_npy(dir / "self_influence.npy");
  if (e.shape.size() != 2 || e.times_drawn.dim() != 1 || e.times_drawn.size(0) != e.shape[1]) {
    throw InputError((dir / "attributions.npy").string() + ": its shape does not match times_drawn.npy");
  }
  return e;
}

/// The per-probe numbers of a summary as [P] tensors.
at::Tensor per_probe(const nlohmann::json& summary, const char* key) {
  std::vector<double> v;
  for (const auto& row : summary.at("per_probe")) v.push_back(row.at(key).get<double>());
  return at::tensor(v, at::kDouble);
}

at::Tensor accumulate(const at::Tensor& a, const at::Tensor& b) { return a.defined() ? a + b : b.clone(); }

/// Each shard's place and settings, from its summary.json (check_shard_set compares them).
std::vector<ShardInfo> shard_infos(const std::vector<StoredExplanation>& parts) {
  std::vector<ShardInfo> infos;
  try {
    for (const auto& p : parts) {
      const nlohmann::json& s = p.summary;
      if (s.value("format", "") != kExplainFormat) {
        throw InputError((p.dir / "summary.json").string() + ": not an explanation (the shards must be of one kind)");
      }
      ShardInfo info{p.dir, {{"settings", s.at("settings")}, {"run", s.at("run")}, {"probes", s.at("probes")},
                             {"outputs", s.at("outputs")}}, "", 0, 0, s.at("first_step"), s.at("last_step"), 0, 0};
      if (s.at("shard").is_object()) {
        info.index = s["shard"].at("index");
        info.count = s["shard"].at("count");
        info.whole_begin = s["shard"].at("whole_begin");
        info.whole_end = s["shard"].at("whole_end");
      }
      infos.push_back(info);
    }
  } catch (const nlohmann::json::exception& e) {
    throw InputError("a shard's summary.json is malformed (" + std::string(e.what()) + ")");
  }
  return infos;
}

/// The settings the shards were explained with, as the merged explanation's config.
ExplainConfig stored_config(const nlohmann::json& first, const MergeConfig& c) {
  ExplainConfig config;
  const nlohmann::json& st = first.at("settings");
  config.run = first.at("run").get<std::string>();
  config.out = c.out;
  config.force = c.force;
  config.probe_indices = first.at("probes").get<std::vector<int64_t>>();
  config.split = st.at("split").get<std::string>();
  config.output = st.at("output").get<int64_t>();
  config.top = st.at("top").get<int64_t>();
  config.exact_nodes = st.at("exact_nodes").get<int64_t>();
  config.self_influence = st.at("self_influence").get<bool>();
  config.csv = st.at("csv").get<std::string>();
  config.threads = st.at("threads").get<int>();
  config.project = st.value("project", int64_t{0});
  config.project_seed = st.value("project_seed", uint64_t{0});
  config.route = st.value("route", std::string("auto"));
  config.kernel_route = st.value("kernel_route", std::string("auto"));
  config.grids = st.value("grids", config.grids);  // explanations written before it was stored: the default
  return config;
}

/// A part's Phi at its first step (phi_begin.npy, or the exact one's), checked against the rows.
at::Tensor stored_phi(const StoredExplanation& p, const char* file, int64_t rows) {
  const fs::path f = p.dir / file;
  if (!fs::exists(f)) throw InputError(f.string() + ": missing (a shard through the optimizer after the first stores it)");
  at::Tensor phi = load_npy(f);
  if (phi.dim() != 2 || phi.size(0) != rows || phi.scalar_type() != at::kDouble) {
    throw InputError(f.string() + ": must be float64 with " + std::to_string(rows) + " rows (one per probe)");
  }
  if (!at::isfinite(phi).all().item<bool>()) throw InputError(f.string() + ": holds a NaN or an infinity");
  return phi;
}

/// Phi_end of part k, for each part but the last: what the later parts' steps hand it,
/// Phi_end(k) = phi_begin(k+1) + carry(k+1) Phi_end(k+1), from the last part back.
struct Tail {
  at::Tensor phi, phi_exact;
};

std::vector<Tail> tails(const std::vector<StoredExplanation>& parts, int64_t rows, bool exact) {
  std::vector<Tail> out(parts.size() - 1);
  Tail tail;
  for (size_t k = parts.size() - 1; k >= 1; --k) {
    const double carry = parts[k].summary.at("shard").at("carry").get<double>();
    if (!std::isfinite(carry)) throw InputError((parts[k].dir / "summary.json").string() + ": shard.carry is not finite");
    const at::Tensor phi = stored_phi(parts[k], "phi_begin.npy", rows);
    tail.phi = tail.phi.defined() ? phi + carry * tail.phi : phi;
    if (exact) {
      const at::Tensor pe = stored_phi(parts[k], "phi_exact_begin.npy", rows);
      tail.phi_exact = tail.phi_exact.defined() ? pe + carry * tail.phi_exact : pe;
    }
    out[k - 1] = tail;
  }
  return out;
}

/// SHA-256 of a tail's float64 bytes (and its exact one's): what a stored share was walked from.
std::string tail_digest(const Tail& t) {
  Sha256 h;
  for (const at::Tensor& x : {t.phi, t.phi_exact}) {
    if (!x.defined()) continue;
    const at::Tensor c = x.contiguous();
    h.update(c.data_ptr(), static_cast<size_t>(c.numel()) * sizeof(double));
  }
  return h.hex_digest();
}

/// Part k's share of the later parts' steps: its own steps walked again from Phi_end(k)
/// (attribution.h, carry_in).
OptimizerAttribution walk_part(const std::vector<StoredExplanation>& parts, const ExplainConfig& config,
                               const std::vector<int64_t>& outputs, Trajectory& traj, size_t k, const Tail& tail) {
  OptimizerAttributionConfig oc;
  oc.run = config.run;
  oc.trajectory = &traj;
  oc.probe_indices = config.probe_indices;
  oc.split = config.split;
  oc.cols = at::tensor(outputs, at::kLong).view({-1, 1});
  oc.begin = parts[k].summary.at("first_step").get<int64_t>();
  oc.end = parts[k].summary.at("last_step").get<int64_t>() + 1;
  oc.exact_nodes = config.exact_nodes;
  oc.kernel_route = config.kernel_route;
  oc.project = config.project;
  oc.project_seed = config.project_seed;
  oc.carry_in = tail.phi;
  oc.carry_in_exact = tail.phi_exact;
  return attribute_through_optimizer(oc);
}

/// A share of part `p` stored by merge --walk (later_share.json and its files), taken when it was
/// walked from `digest` (the tail merge has just formed from the later parts), its files are the
/// ones it names (by SHA-256) and they have the attributions' shape and are finite. Else false:
/// merge walks the part itself.
bool stored_share(const StoredExplanation& p, const std::string& digest, bool exact, at::Tensor& share,
                  at::Tensor& share_exact) {
  const fs::path record = p.dir / kLaterShareRecord;
  if (!fs::exists(record)) return false;
  try {
    const nlohmann::json r = read_json(record);
    if (r.value("format", "") != kLaterShareFormat || r.value("tail_sha256", "") != digest) {
      spdlog::warn("{}: walked from other later parts (they changed since); walking the part again", record.string());
      return false;
    }
    if (r.value("first_step", int64_t{-1}) != p.summary.at("first_step").get<int64_t>() ||
        r.value("last_step", int64_t{-1}) != p.summary.at("last_step").get<int64_t>()) {
      spdlog::warn("{}: walked over other steps than the part's (it was explained again); walking it again",
                   record.string());
      return false;
    }
    auto take = [&](const char* name) {
      const fs::path f = p.dir / name;
      if (!fs::exists(f) || sha256_file(f) != r.at("files").at(name).get<std::string>()) {
        return at::Tensor();  // a walk killed between its files and its record, or a file replaced
      }
      at::Tensor t = load_npy(f);
      if (t.scalar_type() != at::kDouble || t.sizes() != at::IntArrayRef(p.shape) || !at::isfinite(t).all().item<bool>()) {
        throw InputError(f.string() + ": must be finite float64 of attributions.npy's shape");
      }
      return t;
    };
    share = take("later_share.npy");
    if (exact) share_exact = take("later_share_exact.npy");
    if (!share.defined() || (exact && !share_exact.defined())) {
      spdlog::warn("{}: its files are not the ones it names; walking the part again", record.string());
      return false;
    }
  } catch (const nlohmann::json::exception& e) {
    throw InputError(record.string() + ": malformed (" + std::string(e.what()) + ")");
  }
  return true;
}

/// Through the optimizer, a part's steps also move the later parts' steps (the optimizer's
/// memory): each part but the last gets the share of every later part, which enters at its last
/// step as Phi_end (tails), by a walk of its steps, or from what merge --walk stored for it.
/// Adds those shares to `m`.
void add_later_shares(const std::vector<StoredExplanation>& parts, const ExplainConfig& config, Trajectory& traj,
                      ExplainResult& m) {
  const bool exact = m.attributions_exact.defined();
  const std::vector<Tail> tail = tails(parts, m.attributions.size(0), exact);
  for (size_t k = tail.size(); k-- > 0;) {
    at::Tensor share, share_exact;
    if (stored_share(parts[k], tail_digest(tail[k]), exact, share, share_exact)) {
      spdlog::info("part {}: the later parts' share from {}", k + 1, (parts[k].dir / "later_share.npy").string());
    } else {
      spdlog::info("part {}: walking its steps for the later parts' share", k + 1);
      const OptimizerAttribution later = walk_part(parts, config, m.outputs, traj, k, tail[k]);
      share = later.attr;
      share_exact = later.attr_exact;
    }
    m.attributions.add_(share);
    if (exact) m.attributions_exact.add_(share_exact);
  }
}

/// The sum check of joined parts, recomputed from their per-probe terms.
void recompute_sum_check(ExplainResult& m) {
  const at::Tensor change = m.f_final - m.f_initial;
  const double scale = std::max(1e-300, change.abs().max().item<double>());
  m.sum_error = (change - (m.attributions.sum(1) + m.sum_u + m.sum_r)).abs().max().item<double>() / scale;
  if (m.attributions_exact.defined()) {
    m.sum_error_exact = (change - (m.attributions_exact.sum(1) + m.sum_uexact)).abs().max().item<double>() / scale;
  }
}

/// Which steps drew each example, from the run's step log over steps first .. last.
void read_draws(Trajectory& traj, int64_t first, int64_t last, ExplainResult& m) {
  m.drawn_at.assign(static_cast<size_t>(m.attributions.size(1)), {});
  for (int64_t k = first; k <= last; ++k) {
    const at::Tensor idx = traj.logged_step(k, at::kDouble).indices.contiguous();
    for (int64_t j = 0; j < idx.numel(); ++j) m.drawn_at.at(static_cast<size_t>(idx.data_ptr<int64_t>()[j])).push_back(k);
  }
}

/// The shards of one explanation, in their order, their places checked (check_shard_set).
std::vector<StoredExplanation> read_shards(const MergeConfig& c, std::vector<ShardInfo>& infos) {
  std::vector<StoredExplanation> parts;
  for (const auto& d : c.shards) parts.push_back(read_explanation(d));
  infos = shard_infos(parts);
  check_shard_set(infos);  // sorted by index
  std::sort(parts.begin(), parts.end(), [](const StoredExplanation& a, const StoredExplanation& b) {
    return a.summary["shard"]["index"].get<int64_t>() < b.summary["shard"]["index"].get<int64_t>();
  });
  return parts;
}

}  // namespace

LaterShare walk_later_share(const MergeConfig& c) {
  c.validate();
  std::vector<ShardInfo> infos;
  const std::vector<StoredExplanation> parts = read_shards(c, infos);
  const nlohmann::json& first = parts.front().summary;
  const int64_t n = static_cast<int64_t>(parts.size());
  if (c.walk < 1 || c.walk >= n) {
    throw InputError("--walk " + std::to_string(c.walk) + ": give a part from 1 to " + std::to_string(n - 1) +
                     " (the last part, " + std::to_string(n) + ", has no later parts)");
  }
  const size_t k = static_cast<size_t>(c.walk - 1);
  const StoredExplanation& part = parts[k];
  LaterShare out;
  out.file = part.dir / "later_share.npy";
  out.first_step = part.summary.at("first_step").get<int64_t>();
  out.last_step = part.summary.at("last_step").get<int64_t>();
  if (!first.at("shard").value("sum_check_in_merge", false)) {
    out.nothing = true;  // a_i of plain SGD: each part's own steps account for it
    return out;
  }
  const ExplainConfig config = stored_config(first, c);
  const std::vector<int64_t> outputs = first.at("outputs").get<std::vector<int64_t>>();
  const bool exact = part.exact;
  const Tail tail = tails(parts, part.shape[0], exact)[k];
  const std::string digest = tail_digest(tail);
  at::Tensor share, share_exact;
  if (stored_share(part, digest, exact, share, share_exact)) return out;  // walked before (a requeued job)
  const std::shared_ptr<Trajectory> traj(open_trajectory(config.run, config.kernel_route == "torchscript"));
  const auto t0 = std::chrono::steady_clock::now();
  const OptimizerAttribution later = walk_part(parts, config, outputs, *traj, k, tail);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out.walked = true;
  // The files first, the record naming them last: a walk killed in between leaves a record that
  // does not name them, and merge walks the part itself.
  nlohmann::json files;
  save_npy(out.file, later.attr);
  files["later_share.npy"] = sha256_file(out.file);
  if (exact) {
    save_npy(part.dir / "later_share_exact.npy", later.attr_exact);
    files["later_share_exact.npy"] = sha256_file(part.dir / "later_share_exact.npy");
  }
  const nlohmann::json record = {{"format", kLaterShareFormat}, {"part", c.walk}, {"count", n},
                                 {"first_step", out.first_step}, {"last_step", out.last_step},
                                 {"tail_sha256", digest}, {"files", files}, {"seconds", out.seconds}};
  atomic_write(part.dir / kLaterShareRecord, record.dump(2) + "\n");
  return out;
}

std::pair<ExplainResult, ExplainConfig> merge_explanations(const MergeConfig& c) {
  c.validate();
  std::vector<ShardInfo> infos;
  std::vector<StoredExplanation> parts = read_shards(c, infos);

  const nlohmann::json& first = parts.front().summary;
  const ExplainConfig config = stored_config(first, c);
  ExplainResult m;
  m.probe_indices = config.probe_indices;
  for (const auto& row : first.at("per_probe")) m.probe_labels.push_back(row.at("label").get<int64_t>());
  m.outputs = first.at("outputs").get<std::vector<int64_t>>();
  m.optimizer = first.at("optimizer").get<std::string>();
  m.through_optimizer = first.at("attribution").get<std::string>().rfind("aopt", 0) == 0;
  m.f_initial = per_probe(first, "f_initial");
  m.f_final = per_probe(parts.back().summary, "f_final");
  const bool exact = parts.front().exact;
  for (const auto& p : parts) {
    if (p.shape != parts.front().shape || p.exact != exact) {
      throw InputError((p.dir / "attributions.npy").string() + ": its shape or --exact differs from the first part's");
    }
    m.attributions = accumulate(m.attributions, p.matrix());
    if (exact) m.attributions_exact = accumulate(m.attributions_exact, p.matrix(true));
    m.times_drawn = accumulate(m.times_drawn, p.times_drawn);
    if (p.self_influence.defined()) m.self_influence = accumulate(m.self_influence, p.self_influence);
    m.sum_u = accumulate(m.sum_u, per_probe(p.summary, "sum_u"));
    m.sum_r = accumulate(m.sum_r, per_probe(p.summary, "sum_r"));
    if (exact) m.sum_uexact = accumulate(m.sum_uexact, per_probe(p.summary, "sum_u_exact"));
    if (exact) m.max_quad_error = std::max(m.max_quad_error, p.summary.at("max_quad_error").get<double>());
    m.seconds += p.summary.at("seconds").get<double>();
    if (config.project > 0) {
      const nlohmann::json& pj = p.summary.at("projection");
      m.project_dims = pj.at("dims").get<int64_t>();
      m.projection_error = std::max(m.projection_error, pj.at("max_batch_sum_error").get<double>());
    }
  }
  // Which steps drew each example, from the run's step log over the whole range.
  const std::shared_ptr<Trajectory> traj(open_trajectory(config.run, config.kernel_route == "torchscript"));
  if (first.value("shard", nlohmann::json()).value("sum_check_in_merge", false)) add_later_shares(parts, config, *traj, m);
  recompute_sum_check(m);
  m.trajectory = traj;  // the writer reads the same run
  read_draws(*traj, infos.front().whole_begin, infos.front().whole_end - 1, m);
  m.first_step = infos.front().first;
  m.last_step = infos.back().last;
  return {m, config};
}

namespace {

/// A --probe-part worker's output (write_probe_part), its place read from summary.json.
struct StoredPart {
  fs::path dir;
  nlohmann::json summary;
  int64_t index = 0, count = 0, rows_begin = 0, rows_end = 0, first = 0, last = 0, attributed_last = 0;
  bool exact = false;

  [[noreturn]] void refuse(const std::string& why) const { throw InputError((dir / "summary.json").string() + ": " + why); }
  /// dir/file: finite float64 of the given shape, else refused by name.
  at::Tensor load(const char* file, const std::vector<int64_t>& shape) const {
    const fs::path f = dir / file;
    at::Tensor t = load_npy(f);
    if (t.scalar_type() != at::kDouble || t.sizes() != at::IntArrayRef(shape)) {
      throw InputError(f.string() + ": must be float64 [" + fmt_shape(shape) + "] (the part's rows or steps)");
    }
    if (!at::isfinite(t).all().item<bool>()) throw InputError(f.string() + ": holds a NaN or an infinity");
    return t;
  }
  static std::string fmt_shape(const std::vector<int64_t>& shape) {
    std::string out;
    for (int64_t d : shape) out += (out.empty() ? "" : ", ") + std::to_string(d);
    return out;
  }
};

StoredPart read_part(const fs::path& dir) {
  StoredPart p;
  p.dir = dir;
  p.summary = read_json(dir / "summary.json");
  try {
    const nlohmann::json& s = p.summary;
    if (s.value("format", "") != kExplainPartFormat) p.refuse("not a part of explain --workers (--probe-part)");
    const nlohmann::json& part = s.at("part");
    p.index = part.at("index").get<int64_t>();
    p.count = part.at("count").get<int64_t>();
    p.rows_begin = part.at("rows_begin").get<int64_t>();
    p.rows_end = part.at("rows_end").get<int64_t>();
    p.first = s.at("analyzed_steps").at(0).get<int64_t>();
    p.last = s.at("analyzed_steps").at(1).get<int64_t>();
    if (s.at("attributed_steps").at(0).get<int64_t>() != 0) p.refuse("its attribution does not start at step 0");
    p.attributed_last = s.at("attributed_steps").at(1).get<int64_t>();
    for (const char* key : {"run", "settings", "optimizer", "probes", "labels", "outputs", "seconds", "max_quad_error"}) {
      (void)s.at(key);
    }
  } catch (const nlohmann::json::exception& e) {
    p.refuse(std::string("malformed (") + e.what() + ")");
  }
  p.exact = fs::exists(dir / "attributions_exact.npy");
  return p;
}

/// The parts in their order, each in its place: one of each index 1..N, of one run, settings and
/// probes, the rows and the analyzed steps following on from one part to the next.
std::vector<StoredPart> read_parts(const MergeConfig& c) {
  std::vector<StoredPart> parts;
  for (const auto& d : c.shards) parts.push_back(read_part(d));
  std::sort(parts.begin(), parts.end(), [](const StoredPart& a, const StoredPart& b) { return a.index < b.index; });
  const StoredPart& first = parts.front();
  const auto n_probes = static_cast<int64_t>(first.summary.at("probes").size());
  for (size_t i = 0; i < parts.size(); ++i) {
    const StoredPart& p = parts[i];
    if (p.count != static_cast<int64_t>(parts.size()) || p.index != static_cast<int64_t>(i) + 1) {
      p.refuse("part " + std::to_string(p.index) + " of " + std::to_string(p.count) + ", but " +
               std::to_string(parts.size()) + " parts were given (each of 1.." + std::to_string(parts.size()) + " once)");
    }
    for (const char* key : {"run", "settings", "optimizer", "probes", "labels", "outputs"}) {
      if (p.summary.at(key) != first.summary.at(key)) p.refuse(std::string("its ") + key + " differs from the first part's");
    }
    if (p.exact != first.exact) p.refuse("the parts differ in --exact");
    const StoredPart* prev = i > 0 ? &parts[i - 1] : nullptr;
    if (p.rows_begin != (prev ? prev->rows_end : 0) || p.rows_end < p.rows_begin ||
        (i + 1 == parts.size() && p.rows_end != n_probes)) {
      p.refuse("its rows of the probes do not follow on from the previous part's");
    }
    if (p.first != (prev ? prev->last + 1 : 0) || p.last < p.first || p.attributed_last != first.attributed_last ||
        (i + 1 == parts.size() && p.last != p.attributed_last)) {
      p.refuse("its stretch of the steps does not follow on from the previous part's");
    }
  }
  return parts;
}

/// A part's scalars: its time (the parts ran at once), its quadrature's and projection's errors.
void part_numbers(const StoredPart& p, const ExplainConfig& config, ExplainResult& m) {
  try {
    m.seconds = std::max(m.seconds, p.summary.at("seconds").get<double>());
    if (p.exact) m.max_quad_error = std::max(m.max_quad_error, p.summary.at("max_quad_error").get<double>());
    if (config.project > 0) {
      const nlohmann::json& pj = p.summary.at("projection");
      m.project_dims = pj.at("dims").get<int64_t>();
      m.projection_error = std::max(m.projection_error, pj.at("max_batch_sum_error").get<double>());
    }
  } catch (const nlohmann::json::exception& e) {
    p.refuse(std::string("malformed (") + e.what() + ")");
  }
}

}  // namespace

std::pair<ExplainResult, ExplainConfig> join_probe_parts(const MergeConfig& c) {
  c.validate();
  const std::vector<StoredPart> parts = read_parts(c);
  const StoredPart& first = parts.front();
  const nlohmann::json& s0 = first.summary;
  ExplainConfig config;
  ExplainResult m;
  try {
    config = stored_config(s0, c);
    m.probe_labels = s0.at("labels").get<std::vector<int64_t>>();
    m.outputs = s0.at("outputs").get<std::vector<int64_t>>();
    m.optimizer = s0.at("optimizer").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    first.refuse(std::string("malformed (") + e.what() + ")");
  }
  const auto n_probes = static_cast<int64_t>(config.probe_indices.size());
  if (static_cast<int64_t>(m.probe_labels.size()) != n_probes || static_cast<int64_t>(m.outputs.size()) != n_probes) {
    first.refuse("its labels or outputs do not match its probes");
  }
  m.probe_indices = config.probe_indices;
  m.through_optimizer = true;
  m.times_drawn = load_npy(first.dir / "times_drawn.npy");
  if (m.times_drawn.dim() != 1 || m.times_drawn.scalar_type() != at::kLong) {
    throw InputError((first.dir / "times_drawn.npy").string() + ": must be int64 [N_train]");
  }
  const int64_t n_train = m.times_drawn.size(0);
  std::vector<at::Tensor> a, ax, u, r, ux;
  at::Tensor f_end;  // the previous stretch's outputs after its last step
  for (const StoredPart& p : parts) {
    const int64_t rows = p.rows_end - p.rows_begin, steps = p.last - p.first + 1;
    a.push_back(p.load("attributions.npy", {rows, n_train}));
    if (p.exact) ax.push_back(p.load("attributions_exact.npy", {rows, n_train}));
    if (!at::equal(load_npy(p.dir / "times_drawn.npy"), m.times_drawn)) {
      p.refuse("its training examples' draws differ from the first part's (not the same run)");
    }
    if (fs::exists(p.dir / "self_influence.npy") != fs::exists(first.dir / "self_influence.npy")) {
      p.refuse("the parts differ in --self-influence");
    }
    if (fs::exists(p.dir / "self_influence.npy")) {
      const at::Tensor si = p.load("self_influence.npy", {n_train});
      if (!m.self_influence.defined()) m.self_influence = si;
      if ((si - m.self_influence).abs().max().item<double>() >
          1e-12 * std::max(1e-300, m.self_influence.abs().max().item<double>())) {
        p.refuse("its self-influence differs from the first part's");
      }
    }
    const at::Tensor f = p.load("part_f.npy", {2, n_probes});
    // A stretch starts where the previous one ended: the same weights, the same outputs.
    if (f_end.defined() && (f[0] - f_end).abs().max().item<double>() >
                               1e-12 * std::max(1e-300, f_end.abs().max().item<double>())) {
      p.refuse("its outputs before its first step are not the previous part's after its last (another run's stretch?)");
    }
    if (!m.f_initial.defined()) m.f_initial = f[0].clone();
    f_end = f[1].clone();
    u.push_back(p.load("part_u.npy", {steps, n_probes}));
    r.push_back(p.load("part_r.npy", {steps, n_probes}));
    if (p.exact) ux.push_back(p.load("part_uexact.npy", {steps, n_probes}));
    part_numbers(p, config, m);
  }
  m.f_final = f_end;
  m.attributions = at::cat(a, 0);
  // The steps' terms summed in one pass over all of them, as one process sums them: the same numbers.
  m.sum_u = at::cat(u, 0).sum(0);
  m.sum_r = at::cat(r, 0).sum(0);
  if (first.exact) {
    m.attributions_exact = at::cat(ax, 0);
    m.sum_uexact = at::cat(ux, 0).sum(0);
  }
  recompute_sum_check(m);
  m.first_step = 0;
  m.last_step = first.attributed_last;
  const std::shared_ptr<Trajectory> traj(open_trajectory(config.run, config.kernel_route == "torchscript"));
  m.trajectory = traj;  // the writer reads the same run
  read_draws(*traj, m.first_step, m.last_step, m);
  return {m, config};
}

}  // namespace pathkernel
