#pragma once
// The readers the fuzz harnesses exercise, by name (the folder names of corpus/ and
// regressions/). Each returns normally for an input the reader accepts or refuses as bad input.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace pathkernel::fuzz {

struct Reader {
  const char* name;
  void (*read)(const uint8_t* data, size_t size);
};
const std::vector<Reader>& readers();

void fuzz_checkpoint(const uint8_t* data, size_t size);
void fuzz_idx(const uint8_t* data, size_t size);
void fuzz_npy(const uint8_t* data, size_t size);
void fuzz_manifest(const uint8_t* data, size_t size);
void fuzz_step_log(const uint8_t* data, size_t size);
void fuzz_csv(const uint8_t* data, size_t size);
void fuzz_lr_schedule(const uint8_t* data, size_t size);

}  // namespace pathkernel::fuzz
