#pragma once
/// \file scripted_model.h
/// A recorded run's own model: its TorchScript file (python/pathkernel_record.py writes it)
/// loaded with torch::jit and presented as a models::Model. Its parameters are registered under
/// their state_dict names (the TorchScript module's own tensors, shared, so loading weights and
/// autograd act on the model that runs). It has no taps: the analyzer takes the explicit route
/// for it (per-row gradients by autograd), which needs nothing of the architecture beyond a
/// forward that maps a batch of inputs [N, ...] to outputs [N, C] row by row.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "pathkernel/models/model.h"

namespace pathkernel {

/// Loads `file` (a TorchScript archive) as a model with `outputs` outputs, float32 parameters.
/// When `trained` names parameters (by state_dict name), the model's parameters are those and
/// its others are held as buffers (constants, set from the checkpoints), outside every gradient;
/// empty: every parameter is trained. Throws InputError naming the file when it is not a
/// readable TorchScript archive, has no forward, or has no parameters. TorchScript is code: only
/// load runs you trust (the archive is checked as a zip first, but its program is then run by
/// LibTorch's interpreter).
std::shared_ptr<models::Model> load_scripted_model(const std::filesystem::path& file, int64_t outputs,
                                                   const std::vector<std::string>& trained = {});

/// The parameters a model load_scripted_model made holds constant (none for any other model).
std::vector<std::string> scripted_constants(const models::Model& model);

}  // namespace pathkernel
