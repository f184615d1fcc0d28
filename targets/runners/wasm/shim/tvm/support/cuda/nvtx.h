// Minimal tvm/support/cuda/nvtx.h: no profiling ranges in the wasm runtime.
#ifndef ONNXPRUNE_TVM_SUPPORT_NVTX_H_
#define ONNXPRUNE_TVM_SUPPORT_NVTX_H_
#include <string>
namespace tvm {
namespace support {
struct NVTXScopedRange {
  explicit NVTXScopedRange(const std::string&) {}
};
}  // namespace support
}  // namespace tvm
#endif
