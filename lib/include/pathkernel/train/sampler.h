#pragma once
/// \file sampler.h
/// Seeded minibatch sampling. Each epoch is a fresh permutation of the training set drawn from a
/// 64-bit generator seeded by (seed, epoch); step k takes the next `batch` indices of it (the last
/// batch of an epoch may be smaller). The generator's whole state is (seed, epoch, position), so
/// any step's batch is reproducible on its own: that is what resume and replay rely on.

#include <cstdint>
#include <vector>

namespace pathkernel {

/// The sampler's state before a step; saved beside every checkpoint.
struct SamplerState {
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t position = 0;  ///< index into the epoch's permutation
};

class BatchSampler {
 public:
  /// `n` training examples, batches of `batch` (1 <= batch).
  BatchSampler(uint64_t seed, int64_t n, int64_t batch);

  /// Steps in one epoch: ceil(n / batch).
  int64_t steps_per_epoch() const { return (n_ + batch_ - 1) / batch_; }
  /// The example indices of step k.
  std::vector<int64_t> batch_for_step(int64_t step);
  /// The state just before step k.
  SamplerState state_at(int64_t step) const;

 private:
  const std::vector<int64_t>& permutation(int64_t epoch);
  uint64_t seed_;
  int64_t n_, batch_;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> perm_;
};

}  // namespace pathkernel
