// The report of the default job (scripts/default_job.sh's commands, run as that script writes
// them) opened in a real headless browser (Debian's chromium): every figure decodes, the page's
// numbers are summary.json's, and a screenshot renders (docs/img/report.png is one).
#include <gtest/gtest.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <sstream>

#include "fixtures.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

const char* kChromium = "/usr/bin/chromium";

/// The pathkernel commands of scripts/default_job.sh, "$run" replaced by `run`, quotes dropped.
std::vector<std::vector<std::string>> default_job(const fs::path& run) {
  std::istringstream in(read_file(fs::path(PATHKERNEL_SOURCE_DIR) / "scripts" / "default_job.sh"));
  std::vector<std::vector<std::string>> out;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("./build/apps/pathkernel ", 0) != 0) continue;
    std::istringstream words(line);
    std::vector<std::string> argv = {PATHKERNEL_BIN};
    words >> line;  // the binary
    for (std::string w; words >> w;) {
      w.erase(std::remove(w.begin(), w.end(), '"'), w.end());
      if (w.rfind("$run", 0) == 0) w = run.string() + w.substr(4);
      if (w == "$workers") w = "2";  // the script's one worker per core, on these 2-core machines
      argv.push_back(w);
    }
    out.push_back(argv);
  }
  return out;
}

TEST(ReportBrowserTest, TheDefaultJobsReportRendersEveryFigureInChromium) {
  ASSERT_TRUE(fs::exists(kChromium)) << "needs Debian's chromium (bash scripts/test.sh installs it)";
  testing::TempDir tmp;
  const fs::path run = tmp / "run", log = tmp / "cmd.log";
  const auto commands = default_job(run);
  ASSERT_EQ(commands.size(), 3u) << "train, analyze, report";
  for (const auto& argv : commands) ASSERT_EQ(testing::run_program(argv, log), 0) << argv[1] << "\n" << read_file(log);
  const fs::path page = run / "report" / "report.html";
  const std::string html = read_file(page);
  size_t images = 0;
  for (size_t at = html.find("<img "); at != std::string::npos; at = html.find("<img ", at + 1)) ++images;
  EXPECT_EQ(images, 6u);  // r, S, cumulative, D vs F, histogram, by class

  // The page as the browser builds it, after its load event: every picture decoded.
  const std::string url = "file://" + fs::absolute(page).string();
  const std::vector<std::string> common = {kChromium, "--headless", "--no-sandbox", "--disable-gpu",
                                           "--hide-scrollbars", "--virtual-time-budget=10000"};
  std::vector<std::string> dump = common;
  dump.insert(dump.end(), {"--dump-dom", url});
  ASSERT_EQ(testing::run_program(dump, tmp / "dom.html"), 0) << read_file(tmp / "dom.html");
  const std::string dom = read_file(tmp / "dom.html");
  EXPECT_NE(dom.find(fmt::format("data-images-loaded=\"{}/{}\"", images, images)), std::string::npos)
      << dom.substr(0, 2000);

  // The numbers on the page are summary.json's.
  const auto summary = nlohmann::json::parse(read_file(run / "analysis" / "summary.json"));
  EXPECT_NE(dom.find(fmt::format("<th>T_c (rule tau)</th><td>{} of {} steps</td>", summary["tc_size"].get<int64_t>(),
                                 summary["steps_analyzed"].get<int64_t>())),
            std::string::npos);
  const auto& p = summary["r_percentiles"];
  EXPECT_NE(dom.find(fmt::format("{:.3g} / {:.3g} / {:.3g} / {:.3g}", p["p5"].get<double>(), p["p50"].get<double>(),
                                 p["p95"].get<double>(), p["max"].get<double>())),
            std::string::npos);
  EXPECT_NE(dom.find(fmt::format("<td>{:.3g}</td>", summary["sum_R_over_change"].get<double>())), std::string::npos);
  EXPECT_NE(dom.find("<th>model</th><td>mlp:128:tanh</td>"), std::string::npos);
  EXPECT_NE(dom.find("Ankle boot (9)"), std::string::npos);

  std::vector<std::string> shot = common;
  const fs::path png = tmp / "report.png";
  shot.insert(shot.end(), {"--window-size=1100,2600", "--screenshot=" + png.string(), url});
  ASSERT_EQ(testing::run_program(shot, log), 0) << read_file(log);
  const std::string bytes = read_file(png);
  EXPECT_EQ(bytes.substr(1, 3), "PNG");
  EXPECT_GT(bytes.size(), 100000u);  // a rendered page, not a blank one
  if (const char* keep = std::getenv("PATHKERNEL_KEEP_SCREENSHOT")) fs::copy_file(png, keep, fs::copy_options::overwrite_existing);
}

}  // namespace
}  // namespace pathkernel
