#include "generate.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "errors.h"

namespace doge {
namespace {

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

void check_prompts(const std::vector<std::vector<int64_t>>& prompts, const ModelInfo& info, int64_t max_new_tokens) {
  if (prompts.empty()) throw UserError("no prompt given; pass --input-ids");
  size_t T = 0;
  for (size_t n = 0; n < prompts.size(); ++n) {
    if (prompts[n].empty()) throw UserError("prompt " + std::to_string(n) + " is empty; give at least one token");
    for (int64_t id : prompts[n])
      if (id < 0 || id >= info.vocab_size)
        throw UserError("prompt " + std::to_string(n) + " has token id " + std::to_string(id) +
                        " outside the vocabulary [0, " + std::to_string(info.vocab_size) + ")");
    T = std::max(T, prompts[n].size());
  }
  if (int64_t(T) > info.max_prompt)
    throw UserError("prompt of " + std::to_string(T) + " tokens is longer than this artifact's max prompt length " +
                    std::to_string(info.max_prompt) + "; shorten it or re-export with a larger --max-prompt");
  if (max_new_tokens < 1) throw UserError("--max-new-tokens must be at least 1");
  if (int64_t(T) + max_new_tokens > info.max_context)
    throw UserError("prompt (" + std::to_string(T) + " tokens) + max new tokens (" + std::to_string(max_new_tokens) +
                    ") exceeds this artifact's max context " + std::to_string(info.max_context));
}

GenerateResult generate(Runner& runner, const std::vector<std::vector<int64_t>>& prompts, const GenerateConfig& config) {
  const int64_t max_new_tokens = config.max_new_tokens;
  const std::vector<int64_t>& stop_ids = config.stop_ids;
  Sampler sampler(config.sampling);
  const ModelInfo& info = runner.state().info();
  int64_t B = int64_t(prompts.size()), V = info.vocab_size, T = 0;
  for (const auto& p : prompts) T = std::max<int64_t>(T, int64_t(p.size()));
  // left padding (§3): ids pad, mask 0, position 0 at padding; positions = cumsum(mask) - 1
  std::vector<int64_t> ids(B * T, info.pad_token_id), mask(B * T, 0), positions(B * T, 0), next(B);
  for (int64_t b = 0; b < B; ++b) {
    int64_t pad = T - int64_t(prompts[b].size());
    for (int64_t t = pad; t < T; ++t) {
      ids[b * T + t] = prompts[b][t - pad];
      mask[b * T + t] = 1;
      positions[b * T + t] = t - pad;
    }
    next[b] = positions[b * T + T - 1] + 1;
  }
  GenerateResult result;
  result.tokens.resize(B);
  auto start = std::chrono::steady_clock::now();
  const std::vector<float>& logits = runner.prefill(ids, mask, positions, T);  // step() refills it
  result.prefill_ms = ms_since(start);
  std::vector<bool> done(B, false);
  std::vector<int64_t> tokens(B);
  for (int64_t n = 0; n < max_new_tokens; ++n) {
    for (int64_t b = 0; b < B; ++b) {
      tokens[b] = done[b] ? info.pad_token_id : sampler.next(&logits[b * V], V);
      if (done[b]) continue;
      result.tokens[b].push_back(tokens[b]);
      done[b] = std::find(stop_ids.begin(), stop_ids.end(), tokens[b]) != stop_ids.end();
    }
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; }) || n == max_new_tokens - 1) break;
    auto step_start = std::chrono::steady_clock::now();
    runner.step(tokens, next);
    result.step_ms.push_back(ms_since(step_start));
    for (int64_t& p : next) ++p;
  }
  result.last_logits = logits;
  return result;
}

}  // namespace doge
