"""Integer serving math: the packed formats, the C++ kernels, and the same math in XLA ops.

`layout` (the 2-bit ternary and int8 packed formats, mirrored by xla_ffi/layout.h), `ffi` (the
XLA FFI custom calls of xla_ffi/), `ops` (ternary and int8 linears in XLA ops or through `ffi`,
tensor-parallel under a mesh, and `serving_backend`, the one rule that picks FFI or XLA). Below
`model/`, whose serving layers call it.
"""
