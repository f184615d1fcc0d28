// Minimal tvm/support/serializer.h (see io.h).
#ifndef ONNXPRUNE_TVM_SUPPORT_SERIALIZER_H_
#define ONNXPRUNE_TVM_SUPPORT_SERIALIZER_H_
#include <tvm/support/io.h>
#endif
