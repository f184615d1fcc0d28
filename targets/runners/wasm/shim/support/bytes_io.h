// Minimal src/support/bytes_io.h: Stream over a std::string.
#ifndef ONNXPRUNE_SUPPORT_BYTES_IO_H_
#define ONNXPRUNE_SUPPORT_BYTES_IO_H_
#include <tvm/support/io.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace tvm {
namespace support {
class BytesInStream : public Stream {
 public:
  // Keeps its own copy: callers pass ffi::Bytes, which converts to a temporary std::string.
  explicit BytesInStream(std::string s) : owned_(std::move(s)), data_(owned_.data()), size_(owned_.size()) {}
  BytesInStream(const char* d, size_t n) : owned_(d, n), data_(owned_.data()), size_(owned_.size()) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void* ptr, size_t size) override {
    size_t n = std::min(size, size_ - pos_);
    std::memcpy(ptr, data_ + pos_, n);
    pos_ += n;
    return n;
  }
  size_t Write(const void*, size_t) override { return 0; }

 private:
  std::string owned_;
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};
class BytesOutStream : public Stream {
 public:
  explicit BytesOutStream(std::string* s) : out_(s) {}
  using Stream::Read;
  using Stream::Write;
  size_t Read(void*, size_t) override { return 0; }
  size_t Write(const void* ptr, size_t size) override {
    out_->append(static_cast<const char*>(ptr), size);
    return size;
  }

 private:
  std::string* out_;
};
}  // namespace support
}  // namespace tvm
#endif
