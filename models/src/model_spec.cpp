#include "pathkernel/models/model_spec.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

namespace pathkernel::models {
namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(s);
  while (std::getline(in, part, sep)) parts.push_back(part);
  if (!s.empty() && s.back() == sep) parts.emplace_back();
  return parts;
}

std::vector<int64_t> parse_widths(const std::string& spec, const std::string& field) {
  std::vector<int64_t> widths;
  if (field.empty()) throw std::invalid_argument("model spec '" + spec + "': no widths given");
  for (const auto& w : split(field, ',')) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(w, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != w.size() || w.empty() || v <= 0 || v > 1000000) {
      throw std::invalid_argument("model spec '" + spec + "': width '" + w +
                                  "' is not a positive integer");
    }
    widths.push_back(v);
  }
  return widths;
}

std::string check_activation(const std::string& spec, const std::string& act) {
  const auto& known = known_activations();
  if (std::find(known.begin(), known.end(), act) == known.end()) {
    throw std::invalid_argument("model spec '" + spec + "': unknown activation '" + act +
                                "' (expected tanh, relu, leaky_relu, softplus or gelu)");
  }
  return act;
}

/// "dropout=P" with 0 < P < 1, or NaN when `part` is not a dropout field.
double parse_dropout(const std::string& spec, const std::string& part) {
  static const std::string kKey = "dropout=";
  if (part.compare(0, kKey.size(), kKey) != 0) return NAN;
  const std::string v = part.substr(kKey.size());
  size_t used = 0;
  double p = NAN;
  try {
    p = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (v.empty() || used != v.size() || !(p > 0 && p < 1)) {
    throw std::invalid_argument("model spec '" + spec + "': dropout '" + v + "' is not a rate in (0, 1)");
  }
  return p;
}

/// The shortest decimal that reads back as `p`.
std::string shortest(double p) {
  for (int digits = 1; digits <= 17; ++digits) {
    std::ostringstream out;
    out.precision(digits);
    out << p;
    if (std::stod(out.str()) == p) return out.str();
  }
  return std::to_string(p);
}

}  // namespace

const std::vector<std::string>& known_activations() {
  static const std::vector<std::string> kActs = {"tanh", "relu", "leaky_relu", "softplus", "gelu"};
  return kActs;
}

std::string ModelSpec::str() const {
  std::string s = kind;
  if (!widths.empty()) {
    s += ":";
    for (size_t i = 0; i < widths.size(); ++i) s += (i ? "," : "") + std::to_string(widths[i]);
  }
  if (kind == "mlp" || kind == "cnn" || kind == "toy") s += ":" + activation;
  if (batchnorm) s += ":bn";
  if (dropout > 0) s += ":dropout=" + shortest(dropout);
  return s;
}

ModelSpec parse_model_spec(const std::string& spec) {
  auto parts = split(spec, ':');
  if (parts.empty() || parts[0].empty()) throw std::invalid_argument("model spec is empty");
  ModelSpec m;
  m.kind = parts[0];
  // Trailing options, each at most once: dropout=P, bn.
  for (bool more = true; more && parts.size() > 2;) {
    const std::string& last = parts.back();
    more = last == "bn" || !std::isnan(parse_dropout(spec, last));
    if (!more) break;
    if (m.kind != "mlp" && m.kind != "cnn") {
      throw std::invalid_argument("model spec '" + spec + "': only mlp and cnn take :" + last.substr(0, last.find('=')));
    }
    if (last == "bn" ? m.batchnorm : m.dropout > 0) {
      throw std::invalid_argument("model spec '" + spec + "': " + last.substr(0, last.find('=')) + " given twice");
    }
    if (last == "bn") {
      m.batchnorm = true;
    } else {
      m.dropout = parse_dropout(spec, last);
    }
    parts.pop_back();
  }
  if (m.kind == "linear") {
    if (parts.size() != 1) throw std::invalid_argument("model spec '" + spec + "': linear takes no arguments");
  } else if (m.kind == "quadratic") {
    if (parts.size() > 2) throw std::invalid_argument("model spec '" + spec + "': expected quadratic[:WIDTH]");
    m.widths = parts.size() == 2 ? parse_widths(spec, parts[1]) : std::vector<int64_t>{64};
    if (m.widths.size() != 1) throw std::invalid_argument("model spec '" + spec + "': quadratic has one hidden width");
  } else if (m.kind == "mlp" || m.kind == "cnn") {
    if (parts.size() < 2 || parts.size() > 3) {
      throw std::invalid_argument("model spec '" + spec + "': expected " + m.kind +
                                  (m.kind == "mlp" ? ":W1[,W2...][:ACT][:bn][:dropout=P]" : ":C1,C2[:ACT][:bn][:dropout=P]"));
    }
    m.widths = parse_widths(spec, parts[1]);
    m.activation = parts.size() == 3 ? check_activation(spec, parts[2])
                                     : (m.kind == "mlp" ? "tanh" : "relu");
    if (m.kind == "cnn" && m.widths.size() != 2) {
      throw std::invalid_argument("model spec '" + spec + "': cnn takes exactly two channel counts");
    }
    // Bounds that no model of this tool's size comes near, so that a typo is refused here rather
    // than as an allocation failure deep in LibTorch.
    if (m.kind == "cnn" && std::max(m.widths[0], m.widths[1]) > kMaxCnnChannels) {
      throw std::invalid_argument("model spec '" + spec + "': cnn channel counts must be at most " +
                                  std::to_string(kMaxCnnChannels));
    }
    for (size_t i = 1; i < m.widths.size(); ++i) {
      if (m.widths[i - 1] * m.widths[i] > kMaxLayerWeights) {
        throw std::invalid_argument("model spec '" + spec + "': a layer of " + std::to_string(m.widths[i - 1]) + " x " +
                                    std::to_string(m.widths[i]) + " weights is more than " +
                                    std::to_string(kMaxLayerWeights) + " allowed");
      }
    }
  } else if (m.kind == "toy") {
    if (parts.size() != 2 || parts[1] != "wave") {
      throw std::invalid_argument("model spec '" + spec + "': the toy model is toy:wave");
    }
    m.activation = "wave";
  } else {
    throw std::invalid_argument("model spec '" + spec + "': unknown model '" + m.kind +
                                "' (expected linear, quadratic, mlp, cnn or toy:wave)");
  }
  return m;
}

}  // namespace pathkernel::models
