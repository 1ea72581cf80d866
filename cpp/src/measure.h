// What doge_run reports about its own process: RSS, latency percentiles, ONNX Runtime's set-up.
#pragma once
#include <string>
#include <vector>

#include <onnxruntime/onnxruntime_cxx_api.h>

namespace doge {

double status_mib(const std::string& field);            // VmRSS / VmHWM of this process, MiB
double percentile(std::vector<double> values, double q);  // linear interpolation, q in [0, 1]
void warm_up_library(Ort::Env& env);

}  // namespace doge
