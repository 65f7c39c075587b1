#include <ATen/ATen.h>

#include <fstream>

#include "fixtures.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/idx.h"

namespace pathkernel {
namespace {
using testing::idx_bytes;
using testing::TempDir;
using testing::write_file;

TEST(IdxTest, ReadsRawAndGzippedIdentically) {
  TempDir dir;
  std::vector<uint8_t> data(2 * 3 * 4);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7);
  write_file(dir / "a", idx_bytes({2, 3, 4}, data), false);
  write_file(dir / "a.gz", idx_bytes({2, 3, 4}, data), true);
  for (const char* name : {"a", "a.gz"}) {
    const IdxArray arr = read_idx(dir / name, 3);
    EXPECT_EQ(arr.dims, (std::vector<int64_t>{2, 3, 4}));
    EXPECT_EQ(arr.data, data);
  }
}

// A --train-limit run decodes only its examples: the first items equal a full read's, and what
// lies past them is not read (so a file cut short after them still serves the limit).
TEST(IdxTest, ReadsOnlyTheFirstItemsWhenAsked) {
  TempDir dir;
  std::vector<uint8_t> data(5 * 2 * 2);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(3 * i + 1);
  write_file(dir / "a.gz", idx_bytes({5, 2, 2}, data), true);
  const IdxArray full = read_idx(dir / "a.gz", 3), first = read_idx(dir / "a.gz", 3, 2);
  EXPECT_EQ(first.dims, (std::vector<int64_t>{2, 2, 2}));
  EXPECT_EQ(first.header_items, 5);
  EXPECT_EQ(full.header_items, 5);
  EXPECT_EQ(first.data, std::vector<uint8_t>(full.data.begin(), full.data.begin() + 8));
  EXPECT_EQ(read_idx(dir / "a.gz", 3, 9).data, full.data);  // a limit past the end reads all
  write_file(dir / "cut", idx_bytes({5, 2, 2}, data).substr(0, 16 + 12), false);
  EXPECT_EQ(read_idx(dir / "cut", 3, 3).data, std::vector<uint8_t>(data.begin(), data.begin() + 12));
  EXPECT_THROW_WITH(read_idx(dir / "cut", 3), InputError, "truncated");
}

TEST(IdxTest, RejectsBadHeadersAndLengths) {
  TempDir dir;
  std::vector<uint8_t> data(10, 1);
  write_file(dir / "labels", idx_bytes({10}, data), false);
  EXPECT_THROW_WITH(read_idx(dir / "labels", 3), InputError, "1 dimensions, expected 3");

  std::string bad_magic = idx_bytes({10}, data);
  bad_magic[0] = 0x1f;
  write_file(dir / "magic", bad_magic, false);
  EXPECT_THROW_WITH(read_idx(dir / "magic", 1), InputError, "bad magic number");

  std::string bad_type = idx_bytes({10}, data);
  bad_type[2] = 0x0d;
  write_file(dir / "type", bad_type, false);
  EXPECT_THROW_WITH(read_idx(dir / "type", 1), InputError, "unsupported IDX type");

  write_file(dir / "short", idx_bytes({12}, data), true);
  EXPECT_THROW_WITH(read_idx(dir / "short", 1), InputError, "truncated: header says 12 bytes of data, file has 10");

  write_file(dir / "long", idx_bytes({8}, data), false);
  EXPECT_THROW_WITH(read_idx(dir / "long", 1), InputError, "2 bytes beyond");

  write_file(dir / "tiny", "ab", false);
  EXPECT_THROW_WITH(read_idx(dir / "tiny", 1), InputError, "too short");
  EXPECT_THROW_WITH(read_idx(dir / "missing", 1), InputError, "missing: no such file");
}

TEST(IdxTest, HeadersCannotWrapOrMakeTheReaderAllocate) {
  TempDir dir;
  // 2^32-1 cubed wraps a 64-bit product; before the check, a wrapped count could match the data.
  write_file(dir / "wrap", idx_bytes({0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}, std::vector<uint8_t>(16)), false);
  EXPECT_THROW_WITH(read_idx(dir / "wrap", 3), InputError, "dimensions describe more than");
  // 12 GiB promised by a 40-byte file: refused when the data runs out, having allocated only
  // what arrived (the buffer grows with the data).
  write_file(dir / "promise", idx_bytes({65536, 65536, 3}, std::vector<uint8_t>(24)), true);
  EXPECT_THROW_WITH(read_idx(dir / "promise", 3), InputError, "file has 24");
  // A gzip stream that inflates far beyond the header is read only up to the header's size.
  write_file(dir / "bomb", idx_bytes({4}, std::vector<uint8_t>(50u << 20)), true);
  EXPECT_LT(std::filesystem::file_size(dir / "bomb"), 1u << 20);
  EXPECT_THROW_WITH(read_idx(dir / "bomb", 1), InputError, "more than 4096 bytes beyond what the header describes");
}

TEST(IdxTest, RejectsTruncatedGzip) {
  TempDir dir;
  std::vector<uint8_t> data(5000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>((i * 131) % 251);
  write_file(dir / "full.gz", idx_bytes({5000}, data), true);
  std::ifstream in(dir / "full.gz", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  write_file(dir / "cut.gz", bytes.substr(0, bytes.size() / 2), false);
  EXPECT_THROW(read_idx(dir / "cut.gz", 1), InputError);
}

TEST(IdxTest, LoadsSplitsWithLimitAndChecksCounts) {
  TempDir dir;
  testing::write_synthetic_idx(dir.path(), 30, 9, 12, 3, /*gz=*/true);
  Dataset train = load_split(dir.path(), "train", 20);
  EXPECT_EQ(train.size(), 20);
  EXPECT_EQ(train.images.sizes(), (std::vector<int64_t>{20, 1, 12, 12}));
  EXPECT_EQ(train.num_classes(), 3);
  EXPECT_EQ(train.labels[4].item<int64_t>(), 1);
  Dataset test = load_split(dir.path(), "test");
  EXPECT_EQ(test.size(), 9);

  // The classes are the labels file's, whatever the first examples hold: with a limit of 2 over
  // labels 0, 0, 2, 1, ... the model still has three outputs (it had one: the limit's max + 1).
  std::vector<uint8_t> labels(30, 1);
  labels[0] = labels[1] = 0;
  labels[2] = 2;
  write_file(dir / "train-labels-idx1-ubyte.gz", idx_bytes({30}, labels), true);
  const Dataset two = load_split(dir.path(), "train", 2);
  EXPECT_EQ(two.size(), 2);
  EXPECT_EQ(two.labels.max().item<int64_t>(), 0);
  EXPECT_EQ(two.num_classes(), 3);
  EXPECT_EQ(two.distinct_labels(), 3);
  // ... and a 255 beyond the limit is still a damaged file, named with its index.
  labels[29] = 255;
  write_file(dir / "train-labels-idx1-ubyte.gz", idx_bytes({30}, labels), true);
  EXPECT_THROW_WITH(load_split(dir.path(), "train", 2), InputError, "label 255 at index 29 is out of range");

  write_file(dir / "t10k-labels-idx1-ubyte.gz", idx_bytes({8}, std::vector<uint8_t>(8, 0)), true);
  EXPECT_THROW_WITH(load_split(dir.path(), "test"), InputError, "has 9 images but");
  // With a limit the images are decoded only up to it, but the two headers' counts still meet:
  // a labels file one short of the images file is refused whatever the limit.
  write_file(dir / "t10k-labels-idx1-ubyte.gz", idx_bytes({8}, std::vector<uint8_t>(8, 0)), true);
  EXPECT_THROW_WITH(load_split(dir.path(), "test", 3), InputError, "has 9 images but");
  write_file(dir / "t10k-labels-idx1-ubyte.gz", idx_bytes({10}, std::vector<uint8_t>(10, 0)), true);
  EXPECT_THROW_WITH(load_split(dir.path(), "test", 3), InputError, "has 10 labels");
  write_file(dir / "t10k-labels-idx1-ubyte.gz", idx_bytes({9}, std::vector<uint8_t>(9, 0)), true);
  EXPECT_EQ(load_split(dir.path(), "test", 3).size(), 3);
  EXPECT_THROW_WITH(load_split(dir / "nope", "train"), InputError, "data folder does not exist");
}

TEST(IdxTest, FindsRawAndDottedNames) {
  TempDir dir;
  write_file(dir / "train-images.idx3-ubyte", "x", false);
  EXPECT_EQ(find_idx_file(dir.path(), "train", "images").filename(), "train-images.idx3-ubyte");
  EXPECT_THROW_WITH(find_idx_file(dir.path(), "t10k", "labels"), InputError, "t10k-labels-idx1-ubyte.gz");
}

TEST(IdxTest, FindsEmnistOfficialNamesAndRefusesTwoSubsets) {
  TempDir dir;
  // EMNIST's release names its test split "test", not "t10k".
  write_file(dir / "emnist-letters-train-images-idx3-ubyte.gz", idx_bytes({3, 2, 2}, std::vector<uint8_t>(12, 7)), true);
  write_file(dir / "emnist-letters-train-labels-idx1-ubyte.gz", idx_bytes({3}, {1, 2, 26}), true);
  write_file(dir / "emnist-letters-test-images-idx3-ubyte.gz", idx_bytes({2, 2, 2}, std::vector<uint8_t>(8, 7)), true);
  write_file(dir / "emnist-letters-test-labels-idx1-ubyte.gz", idx_bytes({2}, {3, 4}), true);
  const Dataset train = load_split(dir.path(), "train"), test = load_split(dir.path(), "test");
  EXPECT_EQ(train.size(), 3);
  EXPECT_EQ(test.size(), 2);
  EXPECT_EQ(train.labels[2].item<int64_t>(), 26);
  EXPECT_EQ(test.images_file.filename(), "emnist-letters-test-images-idx3-ubyte.gz");
  write_file(dir / "emnist-digits-test-labels-idx1-ubyte.gz", idx_bytes({2}, {3, 4}), true);
  EXPECT_THROW_WITH(load_split(dir.path(), "test"), InputError, "several EMNIST subsets");
}

TEST(IdxTest, InputsArePixelsOver255) {
  const at::Tensor u8 = at::tensor({0, 51, 255}, at::kByte).reshape({1, 1, 1, 3});
  const at::Tensor x = to_inputs(u8, at::kDouble, Normalization{});
  EXPECT_DOUBLE_EQ(x[0][0][0][1].item<double>(), 0.2);
  EXPECT_DOUBLE_EQ(x[0][0][0][2].item<double>(), 1.0);
  const at::Tensor z = to_inputs(u8, at::kDouble, Normalization{0.5, 0.25});
  EXPECT_DOUBLE_EQ(z[0][0][0][0].item<double>(), -2.0);
}

}  // namespace
}  // namespace pathkernel
