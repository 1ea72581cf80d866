// The generation loop of docs/runtime-contract.md §5 (greedy or sampling), with per-step timings.
#pragma once
#include <cstdint>
#include <vector>

#include "runner.h"
#include "sampling.h"

namespace doge {

struct GenerateResult {
  std::vector<std::vector<int64_t>> tokens;  // per prompt, up to and including a stop id
  double prefill_ms = 0;
  std::vector<double> step_ms;  // each decode step: the step run and its row write
  std::vector<float> last_logits;  // [B,V]: the logits the last token was chosen from
};

// Refuses (UserError) what the artifact cannot run: empty prompts, ids outside the vocabulary,
// a prompt over max_prompt, prompt + new tokens over max_context.
void check_prompts(const std::vector<std::vector<int64_t>>& prompts, const ModelInfo& info, int64_t max_new_tokens);

struct GenerateConfig {
  int64_t max_new_tokens = 32;
  std::vector<int64_t> stop_ids;  // a row ends with the first of these (finished rows are fed pad, §5)
  SamplingConfig sampling;        // default: greedy
};

GenerateResult generate(Runner& runner, const std::vector<std::vector<int64_t>>& prompts, const GenerateConfig& config);

}  // namespace doge
