#pragma once
/// \file gnuplot.h
/// PNG figures through gnuplot (Debian's gnuplot-nox, pngcairo terminal). Each figure is a
/// gnuplot script with inline data, written beside the PNG as NAME.gp so that users can edit and
/// re-render it; the PNG is rendered to a temporary name and renamed.

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <string>
#include <vector>

namespace pathkernel {

/// True when a `gnuplot` executable is on the PATH (searched directly; no shell is run).
bool gnuplot_available();

/// `s` made safe inside a single-quoted gnuplot string: quotes doubled; control characters
/// dropped; backquotes, '@' and backslashes replaced by '_' (no command or macro substitution,
/// no escapes). Every string from a file or the command line goes through it.
std::string gp_text(const std::string& s);

/// The first lines of a figure's script: the pngcairo terminal at width x height pixels with a
/// sans font of `font_pt` points (the line render_gnuplot's vector copies read), the output
/// placeholder @OUTPUT@ and comma-separated data.
std::string png_header(int width, int height, int font_pt);

/// Runs a gnuplot script that sets its own output to `png`'s temporary name (use the
/// placeholder @OUTPUT@ in `script`), started with posix_spawn in `png`'s folder with the script
/// on its standard input: file names in the script are relative to that folder. Writes `png`
/// with extension .gp beside it. With `vector_copies`, a script whose first line is
/// `set terminal pngcairo size W,H font 'F'` is also rendered as NAME.svg and NAME.pdf (same
/// figure, svg and pdfcairo terminals). Throws std::runtime_error when gnuplot fails.
void render_gnuplot(const std::filesystem::path& png, const std::string& script, bool vector_copies = false);

/// One tile of an image grid: a uint8 [H, W] image and its caption.
struct GridImage {
  at::Tensor pixels;
  std::string caption;
};

/// A grid of grayscale images with captions and an overall title.
void render_image_grid(const std::filesystem::path& png, const std::vector<GridImage>& images, int columns,
                       const std::string& title);

}  // namespace pathkernel
