#pragma once
/// \file npy.h
/// NumPy .npy files (format 1.0), loadable with numpy.load.

#include <ATen/core/Tensor.h>

#include <filesystem>

namespace pathkernel {

/// Writes a float64 or int64 tensor (any shape, made contiguous) as little-endian .npy,
/// atomically. Throws InputError when the file cannot be written.
void save_npy(const std::filesystem::path& path, const at::Tensor& t);

}  // namespace pathkernel
