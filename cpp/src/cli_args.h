// doge_run's command line (main.cpp): options -> Args, with one clear UserError per bad value.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runner.h"
#include "sampling.h"

namespace doge {

struct Args {
  std::string folder;
  std::vector<std::vector<int64_t>> prompts;
  int64_t max_new_tokens = 32;
  bool stop = true, verify = true, print_logits = false;
  std::vector<int64_t> stop_ids;  // --stop-id; default: the manifest's eos ids
  SamplingConfig sampling;        // greedy unless --temperature, --top-k or --top-p
  int repeat = 1, warmup = 0;
  bool serve = false;
  int64_t batch = 1;  // --serve: the batch size every request has
  RunnerOptions runner;
};

extern const char* kUsage;

// --help prints kUsage and exits 0; anything else wrong throws UserError.
Args parse_args(int argc, char** argv);

}  // namespace doge
