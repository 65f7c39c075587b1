#pragma once
/// \file kernels.h
/// Gradients of "rows" (a probe's output c, or a training example's loss) and their inner
/// products, computed from the layer inputs A and backpropagated signals G that the model's taps
/// capture, never materializing per-row gradients for Linear layers (SPEC, "per-example split";
/// issue 3). For a Linear layer the gradient of row r is (G_r A_r^T, G_r), so
///     <grad row_i, grad row_j> = (G_i . G_j) (A_i . A_j + 1)
/// and for a direction (dW, db): grad row_r . (dW, db) = G_r^T dW A_r + G_r . db.
/// Conv2d layers form their per-row weight gradients through unfold (they are small).
/// The explicit-Jacobian functions are the independent route the tests compare against, and the
/// fallback for models with parameters outside tapped layers.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "pathkernel/models/model.h"
#include "pathkernel/train/stepper.h"

namespace pathkernel {

/// The captured layer inputs and signals of a set of rows, one Tap per tapped layer.
struct RowSignals {
  /// Per tap: the inputs of the distinct examples [rows / repeat, ...] and the signals of every
  /// row [rows, ...] (graph-free copies; Tap::output is undefined).
  std::vector<models::Tap> taps;
  int64_t rows = 0;
  /// Rows per distinct input: probe rows (p, j) share probe p's input, so row r's input is
  /// input row r / repeat (C for probe rows, 1 for loss rows). Everything input-side (A A^T,
  /// A dW^T, Conv2d patches) is computed once per input, not once per row.
  int64_t repeat = 1;
  /// Per tap: for Conv2d, the per-row weight gradients [R, Cout*Cin*kh*kw] and bias gradients
  /// [R, Cout], formed once when the signals are captured; undefined for Linear taps.
  std::vector<at::Tensor> conv_weight_grads, conv_bias_grads;
};

/// Rows (p, c) for probes x [P, ...] and outputs `outputs` (C of them): row p*C + j is the
/// output outputs[j] of probe p. One forward of the P probes; the C signals by C backward passes
/// that stop at the tapped layers' outputs (repeat = C). Also returns the model outputs
/// [P, num_classes] in `logits`.
RowSignals probe_signals(models::Model& model, const at::Tensor& x, const std::vector<int64_t>& outputs,
                         at::Tensor* logits = nullptr);

/// Rows for a per-probe choice of outputs: `cols` int64 [P, C'], row p*C' + j is output
/// cols[p][j] of probe p.
RowSignals probe_signals(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                         at::Tensor* logits = nullptr);
/// The column table of a shared output list: [P, C] with every row equal to `outputs`.
at::Tensor shared_columns(int64_t probes, const std::vector<int64_t>& outputs);

/// Rows m = the per-example losses l(y_m, f(x_m)) of a batch (not divided by the batch size).
RowSignals loss_signals(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss);

/// The model's parameters in state_dict order.
std::vector<at::Tensor> parameters_of(models::Model& model);

/// True when every parameter of the model belongs to a tapped Linear/Conv2d layer, so that the
/// factorized route covers the whole gradient.
bool factorizable(models::Model& model);

/// [Ra, Rb]: <grad row_i of a, grad row_j of b>, summed over all tapped layers.
at::Tensor factorized_gram(const RowSignals& a, const RowSignals& b);

/// [R]: grad row_r . v for a direction v given by parameter name.
at::Tensor factorized_directional(const RowSignals& a, const ParamMap& v);

/// How the explicit route forms one probe's C' rows from one forward of it: a backward per row,
/// or one backward whose incoming gradient carries the C' one-hot rows as a batch
/// (batched_rows.h); or, for a model that runs on swapped parameters (a recorded TorchScript
/// model), functorch's vmap over a block of probes of its grad transform, one backward for the
/// block's rows (functorch_rows.h). The same numbers every way, to rounding.
enum class RowsMode { kPerRow, kBatchedOutputs, kFunctorch };

/// kFunctorch takes the probes in blocks whose gradients, block x C' x n_params values, fit in
/// this many bytes (at least one probe a block).
inline constexpr int64_t kFunctorchBlockBytes = int64_t{64} << 20;

/// The batched mode is taken only while one probe's rows, C' x n_params doubles, fit in this
/// many bytes: beyond it the batch's gradients leave the cache before they are copied into the
/// rows, and a backward per row is faster (docs/benchmarks.md: x2.5 faster for an 11k ViT, x1.05
/// for a 77k residual CNN, x0.7 for a 235k MLP, x0.6 for a 1.2M CNN).
inline constexpr int64_t kBatchedRowsMaxBytes = int64_t{8} << 20;

/// The mode for a model whose operators are not known in advance, tried on the first probe of x
/// (cols: [P, C']). While one probe's rows fit kBatchedRowsMaxBytes: kFunctorch when the model
/// runs on swapped parameters, functorch's transforms accept it and its rows equal that probe's
/// rows by a backward each (to 1e-12 of their scale); else batched when no backward operator
/// falls to ATen's slow loop and its rows are equal likewise; else per row. `why` says which and
/// why (and what refused the modes passed over).
RowsMode choose_rows_mode(models::Model& model, const at::Tensor& x, const at::Tensor& cols, std::string* why);

/// The explicit route: [P*C, n_params] Jacobian of the probe rows (one backward per row).
at::Tensor explicit_probe_jacobian(models::Model& model, const at::Tensor& x, const std::vector<int64_t>& outputs);
at::Tensor explicit_probe_jacobian(models::Model& model, const at::Tensor& x, const at::Tensor& cols);
/// The same, written into `out` ([P*C', n_params], the parameters' dtype), which it returns, in
/// the given mode.
at::Tensor explicit_probe_jacobian_into(models::Model& model, const at::Tensor& x, const at::Tensor& cols, at::Tensor out,
                                        RowsMode mode = RowsMode::kPerRow);
/// The explicit route: [M, n_params] gradients of the per-example losses.
at::Tensor explicit_loss_jacobian(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss);
/// Flattens a ParamMap in the model's state_dict order: [n_params].
at::Tensor flatten_params(models::Model& model, const ParamMap& v);

/// Probe rows dotted with directions by forward-mode AD: for each direction v, one forward of
/// the P probes carrying the tangent v on the parameters gives J_p v for every output at once
/// (no per-output backward, no per-row gradients). Returns one [P*C'] tensor per direction, rows
/// as probe_signals (row p*C' + j is output cols[p][j]); the model's outputs [P, num_classes] in
/// `logits` when given. An independent route to row_directional: the analyzer's K and F on the
/// steps whose per-example split it does not need.
/// How probe_jvps forms J v: forward-mode AD (one forward with tangents per direction, or one
/// forward whose tangents carry every direction as a vmap batch), or the
/// double-backward trick (one forward and one differentiable backward of the probes, then one
/// backward per direction: J v = d/du <J^T u, v>), which needs only the backward formulas of
/// every operator and their derivative in the incoming gradient.
enum class JvpMode { kForward, kDoubleBackward, kForwardBatched };

std::vector<at::Tensor> probe_jvps(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                   const std::vector<const ParamMap*>& dirs, at::Tensor* logits = nullptr,
                                   JvpMode mode = JvpMode::kForward);

/// The mode for a model whose operators are not known in advance (a recorded TorchScript
/// model), tried on the first probe: forward mode when LibTorch has a forward-mode formula for
/// every operator of the forward, else the double backward when every backward is
/// differentiable, else none (the gradient rows serve); `why` says which and why.
std::optional<JvpMode> choose_jvp_mode(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                       std::string* why);

/// kForwardBatched when one forward carrying two directions as a batch gives, on all the probes,
/// what one forward per direction gives (1e-9 of its scale), else kForward; `why` says which and
/// why (the operator that failed, or the difference). Should a later forward's batching fail,
/// kForwardBatched computes one forward per direction (and warns once).
JvpMode choose_forward_batching(models::Model& model, const at::Tensor& x, const at::Tensor& cols, std::string* why);

/// [P*C]: 1/2 dw^T H_row dw for every probe row at once, exactly, by double backward (SPEC's S).
at::Tensor second_order(models::Model& model, const at::Tensor& x, const std::vector<int64_t>& outputs,
                        const ParamMap& dw);
/// The same for a per-probe column table [P, C'].
at::Tensor second_order(models::Model& model, const at::Tensor& x, const at::Tensor& cols, const ParamMap& dw);

/// How S is formed: as the second directional derivative along dw of every row at once (J dw by
/// the double backward, differentiated again along dw: third derivatives of every operator's
/// backward), or row by row as a Hessian-vector product of each output (second derivatives only).
enum class SecondOrderMode { kAllRows, kPerRow };
at::Tensor second_order(models::Model& model, const at::Tensor& x, const at::Tensor& cols, const ParamMap& dw,
                        SecondOrderMode mode);

/// For a model whose operators are not known in advance: all rows at once when that agrees with
/// the rows' Hessian-vector products on the first probe (to 1e-9 of their scale), else per row
/// (an operator whose third derivative LibTorch 1.13 gets wrong; layer_norm's is mended for this
/// route: DifferentiableLayerNorm). `why` says which.
SecondOrderMode choose_second_order_mode(models::Model& model, const at::Tensor& x, const at::Tensor& cols,
                                         const ParamMap& dw, std::string* why);

/// The gradients of a set of rows in the representation of the chosen route: captured signals
/// (factorized) or an explicit Jacobian. The analyzer works through these so that a model with
/// parameters outside tapped layers falls back to the explicit route.
struct RowGradients {
  RowSignals signals;                ///< factorized route
  at::Tensor jacobian;               ///< explicit route: [R, n_params] in state_dict order
  std::vector<std::string> names;    ///< explicit route: the state_dict order
  bool is_explicit() const { return jacobian.defined(); }
};

/// The explicit route's probe rows kept from call to call: the matrix they are written into,
/// reallocated only when too small (a [P*C, n_params] matrix allocated every step was measured
/// to cost a page fault per 4 KiB: 0.3 M per step for a 235k-parameter model at 64 probes), and
/// the RowsMode, chosen on the first call.
struct RowsWorkspace {
  at::Tensor buffer;
  std::optional<RowsMode> mode;
  std::string why;  ///< why that mode
};

/// Probe rows (as probe_signals) by the factorized or the explicit route; the model's outputs
/// [P, num_classes] at the same weights in `logits` when given. With `workspace`, the explicit
/// route writes the rows into its buffer in its mode (choose_rows_mode on the first call); the
/// rows then alias the buffer until the next call. Without, one backward per row.
RowGradients probe_rows(models::Model& model, const at::Tensor& x, const at::Tensor& cols, bool explicit_route,
                        at::Tensor* logits = nullptr, RowsWorkspace* workspace = nullptr);
/// Per-example loss rows (as loss_signals) by the factorized or the explicit route.
RowGradients loss_rows(models::Model& model, const at::Tensor& x, const at::Tensor& y, LossKind loss,
                       bool explicit_route);
/// [Ra, Rb] inner products of the two sets' row gradients (both of the same route).
at::Tensor row_gram(const RowGradients& a, const RowGradients& b);
/// [R] row gradients dotted with the direction v.
at::Tensor row_directional(const RowGradients& a, const ParamMap& v);

/// [R, n_params]: the rows' gradients materialized in state_dict order (for a few rows). Written
/// into `out` when it is given with that shape (a workspace kept across steps), else allocated.
at::Tensor row_jacobian(models::Model& model, const RowGradients& rows, at::Tensor out = {});
/// [D, R]: each of the directions `dirs` [D, n_params] (state_dict order) dotted with each row's
/// gradient, without materializing the rows' gradients (Linear: G_r^T Dir A_r per layer).
at::Tensor directions_dot_rows(models::Model& model, const RowGradients& rows, const at::Tensor& dirs);
/// [R]: <grad row_r, p (.) grad row_r> for a weight p [n_params] (state_dict order).
at::Tensor rows_weighted_sq(models::Model& model, const RowGradients& rows, const at::Tensor& p);

}  // namespace pathkernel
