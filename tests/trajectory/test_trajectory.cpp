// The trajectory seam changes nothing in an analysis: a pathkernel train run, copied into the
// recorded-run format (as python/pathkernel_record.py would have written it, with torch.optim's
// optimizer state_dicts), analyzes to the same D, F, K, U, R, Kopt and Uopt.
#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include "fixtures.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/idx.h"
#include "pathkernel/io/npy.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/trainer.h"
#include "pathkernel/trajectory/recorded_run.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

// torch.optim.SGD's state_dict after the step whose trainer state is `st`.
void write_torch_sgd_state(const fs::path& path, const TrainerState& st, const std::vector<std::string>& order) {
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  for (const auto& [slot, tensors] : st.optimizer_state) {
    for (const auto& [name, t] : tensors) {
      const int64_t i = std::find(order.begin(), order.end(), name) - order.begin();
      c10::Dict<std::string, at::Tensor> per;
      per.insert(slot, t);
      state.insert(i, c10::IValue(per));
    }
  }
  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  root.insert(std::string("state"), c10::IValue(state));
  root.insert(std::string("param_groups"), c10::IValue(c10::impl::GenericList(c10::AnyType::get())));
  const std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(root));
  atomic_write(path, std::string(bytes.begin(), bytes.end()));
}

TEST(TrajectoryTest, ARecordedCopyOfANativeRunAnalyzesTheSame) {
  spdlog::set_level(spdlog::level::err);
  testing::TempDir tmp;
  testing::write_synthetic_idx(tmp / "data", 40, 10, 8, 3);
  TrainConfig c;
  c.data_dir = (tmp / "data").string();
  c.model = "mlp:5:tanh";
  c.steps = 12;
  c.batch = 8;
  c.lr = 0.3;
  c.momentum = 0.5;
  c.checkpoint_every = 1;
  c.out = (tmp / "native").string();
  train(c, "");

  // The copy: data as the native analysis feeds it (float64 pixels / 255), the step log, every
  // checkpoint's weights, and the momentum buffers as torch.optim names them.
  const RunDir native(c.out);
  const fs::path rec = tmp / "recorded";
  fs::create_directories(rec / "checkpoints");
  fs::create_directories(rec / "data");
  const NamedTensors w0 = load_tensor_dict(native.checkpoint(0));
  nlohmann::json params = nlohmann::json::array(), keys = nlohmann::json::array(), names = nlohmann::json::object();
  std::vector<std::string> order;
  for (const auto& [name, t] : w0) {
    params.push_back({name, t.sizes().vec()});
    keys.push_back(name);
    names[name] = name;
    order.push_back(name);
  }
  nlohmann::json data;
  for (const std::string split : {"train", "test"}) {
    const Dataset d = load_split(c.data_dir, split);
    save_npy(rec / "data" / (split + "_x.npy"), to_inputs(d.images, at::kDouble, Normalization{}));
    save_npy(rec / "data" / (split + "_y.npy"), d.labels);
    data[split] = {{"x", "data/" + split + "_x.npy"}, {"y", "data/" + split + "_y.npy"}, {"examples", d.size()},
                   {"input_shape", {1, d.height(), d.width()}}};
  }
  const nlohmann::json manifest = {
      {"format", kRecordedRunFormat},
      {"model", {{"file", "model.pt"}, {"outputs", 3}, {"parameters", params}, {"state_dict_keys", keys}}},
      {"loss", "ce"},
      {"optimizer", {{"name", "sgd"}, {"param_groups", {{{"lr", 0.3}, {"momentum", 0.5}, {"dampening", 0}, {"nesterov", false}, {"weight_decay", 0}}}}}},
      {"checkpoint_every", 1},
      {"zoo", {{"spec", "mlp:5:tanh"}, {"names", names}}},
      {"data", data}};
  atomic_write(rec / "manifest.json", manifest.dump(1));
  // The zoo route analyzes with the zoo model on the stored weights; the reader first checks
  // that the zoo model is the network model.pt holds (the same outputs on recorded inputs).
  fs::copy_file(fs::path(PATHKERNEL_TEST_DATA) / "scripted_zoo_mlp.pt", rec / "model.pt");
  std::string log;
  for (const auto& r : read_step_log(native.steps_log())) {
    log += nlohmann::json{{"step", r["step"]}, {"lr", r["lr"]}, {"batch", r["batch"]}, {"loss", r["loss"]}}.dump() + "\n";
  }
  atomic_write(rec / "steps.jsonl", log);
  for (int64_t k = 0; k <= c.steps; ++k) {
    char base[32];
    std::snprintf(base, sizeof base, "step_%08lld", static_cast<long long>(k));
    fs::copy_file(native.checkpoint(k), rec / "checkpoints" / (std::string(base) + ".pt"));
    write_torch_sgd_state(rec / "checkpoints" / (std::string(base) + ".optim.pt"), load_trainer_state(native.state(k)), order);
  }
  EXPECT_EQ(RecordedRun(rec).analyzable_steps().size(), static_cast<size_t>(c.steps));

  AnalyzeConfig a;
  a.run = c.out;
  a.probes = 4;
  a.split = "test";
  a.out = (tmp / "unused").string();  // analyze() writes nothing; validate() wants a target
  const AnalysisResult want = analyze(a);
  a.run = rec.string();
  const AnalysisResult got = analyze(a);
  EXPECT_TRUE(want.uses_kopt && got.uses_kopt);
  const std::pair<const char*, std::pair<const at::Tensor*, const at::Tensor*>> arrays[] = {
      {"D", {&want.d, &got.d}},       {"F", {&want.f, &got.f}},         {"K", {&want.k, &got.k}},
      {"U", {&want.u, &got.u}},       {"R", {&want.r, &got.r}},         {"Kopt", {&want.kopt, &got.kopt}},
      {"Uopt_wd", {&want.uopt_wd, &got.uopt_wd}}, {"Uopt_round", {&want.uopt_round, &got.uopt_round}}};
  // Against the scale of the whole change (U and Uopt_round are rounding-sized parts of it).
  const double scale = std::max(want.f.abs().max().item<double>(), want.d.abs().max().item<double>());
  for (const auto& [name, pair] : arrays) {
    EXPECT_LE((*pair.first - *pair.second).abs().max().item<double>(), 1e-9 * scale) << name;
  }
  EXPECT_TRUE(at::equal(want.outputs, got.outputs));
  EXPECT_EQ(want.probe_indices, got.probe_indices);
  // U_mom uses the momentum buffers read from torch.optim's state dicts: the same as replayed.
  for (size_t k = 0; k < want.steps.size(); ++k) {
    EXPECT_NEAR(want.steps[k].u_mom_norm, got.steps[k].u_mom_norm, 1e-12 * (1 + want.steps[k].u_mom_norm)) << k;
  }

  // The analysis takes each step's gradient from the verification, which formed it already: the
  // same numbers, bit for bit, as forming it again (no budget), or with room for two steps only.
  int64_t gradient_bytes = 0;
  for (const auto& [name, t] : w0) gradient_bytes += t.numel() * 8;
  auto terms_of = [](const AnalysisResult& r) {
    return std::vector<std::pair<std::string, at::Tensor>>{{"D", r.d}, {"F", r.f}, {"K", r.k}, {"U", r.u},
                                                           {"R", r.r}, {"Kopt", r.kopt}, {"Uopt_wd", r.uopt_wd},
                                                           {"Uopt_round", r.uopt_round}};
  };
  for (const int64_t budget : {int64_t{0}, 2 * gradient_bytes}) {
    AnalyzeConfig again = a;
    again.verified_gradients_memory = budget;
    const AnalysisResult other = analyze(again);
    const auto mine = terms_of(got), theirs = terms_of(other);
    for (size_t i = 0; i < mine.size(); ++i) {
      EXPECT_TRUE(at::equal(mine[i].second, theirs[i].second)) << mine[i].first << ", a budget of " << budget;
    }
    auto same = [](double x, double y) { return x == y || (std::isnan(x) && std::isnan(y)); };  // step 0: no cosine
    for (size_t k = 0; k < got.steps.size(); ++k) {
      EXPECT_EQ(got.steps[k].loss_before, other.steps[k].loss_before) << k;
      EXPECT_EQ(got.steps[k].grad_norm, other.steps[k].grad_norm) << k;
      EXPECT_TRUE(same(got.steps[k].grad_cos, other.steps[k].grad_cos)) << k;
    }
  }

  // Every step was verified against its logged loss (no fingerprint in this copy).
  EXPECT_EQ(got.verified_steps, static_cast<int64_t>(c.steps));
  EXPECT_EQ(got.unverified_steps, 0);
  EXPECT_EQ(want.verified_steps, -1) << "a trained run is checked by its replay";
  // A step whose logged loss is not the one its stored weights and batch give: refused, exit 4.
  {
    std::string edited;
    for (auto r : read_step_log(rec / "steps.jsonl")) {
      if (r["step"] == 7) r["loss"] = r["loss"].get<double>() * 1.01;
      edited += r.dump() + "\n";
    }
    const std::string original = read_file(rec / "steps.jsonl");
    atomic_write(rec / "steps.jsonl", edited);
    EXPECT_THROW_WITH(analyze(a), CheckFailedError, "step 7: the batch loss recomputed from the stored weights and data is off by 0.0099");
    a.allow_unverified = true;
    const AnalysisResult marked = analyze(a);
    EXPECT_EQ(marked.unverified_steps, 1);
    EXPECT_EQ(marked.steps[7].verified, 0);
    EXPECT_EQ(marked.steps[6].verified, 1);
    a.allow_unverified = false;
    atomic_write(rec / "steps.jsonl", original);
  }

  // The same run said to be another zoo model (ReLU for tanh): its outputs are not model.pt's.
  nlohmann::json relu = manifest;
  relu["zoo"]["spec"] = "mlp:5:relu";
  atomic_write(rec / "manifest.json", relu.dump(1));
  EXPECT_THROW_WITH(analyze(a), InputError, "model.pt: the manifest analyzes this run as the zoo model mlp:5:relu");
}

}  // namespace
}  // namespace pathkernel
