// libFuzzer harness: see readers.cpp.
#include "readers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pathkernel::fuzz::fuzz_manifest(data, size);
  return 0;
}
