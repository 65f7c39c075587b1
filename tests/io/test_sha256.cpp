#include <gtest/gtest.h>

#include <string>

#include "fixtures.h"
#include "pathkernel/io/errors.h"
#include "pathkernel/io/sha256.h"

namespace pathkernel {
namespace {

// FIPS 180-4 / NIST example vectors.
TEST(Sha256Test, KnownVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256Test, FileMatchesStringAndMissingFileThrows) {
  testing::TempDir dir;
  const std::string text(70000, 'q');
  testing::write_file(dir / "f", text, false);
  EXPECT_EQ(sha256_file(dir / "f"), sha256_hex(text));
  EXPECT_THROW_WITH(sha256_file(dir / "none"), InputError, "none");
}

}  // namespace
}  // namespace pathkernel
