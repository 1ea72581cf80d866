// doge_run: run a doge-export artifact from C++ with ONNX Runtime, following only its manifest
// and docs/runtime-contract.md. Greedy decoding of token-id prompts; prints one JSON object.
//
//   doge_run FOLDER --input-ids 0,5,9 [--input-ids 0,7 ...] [--max-new-tokens 32] [--stop-id N] [--no-stop]
//            [--temperature T] [--top-k K] [--top-p P] [--seed S]
//            [--print-logits] [--packed] [--threads N] [--spin] [--all-slots] [--no-lm-rows] [--no-verify]
//            [--repeat N] [--warmup N]
//   doge_run FOLDER --serve [--batch N] [options]     (one generation per JSON line on stdin)
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "errors.h"
#include "generate.h"
#include "manifest.h"
#include "runner.h"

namespace {

using doge::UserError;

struct Args {
  std::string folder;
  std::vector<std::vector<int64_t>> prompts;
  int64_t max_new_tokens = 32;
  bool stop = true, verify = true, print_logits = false;
  std::vector<int64_t> stop_ids;  // --stop-id; default: the manifest's eos ids
  doge::SamplingConfig sampling;  // greedy unless --temperature, --top-k or --top-p
  int repeat = 1, warmup = 0;
  bool serve = false;
  int64_t batch = 1;  // --serve: the batch size every request has
  doge::RunnerOptions runner;
};

const char* kUsage =
    "usage: doge_run FOLDER --input-ids 0,5,9 [--input-ids ...] [--max-new-tokens N] [--stop-id N]\n"
    "                [--temperature T] [--top-k K] [--top-p P] [--seed S]\n"
    "                [--no-stop] [--print-logits] [--packed] [--threads N] [--spin] [--all-slots] [--no-lm-rows] [--no-verify]\n"
    "                [--repeat N] [--warmup N]\n"
    "       doge_run FOLDER --serve [--batch N] [options]   (one generation per JSON line on stdin)\n";

int64_t parse_int(const std::string& text, const std::string& option) {
  try {
    size_t used = 0;
    long long value = std::stoll(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  throw UserError(option + " takes an integer, got '" + text + "'");
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) ids.push_back(parse_int(item, "--input-ids"));
  return ids;
}

Args parse_args(int argc, char** argv) {
  Args args;
  bool sampling_asked = false, temperature_given = false;
  std::vector<std::string> a(argv + 1, argv + argc);
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string option = a[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= a.size()) throw UserError(option + " needs a value");
      return a[++i];
    };
    if (option == "--help" || option == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else if (option == "--input-ids") {
      args.prompts.push_back(parse_ids(value()));
    } else if (option == "--max-new-tokens") {
      args.max_new_tokens = parse_int(value(), option);
    } else if (option == "--threads") {
      int threads = int(parse_int(value(), option));
      if (threads < 1) throw UserError("--threads must be at least 1");
      args.runner.prefill_threads = args.runner.step_threads = threads;
    } else if (option == "--repeat" || option == "--warmup") {
      bool repeat = option == "--repeat";
      int n = int(parse_int(value(), option));
      if (n < (repeat ? 1 : 0)) throw UserError(option + (repeat ? " must be at least 1" : " must be at least 0"));
      (repeat ? args.repeat : args.warmup) = n;
    } else if (option == "--serve") {
      args.serve = true;
    } else if (option == "--batch") {
      args.batch = parse_int(value(), option);
      if (args.batch < 1) throw UserError("--batch must be at least 1");
    } else if (option == "--packed") {
      args.runner.packed = true;
    } else if (option == "--spin") {
      args.runner.spin = true;
    } else if (option == "--all-slots") {
      args.runner.attend_filled = false;
    } else if (option == "--no-lm-rows") {
      args.runner.lm_rows = false;
    } else if (option == "--no-stop") {
      args.stop = false;
    } else if (option == "--temperature" || option == "--top-p") {
      const std::string& text = value();
      float number;
      try {
        size_t used = 0;
        number = std::stof(text, &used);
        if (used != text.size()) throw std::invalid_argument(text);
      } catch (const std::exception&) {
        throw UserError(option + " takes a number, got '" + text + "'");
      }
      (option == "--top-p" ? args.sampling.top_p : args.sampling.temperature) = number;
      temperature_given |= option == "--temperature";
      sampling_asked = true;
    } else if (option == "--top-k") {
      args.sampling.top_k = parse_int(value(), option);
      sampling_asked = true;
    } else if (option == "--seed") {
      args.sampling.seed = uint64_t(parse_int(value(), option));
    } else if (option == "--stop-id") {
      args.stop_ids.push_back(parse_int(value(), option));
    } else if (option == "--print-logits") {
      args.print_logits = true;
    } else if (option == "--no-verify") {
      args.verify = false;
    } else if (option.rfind("--", 0) == 0) {
      throw UserError("unknown option " + option + " (see --help)");
    } else if (args.folder.empty()) {
      args.folder = a[i];
    } else {
      throw UserError("unexpected argument " + a[i] + " (see --help)");
    }
  }
  if (args.folder.empty()) throw UserError("no artifact folder given (see --help)");
  // as `doge-export generate`: --top-k or --top-p alone sample at temperature 1
  if (sampling_asked && !temperature_given) args.sampling.temperature = 1;
  doge::Sampler check(args.sampling);  // refuses out-of-range values now, before loading
  return args;
}

// VmRSS / VmHWM of this process, MiB
double status_mib(const std::string& field) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / 1024.0;
  return 0;
}

double percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  double at = q * double(values.size() - 1);
  size_t lo = size_t(at);
  size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (values[hi] - values[lo]) * (at - double(lo));
}

// y = Relu(x): one tiny session, so ONNX Runtime's one-time set-up (kernel registry, logging) is
// in the baseline RSS, as in `doge-export bench`: the runtime RSS is what the model adds.
void warm_up_library(Ort::Env& env) {
  static const unsigned char relu[] = {
      0x08, 0x08, 0x12, 0x00, 0x3a, 0x33, 0x0a, 0x0c, 0x0a, 0x01, 0x78, 0x12, 0x01, 0x79, 0x22, 0x04, 0x52,
      0x65, 0x6c, 0x75, 0x12, 0x01, 0x67, 0x5a, 0x0f, 0x0a, 0x01, 0x78, 0x12, 0x0a, 0x0a, 0x08, 0x08, 0x01,
      0x12, 0x04, 0x0a, 0x02, 0x08, 0x01, 0x62, 0x0f, 0x0a, 0x01, 0x79, 0x12, 0x0a, 0x0a, 0x08, 0x08, 0x01,
      0x12, 0x04, 0x0a, 0x02, 0x08, 0x01, 0x42, 0x04, 0x0a, 0x00, 0x10, 0x11};
  Ort::SessionOptions opts;
  Ort::Session session(env, relu, sizeof relu, opts);
}

nlohmann::json sizes(const doge::Manifest& manifest, const doge::Runner& runner) {
  return {{"weights_mib", manifest.data.at("weights").at("bytes").get<double>() / (1 << 20)},
          {"state_mib", double(runner.state().nbytes()) / (1 << 20)}};
}

// --serve: load once, then one greedy generation (no stop id) per line of stdin, one JSON line
// per answer, so that a driver (`doge-export bench`) times the runtime without restarting it.
//   request: {"prompts": [[ids], ...], "max_new_tokens": N}   (batch-many prompts)
//   answer:  {"tokens", "prefill_ms", "step_ms": [...], "peak_rss_mib"}, or {"error": "..."}
int serve(const Args& args) {
  double start = status_mib("VmRSS");
  doge::Manifest manifest = doge::load_manifest(args.folder, args.verify);
  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "doge_run");
  warm_up_library(env);
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

int run(const Args& args) {
  if (args.serve) return serve(args);
  doge::Manifest manifest = doge::load_manifest(args.folder, args.verify);
  std::vector<int64_t> stop = !args.stop ? std::vector<int64_t>{}
                              : args.stop_ids.empty() ? manifest.info.eos_token_ids : args.stop_ids;
  doge::check_prompts(args.prompts, manifest.info, args.max_new_tokens);
  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "doge_run");
  warm_up_library(env);
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
    return run(parse_args(argc, argv));
  } catch (const UserError& e) {
    std::cerr << "error: " << e.what() << std::endl;
  } catch (const Ort::Exception& e) {
    std::cerr << "error: ONNX Runtime: " << e.what() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
  }
  return 1;
}
