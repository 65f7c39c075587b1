#pragma once
/// \file errors.h
/// Exception types that map to the tool's exit statuses. The library throws them; only the
/// app's main() turns them into exit codes (2 bad input, 3 divergence, 4 a failed check, 5 replay mismatch).

#include <stdexcept>
#include <string>

namespace pathkernel {

/// Bad user input: a missing or malformed file, an invalid flag value. Exit status 2.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Training produced a non-finite loss or weight. Exit status 3.
class DivergenceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A check of the analysis failed before any output was written (a recorded step that is not
/// the logged optimizer's update of the logged batch). Exit status 4, as the other failed checks.
class CheckFailedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A replay did not reproduce a stored checkpoint bit for bit. Exit status 5.
class ReplayMismatchError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace pathkernel
