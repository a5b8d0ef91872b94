// Small helpers shared by the FFI handlers: error text and shape checks.
#ifndef BITNET_JAX_XLA_FFI_FFI_UTIL_H_
#define BITNET_JAX_XLA_FFI_FFI_UTIL_H_

#include <string>

#include "xla/ffi/api/ffi.h"

namespace bitnet {

inline std::string ShapeString(xla::ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_FFI_UTIL_H_
