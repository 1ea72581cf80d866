#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "errors.h"

namespace doge {

Sampler::Sampler(const SamplingConfig& config) : config_(config), rng_(config.seed) {
  if (config.temperature < 0) throw UserError("--temperature must be >= 0 (0: greedy)");
  if (config.top_k < 0) throw UserError("--top-k must be >= 0 (0 disables it)");
  if (!(config.top_p > 0 && config.top_p <= 1)) throw UserError("--top-p must be in (0, 1]");
}

int64_t Sampler::next(const float* logits, int64_t V) {
  if (config_.greedy()) return int64_t(std::max_element(logits, logits + V) - logits);
  // candidates, most likely first (ties: the lower id first, as a stable sort does)
  std::vector<int64_t>& order = order_;
  order.resize(size_t(V));
  std::iota(order.begin(), order.end(), 0);
  int64_t keep = config_.top_k > 0 ? std::min(config_.top_k, V) : V;
  auto more_likely = [&](int64_t a, int64_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), more_likely);
  order.resize(size_t(keep));
  // softmax of logits / temperature over the candidates, in double
  std::vector<double>& p = p_;
  p.resize(order.size());
  double top = logits[order[0]] / double(config_.temperature), total = 0;
  for (size_t i = 0; i < order.size(); ++i) total += p[i] = std::exp(logits[order[i]] / double(config_.temperature) - top);
  // top-p: keep the smallest prefix whose mass reaches top_p (at least one token)
  double mass = 0;
  size_t cut = 0;
  while (cut < p.size() && mass < config_.top_p * total) mass += p[cut++];
  p.resize(std::max<size_t>(cut, 1));
  std::discrete_distribution<size_t> pick(p.begin(), p.end());
  return order[pick(rng_)];
}

}  // namespace doge
