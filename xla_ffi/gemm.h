// Integer matmul kernels behind the serving BitLinear and the int8 lm_head (see layout.h).
//
// Each kernel has a scalar twin and SIMD versions with the same contract; `isa` picks one (the
// caller gets it from SelectIsa). The results are exact int32 sums, identical on every path.
#ifndef BITNET_JAX_XLA_FFI_GEMM_H_
#define BITNET_JAX_XLA_FFI_GEMM_H_

#include <cstdint>

#include "cpu_isa.h"

namespace bitnet {

// Ternary: acc[m, n] = sum_k x_q[m, k] * t[n, k], for every row n of the row groups
// [g_begin, g_end) with n < n_total, and every m < rows.
//   x_q    int8 [rows, kb * kBlockK], zero-padded past K (any int8 value is allowed)
//   x_sum  int32 [rows], sum_k x_q[m, k]
//   w      packed ternary codes [G, kb * kGroupBlockBytes] (layout.h)
//   acc    int32 [rows, n_total] (row stride n_total)
void TernaryGemmI32(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                    const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total,
                    int32_t* acc);

// Int8: acc[m, n] = sum_k x_q[m, k] * w[n, k] for n in [n_begin, n_end), m < rows.
//   x_q int8 [rows, kp], w int8 [N, kp], kp a multiple of kInt8RowAlign (zero-padded); any int8
//   values. acc int32 [rows, n_total].
// The unit of output row groups a task of TernaryGemmI32 should get (a multiple keeps its tiles
// whole; any range is still correct).
int64_t TernaryGroupsPerTask(Isa isa, int64_t rows);

void Int8GemmI32(Isa isa, const int8_t* x_q, int64_t rows, int64_t kp, const int8_t* w,
                 int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc);

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_GEMM_H_
