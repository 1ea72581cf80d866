// Reading weights.bin (docs/runtime-contract.md §1.4 and §4, rows layout).
#pragma once
#include <cstdint>
#include <string>

#include "buffer.h"
#include "manifest.h"

namespace doge {

// A file mapped read-only (MAP_PRIVATE, never written): its pages come from the page cache on
// first touch, and release() hands the resident ones back without losing anything (a later read
// faults them in again, the same bytes). For weights that every session prepacks, the runtime
// releases them once the sessions hold their packed copy: what stays resident is what the
// kernels still read (an embedding row per token, norms), not a second copy of every matrix.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path);
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  void release() const;  // resident pages back to the page cache (madvise MADV_DONTNEED)
  // One mapping region per page over [offset, offset + length), for tensors read a row at a
  // time: on a fault Linux also maps the up to 15 cached pages around it *within the region*
  // (fault-around), so a random prompt brought back nearly all of int4 Doge-20M's 5 MiB
  // embedding; split, only the pages of the rows read come back (peak RSS 46.4 -> 42.5 MiB).
  void split_pages(uint64_t offset, uint64_t length) const;
  // The resident pages of [offset, offset + length) back to the page cache (the pages around it too)
  void drop(uint64_t offset, uint64_t length) const;

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// The file's bytes without [skip_offset, skip_offset + skip_length), in one block: a tensor at
// offset o >= skip_offset + skip_length then sits at o - skip_length.
Bytes read_weights(const std::string& path, uint64_t skip_offset = 0, uint64_t skip_length = 0);

// A float32 [rows, cols] tensor of the file as a new [cols, rows] block, read 16 rows at a time
// (the process never holds the untransposed copy).
Bytes read_transposed(const std::string& path, const WeightTensor& tensor);

}  // namespace doge
