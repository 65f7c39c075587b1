#pragma once
// Helpers the unit suites share (header only: the unit test binary's files, which may be compiled
// as one unity batch, each define their own helpers in an anonymous namespace; these are the ones
// several of them need).

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

#include "pathkernel/models/model.h"

namespace pathkernel::testing {

/// tests/data: the fixtures tests/data/*.py made (TorchScript models, pickles).
inline const std::filesystem::path kTestData = PATHKERNEL_TEST_DATA;

/// max |a - b| relative to max |b|.
inline double max_rel(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-300);
}

/// A zoo model of `spec` on 1 x 8 x 8 inputs with 3 outputs, in float64, its weights drawn
/// from seed `seed`.
inline std::shared_ptr<models::Model> small_model(const std::string& spec, int64_t seed = 4) {
  at::manual_seed(seed);
  auto m = models::build_model(models::parse_model_spec(spec), {1, 8, 8}, 3);
  m->to(at::kDouble);
  return m;
}

}  // namespace pathkernel::testing
