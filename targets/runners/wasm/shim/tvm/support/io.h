// Minimal tvm/support/io.h for building the TVM runtime to wasm (the apache-tvm wheel does not ship it).
// TVM's binary stream format: a uint64 length before every string / vector, then little-endian values.
#ifndef ONNXPRUNE_TVM_SUPPORT_IO_H_
#define ONNXPRUNE_TVM_SUPPORT_IO_H_
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

class Stream;

template <typename T, typename = void>
struct Serializer {
  static constexpr bool enabled = std::is_trivially_copyable<T>::value;
  static void Write(Stream* strm, const T& v);
  static bool Read(Stream* strm, T* v);
};

class Stream {
 public:
  virtual ~Stream() = default;
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;
  template <typename T>
  void Write(const T& v) { Serializer<T>::Write(this, v); }
  template <typename T>
  bool Read(T* v) { return Serializer<T>::Read(this, v); }
  template <typename T>
  void WriteArray(const T* data, size_t n) { for (size_t i = 0; i < n; ++i) Write(data[i]); }
  template <typename T>
  bool ReadArray(T* data, size_t n) {
    for (size_t i = 0; i < n; ++i) if (!Read(data + i)) return false;
    return true;
  }
};

template <typename T, typename E>
void Serializer<T, E>::Write(Stream* strm, const T& v) { strm->Write(static_cast<const void*>(&v), sizeof(T)); }
template <typename T, typename E>
bool Serializer<T, E>::Read(Stream* strm, T* v) { return strm->Read(static_cast<void*>(v), sizeof(T)) == sizeof(T); }

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::string& v) {
    uint64_t n = v.size();
    s->Write(static_cast<const void*>(&n), sizeof(n));
    if (n) s->Write(static_cast<const void*>(v.data()), n);
  }
  static bool Read(Stream* s, std::string* v) {
    uint64_t n;
    if (s->Read(static_cast<void*>(&n), sizeof(n)) != sizeof(n)) return false;
    v->resize(n);
    return n == 0 || s->Read(static_cast<void*>(&(*v)[0]), n) == n;
  }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::vector<T>& v) {
    uint64_t n = v.size();
    s->Write(static_cast<const void*>(&n), sizeof(n));
    for (const T& x : v) s->Write(x);
  }
  static bool Read(Stream* s, std::vector<T>* v) {
    uint64_t n;
    if (s->Read(static_cast<void*>(&n), sizeof(n)) != sizeof(n)) return false;
    v->resize(n);
    for (uint64_t i = 0; i < n; ++i) if (!s->Read(&(*v)[i])) return false;
    return true;
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::pair<A, B>& v) { s->Write(v.first); s->Write(v.second); }
  static bool Read(Stream* s, std::pair<A, B>* v) { return s->Read(&v->first) && s->Read(&v->second); }
};

}  // namespace support
}  // namespace tvm
#endif
