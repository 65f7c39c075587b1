// `cmake --install` into a fresh prefix, then the README's first steps (the lines between its
// quickstart markers) run as written from a folder outside the checkout, with only the prefix's
// bin on PATH for pathkernel (no shell: each line is split on spaces).
#include <gtest/gtest.h>

#include <cstdlib>
#include <sstream>

#include "fixtures.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

std::vector<std::string> words(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> w;
  for (std::string s; in >> s;) w.push_back(s);
  return w;
}

TEST(InstallTest, TheReadmeFirstStepsRunFromAFreshPrefixOutsideTheCheckout) {
  testing::TempDir tmp;
  const fs::path prefix = tmp / "prefix", work = tmp / "work", log = tmp / "cmd.log";
  ASSERT_EQ(testing::run_program({"/usr/bin/cmake", "--install", PATHKERNEL_BINARY_DIR, "--prefix", prefix.string()}, log),
            0)
      << read_file(log);
  EXPECT_TRUE(fs::exists(prefix / "bin" / "pathkernel"));
  EXPECT_TRUE(fs::exists(prefix / "share" / "pathkernel" / "python" / "pathkernel_record.py"));
  EXPECT_TRUE(fs::exists(prefix / "share" / "doc" / "pathkernel" / "spec.md"));
  fs::create_directories(work);

  const std::string readme = read_file(fs::path(PATHKERNEL_SOURCE_DIR) / "README.md");
  const size_t begin = readme.find("<!-- quickstart -->"), end = readme.find("<!-- /quickstart -->");
  ASSERT_NE(begin, std::string::npos);
  ASSERT_NE(end, std::string::npos);
  std::istringstream block(readme.substr(begin, end - begin));
  int commands = 0;
  for (std::string line; std::getline(block, line);) {
    std::vector<std::string> argv = words(line);
    if (argv.empty() || argv[0].rfind("<!--", 0) == 0 || argv[0].rfind("```", 0) == 0) continue;
    for (auto& a : argv) {  // the README's /usr/local is this test's prefix
      if (a.rfind("/usr/local/", 0) == 0) a = (prefix / a.substr(11)).string();
    }
    if (argv[0] == "pathkernel") argv[0] = (prefix / "bin" / "pathkernel").string();
    else if (argv[0] == "python3") argv[0] = "/usr/bin/python3";
    else FAIL() << "the quickstart holds a command this test does not know: " << line;
    ASSERT_EQ(testing::run_program(argv, log, work), 0) << line << "\n" << read_file(log);
    ++commands;
  }
  EXPECT_EQ(commands, 6);
  EXPECT_TRUE(fs::exists(work / "runs" / "first-report" / "report.html"));
  EXPECT_TRUE(fs::exists(work / "runs" / "first-explain" / "summary.json"));
  EXPECT_TRUE(fs::exists(work / "runs" / "py-mlp-analysis" / "summary.json"));
}

}  // namespace
}  // namespace pathkernel
