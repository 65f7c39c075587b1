// The fixture of the tests of recorded training-loop habits (test_recorded_habits.cpp,
// test_recorded_habit_terms.cpp): each habit recorded once per suite by tests/data/
// record_habits.py into the suite's folder, analyzed, and checked by tests/python/
// check_recorded_terms.py.
#pragma once

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "fixtures.h"
#include "pathkernel/io/csv.h"
#include "pathkernel/io/fs_util.h"

namespace pathkernel {

// Issue 23, item 1: every analyzed step of a recorded run is verified to be the logged
// optimizer's update of the logged batch (step_verification.h). Each habit of real training
// loops that made the analysis explain a trajectory it never verified is recorded on
// Fashion-MNIST by tests/data/record_habits.py and must be refused with its cause named: exit 4,
// no output. The clean loop passes, and --allow-unverified analyzes a broken one with its steps
// marked.
class RecordedHabitsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { tmp_ = new testing::TempDir(); }
  static void TearDownTestSuite() { delete tmp_; }
  std::filesystem::path record(const std::string& habit) {
    const std::filesystem::path run = tmp_->path() / habit;
    if (!std::filesystem::exists(run / "COMPLETE")) {
      const int st = testing::run_program({"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/tests/data/record_habits.py",
                                           habit, run.string()},
                                          tmp_->path() / (habit + ".log"));
      EXPECT_EQ(st, 0) << read_file(tmp_->path() / (habit + ".log"));
    }
    return run;
  }
  int analyze(const std::filesystem::path& run, const std::string& out, std::string& log, bool allow = false) {
    std::vector<std::string> argv = {PATHKERNEL_BIN, "analyze", run.string(), "--probes", "4", "--out",
                                     (tmp_->path() / out).string()};
    if (allow) argv.push_back("--allow-unverified");
    const int st = testing::run_program(argv, tmp_->path() / "analyze.log");
    log = read_file(tmp_->path() / "analyze.log");
    return st;
  }
  /// Records HABIT, which the recorder must refuse: its log (the refusal names the cause).
  std::string refused_by_recorder(const std::string& habit) {
    const std::filesystem::path run = tmp_->path() / habit, log = tmp_->path() / (habit + ".log");
    const int st = testing::run_program(
        {"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/tests/data/record_habits.py", habit, run.string()},
        log);
    EXPECT_NE(st, 0) << habit << ": recorded, not refused";
    return read_file(log);
  }
  /// tests/python/check_recorded_terms.py on RUN and its analysis AN (and explanation EX): the
  /// float64 recomputation's differences and each analyzed step's rounding bound on Uopt_round.
  nlohmann::json check_terms(const std::filesystem::path& run, const std::filesystem::path& an, const std::filesystem::path& ex = {}) {
    const std::string name = an.filename().string();
    const std::filesystem::path log = tmp_->path() / (name + "-check.log");
    std::vector<std::string> argv = {"/usr/bin/python3", std::string(PATHKERNEL_SOURCE_DIR) + "/tests/python/check_recorded_terms.py",
                                     run.string(), an.string()};
    if (!ex.empty()) argv.push_back(ex.string());
    const int st = testing::run_program(argv, log);
    const std::string out = read_file(log);
    EXPECT_EQ(st, 0) << out;
    const size_t brace = out.rfind('{');
    return brace == std::string::npos ? nlohmann::json::object() : nlohmann::json::parse(out.substr(brace));
  }
  /// Uopt_round_norm of each analyzed step against the rounding bound `check` computed for it.
  static std::vector<std::pair<double, double>> round_and_bound(const std::filesystem::path& an, const nlohmann::json& check) {
    const Table t = read_csv(an / "steps.csv");
    const auto& bound = check.at("uopt_round_bound");
    EXPECT_EQ(bound.size(), t.rows) << an;
    std::vector<std::pair<double, double>> out;
    for (size_t i = 0; i < std::min(t.rows, bound.size()); ++i) {
      out.emplace_back(t.cols.at("Uopt_round_norm")[i], bound[i].get<double>());
    }
    return out;
  }
  /// The optimizer's update closes on every step of analysis `an`: Uopt_round within what float32
  /// training's rounding can reach on that step (a bound of its own per step: a preconditioner
  /// amplifies the rounding of gradients near zero, Adagrad's first step by up to the rate), and
  /// Kopt nonzero.
  static void expect_update_closes(const std::filesystem::path& an, const nlohmann::json& check) {
    const Table t = read_csv(an / "steps.csv");
    double kopt = 0;
    for (size_t i = 0; i < t.rows; ++i) kopt = std::max(kopt, t.cols.at("Kopt_norm")[i]);
    EXPECT_GT(kopt, 0) << an;
    const auto steps = round_and_bound(an, check);
    for (size_t i = 0; i < steps.size(); ++i) EXPECT_LE(steps[i].first, steps[i].second) << an << " step row " << i;
  }
  static inline testing::TempDir* tmp_ = nullptr;  // the suite's folder (runs shared by its tests)
};

}  // namespace pathkernel
