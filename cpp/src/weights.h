// Reading weights.bin (docs/runtime-contract.md §1.4 and §4, rows layout).
#pragma once
#include <cstdint>
#include <string>

#include "buffer.h"
#include "manifest.h"

namespace doge {

// The file's bytes without [skip_offset, skip_offset + skip_length), in one block: a tensor at
// offset o >= skip_offset + skip_length then sits at o - skip_length.
Bytes read_weights(const std::string& path, uint64_t skip_offset = 0, uint64_t skip_length = 0);

// A float32 [rows, cols] tensor of the file as a new [cols, rows] block, read 16 rows at a time
// (the process never holds the untransposed copy).
Bytes read_transposed(const std::string& path, const WeightTensor& tensor);

}  // namespace doge
