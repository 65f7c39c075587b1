#pragma once
/// \file model_spec.h
/// The model spec string (`mlp:128:tanh`, `cnn:8,16:relu`, `linear`, `quadratic:64`) parsed
/// into a plain struct. Kept free of LibTorch so every unit can include it cheaply.

#include <cstdint>
#include <string>
#include <vector>

namespace pathkernel::models {

/// The most channels a cnn layer may have, and the most weights between two mlp layers.
inline constexpr int64_t kMaxCnnChannels = 4096;
inline constexpr int64_t kMaxLayerWeights = int64_t{1} << 30;

/// A parsed model spec. `kind` is one of linear, quadratic, mlp, cnn.
struct ModelSpec {
  std::string kind;
  /// Hidden widths (mlp, quadratic) or conv channels (cnn); empty for linear.
  std::vector<int64_t> widths;
  /// tanh, relu, softplus or gelu (mlp, cnn); "none" for linear and quadratic.
  std::string activation = "none";
  /// Dropout's rate p in (0, 1) at the model's Dropout sites (mlp: after each hidden activation;
  /// cnn: before the linear head), 0 for none. The sites act in a step's training forward only.
  double dropout = 0;
  /// `:bn`: BatchNorm (momentum 0.1, eps 1e-5, affine, as torch.nn's) after each hidden Linear of
  /// an mlp (BatchNorm1d) and after each conv of a cnn (BatchNorm2d), before the activation.
  bool batchnorm = false;

  /// The canonical spec string; parse_model_spec(s.str()) == s.
  std::string str() const;
};

/// Parses a spec string. Grammar:
///   linear | quadratic[:WIDTH] | mlp:W1[,W2...][:ACT][:bn][:dropout=P] | cnn:C1,C2[:ACT][:bn][:dropout=P] |
///   toy:wave
/// Throws std::invalid_argument naming the spec and what is wrong.
ModelSpec parse_model_spec(const std::string& spec);

/// The activations the zoo knows, for help texts and validation.
const std::vector<std::string>& known_activations();

}  // namespace pathkernel::models
