#include "pathkernel/gnuplot.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cstdlib>
#include <stdexcept>

#include "pathkernel/fs_util.h"

namespace pathkernel {
namespace fs = std::filesystem;

bool gnuplot_available() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

void render_gnuplot(const fs::path& png, const std::string& script) {
  const fs::path gp = fs::path(png).replace_extension(".gp");
  const std::string tmp_png = png.string() + ".tmp.png";
  std::string body = script;
  for (size_t pos; (pos = body.find("@OUTPUT@")) != std::string::npos;) body.replace(pos, 8, png.filename().string());
  atomic_write(gp, body);  // the editable script names the final PNG
  std::string run = script;
  for (size_t pos; (pos = run.find("@OUTPUT@")) != std::string::npos;) run.replace(pos, 8, tmp_png);
  const fs::path tmp_gp = gp.string() + ".run";
  atomic_write(tmp_gp, run, /*durable=*/false);
  const std::string cmd = "gnuplot '" + tmp_gp.string() + "' 2> '" + tmp_gp.string() + ".err'";
  const int status = std::system(cmd.c_str());
  std::string err;
  if (fs::exists(tmp_gp.string() + ".err")) err = read_file(tmp_gp.string() + ".err");
  fs::remove(tmp_gp);
  fs::remove(tmp_gp.string() + ".err");
  if (status != 0 || !fs::exists(tmp_png)) {
    fs::remove(tmp_png);
    throw std::runtime_error("gnuplot failed on " + gp.string() + ": " + err.substr(0, 400));
  }
  fs::rename(tmp_png, png);
}

void render_image_grid(const fs::path& png, const std::vector<GridImage>& images, int columns,
                       const std::string& title) {
  const int n = static_cast<int>(images.size());
  const int rows = (n + columns - 1) / columns;
  std::string s = fmt::format(
      "set terminal pngcairo size {},{} font 'sans,9'\nset output '@OUTPUT@'\n"
      "set palette gray negative\nunset colorbox\nunset key\nunset tics\nunset border\n"
      "set size ratio -1\nset multiplot layout {},{} title \"{}\" font 'sans,11'\n",
      std::max(4, columns) * 175, rows * 170 + 40, rows, columns, title);
  for (int i = 0; i < n; ++i) {
    const at::Tensor img = images[i].pixels.contiguous();
    const int64_t h = img.size(0), w = img.size(1);
    s += fmt::format("$img{} << EOD\n", i);
    const uint8_t* p = img.data_ptr<uint8_t>();
    for (int64_t r = 0; r < h; ++r) {
      for (int64_t c = 0; c < w; ++c) s += fmt::format("{}{}", c ? " " : "", static_cast<int>(p[r * w + c]));
      s += "\n";
    }
    s += "EOD\n";
    s += fmt::format("set title \"{}\" font 'sans,9'\nset xrange [-0.5:{}]\nset yrange [{}:-0.5]\n"
                     "set cbrange [0:255]\nplot $img{} matrix with image\n",
                     images[i].caption, w - 0.5, h - 0.5, i);
  }
  s += "unset multiplot\n";
  render_gnuplot(png, s);
}

}  // namespace pathkernel
