// SHA-256 of a file (FIPS 180-4), to verify an artifact's files against its manifest.
#pragma once
#include <string>

namespace doge {

// Lower-case hex digest of the file's bytes; throws UserError when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace doge
