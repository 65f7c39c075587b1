// Issue 22, item 2: the tool deletes and writes only what it created. Symbolic links planted in
// an output or run folder are refused, never followed; a folder displaced by --force gets a name
// the tool made; an --out that appears while a command runs is not overwritten; one writer per
// output; the gradient log is vouched for by the checkpoints' digests.
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "fixtures.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/analysis/shards.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/trainer.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

/// A folder of the user's with two files, to be checked untouched.
fs::path victim(const fs::path& dir) {
  fs::create_directories(dir / "inner");
  atomic_write(dir / "precious.txt", "mine\n");
  atomic_write(dir / "inner" / "notes.txt", "also mine\n");
  return dir;
}

void expect_untouched(const fs::path& dir) {
  EXPECT_EQ(read_file(dir / "precious.txt"), "mine\n");
  EXPECT_EQ(read_file(dir / "inner" / "notes.txt"), "also mine\n");
}

class OutputSafetyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::off);
    testing::write_synthetic_idx(tmp_ / "data", 40, 10, 8, 3);
  }
  TrainConfig run_config(const std::string& name) const {
    TrainConfig c;
    c.data_dir = (tmp_ / "data").string();
    c.model = "mlp:5:tanh";
    c.steps = 12;
    c.batch = 8;
    c.lr = 0.3;
    c.checkpoint_every = 4;
    c.out = (tmp_ / name).string();
    return c;
  }
  testing::TempDir tmp_;
};

// The repro of the issue: an interrupted analysis whose `segments` is a planted link. Before,
// --force (and a plain resume) emptied the link's target of everything not named seg_*.
TEST_F(OutputSafetyTest, APlantedSegmentsLinkIsRefusedAndItsTargetKept) {
  const TrainConfig c = run_config("run");
  train(c, "");
  AnalyzeConfig a;
  a.run = c.out;
  a.out = (tmp_ / "an").string();
  a.probes = 3;
  a.progress_dir = a.out;
  a.segment_seconds = 0;
  analyze(a);  // left partial: segments at every checkpoint, never written out
  ASSERT_TRUE(fs::is_directory(fs::path(a.out) / "segments"));
  fs::remove_all(fs::path(a.out) / "segments");
  const fs::path target = victim(tmp_ / "victim");
  fs::create_directory_symlink(target, fs::path(a.out) / "segments");
  EXPECT_THROW_WITH(analyze(a), InputError, "segments: is not a folder this command made (a symbolic link)");
  expect_untouched(target);
  AnalyzeConfig other = a;
  other.tau = 0.5;
  other.force = true;  // another command's partial folder, discarded with --force
  EXPECT_THROW_WITH(analyze(other), InputError, "a symbolic link");
  expect_untouched(target);
  EXPECT_TRUE(fs::is_symlink(fs::path(a.out) / "segments")) << "the link itself is the user's too";

  // Inside a real segments folder: a link named like a segment, or a stranger's file.
  fs::remove(fs::path(a.out) / "segments");
  fs::create_directories(fs::path(a.out) / "segments");
  fs::create_directory_symlink(target, fs::path(a.out) / "segments" / "seg_00000000");
  EXPECT_THROW_WITH(analyze(a), InputError, "seg_00000000: not a segment of an interrupted analysis (a symbolic link)");
  expect_untouched(target);
  fs::remove(fs::path(a.out) / "segments" / "seg_00000000");
  atomic_write(fs::path(a.out) / "segments" / "notes.txt", "x");
  EXPECT_THROW_WITH(analyze(a), InputError, "notes.txt: not a segment of an interrupted analysis (an unexpected entry)");
  EXPECT_TRUE(fs::exists(fs::path(a.out) / "segments" / "notes.txt"));
  fs::remove(fs::path(a.out) / "segments" / "notes.txt");

  // Beside the segments: the user's file would have gone with the folder once the analysis
  // completed (continued, or discarded with --force). Refused, naming it; kept.
  victim(fs::path(a.out) / "mine");
  EXPECT_THROW_WITH(analyze(a), InputError, "an/mine, which is not the interrupted analysis's own");
  EXPECT_THROW_WITH(analyze(other), InputError, "which is not the interrupted analysis's own");
  expect_untouched(fs::path(a.out) / "mine");
  fs::remove_all(fs::path(a.out) / "mine");
  write_analysis(analyze(a), a);  // then it continues and completes (written through commit)
  EXPECT_FALSE(fs::exists(fs::path(a.out) / "partial.json"));
}

// StagedOutput::commit removed a sibling `OUT.replaced` the user owned, with or without --force.
TEST_F(OutputSafetyTest, ADisplacedOutputGetsANameTheToolMade) {
  const fs::path out = tmp_ / "out", mine = victim(tmp_ / "out.replaced");
  {
    StagedOutput s(out);
    atomic_write(s.path() / "a.txt", "first\n");
    s.commit();
  }
  {
    StagedOutput s(out);  // replaces the first
    atomic_write(s.path() / "a.txt", "second\n");
    s.commit();
  }
  EXPECT_EQ(read_file(out / "a.txt"), "second\n");
  expect_untouched(mine);
  for (const auto& e : fs::directory_iterator(tmp_.path())) {
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "out" || n == "out.replaced" || n == "data") << "left behind: " << n;
  }
}

// report checked --out only at its start: an --out written by another process meanwhile was
// overwritten. Now what commit replaces must be what was there when the command began.
TEST_F(OutputSafetyTest, AnOutputThatAppearsOrIsReplacedMeanwhileIsNotOverwritten) {
  const fs::path out = tmp_ / "out";
  {
    StagedOutput s(out);
    atomic_write(s.path() / "a.txt", "ours\n");
    victim(out);  // another process's output appears while this one runs
    EXPECT_THROW_WITH(s.commit(), InputError, "appeared while this command ran");
  }
  expect_untouched(out);
  EXPECT_FALSE(fs::exists(out / "a.txt"));
  {
    StagedOutput s(out);  // out exists now (--force): it may replace this folder, not another
    atomic_write(s.path() / "a.txt", "ours\n");
    fs::rename(out, tmp_ / "moved");
    victim(out);
    EXPECT_THROW_WITH(s.commit(), InputError, "was replaced while this command ran");
  }
  expect_untouched(out);
  {
    StagedOutput s(out);
    fs::remove_all(out);
    fs::create_directory_symlink(tmp_ / "moved", out);
    EXPECT_THROW_WITH(s.commit(), InputError, "was replaced while this command ran");
  }
  expect_untouched(tmp_ / "moved");
  fs::remove(out);
  fs::create_directory_symlink(tmp_ / "moved", out);
  EXPECT_THROW_WITH(StagedOutput s(out), InputError, "is a symbolic link");
  expect_untouched(tmp_ / "moved");
}

// One writer per output: a second lock on the same --out is refused (flock locks belong to an
// open file, so two in one process conflict as two processes do); released, it can be taken
// again, and the lock file is gone. A lock file planted as a link is not followed.
TEST_F(OutputSafetyTest, OneWriterPerOutput) {
  const fs::path out = tmp_ / "sub" / "out";
  {
    OutputLock first(out);
    EXPECT_TRUE(fs::exists(first.path()));
    EXPECT_THROW_WITH(OutputLock second(out), InputError, "another pathkernel command is writing it");
    OutputLock other(tmp_ / "sub" / "out2");  // another output in the same folder is free
  }
  EXPECT_FALSE(fs::exists(tmp_ / "sub" / ".out.lock"));
  { OutputLock again(out); }
  {  // "sub/out/" names the same output: its lock beside it, not inside a folder it creates
    OutputLock slash(out.string() + "/");
    EXPECT_EQ(slash.path(), tmp_ / "sub" / ".out.lock");
    EXPECT_FALSE(fs::exists(out));
    EXPECT_THROW_WITH(OutputLock other(out), InputError, "another pathkernel command is writing it");
  }
  {
    StagedOutput s(out.string() + "/");
    atomic_write(s.path() / "a.txt", "x");
    EXPECT_EQ(s.path().parent_path(), tmp_ / "sub");
    s.commit();
    EXPECT_EQ(read_file(out / "a.txt"), "x");
  }
  const fs::path target = victim(tmp_ / "victim");
  fs::create_symlink(target / "precious.txt", tmp_ / "sub" / ".out.lock");
  EXPECT_THROW_WITH(OutputLock planted(out), InputError, ".out.lock: cannot be opened");
  expect_untouched(target);
}

// train --resume wrote through a planted gradients.bin link (truncating its target) and took
// any bytes of the right length as gradient records.
TEST_F(OutputSafetyTest, TheGradientLogIsNeverFollowedAndMustBeTheOneTrainingWrote) {
  TrainConfig c = run_config("grads");
  c.log_gradients = true;
  train(c, "");
  const RunDir dir(c.out);
  const std::string logged = read_file(dir.gradients());
  auto interrupt = [&] {
    fs::remove(dir.complete_marker());
    fs::remove(dir.checkpoint(12));
    fs::remove(dir.state(12));
    fs::remove(dir.digest(12));
    truncate_step_log(dir.steps_log(), 8);
  };

  // A link to the user's file: refused, the target keeps its bytes.
  interrupt();
  const fs::path target = victim(tmp_ / "victim");
  atomic_write(target / "precious.txt", logged);  // the right length, the right bytes even
  fs::remove(dir.gradients());
  fs::create_symlink(target / "precious.txt", dir.gradients());
  EXPECT_THROW_WITH(resume(dir.root(), ""), InputError, "symbolic link");
  EXPECT_EQ(read_file(target / "precious.txt"), logged);

  // Bytes of the right length that training did not write: no checkpoint vouches for them, so
  // the resume goes back to step 0 and writes the log anew, as training writes it.
  fs::remove(dir.gradients());
  std::string other = logged;
  for (size_t i = 0; i < other.size(); i += 97) other[i] = static_cast<char>(other[i] ^ 0x5a);
  atomic_write(dir.gradients(), other);
  const TrainSummary s = resume(dir.root(), "");
  EXPECT_EQ(s.status, "complete");
  EXPECT_EQ(read_file(dir.gradients()), logged);
  const std::string digest = read_file(dir.digest(8));
  EXPECT_NE(digest.find("\ngradients " + std::to_string(8 * logged.size() / 12) + " "), std::string::npos) << digest;

  // A digest that vouches for no gradient log (an older pathkernel's) is not taken as one.
  interrupt();
  for (int64_t k : {4, 8}) {
    std::string d = read_file(dir.digest(k));
    atomic_write(dir.digest(k), d.substr(0, d.find("gradients ")));
  }
  fs::remove(dir.checkpoint(0));
  fs::remove(dir.state(0));
  fs::remove(dir.digest(0));
  EXPECT_THROW_WITH(resume(dir.root(), ""), InputError, "vouches for no gradient log");
  EXPECT_EQ(read_file(dir.gradients()), logged) << "a refused resume changes nothing";
}

}  // namespace
}  // namespace pathkernel
