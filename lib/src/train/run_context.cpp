#include "pathkernel/train/run_context.h"

#include <ATen/ATen.h>


#include "pathkernel/io/errors.h"
#include "pathkernel/io/sha256.h"

namespace pathkernel {

std::pair<at::Tensor, at::Tensor> RunContext::batch(const std::vector<int64_t>& indices) const {
  const at::Tensor idx = at::tensor(indices, at::kLong);
  return {to_inputs(train.images.index_select(0, idx), dtype, normalization),
          train.labels.index_select(0, idx)};
}

double RunContext::test_accuracy() const {
  at::NoGradGuard no_grad;
  int64_t right = 0;
  const int64_t n = test.size(), chunk = 1000;
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t e = std::min(n, s + chunk);
    const at::Tensor x = to_inputs(test.images.slice(0, s, e), dtype, normalization);
    right += model->forward(x).argmax(1).eq(test.labels.slice(0, s, e)).sum().item<int64_t>();
  }
  return n ? static_cast<double>(right) / static_cast<double>(n) : 0.0;
}

TrainerState RunContext::state_at(int64_t step) const {
  TrainerState st;
  st.step = step;
  st.sampler = sampler->state_at(step);
  const Optimizer& opt = stepper->optimizer();
  st.optimizer = optimizer_name(opt.options().kind);
  st.optimizer_steps = opt.steps();
  st.optimizer_state = opt.state();
  return st;
}

void RunContext::restore(const TrainerState& st, int64_t step, const std::string& source) {
  if (st.step != step) throw InputError(source + ": records step " + std::to_string(st.step) + ", expected " +
                                        std::to_string(step));
  Optimizer& opt = stepper->optimizer();
  if (st.optimizer != optimizer_name(opt.options().kind)) {
    throw InputError(source + ": holds the state of optimizer '" + st.optimizer + "', the run's manifest says '" +
                     optimizer_name(opt.options().kind) + "'");
  }
  if (st.optimizer_steps != step) {
    throw InputError(source + ": the optimizer made " + std::to_string(st.optimizer_steps) + " updates by step " +
                     std::to_string(step));
  }
  opt.load_state(st.optimizer_state, st.optimizer_steps, source);
  stepper->sync_norms();
}

std::unique_ptr<RunContext> make_run_context(const TrainConfig& config, std::optional<Normalization> normalization,
                                             const std::string& run_root) {
  config.validate();
  auto ctx = std::make_unique<RunContext>();
  ctx->config = config;
  ctx->threads = pin_threads(config.threads);
  ctx->train = load_dataset(config.data_dir, "train", config.train_limit);
  ctx->test = load_dataset(config.data_dir, "test");
  if (ctx->train.height() != ctx->test.height() || ctx->train.width() != ctx->test.width()) {
    throw InputError(config.data_dir + ": train and test images differ in size");
  }
  ctx->num_classes = ctx->train.num_classes();
  // The model's number of outputs follows the labels; a stray label in a damaged or foreign file
  // would silently add outputs. The classes 0..max must mostly occur (EMNIST letters: 1..26 of
  // 0..26) and there are at most kMaxClasses of them.
  const int64_t distinct = ctx->train.distinct_labels();
  if (ctx->num_classes > kMaxClasses || 2 * distinct < ctx->num_classes) {
    throw InputError(ctx->train.labels_file.string() + ": labels go up to " + std::to_string(ctx->num_classes - 1) +
                     " but only " + std::to_string(distinct) + " distinct values occur (at most " +
                     std::to_string(kMaxClasses) + " classes, at least half of 0..max in use): a damaged or foreign "
                     "labels file? The model would get " + std::to_string(ctx->num_classes) + " outputs");
  }
  const int64_t test_max = ctx->test.labels.max().item<int64_t>();
  if (test_max >= ctx->num_classes) {
    throw InputError(ctx->test.labels_file.string() + ": label " + std::to_string(test_max) +
                     " is out of range: the training labels go up to " + std::to_string(ctx->num_classes - 1));
  }
  if (normalization) {
    ctx->normalization = *normalization;
  } else if (config.normalize == "standard") {
    ctx->normalization = standard_normalization(ctx->train);
  }
  ctx->dtype = config.dtype == "float64" ? at::kDouble : at::kFloat;

  ctx->sampler = std::make_unique<BatchSampler>(config.seed, ctx->train.size(), config.batch);
  ctx->total_steps = config.steps > 0 ? config.steps : config.epochs * ctx->sampler->steps_per_epoch();
  if (ctx->total_steps > kMaxSteps) {
    throw InputError("--epochs " + std::to_string(config.epochs) + " makes " + std::to_string(ctx->total_steps) +
                     " steps, more than " + std::to_string(kMaxSteps));
  }
  ctx->schedule = std::make_unique<LrSchedule>(config.lr_schedule, config.lr, ctx->total_steps, run_root);

  at::manual_seed(config.seed);
  const models::ModelSpec spec = models::parse_model_spec(config.model);
  try {
    ctx->model = models::build_model(spec, {1, ctx->train.height(), ctx->train.width()}, ctx->num_classes);
  } catch (const std::invalid_argument& e) {
    throw InputError(std::string("--model: ") + e.what());
  }
  ctx->model->to(ctx->dtype);
  ctx->stepper = std::make_unique<Stepper>(*ctx->model, config.optimizer_options(), config_loss(config));
  return ctx;
}

models::TrainingContext RunContext::step_context(int64_t k, int64_t rows, bool moves_statistics) const {
  models::TrainingContext ctx = models::draw_dropout_masks(*model, config.seed, k, rows);
  for (const auto& site : model->norm_sites()) ctx.batchnorm_train.push_back(site.name);
  ctx.moves_statistics = moves_statistics;
  return ctx;
}

nlohmann::json data_file_digests(const RunContext& ctx) {
  if (is_synthetic(ctx.config.data_dir)) return {{"synthetic", ctx.config.data_dir}};
  auto entry = [](const std::filesystem::path& p) {
    return nlohmann::json{{"path", p.string()}, {"sha256", sha256_file(p)}};
  };
  return {{"train_images", entry(ctx.train.images_file)},
          {"train_labels", entry(ctx.train.labels_file)},
          {"test_images", entry(ctx.test.images_file)},
          {"test_labels", entry(ctx.test.labels_file)}};
}

void check_data_files(const nlohmann::json& manifest, const RunContext& ctx, const std::string& manifest_path,
                      const std::string& why) {
  const nlohmann::json now = data_file_digests(ctx);
  try {
    const nlohmann::json& files = manifest.at("data").at("files");
    if (files.contains("synthetic") != now.contains("synthetic")) {
      throw InputError(manifest_path + ": data.files does not describe the data in --data (" + ctx.config.data_dir + ")");
    }
    for (const auto& [key, entry] : now.items()) {
      if (key == "synthetic") continue;  // generated from the seed, not read
      if (!files.contains(key) || files.at(key).at("sha256") != entry.at("sha256")) {
        throw InputError(entry.at("path").get<std::string>() + ": differs from the file the run was trained on " +
                         "(SHA-256 mismatch with " + manifest_path + "); " + why + " needs the same data");
      }
    }
  } catch (const nlohmann::json::exception& e) {
    throw InputError(manifest_path + ": data.files malformed (" + std::string(e.what()) + ")");
  }
}

}  // namespace pathkernel
