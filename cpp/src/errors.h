// A user error: bad input or a broken artifact. main() prints it as one `error:` line, exit 1.
#pragma once
#include <stdexcept>
#include <string>

namespace doge {

struct UserError : std::runtime_error {
  explicit UserError(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace doge
