// csv.h: float cells keep their type and their value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>

#include "pathkernel/io/csv.h"

namespace pathkernel {
namespace {

TEST(CsvTest, FloatCellsAlwaysLookLikeFloatsAndReadBackExactly) {
  EXPECT_EQ(csv_float(0.0), "0.0");
  EXPECT_EQ(csv_float(1.0), "1.0");
  EXPECT_EQ(csv_float(-3.0), "-3.0");
  EXPECT_EQ(csv_float(0.1), "0.1");
  EXPECT_EQ(csv_float(1e-5), "1e-05");
  EXPECT_EQ(csv_float(std::numeric_limits<double>::quiet_NaN()), "nan");
  EXPECT_EQ(csv_float(std::numeric_limits<double>::infinity()), "inf");
  for (double v : {1.0 / 3.0, 2.0 / 3.0 * 1e300, 5e-324, 123456789012345678.0, -0.0}) {
    const std::string s = csv_float(v);
    EXPECT_EQ(std::strtod(s.c_str(), nullptr), v) << s;
    EXPECT_NE(s.find_first_of(".e"), std::string::npos) << s;
  }
}

}  // namespace
}  // namespace pathkernel
