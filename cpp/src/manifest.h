// The artifact manifest (doge_export.json), as docs/runtime-contract.md §1 describes it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace doge {

// One tensor of weights.bin: `length` bytes at byte `offset`.
struct WeightTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  uint64_t offset = 0, length = 0;
  bool gathered = false;  // graphs read rows of it (Gather): the embedding, its scales, RoPE
};

// model_info, with the ids a generation loop needs.
struct ModelInfo {
  int64_t vocab_size = 0, num_layers = 0, num_kv_heads = 0, head_dim = 0, capacity = 0;
  int64_t max_prompt = 0, max_context = 0, pad_token_id = 0;
  std::vector<int64_t> eos_token_ids;
  std::string dtype;  // of the state and activations: float32 or float16
  bool full_logits = false;  // prefill logits [B,T,V] instead of [B,V]
};

// lm_rows (§4, optional): the graphs reading the tied matrix as an input in rows layout.
struct LmRows {
  std::string prefill_file, step_file;  // paths inside the folder
  std::string input = "lm_weight";      // [vocab, hidden]: the transpose of `tensor`
  std::string tensor = "lm_weight_t";   // [hidden, vocab] in weights.bin
  int64_t min_batch = 0;                // 0: the artifact has no rows graphs
};

struct Manifest {
  std::string folder;
  nlohmann::json data;
  ModelInfo info;
  std::string prefill_file, step_file, weights_file;  // paths inside `folder`
  std::vector<WeightTensor> tensors;
  bool quantized = false;         // MatMulNBits weights: their kernels always run prepacked
  std::string optimized_by;       // the ONNX Runtime that saved the graphs optimized (quantized), or ""
  bool step_takes_slots = false;  // the step's state inputs take any first S of the C slots
  LmRows lm_rows;

  std::string path(const std::string& file) const { return folder + "/" + file; }
};

// Reads FOLDER/doge_export.json; with verify, checks every listed file's size and sha256.
// Throws UserError for a missing, foreign, newer or modified artifact.
Manifest load_manifest(const std::string& folder, bool verify);

}  // namespace doge
