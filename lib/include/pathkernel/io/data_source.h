#pragma once
/// \file data_source.h
/// What a --data value names: an MNIST-style IDX folder, or a built-in synthetic set.

#include <string>

namespace pathkernel {

/// True for a `synthetic:NAME` data spec (--data synthetic:wave), false for an IDX folder.
inline bool is_synthetic(const std::string& data) { return data.rfind("synthetic:", 0) == 0; }

}  // namespace pathkernel
