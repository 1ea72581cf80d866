// doge_run: run a doge-export artifact from C++ with ONNX Runtime, following only its manifest
// and docs/runtime-contract.md. Greedy decoding of token-id prompts; prints one JSON object.
//
//   doge_run FOLDER --input-ids 0,5,9 [--input-ids 0,7 ...] [--max-new-tokens 32] [--stop-id N] [--no-stop]
//            [--temperature T] [--top-k K] [--top-p P] [--seed S]
//            [--print-logits] [--packed] [--threads N] [--spin] [--all-slots] [--no-lm-rows] [--no-verify]
//            [--repeat N] [--warmup N]
//   doge_run FOLDER --serve [--batch N] [options]     (one generation per JSON line on stdin)
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_args.h"
#include "errors.h"
#include "generate.h"
#include "manifest.h"
#include "measure.h"
#include "runner.h"

namespace {

using doge::UserError;
using doge::percentile;
using doge::status_mib;

nlohmann::json sizes(const doge::Manifest& manifest, const doge::Runner& runner) {
  return {{"weights_mib", manifest.data.at("weights").at("bytes").get<double>() / (1 << 20)},
          {"state_mib", double(runner.state().nbytes()) / (1 << 20)}};
}

// --serve: load once, then one greedy generation (no stop id) per line of stdin, one JSON line
// per answer, so that a driver (`doge-export bench`) times the runtime without restarting it.
//   request: {"prompts": [[ids], ...], "max_new_tokens": N}   (batch-many prompts)
//   answer:  {"tokens", "prefill_ms", "step_ms": [...], "peak_rss_mib"}, or {"error": "..."}
int serve(const doge::Args& args) {
  double start = status_mib("VmRSS");
  doge::Manifest manifest = doge::load_manifest(args.folder, args.verify);
  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "doge_run");
  doge::warm_up_library(env);
  double baseline = status_mib("VmRSS");
  doge::Runner runner(env, manifest, args.batch, args.runner);
  nlohmann::json ready = sizes(manifest, runner);
  ready["attend_filled"] = args.runner.attend_filled && manifest.step_takes_slots;
  ready["lm_rows"] = runner.lm_rows();
  ready["rss_mib"] = {{"start", start}, {"baseline", baseline}, {"after_load", status_mib("VmRSS")}};
  std::cout << ready.dump() << std::endl;
  for (std::string line; std::getline(std::cin, line);) {
    nlohmann::json answer;
    try {
      nlohmann::json request = nlohmann::json::parse(line);
      auto prompts = request.at("prompts").get<std::vector<std::vector<int64_t>>>();
      int64_t new_tokens = request.at("max_new_tokens");
      if (int64_t(prompts.size()) != args.batch)
        throw UserError("this server runs batch " + std::to_string(args.batch) + ", got " +
                        std::to_string(prompts.size()) + " prompts");
      doge::check_prompts(prompts, manifest.info, new_tokens);
      doge::GenerateConfig config;
      config.max_new_tokens = new_tokens;
      doge::GenerateResult result = doge::generate(runner, prompts, config);
      answer = {{"tokens", result.tokens}, {"prefill_ms", result.prefill_ms}, {"step_ms", result.step_ms},
                {"peak_rss_mib", status_mib("VmHWM")}};
    } catch (const std::exception& e) {  // a bad request: answered, the server goes on
      answer = {{"error", e.what()}};
    }
    std::cout << answer.dump() << std::endl;
  }
  return 0;
}

int run(const doge::Args& args) {
  if (args.serve) return serve(args);
  doge::Manifest manifest = doge::load_manifest(args.folder, args.verify);
  std::vector<int64_t> stop = !args.stop ? std::vector<int64_t>{}
                              : args.stop_ids.empty() ? manifest.info.eos_token_ids : args.stop_ids;
  doge::check_prompts(args.prompts, manifest.info, args.max_new_tokens);
  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "doge_run");
  doge::warm_up_library(env);
  double baseline = status_mib("VmRSS");
  doge::Runner runner(env, manifest, int64_t(args.prompts.size()), args.runner);
  double after_load = status_mib("VmRSS");
  doge::GenerateResult result;
  std::vector<double> prefill_ms, step_ms;
  for (int r = 0; r < args.warmup + args.repeat; ++r) {
    doge::GenerateConfig config{args.max_new_tokens, stop, args.sampling};
    config.sampling.seed = args.sampling.seed + uint64_t(r);  // each repeat its own draw
    result = doge::generate(runner, args.prompts, config);
    if (r < args.warmup) continue;
    prefill_ms.push_back(result.prefill_ms);
    step_ms.insert(step_ms.end(), result.step_ms.begin(), result.step_ms.end());
  }
  double decode_seconds = 0;
  for (double ms : step_ms) decode_seconds += ms / 1000.0;
  nlohmann::json out = {
      {"tokens", result.tokens},
      {"prefill_ms", percentile(prefill_ms, 0.5)},
      {"step_ms", {{"p50", percentile(step_ms, 0.5)}, {"p90", percentile(step_ms, 0.9)},
                   {"p99", percentile(step_ms, 0.99)}, {"count", step_ms.size()}}},
      {"decode_tok_s", decode_seconds > 0 ? double(step_ms.size() * args.prompts.size()) / decode_seconds : 0.0},
      {"rss_mib", {{"baseline", baseline}, {"after_load", after_load}, {"peak", status_mib("VmHWM")}}},
      {"options", {{"packed", args.runner.packed || manifest.quantized}, {"threads", args.runner.step_threads},
                   {"spin", args.runner.spin}, {"attend_filled", args.runner.attend_filled}, {"lm_rows", runner.lm_rows()},
                   {"sampling", {{"temperature", args.sampling.temperature}, {"top_k", args.sampling.top_k},
                                 {"top_p", args.sampling.top_p}, {"seed", args.sampling.seed}}},
                   {"ort_version", Ort::GetVersionString()}}}};
  out.update(sizes(manifest, runner));
  if (args.print_logits) out["last_logits"] = result.last_logits;  // [B*V], row-major
  std::cout << out.dump() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(doge::parse_args(argc, argv));
  } catch (const UserError& e) {
    std::cerr << "error: " << e.what() << std::endl;
  } catch (const Ort::Exception& e) {
    std::cerr << "error: ONNX Runtime: " << e.what() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
  }
  return 1;
}
