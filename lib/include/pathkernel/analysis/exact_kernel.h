#pragma once
/// \file exact_kernel.h
/// One step's exact path kernel by quadrature (SPEC, "exact path kernel"): gbar = integral_0^1
/// g(w_k + t dw) dt of every probe row, dotted with the step's directions and, for the per-example
/// split, with the batch's loss rows at w_k. On a smooth model every probe shares Gauss-Legendre
/// nodes on [0, 1]; split at the kinks (issue 13, kinks.h) each probe is integrated over its own
/// pieces, the probes of one quadrature round at their own nodes in one forward (RowSegment).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "pathkernel/analysis/kernels.h"
#include "pathkernel/analysis/kinks.h"
#include "pathkernel/analysis/projection.h"
#include "pathkernel/models/model.h"
#include "pathkernel/train/stepper.h"

namespace pathkernel {

/// What the quadrature reads. Pointers are borrowed for the call; optional ones may be null.
struct ExactStepInputs {
  models::Model* model = nullptr;
  const at::Tensor* xp = nullptr;       ///< probes [P, ...]
  const at::Tensor* cols = nullptr;     ///< their output columns [P, C']
  const ParamMap* w0 = nullptr;         ///< w_k
  const ParamMap* dw = nullptr;         ///< w_{k+1} - w_k
  const ParamMap* grad_l = nullptr;     ///< the batch's mean loss gradient at w_k
  const ParamMap* kernel_dir = nullptr; ///< the optimizer's kernel direction (Kopt), or null
  /// Per-example split against the batch rows at every node (else forward mode: directional only).
  bool split = true;
  JvpMode jvp_mode = JvpMode::kForward;  ///< without split: how J v is formed at the nodes
  bool explicit_route = false;
  RowsWorkspace* rows_workspace = nullptr;   ///< the explicit route's rows, kept between steps
  const RowGradients* batch_rows = nullptr;  ///< with split: the batch's loss rows at w_k
  const Projection* projection = nullptr;    ///< with split and --project: the sketch
  const at::Tensor* batch_sketch = nullptr;  ///< with the projection: the batch rows projected
  double lr = 0;
  int64_t batch_size = 1;
  /// The quadrature: shared nodes (rows of every round = all probes) or per-row (row_node_rounds).
  std::vector<NodeRound> rounds;
  bool per_row = false;
};

/// The integrals, rows as probe_signals [P*C']: gbar . dw, gbar . grad L_k, gbar . kernel_dir
/// (undefined without one) and, with split, the per-example Kexact [P*C', M] (-lr/M gbar . grad l_m).
struct ExactStepSums {
  at::Tensor gbar_dw, gbar_grad, gbar_kdir, kex_per;
};

/// Integrates; leaves the model at w0 with no row segment.
ExactStepSums integrate_exact_step(const ExactStepInputs& in);

/// Shared Gauss-Legendre rounds: round q holds every one of `rows` rows at node q.
std::vector<NodeRound> shared_node_rounds(const std::vector<double>& nodes, const std::vector<double>& weights,
                                          int64_t rows);

}  // namespace pathkernel
