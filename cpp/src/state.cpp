#include "state.h"

#include <algorithm>
#include <cfloat>
#include <cstring>

#include "errors.h"

namespace doge {
namespace {

constexpr int64_t kEmptyPosition = -1;

template <class T> std::vector<uint8_t> bytes_of(T value) {
  std::vector<uint8_t> out(sizeof(T));
  std::memcpy(out.data(), &value, sizeof(T));
  return out;
}

void fill_slots(uint8_t* start, int64_t count, const std::vector<uint8_t>& empty) {
  for (int64_t i = 0; i < count; ++i) std::memcpy(start + i * empty.size(), empty.data(), empty.size());
}

}  // namespace

std::vector<uint8_t> dtype_min_bytes(const std::string& dtype) {
  if (dtype == "float32") return bytes_of(-FLT_MAX);
  if (dtype == "float16") return bytes_of(uint16_t(0xFBFF));  // -65504
  throw UserError("state dtype " + dtype + " is not supported by this runtime (float32, float16)");
}

RowBuffers::RowBuffers(const ModelInfo& info, int64_t batch, size_t elem) {
  size_t sets = size_t(batch * info.num_kv_heads);
  for (int64_t l = 0; l < info.num_layers; ++l) {
    new_key.emplace_back(sets * info.head_dim * elem);
    new_value.emplace_back(sets * info.head_dim * elem);
    new_bias.emplace_back(sets * elem);
    slot.emplace_back(sets * sizeof(int64_t));
  }
}

StateBuffers::StateBuffers(const ModelInfo& info, int64_t batch, size_t elem)
    : info_(info), batch_(batch), sets_(batch * info.num_kv_heads), elem_(elem), width_(info.capacity) {
  size_t row = info.head_dim * elem;
  fields_.push_back(Field{"key", row, std::vector<uint8_t>(row, 0), {}});
  fields_.push_back(Field{"value", row, std::vector<uint8_t>(row, 0), {}});
  fields_.push_back(Field{"bias", elem, dtype_min_bytes(info.dtype), {}});
  fields_.push_back(Field{"position", sizeof(int64_t), bytes_of(kEmptyPosition), {}});
  for (Field& f : fields_)
    for (int64_t l = 0; l < info.num_layers; ++l) {
      f.layers.emplace_back(sets_ * info.capacity * f.slot_bytes);
      fill_slots(f.layers.back().data(), sets_ * info.capacity, f.empty);
    }
}

uint8_t* StateBuffers::field(const std::string& name, int64_t layer) const {
  for (const Field& f : fields_)
    if (f.name == name) return f.layers[layer].data();
  throw std::logic_error("no state field " + name);
}

size_t StateBuffers::nbytes() const {
  size_t total = 0;
  for (const Field& f : fields_)
    for (const Bytes& b : f.layers) total += b.size();
  return total;
}

void StateBuffers::after_prefill() {
  width_ = info_.capacity;
  const Field& bias = fields_[2];
  const Field& position = fields_[3];
  int64_t last = -1;  // highest slot index that holds a token in any set of any layer
  for (int64_t l = 0; l < info_.num_layers; ++l) {
    const auto* pos = position.layers[l].as<int64_t>();
    const uint8_t* b = bias.layers[l].data();
    for (int64_t i = 0; i < sets_ * width_; ++i)
      if (pos[i] != kEmptyPosition || std::memcmp(b + i * elem_, bias.empty.data(), elem_) != 0)
        last = std::max(last, i % width_);
  }
  used_ = last + 1;
}

bool StateBuffers::fit_width() {
  int64_t C = info_.capacity;
  int64_t width = std::min(C, (used_ + 1 + kWidthStep - 1) / kWidthStep * kWidthStep);
  if (width == width_) return false;
  relayout(width);
  return true;
}

bool StateBuffers::advance() {
  used_ = std::min(used_ + 1, info_.capacity);
  return used_ >= width_ && width_ < info_.capacity && fit_width();
}

// Each set from width_ slots apart to `width` apart, in place. Growing: the last set moves first
// and the new slots are filled empty; shrinking (the dropped slots are empty): the first first.
void StateBuffers::relayout(int64_t width) {
  int64_t old = width_, keep = std::min(old, width);
  for (Field& f : fields_)
    for (Bytes& block : f.layers)
      for (int64_t k = 0; k < sets_; ++k) {
        int64_t j = width > old ? sets_ - 1 - k : k;
        uint8_t* base = block.data();
        if (j) std::memmove(base + j * width * f.slot_bytes, base + j * old * f.slot_bytes, keep * f.slot_bytes);
        if (width > old) fill_slots(base + (j * width + old) * f.slot_bytes, width - old, f.empty);
      }
  width_ = width;
}

void StateBuffers::write_rows(const RowBuffers& rows, const int64_t* position_ids) {
  size_t row = info_.head_dim * elem_;
  int64_t G = info_.num_kv_heads;
  for (int64_t l = 0; l < info_.num_layers; ++l) {
    const auto* slot = rows.slot[l].as<int64_t>();
    for (int64_t j = 0; j < sets_; ++j) {
      if (slot[j] < 0) continue;  // the new token lost: nothing is written
      int64_t target = j * width_ + slot[j];
      std::memcpy(fields_[0].layers[l].data() + target * row, rows.new_key[l].data() + j * row, row);
      std::memcpy(fields_[1].layers[l].data() + target * row, rows.new_value[l].data() + j * row, row);
      std::memcpy(fields_[2].layers[l].data() + target * elem_, rows.new_bias[l].data() + j * elem_, elem_);
      fields_[3].layers[l].as<int64_t>()[target] = position_ids[j / G];
    }
  }
}

}  // namespace doge
