// Sharded analyses (shards.h): three shards merged equal one process's analysis of the same run
// (arrays bit for bit, the tables and the summary equal), and merge refuses what does not join.
#include <ATen/ATen.h>

#include <functional>
#include <sstream>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "fixtures.h"
#include "pathkernel/analysis/shards.h"
#include "pathkernel/explain/explain.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/sha256.h"
#include "pathkernel/train/trainer.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

class ShardsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    testing::write_synthetic_idx(tmp_ / "data", 60, 20, 8, 3);
  }
  std::string train_run(const std::string& name, double momentum, const std::string& model = "mlp:5:relu",
                        const std::string& optimizer = "sgd") {
    TrainConfig c;
    c.data_dir = (tmp_ / "data").string();
    c.model = model;
    c.steps = 24;
    c.batch = 10;
    c.optimizer = optimizer;
    c.lr = optimizer == "sgd" ? 2.0 : 0.05;  // large steps: r jumps about, and the outlier rule marks some
    c.momentum = momentum;
    c.weight_decay = 1e-3;
    c.checkpoint_every = 4;
    c.out = (tmp_ / name).string();
    train(c, "");
    return c.out;
  }
  /// explain --shard I/n of `e` for I = 1 .. n, written to TMP/PREFIX1 .. PREFIXn; their folders.
  std::vector<std::string> explain_in_shards(const ExplainConfig& e, int n, const std::string& prefix) {
    std::vector<std::string> dirs;
    for (int i = 1; i <= n; ++i) {
      ExplainConfig s = e;
      s.shard_index = i;
      s.shard_count = n;
      s.out = (tmp_ / (prefix + std::to_string(i))).string();
      write_explanation(explain(s), s);
      dirs.push_back(s.out);
    }
    return dirs;
  }
  AnalyzeConfig config(const std::string& run, const std::string& out) const {
    AnalyzeConfig a;
    a.run = run;
    a.out = (tmp_ / out).string();
    a.probes = 5;
    a.second_order = true;
    a.tc_rule = "outlier";  // its running window crosses the shards' boundaries
    a.tc_window = 5;
    a.tc_kappa = 0;  // above the window's median: about half the steps
    a.check_every = 3;
    // Issue 13's per-step signals too: kinks, sharpness (its steps counted from the whole range's
    // first) and the cosine between consecutive gradients (across the shards' boundaries).
    a.exact_nodes = 1;
    a.kink_split = true;
    a.sharpness_every = 5;
    a.sharpness_examples = 20;
    return a;
  }
  std::vector<std::string> shards(const std::string& run, const std::string& prefix, int n) {
    std::vector<std::string> dirs;
    for (int i = 1; i <= n; ++i) {
      AnalyzeConfig a = config(run, prefix + std::to_string(i));
      a.shard_index = i;
      a.shard_count = n;
      write_analysis(analyze(a), a);
      dirs.push_back(a.out);
    }
    return dirs;
  }
  testing::TempDir tmp_;
};

nlohmann::json without_timings(nlohmann::json s) {
  for (const char* k : {"seconds", "seconds_per_step", "startup_seconds"}) s.erase(k);
  return s;
}

TEST_F(ShardsTest, ThreeShardsMergedEqualOneProcess) {
  for (double momentum : {0.0, 0.9}) {
    const std::string run = train_run(momentum > 0 ? "run-mom" : "run-sgd", momentum);
    const std::string tag = momentum > 0 ? "-mom" : "-sgd";
    const AnalyzeConfig whole = config(run, "whole" + tag);
    write_analysis(analyze(whole), whole);
    std::vector<std::string> parts = shards(run, "shard" + tag, 3);
    const auto s2 = nlohmann::json::parse(read_file(fs::path(parts[1]) / "summary.json"));
    EXPECT_EQ(s2["first_step"], 8);  // split at the checkpoints 8 and 16
    EXPECT_EQ(s2["last_step"], 15);
    std::swap(parts[0], parts[2]);  // in any order
    MergeConfig m{parts, (tmp_ / ("merged" + tag)).string(), false};
    const auto [merged, mc] = merge_shards(m);
    write_analysis(merged, mc);
    const fs::path a = whole.out, b = m.out;
    for (const auto& e : fs::directory_iterator(a / "arrays")) {
      const at::Tensor x = load_npy(e.path()), y = load_npy(b / "arrays" / e.path().filename());
      EXPECT_TRUE(x.sizes() == y.sizes() && at::equal(x, y)) << e.path().filename() << tag;
    }
    EXPECT_EQ(read_file(a / "steps.csv"), read_file(b / "steps.csv")) << tag;
    EXPECT_EQ(read_file(a / "probes.csv"), read_file(b / "probes.csv")) << tag;
    EXPECT_EQ(read_file(a / "sharpness.csv"), read_file(b / "sharpness.csv")) << tag;
    EXPECT_NE(read_file(a / "sharpness.csv").find("\n20,"), std::string::npos) << tag;  // steps 0, 5, ..., 20
    const auto sa = nlohmann::json::parse(read_file(a / "summary.json"));
    const auto sb = nlohmann::json::parse(read_file(b / "summary.json"));
    EXPECT_EQ(without_timings(sa), without_timings(sb)) << tag;
    EXPECT_GT(sa["tc_size"].get<int64_t>(), 0) << "the outlier rule marked no step: the test shows nothing" << read_file(a / "steps.csv");
  }
}

TEST_F(ShardsTest, MergeRefusesShardsThatDoNotJoin) {
  const std::string run = train_run("run", 0.0), other = train_run("other", 0.9);
  const std::vector<std::string> parts = shards(run, "s", 3);
  auto merge = [&](std::vector<std::string> dirs) { return merge_shards({dirs, (tmp_ / "m").string(), false}); };
  EXPECT_THROW_WITH(merge({parts[0], parts[2]}), InputError, "shard 2 of 3 is missing");
  EXPECT_THROW_WITH(merge({parts[0], parts[1]}), InputError, "shard 3 of 3 is missing");
  EXPECT_THROW_WITH(merge({parts[0], parts[1], parts[1], parts[2]}), InputError, "given twice");
  const std::vector<std::string> foreign = shards(other, "o", 3);
  EXPECT_THROW_WITH(merge({parts[0], foreign[1], parts[2]}), InputError, "another run or other settings");
  AnalyzeConfig tau = config(run, "tau2");
  tau.tau = 0.2;
  tau.shard_index = 2;
  tau.shard_count = 3;
  write_analysis(analyze(tau), tau);
  EXPECT_THROW_WITH(merge({parts[0], tau.out, parts[2]}), InputError, (fs::path(tau.out) / "summary.json").string());
  AnalyzeConfig two = config(run, "of2");
  two.shard_index = 2;
  two.shard_count = 2;
  write_analysis(analyze(two), two);
  EXPECT_THROW_WITH(merge({parts[0], two.out, parts[2]}), InputError, "shard of 2, the others of 3");
  const AnalyzeConfig whole = config(run, "whole");
  write_analysis(analyze(whole), whole);
  EXPECT_THROW_WITH(merge({whole.out}), InputError, "not a shard");
  EXPECT_FALSE(fs::exists(tmp_ / "m"));
}

// An analysis keeping its progress (AnalyzeConfig::progress_dir, as the CLI does) ends with the
// files of one that does not; cut short (its last segments gone, a segment's staging folder
// left behind, as a kill leaves them) and run again it continues and ends with the same files;
// another command on the partial folder is refused, and --force starts it anew.
TEST_F(ShardsTest, AnInterruptedAnalysisContinuesToTheSameFiles) {
  const std::string run = train_run("run", 0.9);
  const AnalyzeConfig plain = config(run, "plain");
  write_analysis(analyze(plain), plain);
  AnalyzeConfig a = config(run, "resumed");
  a.progress_dir = a.out;
  a.segment_seconds = 0;  // a segment at every checkpoint
  write_analysis(analyze(a), a);  // uninterrupted, through segments
  auto same = [&](const fs::path& x, const fs::path& y) {
    for (const auto& e : fs::directory_iterator(x / "arrays")) {
      EXPECT_EQ(read_file(e.path()), read_file(y / "arrays" / e.path().filename())) << e.path().filename();
    }
    EXPECT_EQ(read_file(x / "steps.csv"), read_file(y / "steps.csv"));
    EXPECT_EQ(read_file(x / "probes.csv"), read_file(y / "probes.csv"));
    EXPECT_EQ(without_timings(nlohmann::json::parse(read_file(x / "summary.json"))),
              without_timings(nlohmann::json::parse(read_file(y / "summary.json"))));
  };
  same(plain.out, a.out);
  EXPECT_FALSE(fs::exists(fs::path(a.out) / "segments")) << "the partial state is gone once complete";

  // Interrupted after its second segment: partial.json and segments 0 and 4 are left.
  fs::remove_all(a.out);
  analyze(a);
  fs::path segs = fs::path(a.out) / "segments";
  std::vector<fs::path> all;
  for (const auto& e : fs::directory_iterator(segs)) all.push_back(e.path());
  std::sort(all.begin(), all.end());
  ASSERT_EQ(all.size(), 6u);  // checkpoints every 4 of 24 steps
  for (size_t i = 2; i < all.size(); ++i) fs::remove_all(all[i]);
  fs::create_directories(segs / ".seg_00000008.staging-ab12Cd");  // cut off while being written
  atomic_write(segs / ".seg_00000008.staging-ab12Cd" / "D.npy", "half");
  AnalyzeConfig other = a;
  other.tau = 0.5;
  EXPECT_THROW_WITH(analyze(other), InputError, "holds an interrupted analysis of another command");
  const AnalysisResult resumed = analyze(a);
  EXPECT_EQ(resumed.steps.size(), 24u);
  write_analysis(resumed, a);
  same(plain.out, a.out);

  // The same command on a run whose end moved (trained on after the kill): not continued.
  fs::remove_all(a.out);
  analyze(a);
  nlohmann::json partial = nlohmann::json::parse(read_file(fs::path(a.out) / "partial.json"));
  ASSERT_EQ(partial["key"]["range"], nlohmann::json::parse("[0, 24]"));
  partial["key"]["range"] = {0, 20};
  atomic_write(fs::path(a.out) / "partial.json", partial.dump());
  EXPECT_THROW_WITH(analyze(a), InputError, "holds an interrupted analysis of another command");

  // --force on another command's partial folder: discarded, started anew.
  fs::remove_all(a.out);
  analyze(a);
  other.force = true;
  other.progress_dir = other.out = a.out;
  const AnalysisResult anew = analyze(other);
  EXPECT_EQ(anew.steps.size(), 24u);
}

// explain --shard: three parts of a plain-SGD run added up by merge equal one process's
// explanation (a_i, a_exact, times drawn and self-influence to 1e-12, the sum check holding).
TEST_F(ShardsTest, ExplanationShardsAddUpToOneProcess) {
  const std::string run = train_run("run", 0.0, "mlp:5:tanh");  // smooth: explain --exact refuses kinks
  ExplainConfig e;
  e.run = run;
  e.probes = 3;
  e.exact_nodes = 2;
  e.self_influence = true;
  e.grids = 0;
  e.out = (tmp_ / "whole").string();
  const ExplainResult whole = explain(e);
  std::vector<std::string> dirs;
  for (int i = 1; i <= 3; ++i) {
    ExplainConfig s = e;
    s.shard_index = i;
    s.shard_count = 3;
    s.out = (tmp_ / ("e" + std::to_string(i))).string();
    const ExplainResult part = explain(s);
    EXPECT_LT(part.sum_error, 1e-10) << "each shard explains its own stretch";
    write_explanation(part, s);
    dirs.insert(dirs.begin(), s.out);  // in any order
  }
  const auto [merged, mc] = merge_explanations({dirs, (tmp_ / "merged").string(), false});
  auto close = [](const at::Tensor& a, const at::Tensor& b) {
    return (a - b).abs().max().item<double>() <= 1e-12 * std::max(1e-300, b.abs().max().item<double>());
  };
  EXPECT_TRUE(close(merged.attributions, whole.attributions));
  EXPECT_TRUE(close(merged.attributions_exact, whole.attributions_exact));
  EXPECT_TRUE(close(merged.self_influence, whole.self_influence));
  EXPECT_TRUE(at::equal(merged.times_drawn, whole.times_drawn));
  EXPECT_EQ(merged.drawn_at, whole.drawn_at);
  EXPECT_LT(merged.sum_error, 1e-10);
  // Two nodes at lr 2 leave a quadrature error; the parts' sum leaves the same.
  EXPECT_NEAR(merged.sum_error_exact, whole.sum_error_exact, 1e-10);
  EXPECT_EQ(mc.grids, 0) << "the shards' own --grids";
  write_explanation(merged, mc);
  ExplainConfig w = e;
  write_explanation(whole, w);
  auto ranking = [](const fs::path& top) {  // probe, output, kind, rank, example: the last digits of a aside
    std::vector<std::string> rows;
    std::istringstream in(read_file(top));
    for (std::string line; std::getline(in, line);) rows.push_back(line.substr(0, line.rfind(',')));
    return rows;
  };
  EXPECT_EQ(ranking(fs::path(mc.out) / "top.csv"), ranking(fs::path(w.out) / "top.csv"));
  EXPECT_THROW_WITH(merge_explanations({{dirs[0], dirs[2]}, (tmp_ / "m2").string(), false}), InputError, "missing");
  // A part whose attributions have another row count (read from its header before any data).
  const fs::path a1 = fs::path(dirs[1]) / "attributions.npy";
  const at::Tensor kept = load_npy(a1);
  save_npy(a1, at::cat({kept, kept.narrow(0, 0, 1)}));
  EXPECT_THROW_WITH(merge_explanations({dirs, (tmp_ / "m3").string(), false}), InputError,
                    "attributions.npy: its shape or --exact differs from the first part's");
  save_npy(a1, kept);
}

// explain --shard through the optimizer (momentum, Adam): a part's own steps do not account for
// its stretch (the earlier parts' gradients move it through the optimizer's memory), so its sum
// check waits for merge; merge adds each part's share of the later parts' steps. Three parts
// merged equal one process's explanation (a_i, a_exact, self-influence to 1e-12) and the sum
// check holds; the parts' own attributions alone do not, nor a merge with a wrong carry factor.
// Plain SGD through the recursion (route backward) keeps nothing across steps: the parts alone add up.
TEST_F(ShardsTest, ExplanationShardsThroughTheOptimizerAddUpToOneProcess) {
  struct Case {
    std::string tag, optimizer;
    double momentum;
    int64_t project;
  };
  for (const Case& cs : {Case{"mom", "sgd", 0.9, 0}, Case{"adam", "adam", 0.0, 0}, Case{"plain", "sgd", 0.0, 0},
                         Case{"projected", "sgd", 0.9, 16}}) {
    const std::string& tag = cs.tag;
    const bool memory = cs.tag != "plain";
    ExplainConfig e;
    e.run = train_run("run-" + tag, cs.momentum, "mlp:5:tanh", cs.optimizer);
    e.route = "backward";  // auto for the others: the same
    e.project = cs.project;  // Phi in the projection's space: what a part hands on too
    e.probes = 3;
    e.exact_nodes = 2;
    e.self_influence = true;
    e.grids = 0;
    e.out = (tmp_ / ("whole-" + tag)).string();
    const ExplainResult whole = explain(e);
    ASSERT_TRUE(whole.through_optimizer);
    std::vector<std::string> dirs;
    at::Tensor own_sum;
    for (int i = 1; i <= 3; ++i) {
      ExplainConfig s = e;
      s.shard_index = i;
      s.shard_count = 3;
      s.out = (tmp_ / ("e" + tag + std::to_string(i))).string();
      const ExplainResult part = explain(s);
      EXPECT_TRUE(part.sum_check_in_merge);
      EXPECT_EQ(part.phi_begin.defined(), i > 1) << "the first part hands nothing on";
      own_sum = own_sum.defined() ? own_sum + part.attributions : part.attributions.clone();
      write_explanation(part, s);
      const auto summary = nlohmann::json::parse(read_file(fs::path(s.out) / "summary.json"));
      EXPECT_TRUE(summary["max_sum_error"].is_null());
      dirs.insert(dirs.begin(), s.out);  // in any order
    }
    auto rel = [](const at::Tensor& a, const at::Tensor& b) {
      return (a - b).abs().max().item<double>() / std::max(1e-300, b.abs().max().item<double>());
    };
    if (memory) {
      EXPECT_GT(rel(own_sum, whole.attributions), 1e-4) << tag << ": the later parts' share matters";
    } else {
      EXPECT_LT(rel(own_sum, whole.attributions), 1e-12) << tag << ": no share to add";
    }
    const auto [merged, mc] = merge_explanations({dirs, (tmp_ / ("merged-" + tag)).string(), false});
    EXPECT_TRUE(merged.through_optimizer);
    EXPECT_LT(rel(merged.attributions, whole.attributions), 1e-12) << tag;
    EXPECT_LT(rel(merged.attributions_exact, whole.attributions_exact), 1e-12) << tag;
    EXPECT_LT(rel(merged.self_influence, whole.self_influence), 1e-12) << tag;
    EXPECT_TRUE(at::equal(merged.times_drawn, whole.times_drawn));
    EXPECT_EQ(merged.drawn_at, whole.drawn_at);
    // Projected, the sum check measures the projection: the merged parts' error is the whole run's.
    EXPECT_NEAR(merged.sum_error, whole.sum_error, 1e-10) << tag;
    if (cs.project == 0) {
      EXPECT_LT(whole.sum_error, 1e-10) << tag;
    }
    // A wrong carry factor in the middle part's summary (how the last part's Phi reaches its first
    // step): the first part's walk starts from a wrong Phi, and the merged sum check (against the
    // analysis' own D, U and R) sees it.
    const fs::path last = fs::path(e.out).parent_path() / ("e" + tag + "2") / "summary.json";
    const std::string kept = read_file(last);
    auto bad = nlohmann::json::parse(kept);
    bad["shard"]["carry"] = 0.0;
    atomic_write(last, bad.dump(2));
    const auto [off, oc] = merge_explanations({dirs, (tmp_ / ("off-" + tag)).string(), false});
    if (memory && cs.project == 0) {
      EXPECT_GT(off.sum_error, 1e-6) << tag;
    }
    atomic_write(last, kept);
    const fs::path phi_file = fs::path(e.out).parent_path() / ("e" + tag + "2") / "phi_begin.npy";
    at::Tensor phi = load_npy(phi_file);
    phi[0][0] = NAN;
    save_npy(phi_file, phi);
    EXPECT_THROW_WITH(merge_explanations({dirs, (tmp_ / ("nan-" + tag)).string(), false}), InputError,
                      "phi_begin.npy: holds a NaN");
    fs::remove(phi_file);
    EXPECT_THROW_WITH(merge_explanations({dirs, (tmp_ / ("m3-" + tag)).string(), false}), InputError,
                      "phi_begin.npy: missing");
  }
}

// merge --walk K (walk_later_share): each part's share of the later parts' steps walked ahead, in
// jobs of their own, and stored in the part's folder; merge takes the stored shares and equals
// one process's explanation. A stored share is taken only when walked from the Phi_end merge forms
// (a wrong share so stored fails the merged sum check: it was taken); one walked from other later
// parts, or whose file is not the one its record names, is walked again. A second walk keeps it.
TEST_F(ShardsTest, LaterSharesWalkedAheadAreTheMergesOwn) {
  ExplainConfig e;
  e.run = train_run("run", 0.9, "mlp:5:tanh");
  e.probes = 3;
  e.exact_nodes = 2;
  e.grids = 0;
  e.out = (tmp_ / "whole").string();
  const ExplainResult whole = explain(e);
  const std::vector<std::string> dirs = explain_in_shards(e, 3, "e");
  const auto [walked, wc] = merge_explanations({dirs, (tmp_ / "walked").string(), false});  // merge walks
  for (int64_t k : {2, 1}) {  // in any order: each part's Phi_end comes from the stored phi_begin files
    MergeConfig w{dirs, "", false, k};
    const LaterShare share = walk_later_share(w);
    EXPECT_TRUE(share.walked);
    EXPECT_EQ(share.file, fs::path(dirs[static_cast<size_t>(k - 1)]) / "later_share.npy");
    EXPECT_TRUE(fs::exists(fs::path(dirs[static_cast<size_t>(k - 1)]) / "later_share_exact.npy"));
    EXPECT_FALSE(walk_later_share(w).walked) << "stored before from the same Phi_end";
  }
  EXPECT_FALSE(fs::exists(fs::path(dirs[2]) / "later_share.npy"));
  auto rel = [](const at::Tensor& a, const at::Tensor& b) {
    return (a - b).abs().max().item<double>() / std::max(1e-300, b.abs().max().item<double>());
  };
  const auto [stored, sc] = merge_explanations({dirs, (tmp_ / "stored").string(), false});
  EXPECT_TRUE(at::equal(stored.attributions, walked.attributions)) << "the same walk, ahead";
  EXPECT_TRUE(at::equal(stored.attributions_exact, walked.attributions_exact));
  EXPECT_LT(rel(stored.attributions, whole.attributions), 1e-12);
  EXPECT_LT(stored.sum_error, 1e-10);

  // A wrong share stored with a right record: taken, and the merged sum check sees it.
  const fs::path dir1 = dirs[0], file = dir1 / "later_share.npy", record = dir1 / "later_share.json";
  const std::string kept_file = read_file(file), kept_record = read_file(record);
  save_npy(file, load_npy(file) * 2.0);
  auto r = nlohmann::json::parse(kept_record);
  r["files"]["later_share.npy"] = sha256_file(file);
  atomic_write(record, r.dump());
  const auto [wrong, wr] = merge_explanations({dirs, (tmp_ / "wrong").string(), false});
  EXPECT_GT(wrong.sum_error, 1e-6);
  // The same file, its record naming the old one (a walk killed between them): walked again.
  atomic_write(record, kept_record);
  const auto [renamed, rn] = merge_explanations({dirs, (tmp_ / "renamed").string(), false});
  EXPECT_TRUE(at::equal(renamed.attributions, walked.attributions));
  // Walked from another Phi_end (the later parts changed since), or over other steps: walked again.
  for (const char* key : {"tail_sha256", "first_step"}) {
    auto other = r;
    other[key] = std::string(key) == "first_step" ? nlohmann::json(3) : nlohmann::json(std::string(64, '0'));
    atomic_write(record, other.dump());
    const auto [stale, st] = merge_explanations({dirs, (tmp_ / ("stale-" + std::string(key))).string(), false});
    EXPECT_TRUE(at::equal(stale.attributions, walked.attributions)) << key;
  }
  // A record naming its file right, but the file not finite: refused.
  at::Tensor nan = load_npy(file);
  nan[0][0] = NAN;
  save_npy(file, nan);
  r = nlohmann::json::parse(kept_record);
  r["files"]["later_share.npy"] = sha256_file(file);
  atomic_write(record, r.dump());
  EXPECT_THROW_WITH(merge_explanations({dirs, (tmp_ / "nan").string(), false}), InputError,
                    "later_share.npy: must be finite float64");
  atomic_write(file, kept_file);
  atomic_write(record, kept_record);

  EXPECT_THROW_WITH(walk_later_share({dirs, "", false, 3}), InputError, "has no later parts");
  EXPECT_THROW_WITH(walk_later_share({dirs, (tmp_ / "x").string(), false, 1}), InputError, "give no --out");
  EXPECT_THROW_WITH(walk_later_share({{dirs[0], dirs[2]}, "", false, 1}), InputError, "missing");
  // Plain SGD's parts carry nothing into each other: nothing to walk, nothing written (a job
  // array of walks after any explanation's shards succeeds).
  ExplainConfig p = e;
  p.run = train_run("plain", 0.0, "mlp:5:tanh");
  const std::vector<std::string> plain = explain_in_shards(p, 2, "p");
  const LaterShare none = walk_later_share({plain, "", false, 1});
  EXPECT_TRUE(none.nothing);
  EXPECT_FALSE(fs::exists(fs::path(plain[0]) / "later_share.npy"));
  EXPECT_FALSE(fs::exists(fs::path(plain[0]) / "later_share.json"));
}

// explain --workers through the optimizer: each part (--probe-part I/N) attributes its rows of
// the probes over the whole run and analyzes its stretch of the steps for every probe; joined,
// they are one process's explanation bit for bit (a_i, a_exact, self-influence, the outputs, the
// sums of U and R, the sum check, the draws), in whatever order the parts are given. The join
// refuses parts that are not one explanation's, or that do not follow on.
TEST_F(ShardsTest, ProbePartsJoinIntoOneProcess) {
  const std::string run = train_run("run", 0.9, "mlp:5:tanh");
  ExplainConfig e;
  e.run = run;
  e.probe_indices = {1, 4, 7, 9, 12};
  e.exact_nodes = 2;
  e.self_influence = true;
  e.grids = 0;
  e.out = (tmp_ / "whole").string();
  const ExplainResult whole = explain(e);
  ASSERT_TRUE(whole.through_optimizer);
  EXPECT_EQ(plan_explain(e).probe_indices, e.probe_indices);
  EXPECT_TRUE(plan_explain(e).through_optimizer);
  EXPECT_EQ(plan_explain(e).steps, 24);
  ExplainConfig spaced = e;  // the plan, from the manifest, chooses the probes the analysis chooses
  spaced.probe_indices.clear();
  spaced.probes = 3;
  spaced.exact_nodes = 0;
  spaced.self_influence = false;
  EXPECT_EQ(plan_explain(spaced).probe_indices, explain(spaced).probe_indices);
  spaced.split = "train";
  EXPECT_EQ(plan_explain(spaced).probe_indices, explain(spaced).probe_indices);
  auto parts = [&](int n, const std::string& prefix, const ExplainConfig& base) {
    std::vector<std::string> dirs;
    for (int i = 1; i <= n; ++i) {
      ExplainConfig p = base;
      p.part_index = i;
      p.part_count = n;
      p.out = (tmp_ / (prefix + std::to_string(i))).string();
      const ExplainResult r = explain(p);
      EXPECT_EQ(r.part.rows_end - r.part.rows_begin, static_cast<int64_t>(r.probe_indices.size()));
      EXPECT_EQ(r.part.probe_indices, base.probe_indices);
      write_explanation(r, p);
      dirs.push_back(p.out);
    }
    return dirs;
  };
  for (int n : {2, 3}) {
    SCOPED_TRACE(n);
    std::vector<std::string> dirs = parts(n, "part" + std::to_string(n) + "-", e);
    std::reverse(dirs.begin(), dirs.end());  // the parts' own indices give the order
    const auto [joined, jc] = join_probe_parts({dirs, (tmp_ / "joined").string(), false});
    EXPECT_EQ(joined.probe_indices, e.probe_indices);
    EXPECT_EQ(jc.probe_indices, e.probe_indices);
    EXPECT_EQ(joined.outputs, whole.outputs);
    EXPECT_EQ(joined.probe_labels, whole.probe_labels);
    // A part's rows go through products of fewer rows (one row: a matrix-vector product), which
    // may round differently: a_i to 1e-12. What the stretches computed is one process's own.
    auto rel = [](const at::Tensor& a, const at::Tensor& b) {
      return (a - b).abs().max().item<double>() / std::max(1e-300, b.abs().max().item<double>());
    };
    EXPECT_LT(rel(joined.attributions, whole.attributions), 1e-12);
    EXPECT_LT(rel(joined.attributions_exact, whole.attributions_exact), 1e-12);
    const std::vector<std::tuple<const char*, at::Tensor, at::Tensor>> same = {
        {"self-influence", joined.self_influence, whole.self_influence},
        {"f_initial", joined.f_initial, whole.f_initial},
        {"f_final", joined.f_final, whole.f_final},
        {"sum_u", joined.sum_u, whole.sum_u},
        {"sum_r", joined.sum_r, whole.sum_r},
        {"sum_uexact", joined.sum_uexact, whole.sum_uexact}};
    for (const auto& [name, got, want] : same) {
      EXPECT_TRUE(at::equal(got, want)) << name << ": " << (got - want).abs().max().item<double>();
    }
    EXPECT_TRUE(at::equal(joined.times_drawn, whole.times_drawn));
    EXPECT_EQ(joined.drawn_at, whole.drawn_at);
    EXPECT_TRUE(joined.through_optimizer);
    EXPECT_NEAR(joined.sum_error, whole.sum_error, 1e-13);
    EXPECT_EQ(joined.max_quad_error, whole.max_quad_error);
    EXPECT_LT(joined.sum_error, 1e-10);
    EXPECT_EQ(joined.last_step, 23);
  }
  const std::vector<std::string> dirs = parts(2, "p", e);
  auto join = [&](const std::vector<std::string>& d) { return join_probe_parts({d, (tmp_ / "j").string(), false}); };
  EXPECT_THROW_WITH(join({dirs[0]}), InputError, "part 1 of 2, but 1 parts were given");
  EXPECT_THROW_WITH(join({dirs[0], dirs[0]}), InputError, "part 1 of 2, but 2 parts were given");
  ExplainConfig other = e;
  other.exact_nodes = 0;
  EXPECT_THROW_WITH(join({dirs[0], parts(2, "other", other)[1]}), InputError, "its settings differs");
  ExplainConfig fewer = e;
  fewer.probe_indices = {1, 4, 7};
  EXPECT_THROW_WITH(join({dirs[0], parts(2, "fewer", fewer)[1]}), InputError, "its probes differs");
  EXPECT_THROW_WITH(join({dirs[0], (tmp_ / "whole-written").string()}), InputError, "");  // no such folder
  ExplainConfig plain = e;
  plain.out = (tmp_ / "explanation").string();
  write_explanation(whole, plain);
  EXPECT_THROW_WITH(join({dirs[0], plain.out}), InputError, "not a part of explain --workers");

  // Tampered parts, each in a copy: a stretch from elsewhere, a file cut short, rows that overlap.
  auto tampered = [&](const std::string& name, const std::function<void(const fs::path&)>& edit) {
    const fs::path copy = tmp_ / name;
    fs::copy(dirs[1], copy, fs::copy_options::recursive);
    edit(copy);
    return copy.string();
  };
  const std::string moved = tampered("moved", [](const fs::path& d) {
    at::Tensor f = load_npy(d / "part_f.npy");
    f[0].add_(1e-6);
    save_npy(d / "part_f.npy", f);
  });
  EXPECT_THROW_WITH(join({dirs[0], moved}), InputError, "not the previous part's after its last");
  const std::string cut = tampered("cut", [](const fs::path& d) {
    save_npy(d / "part_u.npy", load_npy(d / "part_u.npy").narrow(0, 1, 5).contiguous());
  });
  EXPECT_THROW_WITH(join({dirs[0], cut}), InputError, "part_u.npy: must be float64 [");
  const std::string nan = tampered("nan", [](const fs::path& d) {
    at::Tensor r = load_npy(d / "part_r.npy");
    r[0][0] = NAN;
    save_npy(d / "part_r.npy", r);
  });
  EXPECT_THROW_WITH(join({dirs[0], nan}), InputError, "part_r.npy: holds a NaN or an infinity");
  const std::string overlap = tampered("overlap", [](const fs::path& d) {
    nlohmann::json s = read_json(d / "summary.json");
    s["part"]["rows_begin"] = s["part"]["rows_begin"].get<int64_t>() - 1;
    atomic_write(d / "summary.json", s.dump());
  });
  EXPECT_THROW_WITH(join({dirs[0], overlap}), InputError, "rows of the probes do not follow on");
  const std::string gap = tampered("gap", [](const fs::path& d) {
    nlohmann::json s = read_json(d / "summary.json");
    s["analyzed_steps"][0] = s["analyzed_steps"][0].get<int64_t>() + 1;
    atomic_write(d / "summary.json", s.dump());
  });
  EXPECT_THROW_WITH(join({dirs[0], gap}), InputError, "stretch of the steps does not follow on");

  // A plain-SGD run is split by steps, not probes.
  ExplainConfig sgd = e;
  sgd.run = train_run("sgd", 0.0, "mlp:5:tanh");
  sgd.part_index = 1;
  sgd.part_count = 2;
  EXPECT_THROW_WITH(explain(sgd), InputError, "attributed step by step");
  ExplainConfig both = sgd;
  both.shard_index = 1;
  both.shard_count = 2;
  EXPECT_THROW_WITH(both.validate(), InputError, "--probe-part is one worker");
  both = sgd;
  both.part_index = 3;
  EXPECT_THROW_WITH(both.validate(), InputError, "--probe-part must be I/N");
}

TEST(ShardBoundsTest, SplitsAtTheNearestCheckpoints) {
  const std::vector<int64_t> ck = {0, 4, 8, 12, 16, 20, 24};
  EXPECT_EQ(shard_bounds(0, 24, ck, 3), (std::vector<int64_t>{0, 8, 16, 24}));
  EXPECT_EQ(shard_bounds(0, 24, ck, 1), (std::vector<int64_t>{0, 24}));
  EXPECT_EQ(shard_bounds(5, 24, ck, 2), (std::vector<int64_t>{5, 16, 24}));
  EXPECT_THROW_WITH(shard_bounds(0, 24, {0, 24}, 2), InputError, "too few");
  // Even stretches (every step a checkpoint) of 3 steps: 3 shards, not 4.
  EXPECT_EQ(shard_bounds(0, 3, {0, 1, 2}, 3), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_THROW_WITH(shard_bounds(0, 3, {0, 1, 2}, 4), InputError, "a shard needs a step (use at most 3)");
  EXPECT_EQ(parse_shard("2/3"), (std::pair<int64_t, int64_t>{2, 3}));
  for (const char* bad : {"0/3", "4/3", "2", "2/3x", "a/b", "-1/2"}) {
    SCOPED_TRACE(bad);
    EXPECT_THROW_WITH(parse_shard(bad), InputError, "--shard");
  }
}

}  // namespace
}  // namespace pathkernel
