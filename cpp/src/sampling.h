// Choosing the next token from a row of logits: greedy, or sampling with temperature, top-k and
// top-p, with the rules of the Python runtime (doge_export/generate.py).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace doge {

struct SamplingConfig {
  float temperature = 0;  // 0: greedy (argmax)
  int64_t top_k = 0;      // 0: off
  float top_p = 1;        // 1: off; else the smallest set of most likely tokens whose mass reaches it
  uint64_t seed = 0;

  bool greedy() const { return temperature <= 0; }
};

// One row of V logits -> a token id. Throws UserError for a temperature < 0, top_k < 0 or
// top_p outside (0, 1].
class Sampler {
 public:
  explicit Sampler(const SamplingConfig& config);
  int64_t next(const float* logits, int64_t V);

 private:
  SamplingConfig config_;
  std::mt19937_64 rng_;
  std::vector<int64_t> order_;  // candidate ids, most likely first (reused: V entries per call)
  std::vector<double> p_;       // their unnormalized probabilities
};

}  // namespace doge
