#pragma once
/// \file class_names.h
/// The names of a run's classes, as reports, image grids and explanations show them.

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace pathkernel {

/// One name per class: from `names_file` (one per line) when given; else a recorded run's own
/// (its manifest's `classes`); else Fashion-MNIST's for a run trained on a folder named so; else
/// "class 0", "class 1", ... Throws InputError naming `names_file` when it holds too few names.
std::vector<std::string> class_names(const std::filesystem::path& run, int64_t classes, const std::string& names_file);

}  // namespace pathkernel
