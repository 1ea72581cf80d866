// The state buffers and the step's row write (docs/runtime-contract.md §2 and §4).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "buffer.h"
#include "manifest.h"

namespace doge {

// The step's outputs per layer l: new_key/new_value [B,G,D], new_bias [B,G], slot [B,G] int64.
struct RowBuffers {
  RowBuffers(const ModelInfo& info, int64_t batch, size_t elem);
  std::vector<Bytes> new_key, new_value, new_bias, slot;  // [L] each
};

// Per layer: key/value [B,G,S,D], bias [B,G,S] (state dtype), position [B,G,S] int64.
// Each tensor lives in one C-slot block that never moves; the B*G slot sets of the current width
// S sit contiguously at its start (set j at slots j*S .. j*S+S-1), so the first B*G*S slots are
// the [B,G,S,...] tensor the step reads. S = C after prefill (prefill writes all C slots); with
// narrowing, S is the filled slots plus at least one empty one, growing by kWidthStep.
class StateBuffers {
 public:
  static constexpr int64_t kWidthStep = 64;

  StateBuffers(const ModelInfo& info, int64_t batch, size_t elem);
  void after_prefill();      // prefill wrote all C slots: width C, `used` measured
  bool fit_width();          // narrowest width holding every token + an empty slot; true if changed
  bool advance();            // after write_rows: true when the width grew (rebind the views)
  // Writes each set's new row into its slot (slot -1: nothing); position_ids [B].
  void write_rows(const RowBuffers& rows, const int64_t* position_ids);

  const ModelInfo& info() const { return info_; }
  int64_t width() const { return width_; }
  int64_t used() const { return used_; }
  uint8_t* field(const std::string& name, int64_t layer) const;  // key, value, bias, position
  size_t nbytes() const;

 private:
  struct Field {
    std::string name;
    size_t slot_bytes;         // bytes of one slot: D*elem, elem or 8
    std::vector<uint8_t> empty;  // one slot's empty value
    std::vector<Bytes> layers;   // [L] blocks of B*G*C slots
  };
  void relayout(int64_t width);

  ModelInfo info_;
  int64_t batch_, sets_;
  size_t elem_;
  int64_t width_, used_ = 0;
  std::vector<Field> fields_;
};

// The dtype's minimum as bytes: the bias of an empty slot.
std::vector<uint8_t> dtype_min_bytes(const std::string& dtype);

}  // namespace doge
