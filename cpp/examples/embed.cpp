// The smallest embedding of the runtime library (cpp/build/libdoge_runtime.a): load an artifact,
// greedy-decode one prompt, print the ids.   usage: embed FOLDER ID [ID ...]
#include <cstdlib>
#include <iostream>
#include <vector>

#include "generate.h"
#include "manifest.h"
#include "runner.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: embed FOLDER ID [ID ...]\n";
    return 2;
  }
  try {
    doge::Manifest manifest = doge::load_manifest(argv[1], /*verify=*/true);
    std::vector<std::vector<int64_t>> prompts(1);
    for (int i = 2; i < argc; ++i) prompts[0].push_back(std::atoll(argv[i]));
    doge::check_prompts(prompts, manifest.info, 16);
    Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "embed");
    doge::Runner runner(env, manifest, /*batch=*/1, doge::RunnerOptions{});
    doge::GenerateConfig config;  // greedy; set config.sampling for temperature / top-k / top-p
    config.max_new_tokens = 16;
    config.stop_ids = manifest.info.eos_token_ids;
    doge::GenerateResult result = doge::generate(runner, prompts, config);
    for (int64_t id : result.tokens[0]) std::cout << id << ' ';
    std::cout << '\n';
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
