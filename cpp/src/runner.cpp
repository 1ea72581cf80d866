#include "runner.h"

#include <cstdio>
#include <cstring>

#include "errors.h"
#include "half.h"

namespace doge {
namespace {

const char* kFields[] = {"key", "value", "bias", "position"};
const char* kRowFields[] = {"new_key", "new_value", "new_bias", "slot"};

std::string layer_name(const char* field, int64_t layer) { return std::string(field) + "." + std::to_string(layer); }

// The dtype of a graph's first output (logits) in the manifest.
std::string logits_dtype(const Manifest& manifest) {
  return manifest.data.at("graphs").at("step").at("outputs").at(0).at("dtype");
}

void check_ort(OrtStatus* status) { Ort::ThrowOnError(status); }

}  // namespace

ONNXTensorElementDataType onnx_type(const std::string& dtype) {
  if (dtype == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "float16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (dtype == "bfloat16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  if (dtype == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (dtype == "int32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  if (dtype == "uint8") return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  if (dtype == "int8") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  throw UserError("the manifest names dtype " + dtype + ", which this runtime does not know");
}

size_t type_size(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return 1;
    default: return 4;
  }
}

Runner::Runner(Ort::Env& env, const Manifest& manifest, int64_t batch, const RunnerOptions& options)
    : manifest_(manifest),
      info_(manifest.info),
      batch_(batch),
      options_(options),
      state_type_(onnx_type(manifest.info.dtype)),
      logits_type_(onnx_type(logits_dtype(manifest))),
      elem_(type_size(state_type_)),
      logits_elem_(type_size(logits_type_)),
      cpu_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)),
      state_(manifest.info, batch, elem_),
      rows_(manifest.info, batch, elem_),
      step_ids_(batch * sizeof(int64_t)),
      step_positions_(batch * sizeof(int64_t)),
      step_logits_(batch * manifest.info.vocab_size * logits_elem_) {
  if (info_.dtype == "bfloat16")
    throw UserError("ONNX Runtime has no bfloat16 kernels on the CPU; re-export with --dtype fp16 or fp32");
  load_weights();
  // Who prepacks: quantized weights always (MatMulNBits runs from its packed layout), in both
  // sessions; fp32 weights only in the step, at batch > 1 or when asked. A prefill that prepacks
  // fp32 weights runs faster (Doge-20M, 128 tokens: 12-13 vs 17-19 ms) but peaked 30 MiB higher
  // (measured, 2026-12-03), and the prefill already beats generate()'s time to first token.
  // Sessions that both prepack share one packed copy through the container.
  bool step_packs = manifest.quantized || options.packed || batch > 1;
  if (step_packs) check_ort(Ort::GetApi().CreatePrepackedWeightsContainer(&prepacked_));
  Ort::SessionOptions prefill_opts = session_options(options.prefill_threads, manifest.quantized, true);
  Ort::SessionOptions step_opts = session_options(options.step_threads, step_packs, false);
  prefill_ = std::make_unique<Ort::Session>(env, manifest.prefill_file.c_str(), prefill_opts, prepacked_);
  step_ = std::make_unique<Ort::Session>(env, manifest.step_file.c_str(), step_opts, prepacked_);
  prefill_binding_ = std::make_unique<Ort::IoBinding>(*prefill_);
  step_binding_ = std::make_unique<Ort::IoBinding>(*step_);
  bind_prefill_outputs();
}

Runner::~Runner() {
  // bindings and sessions first: they refer to the weights, buffers and the container
  step_binding_.reset();
  prefill_binding_.reset();
  step_.reset();
  prefill_.reset();
  if (prepacked_) Ort::GetApi().ReleasePrepackedWeightsContainer(prepacked_);
}

// Session settings as in the Python runtime (doge_export/backends/ort.py): every optimization,
// the batch dim specialized (its shape arithmetic folds away), no spinning unless asked, the
// prefill without a memory pattern, prepacking only where asked.
Ort::SessionOptions Runner::session_options(int threads, bool prepack, bool prefill) const {
  Ort::SessionOptions opts;
  opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  opts.SetLogSeverityLevel(3);
  if (threads > 0) opts.SetIntraOpNumThreads(threads);
  opts.AddConfigEntry("session.intra_op.allow_spinning", options_.spin ? "1" : "0");
  if (!prepack) opts.AddConfigEntry("session.disable_prepacking", "1");
  if (prefill) opts.DisableMemPattern();
  check_ort(Ort::GetApi().AddFreeDimensionOverrideByName(opts, "batch", batch_));
  for (size_t i = 0; i < weight_values_.size(); ++i) opts.AddInitializer(weight_names_[i].c_str(), weight_values_[i]);
  return opts;
}

// weights.bin read once into one aligned block; every tensor of the manifest a view of it,
// registered as a shared initializer of both sessions (§1.4).
void Runner::load_weights() {
  FILE* f = std::fopen(manifest_.weights_file.c_str(), "rb");
  if (!f) throw UserError("cannot read " + manifest_.weights_file);
  std::fseek(f, 0, SEEK_END);
  size_t size = size_t(std::ftell(f));
  std::fseek(f, 0, SEEK_SET);
  weights_ = Bytes(size);
  size_t got = std::fread(weights_.data(), 1, size, f);
  std::fclose(f);
  if (got != size) throw UserError("cannot read " + manifest_.weights_file);
  for (const WeightTensor& t : manifest_.tensors) {
    if (t.offset + t.length > size)
      throw UserError(manifest_.weights_file + " is shorter than its manifest says; re-export the artifact");
    weight_names_.push_back(t.name);
    weight_values_.push_back(tensor(weights_.data() + t.offset, t.length, t.shape, onnx_type(t.dtype)));
  }
}

Ort::Value Runner::tensor(void* data, size_t bytes, std::vector<int64_t> shape, ONNXTensorElementDataType type) const {
  return Ort::Value::CreateTensor(cpu_, data, bytes, shape.data(), shape.size(), type);
}

// Prefill writes all C slots of every state tensor straight into the state buffers (§3).
void Runner::bind_prefill_outputs() {
  int64_t G = info_.num_kv_heads, C = info_.capacity, D = info_.head_dim;
  prefill_binding_->BindOutput("logits", cpu_);  // its shape depends on the prompt (full_logits)
  for (int64_t l = 0; l < info_.num_layers; ++l)
    for (const char* f : kFields) {
      bool position = std::strcmp(f, "position") == 0, kv = f[0] != 'b' && !position;
      std::vector<int64_t> shape = kv ? std::vector<int64_t>{batch_, G, C, D} : std::vector<int64_t>{batch_, G, C};
      size_t count = size_t(batch_ * G * C * (kv ? D : 1));
      auto type = position ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : state_type_;
      bound_.push_back(tensor(state_.field(f, l), count * type_size(type), shape, type));
      prefill_binding_->BindOutput(layer_name(f, l).c_str(), bound_.back());
    }
}

// The step reads the state's current views (width S) and its id/position buffers, and writes the
// logits and the new rows into buffers bound once. Called again whenever the width changes.
void Runner::bind_step() {
  int64_t G = info_.num_kv_heads, S = state_.width(), D = info_.head_dim;
  Ort::IoBinding& b = *step_binding_;
  b.ClearBoundInputs();
  b.ClearBoundOutputs();
  std::vector<Ort::Value> values;
  values.push_back(tensor(step_ids_.data(), step_ids_.size(), {batch_, 1}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
  b.BindInput("input_ids", values.back());
  values.push_back(tensor(step_positions_.data(), step_positions_.size(), {batch_, 1}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
  b.BindInput("position_ids", values.back());
  values.push_back(tensor(step_logits_.data(), step_logits_.size(), {batch_, info_.vocab_size}, logits_type_));
  b.BindOutput("logits", values.back());
  for (int64_t l = 0; l < info_.num_layers; ++l) {
    for (const char* f : kFields) {
      bool position = std::strcmp(f, "position") == 0, kv = f[0] != 'b' && !position;
      std::vector<int64_t> shape = kv ? std::vector<int64_t>{batch_, G, S, D} : std::vector<int64_t>{batch_, G, S};
      auto type = position ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : state_type_;
      size_t bytes = size_t(batch_ * G * S * (kv ? D : 1)) * type_size(type);
      values.push_back(tensor(state_.field(f, l), bytes, shape, type));
      b.BindInput(layer_name(f, l).c_str(), values.back());
    }
    const Bytes* row[] = {&rows_.new_key[l], &rows_.new_value[l], &rows_.new_bias[l], &rows_.slot[l]};
    for (int k = 0; k < 4; ++k) {
      bool kv = k < 2, slot = k == 3;
      std::vector<int64_t> shape = kv ? std::vector<int64_t>{batch_, G, D} : std::vector<int64_t>{batch_, G};
      values.push_back(tensor(row[k]->data(), row[k]->size(), shape, slot ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : state_type_));
      b.BindOutput(layer_name(kRowFields[k], l).c_str(), values.back());
    }
  }
  bound_.insert(bound_.end(), std::make_move_iterator(values.begin()), std::make_move_iterator(values.end()));
}

std::vector<float> Runner::prefill(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask,
                                   const std::vector<int64_t>& positions, int64_t T) {
  std::vector<int64_t> shape = {batch_, T};
  size_t bytes = size_t(batch_ * T) * sizeof(int64_t);
  auto as_tensor = [&](const std::vector<int64_t>& v) {
    return tensor(const_cast<int64_t*>(v.data()), bytes, shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
  };
  Ort::Value in_ids = as_tensor(ids), in_mask = as_tensor(mask), in_pos = as_tensor(positions);
  prefill_binding_->BindInput("input_ids", in_ids);
  prefill_binding_->BindInput("attention_mask", in_mask);
  prefill_binding_->BindInput("position_ids", in_pos);
  prefill_->Run(Ort::RunOptions{nullptr}, *prefill_binding_);
  state_.after_prefill();
  narrowing_ = options_.attend_filled && manifest_.step_takes_slots;
  if (narrowing_) state_.fit_width();
  bound_.resize(size_t(info_.num_layers) * 4);  // keep the prefill's state outputs, drop old step views
  bind_step();
  Ort::Value out = std::move(prefill_binding_->GetOutputValues().at(0));
  // logits [B,V], or [B,T,V] with full_logits: each row's last position
  int64_t stride = info_.full_logits ? T * info_.vocab_size : info_.vocab_size;
  int64_t last = info_.full_logits ? (T - 1) * info_.vocab_size : 0;
  const uint8_t* raw = static_cast<const uint8_t*>(out.GetTensorRawData());
  std::vector<float> logits(size_t(batch_ * info_.vocab_size));
  for (int64_t b = 0; b < batch_; ++b)
    to_float(raw + (b * stride + last) * logits_elem_, info_.vocab_size, &logits[b * info_.vocab_size]);
  return logits;
}

std::vector<float> Runner::step(const std::vector<int64_t>& ids, const std::vector<int64_t>& positions) {
  std::memcpy(step_ids_.data(), ids.data(), step_ids_.size());
  std::memcpy(step_positions_.data(), positions.data(), step_positions_.size());
  step_->Run(Ort::RunOptions{nullptr}, *step_binding_);
  state_.write_rows(rows_, step_positions_.as<int64_t>());
  if (narrowing_ && state_.advance()) {
    bound_.resize(size_t(info_.num_layers) * 4);
    bind_step();
  }
  std::vector<float> logits(size_t(batch_ * info_.vocab_size));
  to_float(step_logits_.data(), batch_ * info_.vocab_size, logits.data());
  return logits;
}

void Runner::to_float(const uint8_t* logits, int64_t count, float* out) const {
  if (logits_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    std::memcpy(out, logits, count * sizeof(float));
    return;
  }
  const auto* half = reinterpret_cast<const uint16_t*>(logits);
  for (int64_t i = 0; i < count; ++i) out[i] = half_to_float(half[i]);
}

}  // namespace doge
