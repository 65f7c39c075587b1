#pragma once
// The optimizers with per-parameter state slots and an elementwise preconditioner (Adam, AdamW,
// RMSprop, Adagrad, Adadelta), apart from optimizer.cpp's SGD, linear forms and factory.
#include <memory>
#include <string>
#include <vector>

#include "pathkernel/train/optimizer.h"

namespace pathkernel {

/// Adam, AdamW, RMSprop, Adagrad or Adadelta, by options.kind (make_optimizer's other kinds).
std::unique_ptr<Optimizer> make_adaptive_optimizer(const OptimizerOptions& options, std::vector<std::string> names,
                                                   std::vector<at::Tensor> params);

}  // namespace pathkernel
