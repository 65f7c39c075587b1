#include "pathkernel/train/sampler.h"

#include <algorithm>
#include <stdexcept>

namespace pathkernel {
namespace {

/// SplitMix64: a small, well-mixed generator whose output is fixed by its state on every
/// platform (std::uniform_int_distribution is not, across standard libraries).
struct SplitMix64 {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, bound) without modulo bias (rejection).
  uint64_t below(uint64_t bound) {
    const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t v;
    do v = next(); while (v >= limit);
    return v % bound;
  }
};

}  // namespace

BatchSampler::BatchSampler(uint64_t seed, int64_t n, int64_t batch) : seed_(seed), n_(n), batch_(batch) {
  if (n < 1) throw std::invalid_argument("the training set is empty");
  if (batch < 1) throw std::invalid_argument("--batch must be at least 1");
}

const std::vector<int64_t>& BatchSampler::permutation(int64_t epoch) {
  if (epoch == cached_epoch_) return perm_;
  SplitMix64 rng{seed_ * 0x100000001b3ULL ^ (static_cast<uint64_t>(epoch) + 0x51ed27ULL)};
  rng.next();
  perm_.resize(static_cast<size_t>(n_));
  for (int64_t i = 0; i < n_; ++i) perm_[i] = i;
  for (int64_t i = n_ - 1; i > 0; --i) {  // Fisher-Yates
    std::swap(perm_[i], perm_[rng.below(static_cast<uint64_t>(i) + 1)]);
  }
  cached_epoch_ = epoch;
  return perm_;
}

SamplerState BatchSampler::state_at(int64_t step) const {
  return {seed_, step / steps_per_epoch(), (step % steps_per_epoch()) * batch_};
}

std::vector<int64_t> BatchSampler::batch_for_step(int64_t step) {
  const SamplerState st = state_at(step);
  const auto& perm = permutation(st.epoch);
  const int64_t end = std::min(n_, st.position + batch_);
  return {perm.begin() + st.position, perm.begin() + end};
}

}  // namespace pathkernel
