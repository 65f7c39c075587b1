#pragma once
/// \file npy.h
/// NumPy .npy files (format 1.0), loadable with numpy.load.

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <vector>

namespace pathkernel {

/// Writes a float64, float32, int64 or uint8 tensor (any shape, made contiguous) as little-endian .npy,
/// atomically. Throws InputError when the file cannot be written.
void save_npy(const std::filesystem::path& path, const at::Tensor& t);

/// Reads a little-endian, C-order .npy of float64, float32, int64 or uint8 (as written by save_npy
/// or numpy.save). Throws InputError naming the file for anything else.
at::Tensor load_npy(const std::filesystem::path& path);

/// What a .npy file holds (load_npy's checks of its header, and of its size against the shape)
/// without reading its data. Throws InputError naming the file as load_npy does.
struct NpyInfo {
  at::ScalarType type;
  std::vector<int64_t> shape;
};
NpyInfo npy_info(const std::filesystem::path& path);

}  // namespace pathkernel
