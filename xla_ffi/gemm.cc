// Ternary and int8 integer matmul kernels (gemm.h): a scalar twin, AVX2 and AVX-512 VNNI on
// x86-64, NEON with and without the dot-product extension on aarch64. One file per architecture:
//   gemm.cc       the scalar twins and gemm.h's entry points, which take the path `isa` names
//   gemm_x86.cc   AVX2 and AVX-512 VNNI (x86-64 builds)
//   gemm_arm.cc   NEON and NEON dot-product (aarch64 builds)
//   gemm_paths.h  what they share: ForRowTiles and each architecture's entry points
//
// SIMD functions that need more than the baseline ISA carry __attribute__((target(...))), so that
// the library is built for baseline x86-64 (or Armv8.0-A) and still contains the wide paths;
// SelectIsa (cpu_isa.cc) decides at run time which one runs. Other builds compile the scalar twins
// alone (BITNET_JAX_X86_SIMD, BITNET_JAX_ARM_SIMD in cpu_isa.h): the SIMD files compile to nothing.
// Decode (up to 16 activation rows): a row group's weights are unpacked (shift + mask) in
// registers and shared by every activation row of a tile of up to kMaxTileRows, so the kernels
// stream the weights once at memory speed. Prefill (AVX-512, 17 rows and more): 32-row panels are
// unpacked once into vpdpbusd order and multiplied by register-blocked tiles, compute-bound.

#include "gemm.h"

#include "cpu_isa.h"
#include "gemm_paths.h"
#include "layout.h"

namespace bitnet {

namespace {

// ---------------------------------------------------------------------------------------------
// Scalar twins: the layout read literally, one weight at a time.

void TernaryScalar(const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                   const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total,
                   int32_t* acc) {
  const int64_t kp = kb * kBlockK;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint8_t* w_g = w + g * kb * kGroupBlockBytes;
    for (int64_t r = 0; r < kRowsPerGroup; ++r) {
      const int64_t n = g * kRowsPerGroup + r;
      if (n >= n_total) break;
      for (int64_t m = 0; m < rows; ++m) {
        const int8_t* x = x_q + m * kp;
        int32_t sum = 0;
        for (int64_t b = 0; b < kb; ++b) {
          const uint8_t* block = w_g + b * kGroupBlockBytes + r * kBlockBytes;
          for (int64_t k = 0; k < kBlockK; ++k) {
            const int32_t code = (block[CodeByte(k)] >> CodeShift(k)) & 3;
            sum += code * x[b * kBlockK + k];
          }
        }
        acc[m * n_total + n] = sum - x_sum[m];  // t = code - 1
      }
    }
  }
}

void Int8Scalar(const int8_t* x_q, int64_t rows, int64_t kp, const int8_t* w, int64_t n_begin,
                int64_t n_end, int64_t n_total, int32_t* acc) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < rows; ++m) {
      int32_t sum = 0;
      for (int64_t k = 0; k < kp; ++k) sum += int32_t{x_q[m * kp + k]} * int32_t{w[n * kp + k]};
      acc[m * n_total + n] = sum;
    }
  }
}

}  // namespace

// Off x86-64 and aarch64 the scalar twins are the only path: SelectIsa never picks another there
// (AvailableIsas is {kScalar}), and a caller naming one anyway (IsaBuilt is false) gets the same
// exact sums.

#if BITNET_JAX_X86_SIMD
int64_t TernaryGroupsPerTask(Isa isa, int64_t rows) { return TernaryGroupsPerTaskX86(isa, rows); }
#elif BITNET_JAX_ARM_SIMD
int64_t TernaryGroupsPerTask(Isa isa, int64_t rows) { return TernaryGroupsPerTaskArm(isa, rows); }
#else
int64_t TernaryGroupsPerTask(Isa, int64_t) { return 1; }
#endif

void TernaryGemmI32(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                    const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total,
                    int32_t* acc) {
  if (isa == Isa::kScalar || !IsaBuilt(isa)) {
    TernaryScalar(x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
    return;
  }
#if BITNET_JAX_X86_SIMD
  TernaryGemmI32X86(isa, x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
#elif BITNET_JAX_ARM_SIMD
  TernaryGemmI32Arm(isa, x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
#endif
}

void Int8GemmI32(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kp, const int8_t* w,
                 int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc) {
  if (isa == Isa::kScalar || !IsaBuilt(isa)) {
    Int8Scalar(x_q, rows, kp, w, n_begin, n_end, n_total, acc);
    return;
  }
#if BITNET_JAX_X86_SIMD
  Int8GemmI32X86(isa, x_q, x_sum, rows, kp, w, n_begin, n_end, n_total, acc);
#elif BITNET_JAX_ARM_SIMD
  Int8GemmI32Arm(isa, x_q, x_sum, rows, kp, w, n_begin, n_end, n_total, acc);
#endif
}

}  // namespace bitnet
