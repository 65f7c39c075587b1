#include "pathkernel/train/trainer.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <torch/version.h>

#include <chrono>
#include <cmath>
#include <iterator>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/io/sha256.h"
#include "pathkernel/io/version.h"
#include "pathkernel/train/checkpoint.h"
#include "pathkernel/train/run_context.h"

namespace pathkernel {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
namespace {

/// The model's Dropout sites for the manifest: name, p and one example's shape each; step k's
/// masks are drawn from the seed (models::draw_dropout_masks), so a replay draws them again.
nlohmann::json dropout_sites_json(const models::Model& model) {
  nlohmann::json sites = nlohmann::json::array();
  for (const auto& site : model.dropout_sites()) sites.push_back({{"name", site.name}, {"p", site.p}, {"shape", site.shape}});
  return sites;
}

/// The model's BatchNorm modules (a `:bn` model's), by name: in training mode in every step.
nlohmann::json batchnorm_json(const models::Model& model) {
  nlohmann::json names = nlohmann::json::array();
  for (const auto& site : model.norm_sites()) names.push_back(site.name);
  return names;
}

nlohmann::json make_manifest(const RunContext& ctx, const std::string& command_line) {
  nlohmann::json params = nlohmann::json::array();
  for (const auto& item : ctx.model->named_parameters()) {
    params.push_back({{"name", item.key()}, {"shape", item.value().sizes().vec()}});
  }
  const auto& c = ctx.config;
  return {
      {"format", kRunFormat},
      {"pathkernel_version", kVersion},
      {"git_revision", kGitRevision},
      {"libtorch_version", TORCH_VERSION},
      {"command_line", command_line},
      {"created_unix", std::time(nullptr)},
      {"config", to_json(c)},
      {"model", {{"spec", ctx.model->spec().str()}, {"num_classes", ctx.num_classes},
                 {"input_shape", {1, ctx.train.height(), ctx.train.width()}},
                 {"num_parameters", ctx.stepper->num_parameters()}, {"parameters", params},
                 {"dropout_sites", dropout_sites_json(*ctx.model)}, {"batchnorm", batchnorm_json(*ctx.model)}}},
      {"data", {{"dir", c.data_dir}, {"files", data_file_digests(ctx)}, {"train_examples", ctx.train.size()},
                {"test_examples", ctx.test.size()},
                {"normalization", {{"mode", c.normalize}, {"mean", ctx.normalization.mean},
                                   {"std", ctx.normalization.std}}}}},
      {"optimizer", [&] {
         nlohmann::json o = c.optimizer_options().to_json();
         o["lr"] = c.lr;
         o["lr_schedule"] = c.lr_schedule;
         return o;
       }()},
      {"loss", c.loss},
      {"seed", c.seed},
      {"dtype", c.dtype},
      {"threads", {{"torch", ctx.threads.torch_threads}, {"blas", ctx.threads.blas_threads},
                   {"blas_library", ctx.threads.blas}, {"blas_core", ctx.threads.blas_core}}},
      {"batch", c.batch},
      {"total_steps", ctx.total_steps},
      {"steps_per_epoch", ctx.sampler->steps_per_epoch()},
      {"checkpoint_every", c.checkpoint_every},
      {"lr_schedule_file", c.lr_schedule.find("file:") == std::string::npos
                               ? nlohmann::json(nullptr)
                               : nlohmann::json{{"path", "lr_schedule.txt"},
                                                {"sha256", sha256_file(fs::path(c.out) / "lr_schedule.txt")}}},
      {"gradient_log", c.log_gradients ? nlohmann::json{{"file", "gradients.bin"}, {"dtype", "float32"},
                                                        {"record_numel", ctx.stepper->num_parameters()},
                                                        {"order", "state_dict"}}
                                       : nlohmann::json(nullptr)},
  };
}

/// A finite double as JSON (shortest text that reads back to the same bits); null otherwise.
void put_number(fmt::memory_buffer& out, double v) {
  if (std::isfinite(v)) {
    fmt::format_to(std::back_inserter(out), "{}", v);
  } else {
    fmt::format_to(std::back_inserter(out), "null");
  }
}

/// One line of steps.jsonl. Written with fmt rather than built as a JSON object: this runs every
/// step and is part of the trainer's overhead budget (bench/bench_train.cpp).
/// `,"key":number` (no leading comma when `first`).
void put_field(fmt::memory_buffer& out, const char* key, double v, bool first = false) {
  fmt::format_to(std::back_inserter(out), "{}\"{}\":", first ? "" : ",", key);
  put_number(out, v);
}

void step_line(fmt::memory_buffer& out, const StepRecord& r, const std::vector<int64_t>& batch, double seconds,
               double test_accuracy) {
  auto it = std::back_inserter(out);
  fmt::format_to(it, "{{\"step\":{}", r.step);
  put_field(out, "lr", r.lr);
  fmt::format_to(it, ",\"batch\":[{}]", fmt::join(batch, ","));
  put_field(out, "loss", r.loss);
  put_field(out, "accuracy", r.accuracy);
  put_field(out, "grad_norm", r.grad_norm);
  fmt::format_to(it, ",\"layer_grad_norms\":{{");
  for (size_t i = 0; i < r.layer_grad_norms.size(); ++i) {
    put_field(out, r.layer_grad_norms[i].first.c_str(), r.layer_grad_norms[i].second, /*first=*/i == 0);
  }
  fmt::format_to(it, "}},\"pe_grad_norm\":{{");
  put_field(out, "min", r.pe_grad_min, /*first=*/true);
  put_field(out, "median", r.pe_grad_median);
  put_field(out, "max", r.pe_grad_max);
  fmt::format_to(it, "}}");
  put_field(out, "update_norm", r.update_norm);
  put_field(out, "step_seconds", seconds);
  if (test_accuracy >= 0) put_field(out, "test_accuracy", test_accuracy);
  fmt::format_to(it, "}}\n");
}

/// The CRC-32 of the first `bytes` bytes of the open file `fd` (named `path` in errors).
uLong crc_of_prefix(int fd, int64_t bytes, const fs::path& path) {
  uLong crc = crc32(0L, Z_NULL, 0);
  std::vector<char> buf(1 << 20);
  for (int64_t off = 0; off < bytes;) {
    const ssize_t n = ::pread(fd, buf.data(), static_cast<size_t>(std::min<int64_t>(bytes - off, 1 << 20)), off);
    if (n <= 0) throw InputError("cannot read " + path.string() + ": " + (n < 0 ? std::strerror(errno) : "it is shorter"));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<uInt>(n));
    off += n;
  }
  return crc;
}

/// Appends records to a file. The caller flushes them to the OS at every checkpoint and at least
/// twice a second: a SIGKILL can lose only records after the last checkpoint, which a resume
/// re-creates anyway, and a torn last line, which read_step_log drops. The file is opened
/// without following a symbolic link (a planted link is refused, its target untouched), cut to
/// `keep_bytes` through that same descriptor, and a CRC-32 of everything in it is kept up to date.
class Appender {
 public:
  Appender(const fs::path& path, int64_t keep_bytes) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) {
      throw InputError("cannot open " + path.string() + " for appending: " +
                       (errno == ELOOP ? "it is a symbolic link, which pathkernel does not follow inside a run"
                                       : std::strerror(errno)));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw InputError(path.string() + ": not a regular file");
    }
    if (keep_bytes >= 0 && st.st_size > keep_bytes && ::ftruncate(fd, keep_bytes) != 0) {
      ::close(fd);
      throw InputError("cannot truncate " + path.string() + ": " + std::strerror(errno));
    }
    bytes_ = keep_bytes >= 0 ? std::min<int64_t>(keep_bytes, st.st_size) : st.st_size;
    try {
      crc_ = crc_of_prefix(fd, bytes_, path);  // what is kept, read through the same descriptor
    } catch (...) {
      ::close(fd);
      throw;
    }
    f_ = ::fdopen(fd, "ab");
    if (!f_) {
      ::close(fd);
      throw InputError("cannot open " + path.string() + " for appending: " + std::strerror(errno));
    }
  }
  ~Appender() {
    if (f_) std::fclose(f_);
  }
  Appender(const Appender&) = delete;
  Appender& operator=(const Appender&) = delete;
  void write(const void* data, size_t n) {
    if (std::fwrite(data, 1, n, f_) != n) throw InputError("cannot write " + path_.string() + ": " + std::strerror(errno));
    crc_ = crc32(crc_, static_cast<const Bytef*>(data), static_cast<uInt>(n));
    bytes_ += static_cast<int64_t>(n);
  }
  void flush() {
    if (std::fflush(f_) != 0) throw InputError("cannot write " + path_.string() + ": " + std::strerror(errno));
  }
  int64_t bytes() const { return bytes_; }
  /// The file's CRC-32 as eight hex digits.
  std::string crc() const { return fmt::format("{:08x}", static_cast<unsigned long>(crc_)); }

 private:
  fs::path path_;
  std::FILE* f_ = nullptr;
  int64_t bytes_ = 0;
  uLong crc_ = 0;
};

/// The line of a checkpoint's digest file that vouches for the gradient log up to that step:
/// its length and CRC-32, so that bytes of the right length that training did not write
/// (another file, text) are refused on resume.
std::string gradient_digest(int64_t bytes, const std::string& crc) {
  return "gradients " + std::to_string(bytes) + " " + crc + "\n";
}

/// Checks that the run's gradient log holds, in its first bytes, exactly the records training
/// wrote up to checkpoint `step` (the length and CRC-32 in the checkpoint's digest file). Throws
/// InputError naming the file: a planted link, a short log, a digest without the entry, or
/// other bytes of the right length.
void check_gradient_log(const RunDir& dir, int64_t step, int64_t numel) {
  const fs::path file = dir.gradients(), digest = dir.digest(step);
  const int64_t need = step * numel * 4;
  const std::string text = fs::exists(digest) ? read_file(digest) : "";
  const size_t at = text.find("\ngradients ");
  long long bytes = -1;
  char crc[9] = {0};
  if (at == std::string::npos || std::sscanf(text.c_str() + at + 1, "gradients %lld %8[0-9a-f]", &bytes, crc) != 2) {
    throw InputError(digest.string() + ": vouches for no gradient log (missing, or written before gradient logs had "
                     "digests); " + file.string() + " cannot be checked and is not continued");
  }
  if (bytes != need) {
    throw InputError(digest.string() + ": its gradient log entry covers " + std::to_string(bytes) + " bytes, step " +
                     std::to_string(step) + " needs " + std::to_string(need));
  }
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) {
    throw InputError(file.string() + ": cannot be read (" +
                     (errno == ELOOP ? std::string("a symbolic link, not followed inside a run") : std::strerror(errno)) +
                     ")");
  }
  struct stat st {};
  const bool regular = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
  std::string got;
  try {
    if (!regular) throw InputError(file.string() + ": not a regular file");
    if (st.st_size < need) {
      throw InputError(file.string() + ": holds " + std::to_string(st.st_size / std::max<int64_t>(numel * 4, 1)) +
                       " whole gradient records, the run has reached step " + std::to_string(step) +
                       "; the gradient log is incomplete and cannot be continued");
    }
    got = fmt::format("{:08x}", static_cast<unsigned long>(crc_of_prefix(fd, need, file)));
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  if (got != crc) {
    throw InputError(file.string() + ": its first " + std::to_string(step) + " records are not the ones training wrote "
                     "(CRC-32 " + got + ", the digest in " + digest.string() + " says " + crc + ")");
  }
}

void save_checkpoint(const RunDir& dir, RunContext& ctx, int64_t step, const Appender* grads = nullptr) {
  const TrainerState st = ctx.state_at(step);
  // State first, weights last: a step counts as checkpointed only when its .pt exists.
  save_trainer_state(dir.state(step), st);
  save_tensor_dict(dir.checkpoint(step), state_dict_of(*ctx.model));
  // last: the digest vouches for both files as written (and for the gradient log so far)
  std::string extra;
  if (grads) {
    extra = gradient_digest(grads->bytes(), grads->crc());
  } else if (ctx.config.log_gradients && step == 0) {
    extra = gradient_digest(0, fmt::format("{:08x}", static_cast<unsigned long>(crc32(0L, Z_NULL, 0))));
  }
  dir.write_digest(step, extra);
}

void write_summary(const RunDir& dir, const TrainSummary& s, const RunContext& ctx, const std::string& reason) {
  nlohmann::json j = {{"status", s.status},
                      {"steps_completed", s.steps_completed},
                      {"total_steps", s.total_steps},
                      {"final_loss", s.final_loss},
                      {"test_accuracy", s.test_accuracy},
                      {"train_seconds_this_process", s.seconds},
                      {"model", ctx.model->spec().str()},
                      {"checkpoints", dir.checkpoint_steps()}};
  if (!reason.empty()) {
    j["divergence"] = reason;
    j["test_accuracy"] = nullptr;  // no final model to evaluate
  }
  atomic_write(dir.summary(), j.dump(2) + "\n");
}

std::string fmt_eta(double s) {
  if (!(s >= 0) || s > 360000) return "--:--";  // no rate yet, or more than 100 hours
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%d:%02d", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  return buf;
}

/// The training loop from `start` to the end, appending to the logs. Shared by train and resume.
TrainSummary run_loop(const RunDir& dir, RunContext& ctx, int64_t start, double last_loss) {
  const auto& c = ctx.config;
  const int64_t n = ctx.total_steps;
  const int64_t numel = ctx.stepper->num_parameters();
  Appender log(dir.steps_log(), -1);
  std::unique_ptr<Appender> grads;
  if (c.log_gradients) {
    // Resuming at `start` keeps the first `start` records, which resume() checked against the
    // checkpoint's digest (check_gradient_log: a shorter file would be zero-filled, a replaced
    // one continued).
    grads = std::make_unique<Appender>(dir.gradients(), start * numel * 4);
  }

  TrainSummary s;
  s.run = dir.root();
  s.total_steps = n;
  s.final_loss = last_loss;
  const auto t0 = Clock::now();
  auto last_report = t0, last_flush = t0;
  fmt::memory_buffer line;
  for (int64_t k = start; k < n; ++k) {
    const auto ts = Clock::now();
    const std::vector<int64_t> idx = ctx.sampler->batch_for_step(k);
    const auto [x, y] = ctx.batch(idx);
    StepRecord rec;
    {
      const models::TrainingForward training(*ctx.model, ctx.step_context(k, x.size(0), true));  // masks, batch statistics
      rec = ctx.stepper->step(x, y, ctx.schedule->at(k), /*per_example=*/true);
    }
    rec.step = k;
    if (!rec.finite) {
      s.status = "diverged";
      s.steps_completed = k;
      s.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      save_checkpoint(dir, ctx, k, grads.get());  // w_k is finite: the run stays valid up to here
      const std::string why = "step " + std::to_string(k) + ": " + rec.nonfinite + " is not finite (loss " +
                              fmt::format("{}", rec.loss) + ", lr " + fmt::format("{}", rec.lr) + ")";
      write_summary(dir, s, ctx, why);
      throw DivergenceError("training diverged at " + why + "; " + dir.root().string() +
                            " holds the steps before it (try a smaller --lr)");
    }
    if (grads) {
      const at::Tensor g = ctx.stepper->flat_gradient().contiguous();
      grads->write(g.data_ptr<float>(), static_cast<size_t>(g.numel()) * sizeof(float));
    }
    const bool eval_now = c.eval_every > 0 && (k + 1) % c.eval_every == 0 && k + 1 < n;
    const double test_acc = eval_now ? ctx.test_accuracy() : -1.0;
    line.clear();
    step_line(line, rec, idx, std::chrono::duration<double>(Clock::now() - ts).count(), test_acc);
    log.write(line.data(), line.size());
    s.final_loss = rec.loss;
    const auto now = Clock::now();
    if ((k + 1) % c.checkpoint_every == 0 || k + 1 == n) {
      log.flush();
      if (grads) grads->flush();
      save_checkpoint(dir, ctx, k + 1, grads.get());
      last_flush = now;
    } else if (now - last_flush > std::chrono::milliseconds(500)) {
      log.flush();
      if (grads) grads->flush();
      last_flush = now;
    }
    if (eval_now) spdlog::info("step {}/{}: test accuracy {:.4f}", k + 1, n, test_acc);
    if (now - last_report > std::chrono::seconds(2) || k + 1 == n) {
      const double el = std::chrono::duration<double>(now - t0).count();
      const double rate = static_cast<double>(k + 1 - start) / std::max(el, 1e-9);
      spdlog::info("step {}/{}  loss {:.4f}  {:.0f} steps/s  ETA {}", k + 1, n, rec.loss, rate,
                   fmt_eta(static_cast<double>(n - k - 1) / std::max(rate, 1e-9)));
      last_report = now;
    }
  }
  s.status = "complete";
  s.steps_completed = n;
  s.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  spdlog::info("evaluating on {} test images", ctx.test.size());
  s.test_accuracy = ctx.test_accuracy();
  write_summary(dir, s, ctx, "");
  atomic_write(dir.complete_marker(), "steps " + std::to_string(n) + "\n");
  return s;
}

TrainSummary summary_from_file(const RunDir& dir) {
  const auto j = read_json(dir.summary());
  TrainSummary s;
  s.run = dir.root();
  s.status = j.value("status", "");
  s.steps_completed = j.value("steps_completed", int64_t{0});
  s.total_steps = j.value("total_steps", int64_t{0});
  s.final_loss = j.value("final_loss", 0.0);
  s.test_accuracy = j["test_accuracy"].is_number() ? j["test_accuracy"].get<double>() : 0.0;
  return s;
}

/// A `file:` learning-rate schedule is an input of the run: it is copied into the run
/// (lr_schedule.txt, its SHA-256 in the manifest) and the run refers to its copy, so that
/// resume and replay work from any folder and an edited original changes nothing.
void keep_schedule_file(const RunDir& dir, RunContext& ctx) {
  std::string& spec = ctx.config.lr_schedule;
  const size_t at = spec.find("file:");
  if (at == std::string::npos) return;
  atomic_write(dir.schedule_copy(), read_file(spec.substr(at + 5)));
  spec = spec.substr(0, at) + "file:" + dir.schedule_copy().filename().string();
}

/// Checks a run's copy of its learning-rate file against the digest in its manifest.
void check_schedule_file(const RunDir& dir, const nlohmann::json& manifest) {
  if (!manifest.contains("lr_schedule_file") || !manifest["lr_schedule_file"].is_object()) return;
  const std::string expect = manifest["lr_schedule_file"].value("sha256", "");
  if (!fs::exists(dir.schedule_copy()) || sha256_file(dir.schedule_copy()) != expect) {
    throw InputError(dir.schedule_copy().string() + ": missing or changed since the run was trained (SHA-256 differs "
                     "from the manifest's)");
  }
}

}  // namespace

TrainSummary train(const TrainConfig& user_config, const std::string& command_line) {
  user_config.validate();
  TrainConfig config = user_config;
  // Recorded absolute, so that replay and resume work from any working directory.
  if (!is_synthetic(config.data_dir)) config.data_dir = fs::absolute(config.data_dir).lexically_normal().string();
  const RunDir dir(config.out);
  check_new_run_dir(dir.root());
  auto ctx = make_run_context(config);
  fs::create_directories(dir.checkpoints_dir());
  // One process per run: the lock is taken, then the folder checked again, so two trainings
  // started at once into one --out cannot both proceed.
  const DirLock lock(dir.root(), /*exclusive=*/true);
  if (!lock.held() || !fresh_run_dir(dir.root())) {
    throw InputError(dir.root().string() + ": another pathkernel process is using it (or just created it); "
                     "choose another --out");
  }
  keep_schedule_file(dir, *ctx);
  atomic_write(dir.manifest(), make_manifest(*ctx, command_line).dump(2) + "\n");
  save_checkpoint(dir, *ctx, 0);
  spdlog::info("training {} ({} parameters) for {} steps on {} examples, run directory {}",
               ctx->model->spec().str(), ctx->stepper->num_parameters(), ctx->total_steps, ctx->train.size(),
               dir.root().string());
  return run_loop(dir, *ctx, 0, 0.0);
}

TrainSummary resume(const fs::path& run, const std::string& command_line) {
  const RunDir dir(run);
  const nlohmann::json manifest = dir.read_manifest();
  const DirLock lock(dir.root(), /*exclusive=*/true);
  if (!lock.held()) {
    throw InputError(run.string() + ": another pathkernel process is training, resuming or reading this run; "
                     "wait for it to finish");
  }
  if (dir.complete()) {
    spdlog::info("{} is already complete; nothing to do", run.string());
    return summary_from_file(dir);
  }
  if (fs::exists(dir.summary()) && summary_from_file(dir).status == "diverged") {
    throw InputError(run.string() + " diverged; resuming would diverge again. Start a new run with a smaller --lr");
  }
  TrainConfig config = train_config_from_json(manifest.at("config"), dir.manifest().string());
  const auto& norm = manifest.at("data").at("normalization");
  check_schedule_file(dir, manifest);
  auto ctx = make_run_context(config, Normalization{norm.at("mean").get<double>(), norm.at("std").get<double>()},
                              dir.root().string());
  check_data_files(manifest, *ctx, dir.manifest().string(), "resume");  // the very files the run started with
  if (config.log_gradients) {  // never written through a link, whatever checkpoint is chosen
    std::error_code ec;
    const auto t = fs::symlink_status(dir.gradients(), ec).type();
    if (t != fs::file_type::not_found && t != fs::file_type::regular) {
      throw InputError(dir.gradients().string() + ": is " +
                       (t == fs::file_type::symlink ? "a symbolic link" : "not a regular file") +
                       "; pathkernel neither follows nor replaces it inside a run");
    }
  }
  const auto steps = dir.checkpoint_steps();
  int64_t start = 0;
  double last_loss = 0;
  if (steps.empty()) {
    fs::create_directories(dir.checkpoints_dir());
    save_checkpoint(dir, *ctx, 0);  // killed before the first checkpoint: w_0 is a function of the seed
  } else {
    // The newest checkpoint that loads: after a power loss the last one may be damaged.
    for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
      try {
        dir.check_digest(*it);
        if (config.log_gradients && *it > 0) check_gradient_log(dir, *it, ctx->stepper->num_parameters());
        load_weights(*ctx->model, load_tensor_dict(dir.checkpoint(*it)), dir.checkpoint(*it).string());
        ctx->restore(load_trainer_state(dir.state(*it)), *it, dir.state(*it).string());
        start = *it;
        break;
      } catch (const InputError& e) {
        if (it + 1 == steps.rend()) throw;
        spdlog::warn("skipping checkpoint {}: {}", *it, e.what());
      }
    }
  }
  truncate_step_log(dir.steps_log(), start);
  const auto records = read_step_log(dir.steps_log());
  if (static_cast<int64_t>(records.size()) != start) {
    throw InputError(dir.steps_log().string() + ": has " + std::to_string(records.size()) +
                     " steps before checkpoint " + std::to_string(start) + "; the log is incomplete");
  }
  if (!records.empty()) last_loss = records.back().at("loss").get<double>();
  spdlog::info("resuming {} at step {} of {} ({})", run.string(), start, ctx->total_steps, command_line);
  return run_loop(dir, *ctx, start, last_loss);
}

}  // namespace pathkernel
