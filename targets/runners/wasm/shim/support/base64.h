// Minimal src/support/base64.h: pass-through streams (base64 tensor (de)serialisation is unused here).
#ifndef ONNXPRUNE_SUPPORT_BASE64_H_
#define ONNXPRUNE_SUPPORT_BASE64_H_
#include "bytes_io.h"
namespace tvm {
namespace support {
class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* s) : s_(s) {}
  using Stream::Read;
  using Stream::Write;
  void InitPosition() {}
  size_t Read(void* p, size_t n) override { return s_->Read(p, n); }
  size_t Write(const void*, size_t) override { return 0; }
 private:
  Stream* s_;
};
class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* s) : s_(s) {}
  using Stream::Read;
  using Stream::Write;
  void Finish(char = '\0') {}
  size_t Read(void*, size_t) override { return 0; }
  size_t Write(const void* p, size_t n) override { return s_->Write(p, n); }
 private:
  Stream* s_;
};
}  // namespace support
}  // namespace tvm
#endif
