#include "manifest.h"

#include <fstream>
#include <sys/stat.h>

#include "errors.h"
#include "sha256.h"

namespace doge {
namespace {

using nlohmann::json;

const json& field(const json& object, const std::string& key, const std::string& where) {
  if (!object.is_object() || !object.contains(key))
    throw UserError("the manifest has no " + where + "." + key + "; re-export the artifact");
  return object.at(key);
}

// eos_token_id may be one id, a list of ids or null
std::vector<int64_t> id_list(const json& value) {
  if (value.is_null()) return {};
  if (value.is_array()) return value.get<std::vector<int64_t>>();
  return {value.get<int64_t>()};
}

ModelInfo read_info(const json& m) {
  ModelInfo info;
  info.vocab_size = m.at("vocab_size");
  info.num_layers = m.at("num_layers");
  info.num_kv_heads = m.at("num_kv_heads");
  info.head_dim = m.at("head_dim");
  info.capacity = m.at("capacity");
  info.max_prompt = m.at("max_prompt");
  info.max_context = m.at("max_context");
  info.dtype = m.at("dtype");
  info.pad_token_id = m.value("pad_token_id", json()).is_null() ? 0 : m.at("pad_token_id").get<int64_t>();
  info.eos_token_ids = id_list(m.value("eos_token_id", json()));
  info.full_logits = m.value("full_logits", false);
  return info;
}

void verify_files(const Manifest& manifest) {
  for (const auto& [file, entry] : field(manifest.data, "files", "").items()) {
    std::string path = manifest.path(file);
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) throw UserError(path + " is missing; re-export the artifact");
    if (uint64_t(st.st_size) != entry.at("bytes").get<uint64_t>())
      throw UserError(path + " has " + std::to_string(st.st_size) + " bytes, the manifest says " +
                      std::to_string(entry.at("bytes").get<uint64_t>()) + ": the artifact was modified; re-export it");
    if (sha256_file(path) != entry.at("sha256").get<std::string>())
      throw UserError(path + " does not match its sha256 in the manifest: the artifact was modified; re-export it");
  }
}

// The step graph's key.0 input: [batch, G, slots, D] with a symbolic slot dim, or C.
bool symbolic_slots(const json& step) {
  for (const auto& input : step.at("inputs"))
    if (input.at("name") == "key.0") return input.at("shape").at(2).is_string();
  return false;
}

// The lm_rows entry, when the artifact has one and holds the tied matrix it transposes.
LmRows read_lm_rows(const Manifest& manifest) {
  LmRows rows;
  const json& entry = manifest.data.value("lm_rows", json());
  if (!entry.is_object()) return rows;
  for (const WeightTensor& t : manifest.tensors)
    if (t.name == rows.tensor) {
      rows.prefill_file = manifest.path(entry.at("graphs").at("prefill"));
      rows.step_file = manifest.path(entry.at("graphs").at("step"));
      rows.input = entry.at("input").at("name");
      rows.min_batch = entry.at("min_batch");
    }
  return rows;
}

}  // namespace

Manifest load_manifest(const std::string& folder, bool verify) {
  Manifest manifest;
  manifest.folder = folder;
  std::ifstream in(manifest.path("doge_export.json"));
  if (!in) throw UserError(folder + " is not an artifact folder (no doge_export.json); export one with `doge-export onnx`");
  try {
    manifest.data = json::parse(in);
  } catch (const json::exception& e) {
    throw UserError(manifest.path("doge_export.json") + " is not valid JSON (" + e.what() + "); re-export the artifact");
  }
  const json& m = manifest.data;
  if (!m.is_object())
    throw UserError(manifest.path("doge_export.json") + " holds a JSON " + m.type_name() +
                    ", not a manifest (an object); re-export the artifact");
  if (m.value("schema", "") != "doge-export/artifact" || m.value("schema_version", 0) != 1)
    throw UserError(folder + ": not a doge-export artifact of schema version 1");
  try {
    manifest.info = read_info(field(m, "model_info", ""));
    const json& graphs = field(m, "graphs", "");
    manifest.prefill_file = manifest.path(field(graphs, "prefill", "graphs").at("file"));
    manifest.step_file = manifest.path(field(graphs, "step", "graphs").at("file"));
    manifest.step_takes_slots = symbolic_slots(graphs.at("step"));
    const json& weights = field(m, "weights", "");
    manifest.weights_file = manifest.path(weights.at("file"));
    for (const auto& t : weights.at("tensors"))
      manifest.tensors.push_back({t.at("name"), t.at("dtype"), t.at("shape").get<std::vector<int64_t>>(),
                                  t.at("offset"), t.at("length"), t.value("gathered", false)});
    manifest.lm_rows = read_lm_rows(manifest);
    const json& quantization = m.value("quantization", json());
    manifest.quantized = quantization.is_object() && !quantization.value("mode", json()).is_null();
    if (manifest.quantized && quantization.contains("offline_optimization"))
      manifest.optimized_by = quantization.at("offline_optimization").value("onnxruntime", "");
  } catch (const json::exception& e) {
    throw UserError(manifest.path("doge_export.json") + " is incomplete (" + e.what() + "); re-export the artifact");
  }
  if (verify) verify_files(manifest);
  return manifest;
}

}  // namespace doge
