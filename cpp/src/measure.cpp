#include "measure.h"

#include <algorithm>
#include <fstream>

namespace doge {

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

}  // namespace doge
