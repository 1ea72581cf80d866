#include "runner.h"

#include <cstdio>
#include <cstring>

#include "errors.h"
#include "half.h"
#include "weights.h"

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
      rows_(manifest.info, batch, elem_),
      step_ids_(batch * sizeof(int64_t)),
      step_positions_(batch * sizeof(int64_t)),
      step_logits_(logits_elem_ == sizeof(float) ? 0 : batch * manifest.info.vocab_size * logits_elem_),
      logits_(size_t(batch * manifest.info.vocab_size)) {
  if (info_.dtype == "bfloat16")
    throw UserError("ONNX Runtime has no bfloat16 kernels on the CPU; re-export with --dtype fp16 or fp32");
  // From lm_rows.min_batch rows on, the rows-layout graphs (§4): no prepacked copy of the tied matrix
  lm_rows_ = options.lm_rows && manifest.lm_rows.min_batch > 0 && batch >= manifest.lm_rows.min_batch;
  load_weights();
  // Who prepacks: quantized weights always (MatMulNBits runs from its packed layout), in both
  // sessions; fp32 weights only in the step, at batch > 1 or when asked. Sessions that both
  // prepack share one packed copy through the container, but the second session packs each
  // weight again before the container finds the copy it already holds: a transient of the
  // largest packed matrix (VmHWM while the step session was created, 2026-12-03: +32 MiB for
  // Doge-20M fp32, the lm_head; ~6 MiB for int4). So an fp32 prefill that prepacks, though
  // faster (Doge-20M, 128 tokens: 12-13 vs 17-19 ms), would peak as high as two copies, and the
  // prefill already beats generate()'s time to first token.
  bool step_packs = manifest.quantized || options.packed || batch > 1;
  if (step_packs) check_ort(Ort::GetApi().CreatePrepackedWeightsContainer(&prepacked_));
  Ort::SessionOptions prefill_opts = session_options(options.prefill_threads, manifest.quantized, true);
  Ort::SessionOptions step_opts = session_options(options.step_threads, step_packs, false);
  const std::string& prefill_file = lm_rows_ ? manifest.lm_rows.prefill_file : manifest.prefill_file;
  const std::string& step_file = lm_rows_ ? manifest.lm_rows.step_file : manifest.step_file;
  try {
    prefill_ = std::make_unique<Ort::Session>(env, prefill_file.c_str(), prefill_opts, prepacked_);
    mapped_.release();
    step_ = std::make_unique<Ort::Session>(env, step_file.c_str(), step_opts, prepacked_);
    mapped_.release();  // the step session read them again to find its packed copies
  } catch (const Ort::Exception& e) {
    // graphs another ONNX Runtime saved optimized (its contrib ops and fusions): name both versions
    std::string running = Ort::GetVersionString();
    if (manifest.optimized_by.empty() || manifest.optimized_by == running) throw;
    throw UserError("ONNX Runtime " + running + " cannot load the graphs of " + manifest.folder +
                    ", which ONNX Runtime " + manifest.optimized_by + " saved optimized (" + e.what() +
                    "); use ONNX Runtime >= " + manifest.optimized_by + " or re-export the artifact with this one");
  }
  // the state (zero-filled, all C slots) only now: its bytes and the load's transients (the
  // mapped weights read for packing, the container's repacking) never add up in the peak RSS
  state_.emplace(manifest.info, batch, elem_);
  prefill_binding_ = std::make_unique<Ort::IoBinding>(*prefill_);
  step_binding_ = std::make_unique<Ort::IoBinding>(*step_);
  bind_prefill_outputs();
  if (lm_rows_) prefill_binding_->BindInput(manifest.lm_rows.input.c_str(), lm_rows_value_);
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
  // spinning threads stop when their Run ends: otherwise the idle session's spinning workers
  // take the 2 cores from the other session's next run (a prefill after steps took 22-35 ms
  // instead of 12-18 with 2 spinning threads, Doge-20M; steps unchanged within noise)
  if (options_.spin) opts.AddConfigEntry("session.force_spinning_stop", "1");
  if (!prepack) opts.AddConfigEntry("session.disable_prepacking", "1");
  if (prefill) opts.DisableMemPattern();
  check_ort(Ort::GetApi().AddFreeDimensionOverrideByName(opts, "batch", batch_));
  for (size_t i = 0; i < weight_values_.size(); ++i) opts.AddInitializer(weight_names_[i].c_str(), weight_values_[i]);
  return opts;
}

// weights.bin read once into one aligned block; every tensor of the manifest a view of it,
// registered as a shared initializer of both sessions (§1.4). With the rows-layout graphs the
// tied matrix is left out of that block and held once, transposed: their input (§4).
// Quantized weights are mapped instead: both sessions prepack every matrix (one shared packed
// copy), so after the sessions are built the runtime releases the mapped pages (MappedFile);
// fp32 weights stay read into anonymous memory, which the unpacked kernels stream from huge
// pages (buffer.h).
void Runner::load_weights() {
  const LmRows& rows = manifest_.lm_rows;
  const WeightTensor* tied = nullptr;
  for (const WeightTensor& t : manifest_.tensors)
    if (lm_rows_ && t.name == rows.tensor) tied = &t;
  uint8_t* base = nullptr;
  size_t size = 0;
  if (manifest_.quantized && !tied) {
    mapped_ = MappedFile(manifest_.weights_file);
    base = mapped_.data(), size = mapped_.size();
  } else {
    weights_ = tied ? read_weights(manifest_.weights_file, tied->offset, tied->length)
                    : read_weights(manifest_.weights_file);
    base = weights_.data(), size = weights_.size();
  }
  for (const WeightTensor& t : manifest_.tensors) {
    if (&t == tied) continue;
    uint64_t offset = tied && t.offset >= tied->offset ? t.offset - tied->length : t.offset;
    if (offset + t.length > size)
      throw UserError(manifest_.weights_file + " is shorter than its manifest says; re-export the artifact");
    if (t.gathered && mapped_.data()) mapped_.split_pages(t.offset, t.length);
    weight_names_.push_back(t.name);
    weight_values_.push_back(tensor(base + offset, t.length, t.shape, onnx_type(t.dtype)));
  }
  if (tied) {
    lm_rows_matrix_ = read_transposed(manifest_.weights_file, *tied);
    lm_rows_value_ = tensor(lm_rows_matrix_.data(), lm_rows_matrix_.size(), {tied->shape[1], tied->shape[0]},
                            ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  }
}

// The mapped rows of the gathered tables the runs read since the last call, back to the page
// cache (they fault back in, one page each: split_pages). One call walks every page-sized region
// of the tables (~1 ms for int4 Doge-20M's 1700), hence once per kDropEvery steps.
void Runner::drop_gathered() {
  steps_since_drop_ = 0;
  for (const WeightTensor& t : manifest_.tensors)
    if (t.gathered && mapped_.data()) mapped_.drop(t.offset, t.length);
}

Ort::Value Runner::tensor(void* data, size_t bytes, std::vector<int64_t> shape, ONNXTensorElementDataType type) const {
  return Ort::Value::CreateTensor(cpu_, data, bytes, shape.data(), shape.size(), type);
}

// State tensor `field`.`layer` at width S: [B,G,S,D] (key, value) or [B,G,S] (bias, position),
// the first B*G*S slots of its buffer.
Ort::Value Runner::state_view(const char* field, int64_t layer, int64_t width) const {
  bool position = std::strcmp(field, "position") == 0, kv = !position && std::strcmp(field, "bias") != 0;
  std::vector<int64_t> shape = {batch_, info_.num_kv_heads, width};
  if (kv) shape.push_back(info_.head_dim);
  auto type = position ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : state_type_;
  size_t count = size_t(batch_ * info_.num_kv_heads * width * (kv ? info_.head_dim : 1));
  return tensor(state_->field(field, layer), count * type_size(type), shape, type);
}

// Prefill writes all C slots of every state tensor straight into the state buffers (§3).
void Runner::bind_prefill_outputs() {
  prefill_binding_->BindOutput("logits", cpu_);  // its shape depends on the prompt (full_logits)
  for (int64_t l = 0; l < info_.num_layers; ++l)
    for (const char* f : kFields) {
      prefill_values_.push_back(state_view(f, l, info_.capacity));
      prefill_binding_->BindOutput(layer_name(f, l).c_str(), prefill_values_.back());
    }
}

// The step reads the state's current views (width S) and its id/position buffers, and writes the
// logits and the new rows into buffers bound once. Called again whenever the width changes.
void Runner::bind_step() {
  int64_t G = info_.num_kv_heads, D = info_.head_dim;
  Ort::IoBinding& b = *step_binding_;
  b.ClearBoundInputs();
  b.ClearBoundOutputs();
  step_values_.clear();  // the binding holds its own references to the values it was given
  auto bind = [&](bool input, const std::string& name, Ort::Value value) {
    step_values_.push_back(std::move(value));
    input ? b.BindInput(name.c_str(), step_values_.back()) : b.BindOutput(name.c_str(), step_values_.back());
  };
  auto int64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  bind(true, "input_ids", tensor(step_ids_.data(), step_ids_.size(), {batch_, 1}, int64));
  bind(true, "position_ids", tensor(step_positions_.data(), step_positions_.size(), {batch_, 1}, int64));
  if (lm_rows_) b.BindInput(manifest_.lm_rows.input.c_str(), lm_rows_value_);
  bool float_logits = logits_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // then written where they are returned
  void* logits = float_logits ? static_cast<void*>(logits_.data()) : step_logits_.data();
  size_t logits_bytes = float_logits ? logits_.size() * sizeof(float) : step_logits_.size();
  bind(false, "logits", tensor(logits, logits_bytes, {batch_, info_.vocab_size}, logits_type_));
  for (int64_t l = 0; l < info_.num_layers; ++l) {
    for (const char* f : kFields) bind(true, layer_name(f, l), state_view(f, l, state_->width()));
    const Bytes* row[] = {&rows_.new_key[l], &rows_.new_value[l], &rows_.new_bias[l], &rows_.slot[l]};
    for (int k = 0; k < 4; ++k) {
      std::vector<int64_t> shape = k < 2 ? std::vector<int64_t>{batch_, G, D} : std::vector<int64_t>{batch_, G};
      bind(false, layer_name(kRowFields[k], l), tensor(row[k]->data(), row[k]->size(), shape, k == 3 ? int64 : state_type_));
    }
  }
}

const std::vector<float>& Runner::prefill(const std::vector<int64_t>& ids, const std::vector<int64_t>& mask,
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
  if (steps_since_drop_ > 0) drop_gathered();  // the rows the last generation's steps left
  prefill_->Run(Ort::RunOptions{nullptr}, *prefill_binding_);
  steps_since_drop_ = kDropEvery;  // the first step hands back the rows this prefill read
  state_->after_prefill();
  narrowing_ = options_.attend_filled && manifest_.step_takes_slots;
  if (narrowing_) state_->fit_width();
  bind_step();
  Ort::Value out = std::move(prefill_binding_->GetOutputValues().at(0));
  // logits [B,V], or [B,T,V] with full_logits: each row's last position
  int64_t stride = info_.full_logits ? T * info_.vocab_size : info_.vocab_size;
  int64_t last = info_.full_logits ? (T - 1) * info_.vocab_size : 0;
  const uint8_t* raw = static_cast<const uint8_t*>(out.GetTensorRawData());
  for (int64_t b = 0; b < batch_; ++b)
    to_float(raw + (b * stride + last) * logits_elem_, info_.vocab_size, &logits_[b * info_.vocab_size]);
  return logits_;
}

const std::vector<float>& Runner::step(const std::vector<int64_t>& ids, const std::vector<int64_t>& positions) {
  std::memcpy(step_ids_.data(), ids.data(), step_ids_.size());
  std::memcpy(step_positions_.data(), positions.data(), step_positions_.size());
  step_->Run(Ort::RunOptions{nullptr}, *step_binding_);
  if (++steps_since_drop_ > kDropEvery) drop_gathered();
  state_->write_rows(rows_, step_positions_.as<int64_t>());
  if (narrowing_ && state_->advance()) bind_step();
  if (logits_type_ != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)  // fp32 logits were written into logits_
    to_float(step_logits_.data(), batch_ * info_.vocab_size, logits_.data());
  return logits_;
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
