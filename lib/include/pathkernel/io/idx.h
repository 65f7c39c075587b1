#pragma once
/// \file idx.h
/// MNIST-style IDX data (MNIST, Fashion-MNIST, KMNIST, EMNIST): idx3 image files and idx1
/// label files, gzipped or raw, read with every header field checked.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace pathkernel {

/// A decoded IDX file of unsigned bytes.
struct IdxArray {
  std::vector<int64_t> dims;   ///< e.g. {60000, 28, 28} for images, {60000} for labels
  std::vector<uint8_t> data;   ///< row-major, product(dims) bytes
  int64_t header_items = 0;    ///< the header's first dimension (dims[0] unless read partially)
};

/// The largest IDX data read (16 GiB; EMNIST's largest file holds 0.5 GiB).
inline constexpr uint64_t kMaxIdxBytes = uint64_t{1} << 34;

/// Reads an IDX file of unsigned bytes (type code 0x08), gzipped or raw (detected by content).
/// Checks the magic number, the type code, the number of dimensions against `expected_ndims`,
/// and the length of the data against the header. Throws InputError naming the file and the
/// problem (for example "truncated: header says 47040016 bytes of data, file has 1000").
/// With `max_items` > 0, only the first max_items items (along the first dimension) are read
/// and dims[0] says so (header_items keeps the header's count): the header is checked as always,
/// the rest of the file is not read (nor is its length or gzip checksum checked), so a
/// --train-limit run decodes only its examples.
IdxArray read_idx(const std::filesystem::path& path, int expected_ndims, int64_t max_items = 0);

/// One split of an IDX data folder.
struct Dataset {
  at::Tensor images;  ///< uint8 [N, 1, H, W]
  at::Tensor labels;  ///< int64 [N]
  std::filesystem::path images_file, labels_file;
  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
  int64_t height() const { return images.size(2); }
  int64_t width() const { return images.size(3); }
  /// Largest label + 1, over the whole labels file: with a limit, the first examples need not
  /// hold every class, but the model's outputs are the data's.
  int64_t num_classes() const;
  /// Distinct labels over the whole labels file.
  int64_t distinct_labels() const;
  /// The whole labels file's largest label + 1 and distinct labels (0: from `labels`).
  int64_t file_classes = 0, file_distinct = 0;
};

/// Finds the file of a split in `dir`: `PREFIX-KIND-idxN-ubyte` with or without `.gz`, or the
/// dotted variant `PREFIX-KIND.idxN-ubyte`. `prefix` is "train" or "t10k"; `kind` is "images"
/// or "labels". Throws InputError listing the names tried.
std::filesystem::path find_idx_file(const std::filesystem::path& dir, const std::string& prefix,
                                    const std::string& kind);

/// Loads a split ("train" or "test") from an IDX folder, keeping the first `limit` examples
/// when limit > 0 (the labels file is still read whole, for the classes). Checks that images
/// and labels agree in count. Throws InputError.
Dataset load_split(const std::filesystem::path& dir, const std::string& split, int64_t limit = 0);

/// Loads a split from `data`: an IDX folder (load_split), or `synthetic:NAME` for a built-in
/// synthetic set. `synthetic:wave`: 1x1 images, pixel x = 0..255 (256 training examples, each
/// value once, in a fixed shuffled order; 64 test examples), label 0 when x > 127 else 1; the
/// data of the toy:wave model. Throws InputError.
Dataset load_dataset(const std::string& data, const std::string& split, int64_t limit = 0);

/// How pixels become inputs: x = (pixel / 255 - mean) / std. The default is pixel / 255.
struct Normalization {
  double mean = 0.0;
  double std = 1.0;
  bool identity() const { return mean == 0.0 && std == 1.0; }
};

/// Mean and standard deviation of pixel/255 over a dataset's images.
Normalization standard_normalization(const Dataset& data);

/// Converts uint8 images [N, 1, H, W] to model inputs of `dtype` (float32 or float64).
at::Tensor to_inputs(const at::Tensor& images_u8, at::ScalarType dtype, const Normalization& norm);

}  // namespace pathkernel
