// python/pathkernel_read.py returns the numbers of the files it reads: tests/python/
// check_reader.py compares it with pandas' and numpy's own readers on an analysis and an
// explanation (Debian's python3-numpy and python3-pandas), and fails on a tampered table.
#include <gtest/gtest.h>

#include "fixtures.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

TEST(PythonReaderTest, ReturnsTheNumbersOfTheFilesWithTheirCoordinates) {
  testing::TempDir tmp;
  const fs::path data = tmp / "data", run = tmp / "run", an = tmp / "an", ex = tmp / "ex", log = tmp / "cmd.log";
  testing::write_synthetic_idx(data, 96, 24);
  const std::string bin = PATHKERNEL_BIN, src = PATHKERNEL_SOURCE_DIR;
  ASSERT_EQ(testing::run_program({bin, "train", "--data", data.string(), "--model", "mlp:8:tanh", "--steps", "6",
                                  "--batch", "16", "--momentum", "0.9", "--lr", "0.05", "--out", run.string()},
                                 log),
            0)
      << read_file(log);
  ASSERT_EQ(testing::run_program({bin, "analyze", run.string(), "--probes", "4", "--second-order", "--out", an.string()}, log),
            0)
      << read_file(log);
  ASSERT_EQ(testing::run_program({bin, "explain", run.string(), "--csv", "all", "--probes", "3", "--exact", "2", "--self-influence",
                                  "--out", ex.string()},
                                 log),
            0)
      << read_file(log);
  const std::string check = src + "/tests/python/check_reader.py";
  EXPECT_EQ(testing::run_program({"/usr/bin/python3", check, an.string(), ex.string()}, log), 0) << read_file(log);
  EXPECT_NE(read_file(log).find("ok"), std::string::npos) << read_file(log);

  // A tampered copy: one probe's label changed in probes.csv; the reader reports the file as it
  // is, and the comparison with the arrays' other route (sum of D) or labels must fail.
  const fs::path bad = tmp / "bad";
  fs::copy(an, bad, fs::copy_options::recursive);
  std::string probes = read_file(bad / "probes.csv");
  const size_t row = probes.find('\n') + 1;  // first data row: probe,label,output,f_initial,...
  const size_t f0 = probes.find(',', probes.find(',', probes.find(',', row) + 1) + 1) + 1;
  probes.replace(f0, probes.find(',', f0) - f0, "123.5");  // another initial output
  atomic_write(bad / "probes.csv", probes);
  EXPECT_EQ(testing::run_program({"/usr/bin/python3", check, bad.string(), ex.string()}, log), 1) << read_file(log);
  EXPECT_NE(read_file(log).find("sum of D vs probes.csv"), std::string::npos) << read_file(log);
}

}  // namespace
}  // namespace pathkernel
