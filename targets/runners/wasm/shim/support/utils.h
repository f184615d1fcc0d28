// Minimal src/support/utils.h.
#ifndef ONNXPRUNE_SUPPORT_UTILS_H_
#define ONNXPRUNE_SUPPORT_UTILS_H_
#include <algorithm>
#include <cctype>
#include <string>
namespace tvm {
namespace support {
inline bool IsNumber(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); });
}
}  // namespace support
}  // namespace tvm
#endif
