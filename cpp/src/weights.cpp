#include "weights.h"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errors.h"

namespace doge {
namespace {

using File = std::unique_ptr<FILE, int (*)(FILE*)>;

File open_file(const std::string& path) {
  File f(std::fopen(path.c_str(), "rb"), std::fclose);
  if (!f) throw UserError("cannot read " + path);
  return f;
}

void read_exactly(FILE* f, const std::string& path, uint64_t offset, uint8_t* out, uint64_t length) {
  if (std::fseek(f, long(offset), SEEK_SET) != 0 || std::fread(out, 1, length, f) != length)
    throw UserError(path + " is shorter than its manifest says; re-export the artifact");
}

}  // namespace

MappedFile::MappedFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw UserError("cannot read " + path);
  struct stat info {};
  if (::fstat(fd, &info) != 0 || info.st_size == 0) {
    ::close(fd);
    throw UserError("cannot read " + path + " (empty or unreadable); re-export the artifact");
  }
  void* p = ::mmap(nullptr, size_t(info.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);  // the mapping keeps the file
  if (p == MAP_FAILED) throw UserError("cannot map " + path + " into memory");
  data_ = static_cast<uint8_t*>(p);
  size_ = size_t(info.st_size);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  std::swap(data_, other.data_);
  std::swap(size_, other.size_);
  return *this;
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
}

void MappedFile::release() const {
  if (data_) ::madvise(data_, size_, MADV_DONTNEED);
}

// Every other page gets MADV_RANDOM, which only changes readahead; regions whose flags differ
// are never merged, so each page is a region of its own.
void MappedFile::split_pages(uint64_t offset, uint64_t length) const {
  const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
  uint64_t first = offset / page, end = (offset + length + page - 1) / page, pages = (size_ + page - 1) / page;
  // the odd pages from the one before to the one after: an even first or last page is cut off too
  for (uint64_t p = (first > 0 ? first - 1 : 0) | 1; p < std::min(end + 1, pages); p += 2)
    ::madvise(data_ + p * page, page, MADV_RANDOM);
}

void MappedFile::drop(uint64_t offset, uint64_t length) const {
  const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
  uint64_t first = offset / page * page, end = std::min<uint64_t>(offset + length, size_);
  if (data_ && end > first) ::madvise(data_ + first, end - first, MADV_DONTNEED);
}

Bytes read_weights(const std::string& path, uint64_t skip_offset, uint64_t skip_length) {
  File f = open_file(path);
  std::fseek(f.get(), 0, SEEK_END);
  uint64_t size = uint64_t(std::ftell(f.get()));
  if (skip_offset + skip_length > size) throw UserError(path + " is shorter than its manifest says; re-export the artifact");
  Bytes out(size - skip_length);
  read_exactly(f.get(), path, 0, out.data(), skip_offset);
  uint64_t tail = skip_offset + skip_length;
  read_exactly(f.get(), path, tail, out.data() + skip_offset, size - tail);
  return out;
}

Bytes read_transposed(const std::string& path, const WeightTensor& tensor) {
  if (tensor.dtype != "float32" || tensor.shape.size() != 2)
    throw UserError(tensor.name + " is not a float32 matrix; re-export the artifact");
  int64_t rows = tensor.shape[0], cols = tensor.shape[1], chunk = 16;
  File f = open_file(path);
  Bytes out(tensor.length);
  std::vector<float> part(size_t(chunk * cols));
  float* t = out.as<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    int64_t n = std::min(chunk, rows - r0);
    read_exactly(f.get(), path, tensor.offset + uint64_t(r0 * cols) * 4, reinterpret_cast<uint8_t*>(part.data()),
                 uint64_t(n * cols) * 4);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < n; ++r) t[c * rows + r0 + r] = part[size_t(r * cols + c)];
  }
  return out;
}

}  // namespace doge
