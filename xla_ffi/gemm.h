// Integer matmul kernels behind the serving BitLinear and the int8 / int4 lm_head (see layout.h).
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

// The unit of output row groups a task of TernaryGemmI32 should get (a multiple keeps its tiles
// whole; any range is still correct).
int64_t TernaryGroupsPerTask(Isa isa, int64_t rows);

// Int8: acc[m, n] = sum_k x_q[m, k] * w[n, k] for n in [n_begin, n_end), m < rows.
//   x_q int8 [rows, kp], w int8 [N, kp], kp a multiple of kInt8RowAlign (zero-padded); any int8
//   values. x_sum int32 [rows] = sum_k x_q[m, k] (the AVX-512 path multiplies w + 128, an
//   unsigned operand, and takes 128 * x_sum off). acc int32 [rows, n_total].
void Int8GemmI32(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kp, const int8_t* w,
                 int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc);

// Int4 (I4G, layout.h; int4_gemm.cc): dot[m, n] for n in [n_begin, n_end), m < rows, row stride
// n_total, in float32 with one order on every path, so that every path gives the same bits:
//   lane[l] = 0, then for each group g in order lane[l] += float(p[g, l]) * float(w_scale[n, g]),
//             product and sum each rounded (no fused multiply-add), for l = 0 .. 7, where
//             p[g, l] = sum_{j < 4} x_q[m, 32g + 4l + j] * q[n, 32g + 4l + j], exact;
//   dot = ((lane0 + lane4) + (lane2 + lane6)) + ((lane1 + lane5) + (lane3 + lane7)).
//   x_q int8 [rows, kp], kp a multiple of kInt4GroupK (zero-padded; any int8 values);
//   w uint8 [N, kp / 2]; w_scale float16 bits [N, kp / 32].
void Int4GemmF32(Isa isa, const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w,
                 const uint16_t* w_scale, int64_t n_begin, int64_t n_end, int64_t n_total, float* dot);

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_GEMM_H_
