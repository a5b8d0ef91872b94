// What the x86-64 kernel files share: the target attributes of their AVX2 and AVX-512 VNNI
// functions, and the two multiply-add steps written as inline assembly. Include it only where
// BITNET_JAX_X86_SIMD is set (cpu_isa.h).
#ifndef BITNET_JAX_XLA_FFI_X86_SIMD_H_
#define BITNET_JAX_XLA_FFI_X86_SIMD_H_

#include "cpu_isa.h"

#if !BITNET_JAX_X86_SIMD
#error "x86_simd.h is for x86-64 builds (BITNET_JAX_X86_SIMD)"
#endif

// GCC 12's AVX-512 headers build some results from _mm*_undefined_*() and then warn that they
// "may be used uninitialized"; the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define BITNET_AVX2 __attribute__((target("avx2,fma")))
#define BITNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
// 256-bit helpers that functions of both targets inline: GCC inlines only into a caller whose
// target holds the callee's, and the AVX-512 target implies AVX2 but not FMA.
#define BITNET_AVX2_SHARED __attribute__((target("avx2")))

namespace bitnet {

// acc += maddubs(codes, x) in int16 lanes. From the intrinsics GCC emits the add into the
// product's register and a move back to the accumulator, and it loads x into a register first;
// the inline assembly names the accumulator as read-write and lets x be a memory operand, so a
// step is the peak loop's two instructions (machine.cc, PeakAvx2). The assembly's operand is a
// local copy, not `acc` itself: an asm output written through the reference kept GCC from
// turning a caller's array of accumulators into registers (as for Dpbusd below).
BITNET_AVX2 inline void MaddubsAdd(__m256i& acc, __m256i codes, __m256i x) {
  __m256i a = acc, t;
  asm("vpmaddubsw %[x], %[c], %[t]\n\t"
      "vpaddw %[t], %[acc], %[acc]"
      : [acc] "+x"(a), [t] "=&x"(t)
      : [c] "x"(codes), [x] "xm"(x));
  acc = a;
}

// acc += u8 . s8 (4-way dot products into int32 lanes). GCC compiles the intrinsic as if it
// were not destructive: it copies every accumulator before the instruction and spills the
// copies, which halves the inner loop's speed. The inline assembly names the accumulator as
// read-write, through a local copy: with `acc` itself as the output, a caller's array of
// accumulators could stay in memory, loaded and stored at every step (GCC 12's scalar
// replacement skips arrays written by asm through a may_alias reference; the group-scale prefill
// tile ran 3x slower so).
BITNET_AVX512 inline void Dpbusd(__m512i& acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__) && !defined(__clang__)
  __m512i a = acc;
  asm("vpdpbusd %2, %1, %0" : "+v"(a) : "v"(u8), "v"(s8));
  acc = a;
#else
  acc = _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}

// acc += u8 . (the 4 int8 at s8, broadcast to every lane): the broadcast as vpdpbusd's own memory
// operand ({1to16}), one fused uop, where _mm512_set1_epi32 and Dpbusd take a vpbroadcastd more.
// Where each broadcast quad feeds a single vpdpbusd (the transposed group tiles) that is 10% of
// 2 rows' time on an Ice Lake core (benchmarks/RESULTS.md, "Intel Xeon (Ice Lake), sixth session").
BITNET_AVX512 inline void DpbusdBroadcast(__m512i& acc, __m512i u8, const int32_t* s8) {
#if defined(__GNUC__) && !defined(__clang__)
  __m512i a = acc;
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(a) : "v"(u8), "m"(*s8));
  acc = a;
#else
  acc = _mm512_dpbusd_epi32(acc, u8, _mm512_set1_epi32(*s8));
#endif
}

// acc += a . b over pairs of int16 lanes into int32 lanes (vpdpwssd), as inline assembly for the
// reason Dpbusd gives.
BITNET_AVX512 inline void Dpwssd(__m512i& acc, __m512i a, __m512i b) {
#if defined(__GNUC__) && !defined(__clang__)
  __m512i r = acc;
  asm("vpdpwssd %2, %1, %0" : "+v"(r) : "v"(a), "v"(b));
  acc = r;
#else
  acc = _mm512_dpwssd_epi32(acc, a, b);
#endif
}

// acc += a . (the int16 pair at pair, broadcast to every lane), the broadcast as vpdpwssd's memory
// operand ({1to16}) as in DpbusdBroadcast.
BITNET_AVX512 inline void DpwssdBroadcast(__m512i& acc, __m512i a, const int32_t* pair) {
#if defined(__GNUC__) && !defined(__clang__)
  __m512i r = acc;
  asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(r) : "v"(a), "m"(*pair));
  acc = r;
#else
  acc = _mm512_dpwssd_epi32(acc, a, _mm512_set1_epi32(*pair));
#endif
}

// Sum16x16's steps: a register's bits as int32 or float lanes, and two added as such.
template <typename V>
BITNET_AVX512 inline V FromBits16(__m512i v);
template <>
BITNET_AVX512 inline __m512i FromBits16<__m512i>(__m512i v) { return v; }
template <>
BITNET_AVX512 inline __m512 FromBits16<__m512>(__m512i v) { return _mm512_castsi512_ps(v); }
BITNET_AVX512 inline __m512i Bits16(__m512i v) { return v; }
BITNET_AVX512 inline __m512i Bits16(__m512 v) { return _mm512_castps_si512(v); }
BITNET_AVX512 inline __m512i Add16(__m512i x, __m512i y) { return _mm512_add_epi32(x, y); }
BITNET_AVX512 inline __m512 Add16(__m512 x, __m512 y) { return _mm512_add_ps(x, y); }
template <typename V>
BITNET_AVX512 inline V AddBits16(__m512i x, __m512i y) { return Add16(FromBits16<V>(x), FromBits16<V>(y)); }

// Lane i of the result: the sum of the 16 lanes of a[i] (V: __m512i, exact; or __m512, always in
// this order). Three rounds, each halving the vectors and doubling the sums each holds: pairs
// interleaved within 128-bit lanes, then quads within them, then the 128-bit lanes across
// vectors. Forced inline: as a call, a caller's accumulators would pass through memory.
template <typename V>
BITNET_AVX512 __attribute__((always_inline)) inline V Sum16x16(const V* a) {
  V t[8], u[4];
  for (int k = 0; k < 8; ++k) {
    const __m512i x = Bits16(a[2 * k]), y = Bits16(a[2 * k + 1]);
    t[k] = AddBits16<V>(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i x = Bits16(t[2 * k]), y = Bits16(t[2 * k + 1]);
    u[k] = AddBits16<V>(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
  }
  // u[k]'s 128-bit lane L holds lane L's partial sums of a[4k .. 4k + 3]; add the four lanes.
  __m512i w[2];
  for (int k = 0; k < 2; ++k) {
    const __m512i x = Bits16(u[2 * k]), y = Bits16(u[2 * k + 1]);
    w[k] = Bits16(AddBits16<V>(_mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1))));
  }
  return AddBits16<V>(_mm512_shuffle_i32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_i32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// In place: r[i] lane j <- r[j] lane i, for 8 x 8 dwords.
BITNET_AVX2 __attribute__((always_inline)) inline void Transpose8x8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// In place: r[i] lane j <- r[j] lane i, for 16 x 16 dwords (four shuffle stages).
BITNET_AVX512 __attribute__((always_inline)) inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_X86_SIMD_H_
