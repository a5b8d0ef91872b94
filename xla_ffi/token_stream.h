// Token streams: a decode loop compiled by XLA hands each step's tokens to a Python consumer
// without running Python on XLA's thread (see token_stream.cc).
#ifndef BITNET_JAX_XLA_FFI_TOKEN_STREAM_H_
#define BITNET_JAX_XLA_FFI_TOKEN_STREAM_H_

#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace bitnet {

// The consumer's side, for the nanobind module. Streams are named by an int64 id that the
// program gets as an argument (so one compiled program serves every stream).
void OpenTokenStream(int64_t id);
// Blocks until the stream has a step's tokens (true, into *tokens) or has been finished and
// drained (false). The caller releases the GIL around it.
bool PopTokens(int64_t id, std::vector<int32_t>* tokens);
// The producer (the program) has returned: PopTokens returns false once the queue is empty.
void FinishTokenStream(int64_t id);
// The consumer failed: later pushes make the program fail with `reason`, so it stops early.
void CancelTokenStream(int64_t id, const std::string& reason);
void CloseTokenStream(int64_t id);

}  // namespace bitnet

XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetStreamTokens);

#endif  // BITNET_JAX_XLA_FFI_TOKEN_STREAM_H_
