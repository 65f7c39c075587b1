#include "pathkernel/run_context.h"

#include <ATen/ATen.h>


#include "pathkernel/errors.h"

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
  const int64_t distinct = std::get<0>(at::_unique(ctx->train.labels)).numel();
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
  ctx->stepper = std::make_unique<Stepper>(*ctx->model, config.optimizer_options(), parse_loss(config.loss));
  return ctx;
}

}  // namespace pathkernel
