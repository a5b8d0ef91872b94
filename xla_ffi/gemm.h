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

// The int4 kernel below keeps 8 float lanes and adds them up last, in this order on every path:
// ((lane0 + lane4) + (lane2 + lane6)) + ((lane1 + lane5) + (lane3 + lane7)).
constexpr int kFloatLanes = 8;
inline float SumFloatLanes(const float lane[kFloatLanes]) {
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

// Int4 (I4G, layout.h; int4_gemm.cc): dot[m, n] for n in [n_begin, n_end), m < rows, row stride
// n_total, in float32 with one order on every path, so that every path gives the same bits:
//   lane[l] = 0, then for each group g in order lane[l] += float(p[g, l]) * float(w_scale[n, g]),
//             product and sum each rounded (no fused multiply-add), for l = 0 .. 7, where
//             p[g, l] = sum_{j < 4} x_q[m, 32g + 4l + j] * q[n, 32g + 4l + j], exact;
//   dot = SumFloatLanes(lane).
//   x_q int8 [rows, kp], kp a multiple of kInt4GroupK (zero-padded; any int8 values);
//   w uint8 [N, kp / 2]; w_scale float16 bits [N, kp / 32].
void Int4GemmF32(Isa isa, const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w,
                 const uint16_t* w_scale, int64_t n_begin, int64_t n_end, int64_t n_total, float* dot);

// Ternary with a float32 scale per output row and group of G consecutive inputs (weight_quant
// 'group:G'; ternary_group_gemm.cc), on TQ2G tiles (layout.h): dot[m, n] for every output n of the
// tiles [t_begin, t_end) with n < n_total, and every m < rows (row stride n_total), in float32
// with one order on every path, so that every path, batch size and thread count gives the same bits:
//   d = 0, then for each input group c = 0 .. groups - 1 in order
//          d = d + float(p[c]) * w_scale[c, n], product and sum each rounded (no fused multiply-add),
//   where p[c] = sum of x_q[m, k] * t[n, k] over the k of group c, exact; dot[m, n] = d.
//   x_q        int8 [rows, kp], kp = TernaryTileKp(K) (zero-padded; any int8 values)
//   group_k    G, a multiple of kTernaryGroupAlign; groups * G <= kp
//   x_group    int32 [groups, rows]: the sum of x_q[m] over group c at [c, m] (TernaryGroupSums)
//   w          TQ2G tiles [CeilDiv(n_total, 16), TernaryTileBytes(kp)], w_scale their scales
//              float32 [CeilDiv(n_total, 16), groups * 16] (layout.h): w_scale[c, n] above is
//              w_scale[n / 16, 16c + n % 16]
// A group is whole 64-input strips of chunks (whole int16 sums on AVX2), hence the alignment.
constexpr int64_t kTernaryGroupAlign = 64;
void TernaryGroupGemmF32(Isa isa, const int8_t* x_q, const int32_t* x_group, int64_t rows, int64_t kp,
                         const uint8_t* w, const float* w_scale, int64_t group_k, int64_t groups, int64_t t_begin,
                         int64_t t_end, int64_t n_total, float* dot);

// x_group of TernaryGroupGemmF32 for activation rows x_q [rows, kp].
void TernaryGroupSums(const int8_t* x_q, int64_t rows, int64_t kp, int64_t group_k, int64_t groups,
                      int32_t* x_group);

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_GEMM_H_
