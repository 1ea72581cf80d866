#include "cli_args.h"

#include <cstdlib>
#include <iostream>
#include <sstream>

#include "errors.h"

namespace doge {

const char* kUsage =
    "usage: doge_run FOLDER --input-ids 0,5,9 [--input-ids ...] [--max-new-tokens N] [--stop-id N]\n"
    "                [--temperature T] [--top-k K] [--top-p P] [--seed S]\n"
    "                [--no-stop] [--print-logits] [--packed] [--threads N] [--spin] [--all-slots] [--no-lm-rows] [--no-verify]\n"
    "                [--repeat N] [--warmup N]\n"
    "       doge_run FOLDER --serve [--batch N] [options]   (one generation per JSON line on stdin)\n";

namespace {

int64_t parse_int(const std::string& text, const std::string& option) {
  try {
    size_t used = 0;
    long long value = std::stoll(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  throw UserError(option + " takes an integer, got '" + text + "'");
}

float parse_float(const std::string& text, const std::string& option) {
  try {
    size_t used = 0;
    float value = std::stof(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  throw UserError(option + " takes a number, got '" + text + "'");
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) ids.push_back(parse_int(item, "--input-ids"));
  return ids;
}

}  // namespace

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
      (option == "--top-p" ? args.sampling.top_p : args.sampling.temperature) = parse_float(value(), option);
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


}  // namespace doge
