// Prefill and step sessions over state buffers that never move (docs/runtime-contract.md §1-4).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <onnxruntime/onnxruntime_cxx_api.h>

#include "buffer.h"
#include "manifest.h"
#include "state.h"
#include "weights.h"

namespace doge {

struct RunnerOptions {
  int prefill_threads = 0;  // 0: ONNX Runtime's default (all physical cores); prefill is compute-bound
  int step_threads = 1;     // a one-row step is bound by memory bandwidth
  bool spin = false;        // worker threads busy-wait between kernels
  // fp32 weights at batch 1: false keeps one copy (both sessions read the shared initializers
  // unpacked); true lets the step prepack them (faster, a second copy), as the Python backend
  // onnxruntime-packed does. Quantized weights are always prepacked, in both sessions, into ONE
  // copy shared through ONNX Runtime's prepacked-weights container (C API; Python has none).
  bool packed = false;
  bool attend_filled = true;  // the step reads only the filled slots (when the graph allows it)
  bool lm_rows = true;        // from the manifest's lm_rows.min_batch rows on, the rows-layout graphs
};

class Runner {
 public:
  Runner(Ort::Env& env, const Manifest& manifest, int64_t batch, const RunnerOptions& options);
  ~Runner();

  // ids, mask, positions: [B,T] int64, left-padded (§3). Returns logits [B,V] as float, in a
  // buffer of the runner that the next prefill or step overwrites.
  const std::vector<float>& prefill(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask,
                                    const std::vector<int64_t>& positions, int64_t T);
  // ids, positions: [B] (§4). Returns logits [B,V] as float (the same buffer as prefill's); the
  // state is updated in place.
  const std::vector<float>& step(const std::vector<int64_t>& ids, const std::vector<int64_t>& positions);

  int64_t batch() const { return batch_; }
  const StateBuffers& state() const { return *state_; }
  bool lm_rows() const { return lm_rows_; }

 private:
  Ort::SessionOptions session_options(int threads, bool prepack, bool prefill) const;
  void load_weights();
  void drop_gathered();
  void bind_prefill_outputs();
  void bind_step();
  Ort::Value state_view(const char* field, int64_t layer, int64_t width) const;
  Ort::Value tensor(void* data, size_t bytes, std::vector<int64_t> shape, ONNXTensorElementDataType type) const;
  void to_float(const uint8_t* logits, int64_t count, float* out) const;  // logits dtype -> float

  const Manifest& manifest_;
  ModelInfo info_;
  int64_t batch_;
  RunnerOptions options_;
  ONNXTensorElementDataType state_type_, logits_type_;
  size_t elem_, logits_elem_;
  bool narrowing_ = false;
  // Quantized weights: the gathered tables' mapped rows are handed back after the first step of a
  // generation, then every kDropEvery steps, and before a prefill that follows steps (int4
  // Doge-20M, four 128 + 256-token generations: peak RSS 40.9 -> 40.1 MiB; the rows otherwise stay mapped
  // once read, and the next prompt's add to them). As DROP_EVERY in backends/ort.py.
  static constexpr int64_t kDropEvery = 64;
  int64_t steps_since_drop_ = 0;
  Ort::MemoryInfo cpu_;
  OrtPrepackedWeightsContainer* prepacked_ = nullptr;  // one packed copy for both sessions
  bool lm_rows_ = false;            // the rows-layout graphs run (§4)
  Bytes weights_;                   // weights.bin, one copy; outlives the sessions
  MappedFile mapped_;               // or, when every session prepacks them, weights.bin mapped
  Bytes lm_rows_matrix_;            // with lm_rows_: the tied matrix [vocab, hidden]
  Ort::Value lm_rows_value_{nullptr};
  std::vector<Ort::Value> weight_values_;
  std::vector<std::string> weight_names_;
  std::unique_ptr<Ort::Session> prefill_, step_;
  std::optional<StateBuffers> state_;  // allocated once the sessions exist (the load's peak)
  RowBuffers rows_;
  Bytes step_ids_, step_positions_;
  Bytes step_logits_;               // the step's logits when they are not float32 (fp16 artifacts)
  std::vector<float> logits_;       // [B,V] float: what prefill and step return; fp32 steps write it
  std::vector<Ort::Value> prefill_values_, step_values_;  // what the bindings were given
  std::unique_ptr<Ort::IoBinding> prefill_binding_, step_binding_;
};

// ONNX element type of a manifest dtype name ("float32", "int64", "uint8", ...).
ONNXTensorElementDataType onnx_type(const std::string& dtype);
size_t type_size(ONNXTensorElementDataType type);

}  // namespace doge
