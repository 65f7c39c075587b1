#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>
#include <set>

#include "fixtures.h"
#include "pathkernel/analysis/analyzer.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/fs_util.h"
#include "pathkernel/io/gnuplot.h"
#include "pathkernel/report/report.h"
#include "pathkernel/train/trainer.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

class ReportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::err);
    testing::write_synthetic_idx(tmp_ / "data", 40, 10, 8, 3);
    TrainConfig c;
    c.data_dir = (tmp_ / "data").string();
    c.model = "mlp:5:tanh";
    c.steps = 12;
    c.batch = 8;
    c.lr = 0.5;
    c.out = (tmp_ / "run").string();
    train(c, "");
    AnalyzeConfig a;
    a.run = c.out;
    a.out = (tmp_ / "analysis").string();
    a.probes = 5;
    write_analysis(analyze(a), a);
  }
  testing::TempDir tmp_;
};

TEST_F(ReportTest, WritesPlotsDataAndHtml) {
  ReportConfig c;
  c.analysis = (tmp_ / "analysis").string();
  c.out = (tmp_ / "report").string();
  const ReportFiles f = write_report(c);
  ASSERT_TRUE(f.gnuplot) << "scripts/setup.sh installs gnuplot-nox";
  EXPECT_EQ(f.pngs.size(), 5u);  // r, cumulative, D vs F, histogram, by class
  for (const auto& png : f.pngs) EXPECT_GT(fs::file_size(fs::path(c.out) / png), 5000u) << png;
  const std::string html = read_file(f.html);
  EXPECT_NE(html.find("Eq. 9"), std::string::npos);
  EXPECT_NE(html.find("cumulative.png"), std::string::npos);
  // A header and 12 steps in the r data; 12 steps x 5 probes x 3 outputs points of D against F.
  const std::string r_csv = read_file(fs::path(c.out) / "data/r_per_step.csv");
  EXPECT_EQ(std::count(r_csv.begin(), r_csv.end(), '\n'), 13);
  const std::string df_csv = read_file(fs::path(c.out) / "data/d_vs_f.csv");
  EXPECT_EQ(std::count(df_csv.begin(), df_csv.end(), '\n'), 1 + 12 * 5 * 3);
  EXPECT_THROW_WITH(write_report(c), InputError, "already exists");
}

/// Decodes standard base64 (the test's own route to the embedded pictures).
std::string unbase64(const std::string& s) {
  const std::string digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char ch : s) {
    if (ch == '=') break;
    acc = (acc << 6) | static_cast<uint32_t>(digits.find(ch));
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xFF);
    }
  }
  return out;
}

// Issue 10: the page a researcher would keep. The run's facts come from the run's own files,
// every figure is embedded (the page stands alone) and also written as SVG and PDF, classes are
// named, and the summary numbers are summary.json's.
TEST_F(ReportTest, APaperReadyPageStandsAloneWithTheRunFactsAndNamedClasses) {
  ReportConfig c;
  c.analysis = (tmp_ / "analysis").string();
  c.out = (tmp_ / "report").string();
  atomic_write(tmp_ / "names.txt", "circle\nsquare\ntriangle\n");
  c.class_names_file = (tmp_ / "names.txt").string();
  const ReportFiles f = write_report(c);
  const std::string html = read_file(f.html);
  const auto manifest = nlohmann::json::parse(read_file(tmp_ / "run" / "manifest.json"));
  const auto run_summary = nlohmann::json::parse(read_file(tmp_ / "run" / "summary.json"));
  const auto summary = nlohmann::json::parse(read_file(tmp_ / "analysis" / "summary.json"));
  EXPECT_NE(html.find("<tr><th>model</th><td>mlp:5:tanh</td></tr>"), std::string::npos);
  EXPECT_NE(html.find(fmt::format("<tr><th>parameters</th><td>{}</td></tr>", manifest["model"]["num_parameters"].get<int64_t>())),
            std::string::npos);
  EXPECT_NE(html.find(fmt::format("<tr><th>test accuracy at the end</th><td>{:.4f}</td></tr>",
                                  run_summary["test_accuracy"].get<double>())),
            std::string::npos);
  EXPECT_NE(html.find("<tr><th>batch</th><td>8</td></tr>"), std::string::npos);
  EXPECT_NE(html.find("0.5 (constant)"), std::string::npos);
  EXPECT_NE(html.find(fmt::format("<tr><th>T_c (rule tau)</th><td>{} of {} steps</td></tr>",
                                  summary["tc_size"].get<int64_t>(), summary["steps_analyzed"].get<int64_t>())),
            std::string::npos);
  EXPECT_NE(html.find(fmt::format("{:.3g} / {:.3g}", summary["r_percentiles"]["p5"].get<double>(),
                                  summary["r_percentiles"]["p50"].get<double>())),
            std::string::npos);
  // The by-class table against probes.csv, read here: per class, the probes and the means over
  // its probes and outputs of f_N - f_0 and of sum R (= sum R(T_c) + sum R(rest)).
  const Table probes = read_csv(tmp_ / "analysis" / "probes.csv");
  const char* names[] = {"circle", "square", "triangle"};
  for (int64_t cls = 0; cls < 3; ++cls) {
    double change = 0, rsum = 0;
    int64_t rows = 0;
    std::set<int64_t> members;
    for (size_t i = 0; i < probes.rows; ++i) {
      if (static_cast<int64_t>(probes.cols.at("label")[i]) != cls) continue;
      change += probes.cols.at("f_final")[i] - probes.cols.at("f_initial")[i];
      rsum += probes.cols.at("sum_R_Tc")[i] + probes.cols.at("sum_R_other")[i];
      members.insert(static_cast<int64_t>(probes.cols.at("probe")[i]));
      ++rows;
    }
    if (rows == 0) continue;
    const std::string row_start = fmt::format("<tr><th>{} ({})</th><td>{}</td><td>{:.4g}</td>", names[cls], cls,
                                              members.size(), change / static_cast<double>(rows));
    const size_t at = html.find(row_start);
    ASSERT_NE(at, std::string::npos) << row_start;
    const std::string row = html.substr(at, html.find("</tr>", at) - at);
    EXPECT_NE(row.find(fmt::format("<td>{:.4g}</td>", rsum / static_cast<double>(rows))), std::string::npos) << row;
  }
  // Every figure: embedded byte for byte, and beside the page as PNG, SVG and PDF.
  size_t embedded = 0;
  for (size_t at = html.find("data:image/png;base64,"); at != std::string::npos;
       at = html.find("data:image/png;base64,", at + 1)) {
    const size_t start = at + 22, end = html.find('\'', start);
    const std::string png = f.pngs.at(embedded++);
    EXPECT_EQ(unbase64(html.substr(start, end - start)), read_file(fs::path(c.out) / png)) << png;
    const std::string stem = fs::path(png).stem().string();
    EXPECT_EQ(read_file(fs::path(c.out) / (stem + ".pdf")).rfind("%PDF", 0), 0u) << stem;
    EXPECT_NE(read_file(fs::path(c.out) / (stem + ".svg")).find("<svg"), std::string::npos) << stem;
  }
  EXPECT_EQ(embedded, f.pngs.size());
  EXPECT_EQ(html.find("<img src='r_per_step.png'"), std::string::npos);

  atomic_write(tmp_ / "short.txt", "circle\n");
  c.class_names_file = (tmp_ / "short.txt").string();
  c.out = (tmp_ / "report-short").string();
  EXPECT_THROW_WITH(write_report(c), InputError, "short.txt: 1 names, the run has 3 classes");
  EXPECT_FALSE(fs::exists(c.out));
}

// Issue 8: no string reaches a shell, and none is code to gnuplot. An output folder whose name
// is shell syntax, and a crafted summary.json whose T_c rule is gnuplot code, are data.
TEST_F(ReportTest, PathsAndSettingsAreNeverRunAsCommands) {
  const fs::path canary = tmp_ / "PWNED";
  ReportConfig c;
  c.analysis = (tmp_ / "analysis").string();
  c.out = (tmp_ / ("a'; touch " + canary.string() + "; echo '")).string();
  const ReportFiles f = write_report(c);
  EXPECT_EQ(f.pngs.size(), 5u);
  EXPECT_FALSE(fs::exists(canary)) << "the output path was run by a shell";

  auto summary = nlohmann::json::parse(read_file(tmp_ / "analysis" / "summary.json"));
  summary["settings"]["tc_rule"] = "tau'\nsystem('touch " + canary.string() + "')\n`touch " + canary.string() +
                                   "`@x<script>alert(1)</script>'";
  atomic_write(tmp_ / "analysis" / "summary.json", summary.dump());
  c.out = (tmp_ / "report2").string();
  const ReportFiles g = write_report(c);
  EXPECT_EQ(g.pngs.size(), 5u);
  EXPECT_FALSE(fs::exists(canary)) << "a setting from summary.json ran as gnuplot code";
  const std::string html = read_file(g.html);
  EXPECT_EQ(html.find("<script>alert"), std::string::npos);
  EXPECT_NE(html.find("&lt;script&gt;"), std::string::npos);
  // The kept script re-renders from the report folder itself: it names its files relatively.
  const std::string gp = read_file(fs::path(c.out) / "r_per_step.gp");
  EXPECT_NE(gp.find("'data/r_per_step.csv'"), std::string::npos);
  EXPECT_EQ(gp.find((fs::path(c.out) / "data").string()), std::string::npos);
}

TEST(GnuplotTest, TextIsSafeInsideSingleQuotes) {
  EXPECT_EQ(gp_text("it's"), "it''s");
  EXPECT_EQ(gp_text("a`cmd`b"), "a_cmd_b");
  EXPECT_EQ(gp_text("mac@ro and back\\slash"), "mac_ro and back_slash");
  EXPECT_EQ(gp_text(std::string("a") + '\n' + "system('x')" + '\r' + '\x01'), "asystem(''x'')");
  EXPECT_EQ(gp_text("class \xc3\xa9t\xc3\xa9"), "class \xc3\xa9t\xc3\xa9") << "UTF-8 is kept";
}

TEST_F(ReportTest, WithoutGnuplotSaysSoAndStillWritesTheData) {
  const std::string path = std::getenv("PATH");
  setenv("PATH", "/nonexistent", 1);
  ReportConfig c;
  c.analysis = (tmp_ / "analysis").string();
  c.out = (tmp_ / "report-nognuplot").string();
  const ReportFiles f = write_report(c);
  setenv("PATH", path.c_str(), 1);
  EXPECT_FALSE(f.gnuplot);
  EXPECT_TRUE(f.pngs.empty());
  EXPECT_EQ(f.csvs.size(), 5u);  // r, cumulative, D vs F, histogram, by class
  EXPECT_NE(read_file(f.html).find("gnuplot was not found"), std::string::npos);
}

TEST_F(ReportTest, RejectsWhatIsNotAnAnalysis) {
  ReportConfig c;
  c.analysis = (tmp_ / "run").string();
  c.out = (tmp_ / "r2").string();
  EXPECT_THROW_WITH(write_report(c), InputError, "steps.csv: missing");
}

}  // namespace
}  // namespace pathkernel

#include "pathkernel/io/run_dir.h"
#include "pathkernel/train/checkpoint.h"

namespace pathkernel {
namespace {
namespace fs = std::filesystem;

// The note's Figure 2: toy:wave has a shallow minimum at w = 0.579 behind a barrier at
// w = 1.515. A small rate settles in the shallow one; a large one jumps the barrier, and that
// jump is in T_c with a large residual.
TEST(ToyTest, BarrierJumpIsAComplexStep) {
  spdlog::set_level(spdlog::level::err);
  testing::TempDir tmp;
  auto run_toy = [&](double lr) {
    TrainConfig c;
    c.data_dir = "synthetic:wave";
    c.model = "toy:wave";
    c.steps = 30;
    c.batch = 32;
    c.lr = lr;
    c.checkpoint_every = 1;
    c.out = (tmp / ("toy" + std::to_string(lr))).string();
    train(c, "");
    std::vector<double> w;
    for (int64_t k = 0; k <= 30; ++k) w.push_back(load_tensor_dict(RunDir(c.out).checkpoint(k))[0].second.item<double>());
    return std::pair{c.out, w};
  };
  const auto [slow_run, slow_w] = run_toy(0.5);
  EXPECT_NEAR(slow_w.back(), 0.579, 0.01) << "the small rate settles in the shallow minimum";
  const auto [fast_run, fast_w] = run_toy(6.0);
  EXPECT_NEAR(fast_w.back(), 2.674, 0.01) << "the large rate ends in the deeper minimum";

  AnalyzeConfig a;
  a.run = fast_run;
  a.out = (tmp / "analysis").string();
  a.probes = 16;
  a.second_order = true;
  const AnalysisResult r = analyze(a);
  EXPECT_LT(r.identity_error, 1e-12);
  int64_t jumps = 0;
  for (const auto& s : r.steps) {
    const bool crosses = (fast_w[s.step] - 1.515) * (fast_w[s.step + 1] - 1.515) < 0;
    if (crosses) {
      ++jumps;
      EXPECT_TRUE(s.in_tc) << "step " << s.step << " jumps the barrier";
      EXPECT_GT(s.r, 0.5) << "step " << s.step;
    }
  }
  EXPECT_GE(jumps, 1);
  write_analysis(r, a);
  ReportConfig rc;
  rc.analysis = a.out;
  rc.out = (tmp / "report").string();
  const ReportFiles f = write_report(rc);
  EXPECT_NE(std::find(f.pngs.begin(), f.pngs.end(), "landscape.png"), f.pngs.end());
  EXPECT_TRUE(fs::exists(fs::path(rc.out) / "data/path.csv"));
}

}  // namespace
}  // namespace pathkernel
