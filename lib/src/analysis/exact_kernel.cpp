#include "pathkernel/analysis/exact_kernel.h"

#include <ATen/ATen.h>

namespace pathkernel {
std::vector<NodeRound> shared_node_rounds(const std::vector<double>& nodes, const std::vector<double>& weights,
                                          int64_t rows) {
  std::vector<NodeRound> rounds(nodes.size());
  for (size_t q = 0; q < nodes.size(); ++q) {
    for (int64_t r = 0; r < rows; ++r) rounds[q].rows.push_back(r);
    rounds[q].t.assign(static_cast<size_t>(rows), nodes[q]);
    rounds[q].weight.assign(static_cast<size_t>(rows), weights[q]);
  }
  return rounds;
}

ExactStepSums integrate_exact_step(const ExactStepInputs& in) {
  models::Model& model = *in.model;
  const int64_t np = in.xp->size(0), nc = in.cols->size(1);
  const bool kopt = in.kernel_dir != nullptr;
  ExactStepSums out;
  out.gbar_dw = at::zeros({np * nc}, at::kDouble);
  out.gbar_grad = at::zeros({np * nc}, at::kDouble);
  if (kopt) out.gbar_kdir = at::zeros({np * nc}, at::kDouble);
  if (in.split) out.kex_per = at::zeros({np * nc, in.batch_size}, at::kDouble);
  const SegmentRestore restore(model, *in.w0);
  if (in.per_row) set_weights_along(model, *in.w0, *in.dw, 0.0);
  for (const NodeRound& round : in.rounds) {
    const int64_t na = static_cast<int64_t>(round.rows.size());
    at::Tensor x = *in.xp, cols = *in.cols, rows, weights;
    if (in.per_row) {
      rows = at::tensor(round.rows, at::kLong);
      x = x.index_select(0, rows);
      cols = cols.index_select(0, rows);
      weights = at::tensor(round.weight, at::kDouble);
      model.set_row_segment(segment_along(model, *in.dw, at::tensor(round.t, at::kDouble).to(x.scalar_type())));
    } else {
      set_weights_along(model, *in.w0, *in.dw, round.t.front());
    }
    // target += weight * scale * v, v's rows those of the round's probes.
    auto add = [&](at::Tensor& target, const at::Tensor& v, double scale) {
      if (!in.per_row) {
        target.add_(v, round.weight.front() * scale);
        return;
      }
      const at::Tensor w = (weights * scale).view({na, 1, 1});
      target.view({np, nc, -1}).index_add_(0, rows, v.reshape({na, nc, -1}) * w);
    };
    if (!in.split) {
      std::vector<const ParamMap*> dirs = {in.dw, in.grad_l};
      if (kopt) dirs.push_back(in.kernel_dir);
      const std::vector<at::Tensor> t = probe_jvps(model, x, cols, dirs, nullptr, in.jvp_mode);
      add(out.gbar_dw, t[0], 1.0);
      add(out.gbar_grad, t[1], 1.0);
      if (kopt) add(out.gbar_kdir, t[2], 1.0);
      continue;
    }
    const RowGradients sq = probe_rows(model, x, cols, in.explicit_route, nullptr, in.rows_workspace);
    add(out.gbar_dw, row_directional(sq, *in.dw), 1.0);
    if (in.projection) add(out.gbar_grad, row_directional(sq, *in.grad_l), 1.0);
    add(out.kex_per,
        in.projection ? at::mm(project_rows(*in.projection, sq), in.batch_sketch->t()) : row_gram(sq, *in.batch_rows),
        -in.lr / static_cast<double>(in.batch_size));
    if (kopt) add(out.gbar_kdir, row_directional(sq, *in.kernel_dir), 1.0);
  }
  return out;
}

}  // namespace pathkernel
