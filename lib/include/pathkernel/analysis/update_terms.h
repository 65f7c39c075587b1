#pragma once
/// \file update_terms.h
/// The optimizer's update in float64, split into its kernel part and its weight-decay part
/// (SPEC, "Optimizers with memory or a preconditioner"):
///
///     dw_k = -a_k * ( P_k (.) (alpha_k G_k + nu grad L_k) )                      kernel part
///            -a_k * ( P_k (.) (alpha_k W_k + nu lc w_k) + ld w_k )               decay part
///     G_k = beta G_{k-1} + s_k grad L_k(w_k),   W_k = beta W_{k-1} + s_k lc w_k   (G_{-1} = W_{-1} = 0)
///
/// so that Kopt_k = g_c(x; w_k) . kernel part and Uopt_wd = g_c(x; w_k) . decay part. The
/// recurrences must see every step from 0 on: the momentum series is never truncated.

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "pathkernel/train/optimizer.h"

namespace pathkernel {

class UpdateRecurrence {
 public:
  UpdateRecurrence() = default;

  /// Takes in step k: the float64 gradient the optimizer applied, grad L_k(w_k) (times a
  /// recorded clipping scale), the weights w_k by name and the step's settings (its momentum or
  /// betas, the parameters' rates and decay). With memory, steps must come in order 0, 1, 2, ...
  /// (throws std::logic_error otherwise). Each step's settings enter the buffers with that step:
  ///   G_k = beta_k G_{k-1} + s_k grad L_k,   W_k = beta_k W_{k-1} + s_k lc_k(p) w_k.
  /// `p`: P_k, needed here when it enters the buffer (LinearUpdate::inner, RMSprop with momentum:
  /// G_k = beta_k G_{k-1} + s_k P_k (.) grad L_k); else ignored.
  void advance(int64_t k, const ParamMap& grad, const ParamMap& weights, const StepSettings& settings,
               const ParamMap& p = {});

  /// r (.) P_k (.) (alpha_k G_k + nu grad L_k), without the factor -a_k; r the parameters' rate
  /// scales. `p` is the preconditioner after step k (empty: the identity); with P inside the
  /// buffer, r (.) alpha_k G_k (p unused).
  ParamMap kernel_direction(const ParamMap& p) const;
  /// r (.) P_k (.) (alpha_k W_k + nu lc w_k) + r ld w_k, without the factor -a_k.
  ParamMap decay_direction(const ParamMap& p) const;

  /// The coefficients of the last step taken in.
  const LinearUpdate& coefficients() const { return lu_; }
  /// True when the last step's update has a decay term (now, or decay carried in the buffer).
  bool has_decay() const { return decays_; }

 private:
  int64_t next_ = 0;
  LinearUpdate lu_;
  StepSettings settings_;
  bool decays_ = false;
  ParamMap g_buf_, w_buf_, grad_, weights_;
};

/// a (.) b by name; `a` empty stands for all ones.
ParamMap precondition(const ParamMap& p, const ParamMap& v);

/// s * g, parameter by parameter (a recorded step's applied gradient: clipping's scale).
ParamMap scaled(const ParamMap& g, double s);

}  // namespace pathkernel
