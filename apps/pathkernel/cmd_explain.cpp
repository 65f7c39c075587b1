// pathkernel explain: options -> ExplainConfig -> explain, write, print the sum check.
#include <cxxopts.hpp>
#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "options.h"
#include "pathkernel/errors.h"
#include "pathkernel/fs_util.h"
#include "pathkernel/explain.h"

namespace pathkernel::app {

int cmd_explain(const Args& args) {
  ExplainConfig c;
  cxxopts::Options opts("pathkernel explain",
                        "The kernel-machine view: which training examples pushed a prediction (a_i = summed K).");
  // clang-format off
  opts.add_options()
    ("run", "run directory", cxxopts::value(c.run))
    ("out", "explanation directory to create", cxxopts::value(c.out))
    ("probe", "probe index in the split (repeatable, or I,J,...)", cxxopts::value(c.probe_indices))
    ("probes", "or N probes evenly spaced over the split (they share one pass over the run)",
     cxxopts::value(c.probes)->default_value("0"))
    ("split", "test | train", cxxopts::value(c.split)->default_value("test"))
    ("logit", "the logit to explain (default: each probe's final prediction)", cxxopts::value(c.output))
    ("output", "old name of --logit (next to analyze's --outputs it read as the same flag)", cxxopts::value<int64_t>())
    ("top", "proponents and opponents listed and shown per probe", cxxopts::value(c.top)->default_value("16"))
    ("exact", "Q: also attribute with the exact path kernel (Q-node quadrature): no residual left",
     cxxopts::value(c.exact_nodes))
    ("self-influence", "rank training examples by TracIn self-influence (finds mislabeled ones)")
    ("kernel-route", "auto | factorized | explicit | torchscript (a recorded run's own model, by autograd)",
     cxxopts::value(c.kernel_route)->default_value("auto"))
    ("class-names", "file with one class name per line for the grids (default: Fashion-MNIST's names for its data)",
     cxxopts::value(c.class_names_file))
    ("grids", "PNG grids for at most this many probes", cxxopts::value(c.grids)->default_value("16"))
    ("force", "write into a non-empty --out");
  // clang-format on
  opts.parse_positional({"run"});
  opts.positional_help("RUN");
  cxxopts::ParseResult r;
  if (!parse_options(opts, args, r)) return 0;
  if (r.count("output")) {
    if (r.count("logit")) throw InputError("give --logit only (--output is its old name)");
    spdlog::warn("explain --output is now --logit (the old name works for one more release)");
    c.output = r["output"].as<int64_t>();
  }
  c.self_influence = r.count("self-influence") > 0;
  c.force = r.count("force") > 0;
  check_output_dir(c.out, c.force, "summary.json", kExplainFormat);  // before any work
  const ExplainResult res = explain(c);
  write_explanation(res, c);
  if (json_output(r)) {
    nlohmann::json doc = read_json(std::filesystem::path(c.out) / "summary.json");
    doc["out"] = c.out;
    print_json(doc);
  } else std::cout << explain_table(res, c) << "files: " << c.out
            << "/{attributions.csv,attributions.npy,top.csv,grids/,summary.json"
            << (c.self_influence ? ",self_influence.csv,self_influence.png" : "") << "}\n";
  if (!(res.sum_error <= c.tolerance)) {  // NaN fails too
    spdlog::error("the sum check fails: error {:.3e} exceeds {:.0e}", res.sum_error, c.tolerance);
    return 4;
  }
  return 0;
}

}  // namespace pathkernel::app
