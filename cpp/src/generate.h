// The generation loop of docs/runtime-contract.md §5 (greedy), with per-step timings.
#pragma once
#include <cstdint>
#include <vector>

#include "runner.h"

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

// Greedy decoding; stop_ids end a row (finished rows are fed pad_token_id, §5).
GenerateResult generate_greedy(Runner& runner, const std::vector<std::vector<int64_t>>& prompts,
                               int64_t max_new_tokens, const std::vector<int64_t>& stop_ids);

}  // namespace doge
